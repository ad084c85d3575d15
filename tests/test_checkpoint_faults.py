"""Damaged and planted checkpoints (issue 16, items 4 and 7): a resume verifies the newest checkpoint against its
manifest before DeepSpeed opens a file of it, falls back to the newest one that verifies with one line saying which
was skipped and why, starts from scratch when none does, and loads with weights_only=True, so that a planted pickle
never runs, even behind a forged manifest.

One in-process training run (tiny preset, a world of one, checkpoints at steps 5 and 10) is copied, damaged and
rerun by each test; a rerun that falls back to step 5 must end exactly where the undamaged run ended (every logged
loss equal, model.safetensors byte-identical)."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import shutil
from pathlib import Path

import pytest

from tasks.common.checkpoint import MANIFEST, Checkpoints, manifest_files, tag_of
from tasks.common.config import ScratchError
from tests.test_pretrain import build_token_data
from tests.test_trainer import run_stage

TRAIN = {"max_steps": 10, "checkpoint_every": 5, "eval_every": 5, "keep_checkpoints": 2}
MODEL_STATES = "mp_rank_00_model_states.pt"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished run: data/ (tokens, outputs) and checkpoints/ with step_00000005 and step_00000010."""
    root = build_token_data(tmp_path_factory.mktemp("ckpt-faults"), n_docs=400)
    with pytest.MonkeyPatch.context() as mp:
        run_stage(root, mp, **TRAIN)
    assert Checkpoints(folder_of(root)).tags() == [tag_of(5), tag_of(10)]
    return root


def folder_of(root: Path) -> Path:
    (folder,) = (root / "checkpoints" / "pretrain").iterdir()
    return folder


def copy_run(trained: Path, dest: Path) -> tuple[Path, Path]:
    shutil.copytree(trained, dest)
    return dest, folder_of(dest)


