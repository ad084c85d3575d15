"""The pretrain stage as a user runs it (`python -m tasks.pretrain` → the deepspeed launcher → ranks), on token files
made from the builtin corpus by the real tokenizer and pretokenize stages, with the tiny preset:
a SIGKILLed run resumes to the very same losses, 2 ranks (ZeRO-2, ZeRO-3) follow 1 rank with 2x accumulation,
the consolidated weights are the trained ones and load into model/ and transformers, MLflow has the curves, and
impossible params fail before any rank starts.

The helpers here are shared by tests/test_trainer.py and tests/test_pretrain_quality.py."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from flows.sandbox import deep_merge
from tests.conftest import ROOT

TEST_TRAIN = {  # a few seconds of the tiny preset; tests override what they exercise
    "ranks": 1,
    "hostfile": "",
    "zero_stage": 0,
    "precision": "fp32",
    "batch_size": 8,
    "micro_batch_size": 4,
    "max_steps": 30,
    "max_tokens": 0,
    "lr": 3.0e-3,
    "min_lr_ratio": 0.1,
    "warmup_steps": 3,
    "weight_decay": 0.1,
    "beta1": 0.9,
    "beta2": 0.95,
    "eps": 1.0e-8,
    "grad_clip": 1.0,
    "seed": 7,
    "log_every": 2,
    "eval_every": 10,
    "checkpoint_every": 5,
    "keep_checkpoints": 2,
    "peak_flops": 1.0e11,
    "resume": True,
}
TEST_PRETRAIN = {
    "seq_len": 64,
    "val_windows": 16,
    "samples": {"openings": ["Once upon a time"], "max_new_tokens": 16, "temperature": 0.8, "top_k": 20},
    "train": TEST_TRAIN,
}


def write_params(root: Path, pretrain: dict | None = None, preset: str = "tiny", vocab: int = 512) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"] = {"preset": preset, "overrides": {}}
    params["tokenizer"].update({"vocab_size": vocab, "val_fraction": 0.1})
    params["data"]["parallel"]["workers"] = 1
    params["pretrain"] = deep_merge(TEST_PRETRAIN, pretrain or {})
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def build_token_data(root: Path, n_docs: int = 800, vocab: int = 512, seed: int = 11) -> Path:
    """data/dedup (clean builtin stories) → the real tokenizer and pretokenize stages → data/{tokenizer,pretokenize}."""
    from tasks import pretokenize, tokenizer
    from tasks.common.config import load_section
    from tasks.common.dvcio import shard_name, stage_paths, write_jsonl_gz
    from tasks.common.stage import sections_for
    from tasks.common.tracking import Tracker
    from tasks.sources import builtin

    docs = [
        {"id": d.id, "text": d.text, "source": "builtin:stories"}
        for d in builtin.generate_corpus(n_docs, seed, 0.0, 0.0, 0.0)
    ]
    (root / "data" / "dedup").mkdir(parents=True, exist_ok=True)
    half = len(docs) // 2
    write_jsonl_gz(root / "data" / "dedup" / shard_name(0), docs[:half])
    write_jsonl_gz(root / "data" / "dedup" / shard_name(1), docs[half:])
    params = write_params(root, vocab=vocab)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCRATCHLM_PARAMS", str(params))
        mp.setenv("SCRATCHLM_NO_MLFLOW", "1")
        for stage in (tokenizer, pretokenize):
            name = stage.__name__.rsplit(".", 1)[1]
            stage.run(load_section(name), stage_paths(name, root), Tracker(name, None), **sections_for(stage.run))
    return root


def make_project(dest: Path, data_from: Path, pretrain: dict | None = None, preset: str = "tiny") -> Path:
    """A runnable copy of the code (tasks/, model/) beside a copy of the token data, with test params."""
    dest.mkdir(parents=True, exist_ok=True)
    for folder in ("tasks", "model"):
        shutil.copytree(ROOT / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for stage in ("tokenizer", "pretokenize"):
        shutil.copytree(data_from / "data" / stage, dest / "data" / stage)
    write_params(dest, pretrain, preset=preset)
    return dest


def stage_env(project: Path, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(project),
        "SCRATCHLM_PARAMS": str(project / "params.yaml"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlruns.db'}",
        "SCRATCHLM_PROGRESS": "off",
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        **extra,
    }
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_PORT"):
        env.pop(name, None)  # a test process that ran DeepSpeed in-process must not pass its rank on
    return env


def start_pretrain(project: Path, **extra: str) -> subprocess.Popen:
    """`python -m tasks.pretrain` (the launcher, which execs deepspeed) in its own process group."""
    return subprocess.Popen(
        [sys.executable, "-m", "tasks.pretrain"],
        cwd=project,
        env=stage_env(project, **extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def run_pretrain(project: Path, timeout: int = 300, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tasks.pretrain"],
        cwd=project,
        env=stage_env(project, **extra),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def history(project: Path) -> dict[int, dict]:
    """data/pretrain/history.jsonl as step → merged row (train and val rows of one step together)."""
    rows: dict[int, dict] = {}
    for line in (project / "data" / "pretrain" / "history.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row["step"], {}).update(row)
    return rows


def checkpoint_folder(project: Path) -> Path:
    folders = sorted((project / "checkpoints" / "pretrain").iterdir())
    assert len(folders) == 1, folders
    return folders[0]


def unigram_entropy_nats(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats per token) of the token frequencies: the loss of the best model that ignores context."""
    counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def val_loss_of(model, project: Path, seq_len: int, n_windows: int, seed: int) -> float:
    """Mean next-token loss of `model` on the stage's validation rows (whole documents, attention within each),
    recomputed outside the stage."""
    import torch

    from tasks.pretrain import PretrainConfig, load_tokens, row_batch, val_rows

    data = load_tokens(project / "data" / "pretokenize")
    rows, filled = val_rows(data, PretrainConfig(seq_len=seq_len, val_windows=n_windows), seed)
    x, y, doc = row_batch(rows, filled, data.eot_id, document_mask=True)
    with torch.no_grad():
        _, loss = model(x, y, doc_ids=doc)
    return loss.item()


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def token_data(tmp_path_factory) -> Path:
    return build_token_data(tmp_path_factory.mktemp("pretrain-data"))


