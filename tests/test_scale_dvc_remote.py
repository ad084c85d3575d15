"""A DVC remote round trip, as docs/SCALE.md ("DVC remote") tells a user: `dvc remote add -d`, `dvc repro`,
commit dvc.lock and the metrics, `dvc push`; then on a fresh `git clone`: `dvc pull` restores every stage's outputs
byte for byte and `dvc status`/`dvc repro` find nothing to run. The remote is a local directory (the same commands
work for s3://, ssh://, gs://, ... remotes). Runs in throwaway copies of the project."""

from __future__ import annotations

import filecmp
import subprocess

import pytest
import yaml

from tests.conftest import copy_project, run_in

pytestmark = pytest.mark.slow

SMALL = {"data": {"builtin": {"n_docs": 300}}}
ENV = {"SCRATCHLM_NO_MLFLOW": "1", "SCRATCHLM_PROGRESS": "off"}
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"{' '.join(proc.args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def same_tree(a, b) -> bool:
    """Every file under a and b has the same bytes (and the same names)."""
    cmp = filecmp.dircmp(a, b)
    if cmp.left_only or cmp.right_only or cmp.funny_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    return not mismatch and not errors and all(same_tree(a / d, b / d) for d in cmp.common_dirs)


def test_push_then_pull_on_a_fresh_clone_restores_every_output_and_leaves_nothing_to_run(tmp_path):
    project = copy_project(tmp_path / "project", SMALL)
    order = list(yaml.safe_load((project / "dvc.yaml").read_text())["stages"])
    stages = [s for s in order if s in ("ingest", "filter", "dedup")]
    last = stages[-1]
    remote = tmp_path / "remote"

    ok(run_in(project, "dvc", "remote", "add", "-d", "storage", str(remote)))
    ran = ok(run_in(project, "dvc", "repro", last, env=ENV))
    assert all(f"Running stage '{s}'" in ran.stdout for s in stages), ran.stdout
    pushed = ok(run_in(project, "dvc", "push"))
    assert "pushed" in pushed.stdout and any((remote / "files" / "md5").rglob("*")), pushed.stdout
    # metrics are `cache: false` outputs: git carries them (and dvc.lock), the remote carries the data
    ok(run_in(project, "git", "add", ".dvc/config", "dvc.lock"))
    ok(run_in(project, "git", "add", "-f", *[f"metrics/{s}.json" for s in stages]))
    ok(run_in(project, *GIT, "commit", "-qm", "pipeline run"))

    clone = tmp_path / "clone"
    ok(run_in(tmp_path, "git", "clone", "-q", str(project), str(clone)))
    assert not (clone / "data").exists()
    # after a full run a plain `dvc pull` does it; this run stopped at the data stages, so name them
    ok(run_in(clone, "dvc", "pull", "--with-deps", last, env=ENV))
    for stage in stages:
        assert same_tree(project / "data" / stage, clone / "data" / stage), f"data/{stage} differs after pull"

    status = ok(run_in(clone, "dvc", "status", "--with-deps", last))
    assert "Data and pipelines are up to date." in status.stdout, status.stdout
    again = ok(run_in(clone, "dvc", "repro", last, env=ENV))
    assert "Running stage" not in again.stdout, again.stdout
    assert all(f"'{s}' didn't change, skipping" in again.stdout for s in stages), again.stdout
