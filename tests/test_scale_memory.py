"""What lets big models start (issue 21): the device chosen per run, the memory knobs and their checks, activation
checkpointing every N blocks, the ZeRO-3 build inside deepspeed.zero.Init (the same weights as an unsharded build,
each rank holding its share), and the rule of `train.compile: auto`."""

from __future__ import annotations

import pytest
import torch

from model.config import ModelConfig
from model.llama import Llama
from tasks.common.config import ConfigError, build
from tasks.common.distributed import World, deepspeed_config, launch_command, resolve_device
from tasks.common.train_config import TrainConfig
from tests.test_pretrain import TEST_TRAIN

CPU_WORLD = World(0, 0, 1, 1, torch.device("cpu"), "gloo")


def train_cfg(**changes) -> TrainConfig:
    return build(TrainConfig, {**TEST_TRAIN, **changes}, "pretrain.train")


# ------------------------------------------------------------------------------------------------ device


def test_device_is_chosen_per_run_and_overridable(monkeypatch, tmp_path):
    monkeypatch.delenv("SCRATCHLM_DEVICE", raising=False)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # what the tests and CI set: auto follows it
    assert resolve_device("auto") == "cpu"
    monkeypatch.setenv("SCRATCHLM_DEVICE", "cpu")  # the variable beats the params
    assert resolve_device("cuda") == "cpu"
    cmd, env = launch_command("tasks.pretrain", train_cfg(device="cuda"), root=tmp_path)
    assert env["DS_ACCELERATOR"] == "cpu" and "OMP_NUM_THREADS" in env  # the ranks get the choice
    monkeypatch.setenv("SCRATCHLM_DEVICE", "tpu")
    with pytest.raises(ConfigError, match=r"SCRATCHLM_DEVICE: must be auto, cpu or cuda, got 'tpu'"):
        resolve_device()
    monkeypatch.delenv("SCRATCHLM_DEVICE")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"train.device: cuda, but this torch .* sees no CUDA device"):
            resolve_device("cuda")


# ------------------------------------------------------------------------------------------------ config


def test_memory_knobs_are_checked_naming_the_key():
    with pytest.raises(ConfigError, match=r"pretrain.train.offload: 'optimizer' offloads ZeRO's partitioned"):
        train_cfg(offload="optimizer")
    with pytest.raises(ConfigError, match=r"pretrain.train.offload: 'all' also offloads the parameters"):
        train_cfg(offload="all", zero_stage=2)
    with pytest.raises(ConfigError, match=r"pretrain.train.activation_checkpointing: must be >= 0"):
        train_cfg(activation_checkpointing=-1)
    with pytest.raises(ConfigError, match=r"pretrain.train.offload: must be one of 'none', 'optimizer', 'all'"):
        train_cfg(offload=False)  # YAML's `off` is false: the knob says none
    with pytest.raises(ConfigError, match=r"pretrain.train.compile.*zero_stage <= 2"):
        train_cfg(compile=True, zero_stage=3)
    assert train_cfg(compile="auto", zero_stage=3).compile == "auto"  # auto decides (off) instead of failing
    with pytest.raises(ConfigError, match=r"pretrain.train.compile"):
        train_cfg(compile="sometimes")
    # none of them changes the trained weights' arithmetic: a run resumes across them
    base = train_cfg().fingerprint_dict()
    assert base == train_cfg(zero_stage=3, offload="all", activation_checkpointing=2).fingerprint_dict() | {
        "zero_stage": 0
    }


def test_deepspeed_config_offloads_what_is_asked():
    world = World(0, 0, 2, 2, torch.device("cpu"), "gloo")
    plain = deepspeed_config(train_cfg(zero_stage=3), world, "fp32")
    assert "offload_optimizer" not in plain["zero_optimization"] and "zero_force_ds_cpu_optimizer" not in plain
    opt = deepspeed_config(train_cfg(zero_stage=2, offload="optimizer"), world, "fp32")["zero_optimization"]
    assert opt["offload_optimizer"]["device"] == "cpu" and "offload_param" not in opt
    full = deepspeed_config(train_cfg(zero_stage=3, offload="all"), world, "bf16")
    assert full["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert full["zero_force_ds_cpu_optimizer"] is False  # torch AdamW stays allowed where CPU Adam cannot build


# ------------------------------------------------------------------------------------------------ checkpointing


@pytest.mark.parametrize("every, checkpointed", [(1, 4), (2, 2), (3, 2)])
def test_checkpointing_every_n_blocks_gives_the_same_loss_and_gradients(monkeypatch, every, checkpointed):
    import model.llama as llama
    from tasks.common.trainer import set_activation_checkpointing

    cfg = ModelConfig.from_preset("tiny", n_layers=4)
    torch.manual_seed(0)
    model = Llama(cfg).train()
    idx = torch.randint(0, cfg.vocab_size, (2, 32))
    _, loss = model(idx, idx)
    loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    calls = []
    real = llama.checkpoint
    monkeypatch.setattr(llama, "checkpoint", lambda block, *a, **k: calls.append(block) or real(block, *a, **k))
    set_activation_checkpointing(model, every)
    _, again = model(idx, idx)
    again.backward()
    assert [model.blocks[i] for i in range(0, 4, every)] == calls and len(calls) == checkpointed
    assert again.item() == loss.item()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=0, atol=1e-6, msg=n)
    model.eval()
    calls.clear()
    model(idx, idx)
    assert not calls  # evaluation and generation never recompute


