"""Shared fixtures: the real corpora beside the checkout, and throwaway copies of the project for DVC/flow tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.sandbox import copy_project  # noqa: F401  (re-exported for the DVC/flow tests)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("SCRATCHLM_PROGRESS", "off")

CONVERSATION = [
    {"role": "system", "content": "You tell short stories."},
    {"role": "user", "content": "Tell me about a cat."},
    {"role": "assistant", "content": "The cat sat in the sun. It was happy."},
    {"role": "user", "content": "And a dog?"},
    {"role": "assistant", "content": "The dog ran to the park!"},
]
"""A two-turn chat with a system prompt, for the chat format (test_tokenizer) and SFT masks (test_alignment)."""


def shared(folder: str) -> Path:
    """A folder of ../shared/data, or skip the test naming it."""
    path = SHARED_DATA / folder
    if not path.is_dir():
        pytest.skip(f"real data folder {path} is absent")
    return path


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    """A fresh SQLite MLflow store for one test: the environment (for subprocesses) and MLflow's process-global
    URI (for `mlflow.search_runs` & co. in the test itself) both point at it, and the global is restored after."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(previous)


def run_in(project: Path, *args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a command in a project copy with this venv's executables first on PATH."""
    full_env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(project),
        **(env or {}),
    }
    return subprocess.run(list(args), cwd=project, env=full_env, capture_output=True, text=True, timeout=timeout)
