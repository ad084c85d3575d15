"""Where the pipeline writes outside its DVC outputs, as the README says, and `make clean` removes all of it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT, copy_project, run_in

NOT_PIPELINE = {  # ignored by git, but the environment's, the tools' or the user's, not what a run writes
    ".venv/",
    "__pycache__/",
    "*.pyc",
    ".pytest_cache/",
    "*.egg-info/",
    ".hypothesis/",
    "/.dvc/tmp",
    "/.dvc/cache",
    "/bench/out/",
    "/infra/.env",
}


def clean_targets() -> set[str]:
    recipe = re.search(r"^clean:.*\n\trm -rf (.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert recipe, "Makefile: no `clean:` target with an `rm -rf` recipe"
    return set(recipe[1].split())


def test_make_clean_removes_every_ignored_output():
    ignored = {ln.strip() for ln in (ROOT / ".gitignore").read_text().splitlines() if ln.strip()}
    ignored = {ln for ln in ignored if not ln.startswith("#")} - NOT_PIPELINE
    removed = clean_targets()
    for entry in ignored:
        top = entry.strip("/").split("/")[0]
        assert top in removed, f".gitignore lists {entry} but `make clean` leaves it"


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_clean_in_a_copy(tmp_path):
    project = copy_project(tmp_path / "project")
    for name in clean_targets():
        path = project / name
        if "." in name and not name.startswith("."):
            path.write_text("x")  # mlruns.db
        else:
            (path / "inner").mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["make", "clean"], cwd=project, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert [n for n in clean_targets() if (project / n).exists()] == []
    assert (project / "params.yaml").is_file() and (project / "tasks" / "pretrain.py").is_file()


def test_the_local_store_keeps_artifacts_in_mlartifacts(tmp_path):
    """The README's store: a fresh project's experiment puts run artifacts under mlartifacts/, not mlruns/."""
    project = copy_project(tmp_path / "project")
    script = (
        "from tasks.common.tracking import setup_mlflow\n"
        "mlflow = setup_mlflow()\n"
        "with mlflow.start_run():\n"
        "    mlflow.log_text('x', 'probe.txt')\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=project,
        env={**env, "PYTHONPATH": str(project)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert list((project / "mlartifacts").rglob("probe.txt")), list(project.glob("mlruns/*/*/artifacts/*"))
    assert not (project / "mlruns").exists()
    assert run_in(project, "git", "status", "--porcelain").stdout == "", "the store is ignored by git"