def test_checkpointing_a_model_without_the_flag_is_an_error():
    from tasks.common.trainer import set_activation_checkpointing

    set_activation_checkpointing(torch.nn.Linear(2, 2), 0)  # off: nothing to set, nothing to say
    with pytest.raises(ConfigError, match=r"train.activation_checkpointing: Linear has no gradient_checkpointing"):
        set_activation_checkpointing(torch.nn.Linear(2, 2), 1)


# ------------------------------------------------------------------------------------------------ ZeRO-3 build


def test_zero3_build_inside_zero_init_has_the_weights_of_a_plain_build():
    """In a world of one the partition is the whole tensor; the 2-rank run (each rank half) is bench/memory.py and
    tests/test_pretrain.py::test_two_ranks_follow_one_rank_with_accumulation[3] (same curve as 1 rank)."""
    import deepspeed

    from tasks.common.distributed import init_distributed
    from tasks.common.trainer import build_for_training, optim_groups

    world = init_distributed()
    cfg = ModelConfig.from_preset("tiny")

    def build_model() -> Llama:
        torch.manual_seed(7)
        return Llama(cfg)

    plain = build_model()
    after_plain = torch.rand(4)
    train = train_cfg(zero_stage=3, batch_size=4, micro_batch_size=4, activation_checkpointing=2)
    sharded = build_for_training(build_model, train, world, deepspeed_config(train, world, "fp32"), False, True)
    assert torch.equal(torch.rand(4), after_plain)  # the replayed init consumed exactly the plain build's draws
    assert sharded.gradient_checkpointing == 2
    params = dict(sharded.named_parameters())
    assert all(hasattr(p, "ds_tensor") and p.numel() == 0 for p in params.values())  # partitioned, data freed
    for name, want in plain.named_parameters():
        with deepspeed.zero.GatheredParameters([params[name]]):
            assert torch.equal(params[name].data, want.data), name
    assert torch.equal(sharded.rope_cos, plain.rope_cos)
    # AdamW's decay split reads the whole shapes, not the 1-D partitions
    split = [[tuple(p.ds_shape) for p in g["params"]] for g in optim_groups(sharded, 0.1)]
    assert split == [[tuple(p.shape) for p in g["params"]] for g in plain.optim_groups(0.1)]


# ------------------------------------------------------------------------------------------------ compile: auto


def recipe(fixed_shapes: bool = True, flops: float = 1e6):
    from tasks.common.trainer import Recipe

    return Recipe(lambda i: None, lambda e, b: None, 64, flops, fixed_shapes=fixed_shapes)


def test_compile_auto_compiles_long_fixed_shape_runs_only():
    from tasks.common.trainer import compile_toolchain_missing, decide_compile

    cfg = train_cfg(compile="auto", peak_flops=1e11)  # peak given: no measurement in the test
    # 1e6 FLOP/token x 8 x 64 tokens/step over 1e11 x 0.2 FLOP/s: 25.6 ms per step of eager training
    on, why = decide_compile(cfg, CPU_WORLD, recipe(), 100, "fp32")
    assert not on and why == (
        "compile: off (auto: a short run: ~3 s eager estimated, saving ~1 s for ~20 s of compiling; pays from ~154 s)"
    )
    on, why = decide_compile(cfg, CPU_WORLD, recipe(), 10_000, "fp32")  # ~256 s eager
    missing = compile_toolchain_missing("cpu")
    assert (on, missing) == (True, "") or (not on and missing in why), why
    if on:
        assert why == "compile: on (auto: ~256 s eager estimated, saving ~66 s for ~20 s of compiling)"
    assert "change shape" in decide_compile(cfg, CPU_WORLD, recipe(fixed_shapes=False), 10**8, "fp32")[1]
    assert "ZeRO-3" in decide_compile(train_cfg(zero_stage=3), CPU_WORLD, recipe(), 10**8, "fp32")[1]
    assert "no FLOP count" in decide_compile(cfg, CPU_WORLD, recipe(flops=0.0), 10**8, "fp32")[1] or missing
    off = decide_compile(train_cfg(compile=False), CPU_WORLD, recipe(), 10**8, "fp32")
    assert off == (False, "compile: off (train.compile: false)")