def losses(root: Path) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    for line in (root / "data" / "pretrain" / "history.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row["step"], {}).update({k: v for k, v in row.items() if k in ("train/loss", "val/loss")})
    return rows


def weights(root: Path) -> bytes:
    return (root / "data" / "pretrain" / "model" / "model.safetensors").read_bytes()


def truncate(path: Path) -> tuple[int, int]:
    """Cut a file to half its size, as a full disk or a killed copy leaves it; (new size, old size)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return len(data) // 2, len(data)


class Payload:
    """A pickle that creates `marker` when unpickled: what a planted checkpoint file would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def plant(path: Path, marker: Path) -> None:
    """Replace `path` by a pickle payload of exactly its size (torch.load(weights_only=False) runs it at once)."""
    payload = pickle.dumps(Payload(marker), protocol=2)
    size = path.stat().st_size
    assert len(payload) < size
    path.write_bytes(payload + b"\0" * (size - len(payload)))


def one_line(out: str, tag: str) -> str:
    lines = [line for line in out.splitlines() if f"/{tag}: " in line]
    assert len(lines) == 1, out
    return lines[0]


def assert_resumed_exactly(trained: Path, root: Path, metrics: dict, folder: Path) -> None:
    assert metrics["resumed_from_step"] == 5 and metrics["steps_this_run"] == 5
    assert losses(root) == losses(trained)
    assert weights(root) == weights(trained)
    assert (folder / "latest").read_text() == tag_of(10)
    assert Checkpoints(folder).verify(tag_of(10)) is None  # saved anew, into an empty folder


@pytest.mark.slow
def test_truncated_model_states_resume_from_the_previous_checkpoint(trained, tmp_path, monkeypatch, capsys):
    root, folder = copy_run(trained, tmp_path / "run")
    now, was = truncate(folder / tag_of(10) / MODEL_STATES)
    capsys.readouterr()
    metrics = run_stage(root, monkeypatch, **TRAIN)
    line = one_line(capsys.readouterr().out, tag_of(10))
    assert line == (
        f"{folder / tag_of(10)}: {MODEL_STATES} is {now:,} bytes, the manifest says {was:,}; resuming from "
        f"{tag_of(5)} instead (set aside in {folder / 'rejected' / tag_of(10)})"
    )
    assert (folder / "rejected" / tag_of(10) / MODEL_STATES).stat().st_size == now  # kept for a look
    assert_resumed_exactly(trained, root, metrics, folder)


@pytest.mark.slow
def test_truncated_trainer_state_resumes_from_the_previous_checkpoint(trained, tmp_path, monkeypatch, capsys):
    root, folder = copy_run(trained, tmp_path / "run")
    now, was = truncate(folder / tag_of(10) / "trainer_state.json")
    capsys.readouterr()
    metrics = run_stage(root, monkeypatch, **TRAIN)
    line = one_line(capsys.readouterr().out, tag_of(10))
    assert f"{tag_of(10)}: trainer_state.json is {now:,} bytes, the manifest says {was:,}; resuming from" in line
    assert "JSONDecodeError" not in line
    assert_resumed_exactly(trained, root, metrics, folder)


@pytest.mark.slow
def test_planted_file_is_refused_by_its_hash_and_never_runs(trained, tmp_path, monkeypatch, capsys):
    root, folder = copy_run(trained, tmp_path / "run")
    marker = tmp_path / "planted-code-ran"
    plant(folder / tag_of(10) / MODEL_STATES, marker)  # same size: only the sha256 tells it apart
    capsys.readouterr()
    metrics = run_stage(root, monkeypatch, **TRAIN)
    line = one_line(capsys.readouterr().out, tag_of(10))
    assert f"{tag_of(10)}: {MODEL_STATES} does not match its sha256 in the manifest" in line
    assert f"resuming from {tag_of(5)} instead" in line
    assert not marker.exists()
    assert_resumed_exactly(trained, root, metrics, folder)


@pytest.mark.slow
def test_planted_file_behind_a_forged_manifest_is_refused_by_weights_only_loading(trained, tmp_path, monkeypatch):
    root, folder = copy_run(trained, tmp_path / "run")
    marker = tmp_path / "planted-code-ran"
    planted = folder / tag_of(10) / MODEL_STATES
    plant(planted, marker)
    manifest = json.loads((folder / tag_of(10) / MANIFEST).read_text())
    manifest["files"][MODEL_STATES]["sha256"] = hashlib.sha256(planted.read_bytes()).hexdigest()
    (folder / tag_of(10) / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ScratchError, match=rf"{re.escape(str(planted))}: refused to load: .*exec"):
        run_stage(root, monkeypatch, **TRAIN)
    assert not marker.exists()


@pytest.mark.slow
def test_nothing_verifies_starts_from_scratch(trained, tmp_path, monkeypatch, capsys):
    root, folder = copy_run(trained, tmp_path / "run")
    truncate(folder / tag_of(10) / MODEL_STATES)
    (folder / tag_of(5) / MANIFEST).unlink()  # as an older scratchlm wrote it: nothing to verify it against
    capsys.readouterr()
    metrics = run_stage(root, monkeypatch, **TRAIN)
    out = capsys.readouterr().out
    newest, older = one_line(out, tag_of(10)), one_line(out, tag_of(5))
    assert f"{MODEL_STATES} is " in newest and newest.endswith(f"(set aside in {folder / 'rejected' / tag_of(10)})")
    assert f"{tag_of(5)}: has no {MANIFEST} (written by an older scratchlm" in older
    assert "no checkpoint verifies, starting from scratch" in older
    assert metrics["resumed_from_step"] == 0 and metrics["steps_this_run"] == 10
    assert losses(root) == losses(trained) and weights(root) == weights(trained)
    assert sorted(p.name for p in (folder / "rejected").iterdir()) == [tag_of(5), tag_of(10)]


def test_pruning_keeps_latest_and_a_killed_save_with_a_manifest(tmp_path):
    """Without an engine: what save() leaves behind. A save killed after its manifest but before `latest` moved is
    complete, so prepare keeps it (a resume verifies it); one killed before its manifest is dropped."""
    folder = tmp_path / "ck"
    ckpt = Checkpoints(folder, keep=1)
    ckpt.prepare({})
    for step in (5, 10):
        (folder / tag_of(step)).mkdir()
        (folder / tag_of(step) / "trainer_state.json").write_text(json.dumps({"step": step}))
        (folder / tag_of(step) / MANIFEST).write_text("{}")
        (folder / "latest").write_text(tag_of(step))
        ckpt.prune()
    assert ckpt.tags() == [tag_of(10)]  # keep=1 never deletes the checkpoint `latest` names
    for step, manifest in ((15, True), (20, False)):
        (folder / tag_of(step)).mkdir()
        (folder / tag_of(step) / "trainer_state.json").write_text(json.dumps({"step": step}))
        if manifest:
            files = manifest_files(folder / tag_of(step))
            (folder / tag_of(step) / MANIFEST).write_text(json.dumps({"files": files}))
    ckpt.prepare({})
    assert ckpt.tags() == [tag_of(10), tag_of(15)]
    assert ckpt.resume_tag() == tag_of(15) and (folder / "latest").read_text() == tag_of(15)
