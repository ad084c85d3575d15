"""Serving: a real `mlflow models serve -m models:/scratchlm@champion --env-manager local` process on loopback
answers generation requests with the text our pyfunc generates (the registered, promoted tiny model)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.evaluate_fixtures import registry_project, run_register

pytestmark = pytest.mark.slow
STARTUP_SECONDS = 150


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, payload: dict, timeout: float = 60) -> dict:
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def wait_until_up(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow models serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    pytest.fail(f"mlflow models serve did not answer /ping within {STARTUP_SECONDS}s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    """The server and its uvicorn worker: the whole process group, politely first."""
    if proc.poll() is not None:
        return
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def test_served_champion_answers_generation_requests(tmp_path, monkeypatch):
    import mlflow
    import pandas as pd

    from flows.promote import promote

    root = registry_project(tmp_path, monkeypatch)
    run_register(root)
    assert promote.fn()["promoted"]  # @champion = the registered version

    port = free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                "mlflow",
                "models",
                "serve",
                "-m",
                "models:/scratchlm@champion",
                "--env-manager",
                "local",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
            start_new_session=True,
        )
    try:
        wait_until_up(f"http://127.0.0.1:{port}/ping", proc, log)
        params = {"max_new_tokens": 12, "temperature": 0.8, "top_p": 0.95, "seed": 7}
        rows = [
            {"prompt": "", "messages": [{"role": "user", "content": "Tell me a story about a cat."}]},
            {"prompt": "Once upon a time", "messages": []},
        ]
        answer = post(f"http://127.0.0.1:{port}/invocations", {"dataframe_records": rows, "params": params})
        texts = [p["text"] for p in answer["predictions"]]
        assert len(texts) == 2 and all(isinstance(t, str) and t for t in texts)
        direct = mlflow.pyfunc.load_model("models:/scratchlm@champion").predict(pd.DataFrame(rows), params=params)
        assert texts == [d["text"] for d in direct]  # the server runs our pyfunc: same seed, same text
        chat_only = post(
            f"http://127.0.0.1:{port}/invocations",
            {"dataframe_records": [{"messages": [{"role": "user", "content": "Hi!"}]}]},
        )
        assert isinstance(chat_only["predictions"][0]["text"], str)
    finally:
        stop(proc)
    assert proc.poll() is not None
