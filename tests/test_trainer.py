"""The shared training loop and its pieces, in this process (a DeepSpeed world of one): the LR schedule, the batch
arithmetic and its errors, the data windows, the DeepSpeed config, hostfiles, fingerprints, the checkpoint
pointer and pruning, the NaN guard (checkpoint intact, a rerun resumes) and bf16 on CPU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from tasks.common.checkpoint import Checkpoints, fingerprint, step_of, tag_of
from tasks.common.config import ConfigError, ScratchError, build, load_section
from tasks.common.distributed import World, deepspeed_config, hostfile_slots
from tasks.common.train_config import BatchIndex, TrainConfig
from tasks.common.trainer import TrainingDiverged, check_cpu_compile_toolchain
from tasks.pretrain import TrainWindows, val_window_starts
from tests.test_pretrain import TEST_TRAIN, build_token_data, write_params


def train_cfg(**changes) -> TrainConfig:
    return build(TrainConfig, {**TEST_TRAIN, **changes}, "pretrain.train")


# ------------------------------------------------------------------------------------------------ pure pieces


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    f = [TrainConfig(warmup_steps=10, min_lr_ratio=0.1).lr_factor(s, total=110) for s in range(110)]
    assert f[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert f[10] == 1.0 and f[-1] == pytest.approx(0.1)
    assert f[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 50 / 99)))
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # monotone after the warmup
    assert TrainConfig(warmup_steps=0, min_lr_ratio=0.0).lr_factor(0, total=5) == 1.0


def test_batch_arithmetic_and_budget_errors_name_the_key():
    assert train_cfg(batch_size=32, micro_batch_size=4).grad_accum(world_size=2) == 4
    with pytest.raises(ConfigError, match=r"train.batch_size: 30 examples per step .* multiple of 8 \(e.g. 24 or 32\)"):
        train_cfg(batch_size=30, micro_batch_size=4).grad_accum(world_size=2)
    assert train_cfg(max_steps=0, max_tokens=10_000, batch_size=8).total_steps(tokens_per_example=64) == 20
    with pytest.raises(ConfigError, match="warmup_steps: 3 warmup steps leave nothing of a 2-step budget"):
        train_cfg(max_steps=2).total_steps(64)
    with pytest.raises(ConfigError, match="set exactly one training budget"):
        train_cfg(max_steps=10, max_tokens=10)
    with pytest.raises(ConfigError, match=r"pretrain.train.zero_stage: must be one of 0, 1, 2, 3, got 4"):
        train_cfg(zero_stage=4)
    with pytest.raises(ConfigError, match=r"pretrain.train.lr_max: unknown key"):
        build(TrainConfig, {**TEST_TRAIN, "lr_max": 1.0}, "pretrain.train")


def test_micro_batches_cover_the_same_examples_whatever_the_split():
    def covered(world: int, accum: int) -> list[list[int]]:
        return sorted(list(BatchIndex(0, m, r, world, accum, 4).examples) for m in range(accum) for r in range(world))

    assert covered(1, 4) == covered(2, 2) == covered(4, 1) == [list(range(i, i + 4)) for i in range(0, 16, 4)]


def test_train_windows_are_disjoint_deterministic_and_in_bounds():
    tokens = np.arange(10_000, dtype=np.uint16)
    w = TrainWindows(tokens, seq_len=31, per_step=16, seed=3)
    again = TrainWindows(tokens, seq_len=31, per_step=16, seed=3)
    for step in (0, 1, 57):
        starts = w.starts(step)
        assert np.array_equal(starts, again.starts(step))
        assert starts.min() >= 0 and starts.max() + 32 <= len(tokens)
        spans = sorted(starts)
        assert all(b - a >= 32 for a, b in zip(spans, spans[1:]))  # no two windows share a token
    assert not np.array_equal(w.starts(0), w.starts(1))
    assert not np.array_equal(w.starts(0), TrainWindows(tokens, 31, 16, seed=4).starts(0))
    x, y = w(BatchIndex(5, 1, 0, 1, 2, 8))  # the second half of step 5's windows
    assert x.shape == y.shape == (8, 31) and (y[:, :-1] == x[:, 1:]).all()
    assert x[0, 0].item() == w.starts(5)[8]
    with pytest.raises(ScratchError, match="train.bin: 100 tokens hold 2 disjoint windows"):
        TrainWindows(tokens[:100], seq_len=31, per_step=4, seed=0)


def test_validation_windows_are_fixed_and_use_all_of_a_short_split():
    tokens = np.zeros(1000, dtype=np.uint16)
    a = val_window_starts(tokens, 63, wanted=5, seed=1)
    assert np.array_equal(a, val_window_starts(tokens, 63, wanted=5, seed=1)) and len(a) == 5
    assert list(val_window_starts(tokens, 63, wanted=100, seed=1)) == [i * 64 for i in range(15)]
    with pytest.raises(ScratchError, match="val.bin: 10 tokens, fewer than one window"):
        val_window_starts(tokens[:10], 63, 1, 0)


def test_compile_without_a_cpu_toolchain_fails_naming_the_knob():
    import torch._inductor.config as inductor_config

    try:
        check_cpu_compile_toolchain()
    except ConfigError as e:
        pytest.skip(f"the baseline needs a working toolchain: {e}")
    with (
        inductor_config.patch({"cpp.cxx": ("no-such-c++-compiler",)}),
        pytest.raises(ConfigError, match=r"train.compile: .* needs a C\+\+ compiler .* compile: false"),
    ):
        check_cpu_compile_toolchain()
    check_cpu_compile_toolchain()  # the patch is gone again


def test_deepspeed_config_on_cpu():
    import torch

    world = World(0, 0, 2, 2, torch.device("cpu"), "gloo")
    c = deepspeed_config(train_cfg(zero_stage=2, batch_size=16, micro_batch_size=4, grad_clip=0.5), world, "bf16")
    assert (c["train_batch_size"], c["train_micro_batch_size_per_gpu"], c["gradient_accumulation_steps"]) == (16, 4, 2)
    assert c["zero_optimization"]["stage"] == 2 and c["bf16"]["enabled"] and c["gradient_clipping"] == 0.5
    assert "optimizer" not in c and "torch_autocast" not in c  # the trainer builds torch.optim.AdamW itself
    auto = deepspeed_config(train_cfg(), world, "autocast")
    assert auto["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and not auto["bf16"]["enabled"]


def test_hostfile_errors_name_the_line(tmp_path):
    good = tmp_path / "hosts"
    good.write_text("# two nodes\nnode-a slots=8\nnode-b slots=4  # smaller\n\n")
    assert hostfile_slots(good) == {"node-a": 8, "node-b": 4}
    bad = tmp_path / "bad"
    bad.write_text("node-a slots=8\nnode-b 4\n")
    with pytest.raises(ScratchError, match=r"bad:2: expected `<host> slots=<N>`"):
        hostfile_slots(bad)


def test_fingerprint_ignores_cadence_but_not_what_shapes_the_weights():
    base = train_cfg().fingerprint_dict()
    assert fingerprint({"t": base}) == fingerprint(
        {"t": train_cfg(log_every=7, eval_every=3, resume=False, checkpoint_every=9).fingerprint_dict()}
    )
    assert fingerprint({"t": base}) != fingerprint({"t": train_cfg(lr=1e-4).fingerprint_dict()})
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})


# ------------------------------------------------------------------------------------------------ DeepSpeed runs


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return build_token_data(tmp_path_factory.mktemp("trainer-data"), n_docs=400)


def run_stage(root: Path, monkeypatch, section: dict | None = None, **train) -> dict:
    """tasks.pretrain.run in this process (a world of one), on root's token data."""
    import torch

    from tasks import pretrain
    from tasks.common.dvcio import stage_paths
    from tasks.common.tracking import Tracker

    torch.set_num_threads(1)
    monkeypatch.setenv("SCRATCHLM_PARAMS", str(write_params(root, {**(section or {}), "train": train})))
    monkeypatch.setenv("SCRATCHLM_PROGRESS", "off")
    return pretrain.run(
        load_section("pretrain"), stage_paths("pretrain", root), Tracker("pretrain", None), model=load_section("model")
    )