@pytest.fixture(scope="module")
def reference(token_data, tmp_path_factory) -> Path:
    """The uninterrupted run every other run is compared with: 1 rank, fp32, 2x accumulation, MLflow on."""
    project = make_project(tmp_path_factory.mktemp("reference"), token_data)
    done = run_pretrain(project)
    assert done.returncode == 0, done.stdout + done.stderr
    return project


# ------------------------------------------------------------------------------------------------ tests


@pytest.mark.slow
def test_stage_trains_logs_and_exports_the_trained_weights(reference):
    import torch
    from transformers import LlamaForCausalLM

    from model.hf import load

    metrics = json.loads((reference / "metrics" / "all" / "pretrain.json").read_text())
    assert metrics["steps"] == 30 and metrics["grad_accum"] == 2 and metrics["world_size"] == 1
    rows = history(reference)
    assert sorted(s for s, r in rows.items() if "train/loss" in r) == list(range(2, 31, 2))
    assert sorted(s for s, r in rows.items() if "val/loss" in r) == [10, 20, 30]
    assert rows[30]["train/loss"] < rows[2]["train/loss"] - 0.3
    assert rows[30]["val/loss"] < rows[10]["val/loss"]
    for key in ("train/lr", "train/grad_norm", "train/tokens_per_s", "train/mfu", "val/bpb"):
        assert key in rows[30] and math.isfinite(rows[30][key]) and rows[30][key] > 0, key
    assert rows[30]["train/lr"] == pytest.approx(3e-3 * 0.1)  # the cosine ends at lr x min_lr_ratio

    # the consolidated weights are the trained ones: the same validation loss, from our Llama and from HF's
    model_dir = reference / "data" / "pretrain" / "model"
    ours = load(model_dir)
    assert val_loss_of(ours, reference, 64, 16, 7) == pytest.approx(metrics["val_loss"], rel=1e-5)
    hf = LlamaForCausalLM.from_pretrained(str(model_dir)).eval()
    idx = torch.randint(0, ours.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx, all_logits=True)[0], rtol=1e-4, atol=1e-4)
    assert (model_dir / "tokenizer.json").is_file() and (reference / "data/pretrain/samples.txt").read_text()
    assert len(hf.generation_config.eos_token_id) == 2  # <|end|> and <|endoftext|>
    card = (model_dir / "README.md").read_text()
    assert "# scratchlm pretrain model" in card and "base: none (randomly initialised" in card
    assert "| `val_loss` |" in card and "| `pretrain.seq_len` |" in card

    # checkpoints live outside the DVC out; only the newest keep_checkpoints stay
    folder = checkpoint_folder(reference)
    assert (folder / "latest").read_text() == "step_00000030"
    assert sorted(p.name for p in folder.glob("step_*")) == ["step_00000025", "step_00000030"]

    # MLflow: the curves, the samples
    client = mlflow_client(reference)
    run = client.get_run(metrics_run_id(reference))
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 15
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/bpb")] == [10, 20, 30]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert "samples/step_00000010.txt" in artifacts and "samples/final.txt" in artifacts


def mlflow_client(project: Path):
    """A client on the project's own store (never the process-global URI another test may have set)."""
    import mlflow

    return mlflow.MlflowClient(f"sqlite:///{project / 'mlruns.db'}")


