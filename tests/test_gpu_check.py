"""bench/gpu_check.py's dry path on CPU: the same code paths the GPU check takes (the Trainer on pattern batches
through the engine set-up; the pretrain stage launched on the TinyStories sample), at tiny sizes, one table."""

from __future__ import annotations

import json
import os
import sys

import pytest

from tests.conftest import ROOT, shared

sys.path.insert(0, str(ROOT))
from bench import gpu_check  # noqa: E402


@pytest.fixture(autouse=True)
def _environment_restored():
    """main() sets the device and params variables for the stages it runs; the other tests must not see them."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_packages_it_needs_are_here():
    assert gpu_check.missing_packages() == []
    assert gpu_check.main(["--packages"]) == 0


def test_dry_synthetic_run_trains_and_reports_its_figures(tmp_path, capsys):
    out = tmp_path / "figures.json"
    assert gpu_check.main(["--dry", "--only", "125m", "--work", str(tmp_path / "w"), "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "gpu_check (dry run on CPU (tiny sizes))" in table and "tiny eager: 6 steps x 4 x 64" in table
    eager = json.loads(out.read_text())["figures"]["tiny_eager"]
    assert eager["world"] == 1 and eager["device"] == "cpu" and not eager["compiled"]
    assert eager["last_loss"] < eager["first_loss"] and eager["steady_tokens_per_s"] > 0 and eager["peak_memory"] > 0
    assert len(eager["losses"]) == 6  # log_every 1 at 6 steps: every step logged


def test_pattern_batches_split_a_step_like_pretrain():
    from tasks.common.train_config import BatchIndex

    batches = gpu_check.pattern_batches(vocab=50, seq=8, per_step=4, seed=3)
    x0, y0 = batches(BatchIndex(5, 0, 0, 2, 1, 2))  # rank 0 of 2: examples 0-1
    x1, _ = batches(BatchIndex(5, 0, 1, 2, 1, 2))  # rank 1: examples 2-3
    whole, _ = batches(BatchIndex(5, 0, 0, 1, 1, 4))
    assert x0.shape == (2, 8) and bool((y0 == (x0 + 1) % 50).all())
    assert whole.tolist() == x0.tolist() + x1.tolist()


@pytest.mark.slow
def test_dry_pretrain_stage_on_tinystories(tmp_path, capsys):
    shared("tinystories")
    out = tmp_path / "figures.json"
    assert gpu_check.main(["--dry", "--only", "pretrain", "--work", str(tmp_path / "w"), "--json", str(out)]) == 0
    assert "pretrain stage: 6 steps, tiny, 1 rank" in capsys.readouterr().out
    m = json.loads(out.read_text())["figures"]["pretrain"]
    assert m["steps"] == 6 and m["val_loss"] > 0 and m["tokens_per_s"] > 0
