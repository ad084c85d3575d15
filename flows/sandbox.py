"""A throwaway copy of the project to run the pipeline in: what the DVC/flow tests and bench/tinystories.py use.

    project = copy_project(tmp / "project", {"model": {"preset": "tiny"}})   # git + DVC repo of its own
    subprocess.run(["dvc", "repro", "pretrain"], cwd=project)

The copy holds this checkout's files, tracked and new (not ignored), as a fresh clone of the working tree would,
with `params` deep-merged into its params.yaml and everything committed to a new git repository.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tasks.common.config import ROOT

__all__ = ["copy_project", "deep_merge", "project_env"]


def copy_project(dest: Path, params: dict | None = None, source: Path = ROOT) -> Path:
    """Copy `source`'s tracked and untracked-but-not-ignored files to `dest`, merge `params` into params.yaml, and
    commit the lot in a fresh git repository at `dest`."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=source, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    for rel in filter(None, listed):
        src = source / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    if params:
        merged = deep_merge(yaml.safe_load((dest / "params.yaml").read_text()), params)
        (dest / "params.yaml").write_text(yaml.safe_dump(merged, sort_keys=False))
    for cmd in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=scratchlm", "-c", "user.email=scratchlm@localhost", "commit", "-qm", "copy"],
    ):
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True)
    return dest


def deep_merge(base: dict, extra: dict) -> dict:
    """`base` with `extra` merged in: nested dicts merge key by key, anything else replaces."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def project_env(project: Path) -> dict[str, str]:
    """The environment a stage runs in inside a copy: this interpreter's scripts first on PATH (dvc, deepspeed),
    the copy's modules on PYTHONPATH, MLflow into the copy's own mlruns.db, and (unless already set) the Hub
    offline and tokenizers single-threaded, so nothing reaches the network or this checkout's store."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(project),
        "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlruns.db'}",
    }
    for key, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        env.setdefault(key, value)
    return env
