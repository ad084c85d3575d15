"""Serving: a real `mlflow models serve -m models:/scratchlm@champion --env-manager local` process on loopback,
started with README.md's own command in a fresh shell (no MLFLOW_TRACKING_URI, .venv not on PATH until activated),
answers README.md's request with the text our pyfunc generates (the registered, promoted tiny model) and a request
of the wrong shape with HTTP 400."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.evaluate_fixtures import registry_project, run_register

pytestmark = pytest.mark.slow
STARTUP_SECONDS = 150
README = ROOT / "README.md"


def readme_command(row: str) -> str:
    """The command README.md's "Using it" table gives for `row` (the first `code` of that row)."""
    for line in README.read_text().splitlines():
        if line.startswith(f"| {row} | `"):
            return line.split("`")[1]
    raise AssertionError(f"README.md has no row {row!r} with a command")


def readme_request() -> dict:
    """The JSON body of README.md's curl example (`-d '...'`)."""
    return json.loads(README.read_text().split("-d '", 1)[1].split("'", 1)[0])


def fresh_shell(command: str) -> list[str]:
    """`command` as pasted into a new shell in the project folder after README's `source .venv/bin/activate`."""
    venv = sys.prefix != sys.base_prefix
    activate = f"source {shlex.quote(str(Path(sys.prefix) / 'bin' / 'activate'))} && " if venv else ""
    return ["bash", "-c", activate + command]


def fresh_env() -> dict[str, str]:
    """A new login's environment: no MLFLOW_* or SCRATCHLM_* variables, the system PATH (plus ours when this Python
    is not a virtual environment, which then has nothing to activate)."""
    keep = {k: os.environ[k] for k in ("HOME", "LANG", "TMPDIR", "OMP_NUM_THREADS") if k in os.environ}
    system = "/usr/local/bin:/usr/bin:/bin"
    return {**keep, "PATH": system if sys.prefix != sys.base_prefix else os.environ["PATH"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, payload: dict, timeout: float = 60) -> dict:
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def refused(url: str, payload: dict) -> tuple[int, dict]:
    """(HTTP status, JSON body) of a request the server must refuse."""
    with pytest.raises(urllib.error.HTTPError) as caught:
        post(url, payload)
    return caught.value.code, json.loads(caught.value.read())


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
    command = readme_command("serve the champion")
    assert command.endswith(" -p 5001") and "MLFLOW_TRACKING_URI=sqlite:///mlruns.db " in command
    with open(log, "w") as out:  # tmp_path is the project folder: mlruns.db is there
        proc = subprocess.Popen(
            fresh_shell(command.replace(" -p 5001", f" -p {port}")),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=fresh_env(),
            cwd=tmp_path,
            start_new_session=True,
        )
    try:
        wait_until_up(f"http://127.0.0.1:{port}/ping", proc, log)
        documented = post(f"http://127.0.0.1:{port}/invocations", {**readme_request(), "params": {"max_new_tokens": 8}})
        assert [sorted(p) for p in documented["predictions"]] == [["text"], ["text"]]
        for wrong in ({"dataframe_records": [{"foo": "bar"}]}, {"dataframe_records": [{"foo": 1}, {"prompt": "x"}]}):
            status, body = refused(f"http://127.0.0.1:{port}/invocations", wrong)
            assert status == 400 and body["error_code"] == "INVALID_PARAMETER_VALUE", body
            assert "needs `messages`" in body["message"] and "or `prompt`" in body["message"]
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
    assert not (tmp_path / "mlflow.db").exists()  # the store README names was used, not MLflow's default
