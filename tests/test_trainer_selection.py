"""More compute must never give a worse model (issue 21): the shared Trainer exports the best evaluation's weights
(train.keep_best), says which step and why, stops after `early_stop_patience` evaluations without a new best, keeps
the best checkpoint through pruning, and a rerun of a stopped run resumes to the same export without training on."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from tasks.common.checkpoint import Checkpoints, tag_of
from tasks.common.config import ConfigError, build
from tasks.common.train_config import TrainConfig
from tasks.common.trainer import Selection
from tests.test_pretrain import TEST_TRAIN, build_token_data, val_loss_of
from tests.test_trainer import run_stage


def test_selection_counts_evaluations_since_the_best():
    s = Selection("auto")
    assert s.update(5, {"val/loss": 2.0, "val/bpb": 1.0}) and s.metric == "val/loss" and not s.maximise
    assert not s.update(10, {"val/loss": 2.1}) and s.since == 1
    assert not s.update(15, {"val/loss": math.nan}) and s.since == 1  # a non-finite evaluation does not count
    assert s.update(20, {"val/loss": 1.5}) and (s.step, s.value, s.since) == (20, 1.5, 0)
    again = Selection("auto")
    again.load_state_dict(json.loads(json.dumps(s.state_dict())))  # through trainer_state.json
    assert again.state_dict() == s.state_dict()

    rl = Selection("auto")  # ppo's evaluation has no loss: the checker score, higher is better
    assert rl.update(12, {"val/checker": 0.4, "val/response_length": 80.0}) and rl.metric == "val/checker"
    assert rl.maximise and rl.update(24, {"val/checker": 0.5}) and not rl.update(36, {"val/checker": 0.45})
    explicit = Selection("max:response_length")
    assert explicit.update(1, {"val/response_length": 3.0}) and not explicit.update(2, {"val/response_length": 2.0})
    missing = Selection("accuracy")
    assert not missing.update(1, {"val/loss": 1.0}) and missing.metric == "" and missing.step == -1


def test_bad_selection_params_fail_naming_the_key():
    with pytest.raises(ConfigError, match="pretrain.train.early_stop_patience: must be >= 0"):
        build(TrainConfig, {**TEST_TRAIN, "early_stop_patience": -1}, "pretrain.train")
    with pytest.raises(ConfigError, match="pretrain.train.best_metric: must be auto, a metric name"):
        build(TrainConfig, {**TEST_TRAIN, "best_metric": "max:"}, "pretrain.train")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return build_token_data(tmp_path_factory.mktemp("selection-data"), n_docs=400)


def history(root: Path) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    for line in (root / "data" / "pretrain" / "history.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row["step"], {}).update(row)
    return rows


# the validation loss falls step after step here, so "best = highest loss" makes the first evaluation the best one
# and stops the run two evaluations later: the mechanism, without waiting for a real overfit
STOPPING = {"max_steps": 40, "eval_every": 5, "checkpoint_every": 0, "keep_checkpoints": 1}
STOPPING_SELECTION = {"best_metric": "max:loss", "early_stop_patience": 2}


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 1])
def test_a_run_stops_early_and_exports_the_best_evaluations_weights(data_root, tmp_path, monkeypatch, zero_stage):
    from model.hf import load

    root = tmp_path / "run"
    shutil.copytree(data_root / "data", root / "data")
    metrics = run_stage(root, monkeypatch, zero_stage=zero_stage, **STOPPING, **STOPPING_SELECTION)
    rows = history(root)
    assert sorted(s for s, r in rows.items() if "val/loss" in r) == [5, 10, 15]
    assert rows[15]["val/loss"] < rows[5]["val/loss"]
    assert (metrics["steps"], metrics["planned_steps"], metrics["stopped_early"]) == (15, 40, True)
    assert metrics["exported_step"] == 5 and "the best evaluation (val/loss" in metrics["exported_because"]
    assert metrics["val_loss"] == rows[5]["val/loss"] and metrics["last_val_loss"] == rows[15]["val/loss"]
    exported = load(root / "data" / "pretrain" / "model")
    assert val_loss_of(exported, root, 64, 16, 7) == pytest.approx(rows[5]["val/loss"], rel=1e-5)
    # the best checkpoint outlives pruning (keep_checkpoints 1) beside the newest
    folder = next((root / "checkpoints" / "pretrain").iterdir())
    assert Checkpoints(folder).tags() == [tag_of(5), tag_of(15)] and (folder / "latest").read_text() == tag_of(15)

    # a rerun resumes at the stop: no step trained, the same weights exported
    weights = (root / "data" / "pretrain" / "model" / "model.safetensors").read_bytes()
    again = run_stage(root, monkeypatch, zero_stage=zero_stage, **STOPPING, **STOPPING_SELECTION)
    assert (again["resumed_from_step"], again["steps_this_run"], again["exported_step"]) == (15, 0, 5)
    assert (root / "data" / "pretrain" / "model" / "model.safetensors").read_bytes() == weights


@pytest.mark.slow
def test_without_keep_best_the_last_steps_weights_are_exported(data_root, tmp_path, monkeypatch):
    root = tmp_path / "last"
    shutil.copytree(data_root / "data", root / "data")
    metrics = run_stage(root, monkeypatch, keep_best=False, **STOPPING, **STOPPING_SELECTION)
    assert (metrics["steps"], metrics["exported_step"]) == (15, 15)
    assert metrics["exported_because"] == "the last step (train.keep_best is off)"
    assert metrics["val_loss"] == metrics["last_val_loss"] == history(root)[15]["val/loss"]
    # a longer patience lets the same run go on from its stop
    longer = run_stage(root, monkeypatch, keep_best=False, **STOPPING, best_metric="max:loss", early_stop_patience=3)
    assert (longer["resumed_from_step"], longer["steps"], longer["stopped_early"]) == (15, 20, True)