@pytest.mark.slow
def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(data_root, tmp_path, monkeypatch):
    import shutil

    root = tmp_path / "nan"
    shutil.copytree(data_root / "data", root / "data")
    monkeypatch.setenv("SCRATCHLM_TEST_NAN_STEP", "12")
    with pytest.raises(
        TrainingDiverged,
        match=r"step 12: the loss is not finite on 2 of 2 micro batches .*"
        r"/step_00000010 is kept and a rerun resumes from it",
    ):
        run_stage(root, monkeypatch, max_steps=16)
    folder = next((root / "checkpoints" / "pretrain").iterdir())
    assert (folder / "latest").read_text() == "step_00000010"
    assert not (root / "data" / "pretrain" / "model").exists()
    rows = [json.loads(line) for line in (folder / "history.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)

    monkeypatch.delenv("SCRATCHLM_TEST_NAN_STEP")
    metrics = run_stage(root, monkeypatch, max_steps=16)
    assert metrics["resumed_from_step"] == 10 and metrics["steps_this_run"] == 6
    assert math.isfinite(metrics["val_loss"])


@pytest.mark.slow
def test_bf16_on_cpu_trains_and_exports_fp32_weights(data_root, tmp_path, monkeypatch):
    import shutil

    import torch

    from model.hf import load

    root = tmp_path / "bf16"
    shutil.copytree(data_root / "data", root / "data")
    metrics = run_stage(root, monkeypatch, precision="bf16", zero_stage=1, max_steps=20)
    assert metrics["precision"] == "bf16"
    rows = [json.loads(line) for line in (root / "data/pretrain/history.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.3
    assert all(math.isfinite(r["train/grad_norm"]) for r in rows if "train/grad_norm" in r)
    model = load(root / "data/pretrain/model")
    assert model.tok_emb.weight.dtype == torch.float32
    # ZeRO-1 keeps fp32 master weights: the export carries them, not their bf16 copies
    assert (model.tok_emb.weight != model.tok_emb.weight.bfloat16().float()).any()


def test_checkpoint_pointer_only_moves_to_complete_checkpoints(tmp_path):
    folder = tmp_path / "ck"
    ckpt = Checkpoints(folder, keep=2)
    ckpt.prepare({"what": "test"})
    assert ckpt.latest_tag() is None
    for step in (5, 10, 15):  # what save() leaves behind, without an engine
        (folder / tag_of(step)).mkdir()
        (folder / tag_of(step) / "trainer_state.json").write_text(json.dumps({"step": step}))
        (folder / "latest").write_text(tag_of(step))
        ckpt.prune()
    assert ckpt.tags() == ["step_00000010", "step_00000015"] and ckpt.latest_tag() == "step_00000015"
    (folder / tag_of(20)).mkdir()  # a save killed before `latest` moved
    ckpt.prepare({"what": "test"})
    assert ckpt.tags() == ["step_00000010", "step_00000015"] and step_of(ckpt.latest_tag()) == 15
    (folder / "latest").write_text(tag_of(25))
    with pytest.raises(ScratchError, match="not a complete checkpoint"):
        ckpt.latest_tag()


def test_launch_command_local_and_multi_node(tmp_path, monkeypatch):
    from tasks.common.distributed import WORKER_FLAG, launch_command, planned_world_size

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("SCRATCHLM_PARENT_RUN_ID", "abc")
    cmd, env = launch_command("tasks.pretrain", train_cfg(ranks=2), root=tmp_path)
    assert cmd[2:5] == ["-m", "deepspeed.launcher.runner", "--log_level"]
    assert cmd[cmd.index("--num_gpus") + 1] == "2" and cmd[-3:] == ["--module", "tasks.pretrain", WORKER_FLAG]
    assert "--no_local_rank" in cmd and int(cmd[cmd.index("--master_port") + 1]) > 0
    assert env["DS_ACCELERATOR"] == "cpu" and env["PYTHONPATH"].split(":")[0] == str(tmp_path)
    assert "DS_ENV_FILE" not in env

    (tmp_path / "hosts").write_text("node-a slots=2\nnode-b slots=2\n")
    multi = train_cfg(hostfile="hosts", batch_size=16)
    assert planned_world_size(multi, tmp_path) == 4 and multi.grad_accum(4) == 1
    cmd, env = launch_command("tasks.pretrain", multi, root=tmp_path)
    assert cmd[cmd.index("--hostfile") + 1] == str(tmp_path / "hosts") and "--num_gpus" not in cmd
    forwarded = Path(env["DS_ENV_FILE"]).read_text().splitlines()
    assert "SCRATCHLM_PARENT_RUN_ID=abc" in forwarded and "DS_ACCELERATOR=cpu" in forwarded