def metrics_run_id(project: Path) -> str:
    client = mlflow_client(project)
    experiment = client.get_experiment_by_name("scratchlm")
    runs = client.search_runs([experiment.experiment_id], filter_string="attributes.run_name = 'pretrain'")
    assert len(runs) == 1
    return runs[0].info.run_id


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_same_losses(reference, token_data, tmp_path):
    project = make_project(tmp_path / "killed", token_data)
    proc = start_pretrain(project, SCRATCHLM_NO_MLFLOW="1", SCRATCHLM_TEST_HANG_STEP="13")
    deadline = time.monotonic() + 240
    try:
        while not _logged_step(project, 12):  # checkpoint 10 written, steps 11-13 done and about to be lost
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the run never reached step 12"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert (checkpoint_folder(project) / "latest").read_text() == "step_00000010"
    assert not (project / "metrics" / "all" / "pretrain.json").exists()

    rerun = run_pretrain(project, SCRATCHLM_NO_MLFLOW="1")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "resumed from step 10" in rerun.stdout
    assert json.loads((project / "metrics" / "all" / "pretrain.json").read_text())["resumed_from_step"] == 10
    want, got = history(reference), history(project)
    assert sorted(got) == sorted(want)
    for step in got:  # bitwise: one fp32 rank, same data, same optimizer and scheduler state
        for key in ("train/loss", "train/lr", "val/loss"):
            assert got[step].get(key) == want[step].get(key), (step, key)


def _logged_step(project: Path, step: int) -> bool:
    files = list((project / "checkpoints" / "pretrain").glob("*/history.jsonl"))
    return bool(files) and any(json.loads(line)["step"] >= step for line in files[0].read_text().splitlines())


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_ranks_follow_one_rank_with_accumulation(reference, token_data, tmp_path, zero_stage):
    from model.hf import load

    project = make_project(
        tmp_path / f"zero{zero_stage}", token_data, {"train": {"ranks": 2, "zero_stage": zero_stage}}
    )
    done = run_pretrain(project, SCRATCHLM_NO_MLFLOW="1")
    assert done.returncode == 0, done.stdout + done.stderr
    metrics = json.loads((project / "metrics" / "all" / "pretrain.json").read_text())
    assert (metrics["world_size"], metrics["grad_accum"], metrics["zero_stage"]) == (2, 1, zero_stage)
    want, got = history(reference), history(project)
    assert sorted(got) == sorted(want)
    for step in got:
        for key in ("train/loss", "val/loss"):
            if key in want[step]:
                assert got[step][key] == pytest.approx(want[step][key], rel=1e-4), (step, key)
    # the ZeRO partitions were gathered into the exported weights
    assert val_loss_of(load(project / "data/pretrain/model"), project, 64, 16, 7) == pytest.approx(
        metrics["val_loss"], rel=1e-5
    )


def test_impossible_batch_split_fails_before_any_rank_starts(token_data, tmp_path):
    project = make_project(tmp_path / "bad", token_data, {"train": {"ranks": 2, "batch_size": 10}})
    done = run_pretrain(project, timeout=120)
    assert done.returncode == 2
    assert "error: pretrain: train.batch_size: 10 examples per step is not micro_batch_size (4)" in done.stderr
    assert "multiple of 8" in done.stderr and "launching" not in done.stdout


def test_context_longer_than_the_model_fails_naming_the_key(token_data, tmp_path):
    project = make_project(tmp_path / "long", token_data, {"seq_len": 512})
    done = run_pretrain(project, timeout=120)
    assert done.returncode == 2 and "pretrain.seq_len: 512 is longer than the model's max_seq_len (128)" in done.stderr


@pytest.mark.slow
def test_compiled_run_follows_the_eager_run(reference, token_data, tmp_path):
    from tasks.common.config import ConfigError
    from tasks.common.trainer import check_cpu_compile_toolchain

    try:
        check_cpu_compile_toolchain()
    except ConfigError as e:
        pytest.skip(str(e))
    project = make_project(tmp_path / "compiled", token_data, {"train": {"compile": True}})
    done = run_pretrain(project, SCRATCHLM_NO_MLFLOW="1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ZeRO 0, fp32, compiled" in done.stdout
    metrics = json.loads((project / "metrics" / "all" / "pretrain.json").read_text())
    assert metrics["compiled"] is True and metrics["steps"] == 30
    want, got = history(reference), history(project)
    assert sorted(got) == sorted(want)
    for step in got:  # the same math; inductor's fused kernels only reorder float32 sums
        for key in ("train/loss", "val/loss"):
            if key in want[step]:
                assert got[step][key] == pytest.approx(want[step][key], rel=1e-3), (step, key)


def test_compile_with_zero3_fails_before_any_rank_starts(token_data, tmp_path):
    project = make_project(tmp_path / "compile3", token_data, {"train": {"compile": True, "zero_stage": 3}})
    done = run_pretrain(project, timeout=120)
    assert done.returncode == 2 and "train.compile" in done.stderr and "zero_stage <= 2" in done.stderr
