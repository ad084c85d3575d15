"""Fault injection, tracking server down (issue 16, item 5): an http(s) MLFLOW_TRACKING_URI that does not answer is
one `error: <stage>: ...` line naming the URI within seconds and exit 2, before the stage touches anything, instead of
MLflow's minutes of retries and a traceback. The probe itself (tasks/common/tracking.py: check_server) against a
closed port, a server that accepts but never answers, a proxy answering 503, and a server that answers."""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasks.common import tracking
from tasks.common.config import ScratchError
from tests.conftest import copy_project, run_in


def free_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def digest(folder: Path) -> dict[str, str]:
    return {
        str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest() for f in folder.rglob("*") if f.is_file()
    }


@pytest.fixture(autouse=True)
def fresh_probe_cache(monkeypatch):
    monkeypatch.setattr(tracking, "_answered", set())


@pytest.fixture
def answering(request) -> Iterator[str]:
    """An HTTP server on loopback answering every GET with the status given by the test's parameter."""
    status = request.param

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.slow
def test_a_stage_with_the_server_down_fails_in_seconds_with_one_line(tmp_path):
    project = copy_project(tmp_path / "project")
    # the last good output of ingest, which a refused run must leave as it was
    (project / "data" / "ingest").mkdir(parents=True)
    (project / "data" / "ingest" / "shard-00000.jsonl.gz").write_bytes(b"previous good shard")
    (project / "metrics").mkdir(exist_ok=True)
    (project / "metrics" / "ingest.json").write_text('{"docs_out": 300}\n')
    before = {**digest(project / "data"), **digest(project / "metrics")}
    params = (project / "params.yaml").read_bytes()
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    proc = run_in(project, "python", "-m", "tasks.ingest", env={"MLFLOW_TRACKING_URI": uri}, timeout=60)
    seconds = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("error:")]
    assert errors == [
        f"error: ingest: MLflow tracking server {uri} is unreachable (connection refused); start it (mlflow server "
        f"--host 127.0.0.1 --port {uri.rsplit(':', 1)[1]}) or unset MLFLOW_TRACKING_URI to use the local SQLite store"
    ]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert seconds < 15, f"took {seconds:.1f} s"
    assert {**digest(project / "data"), **digest(project / "metrics")} == before
    assert (project / "params.yaml").read_bytes() == params
    assert not (project / "mlruns.db").exists()  # nothing fell back to the local store either


def test_setup_mlflow_and_stage_run_refuse_a_closed_port_before_any_run(monkeypatch):
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("SCRATCHLM_NO_MLFLOW", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    started = time.monotonic()
    with pytest.raises(ScratchError, match=rf"^MLflow tracking server {uri} is unreachable \(connection refused\)"):
        tracking.setup_mlflow()  # what the flow's parent run and promote open their store with
    entered = False
    with pytest.raises(ScratchError, match="unreachable"), tracking.stage_run("ingest", {"x": 1}):
        entered = True
    assert not entered and time.monotonic() - started < 5


def test_a_server_that_accepts_but_never_answers_times_out():
    with socket.socket() as listener:  # connections queue in the backlog; nobody reads or answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(ScratchError, match=r"is unreachable \(no answer within 0.5 s\)"):
            tracking.check_server(uri, timeout=0.5)
        assert time.monotonic() - started < 3


@pytest.mark.parametrize("answering", [503], indirect=True)
def test_a_proxy_answering_503_counts_as_down(answering):
    with pytest.raises(ScratchError, match=r"is unreachable \(HTTP 503 Service Unavailable\)"):
        tracking.check_server(answering)


@pytest.mark.parametrize("answering", [200, 401, 404], indirect=True)
def test_any_other_answer_counts_as_up_and_is_probed_once(answering):
    tracking.check_server(answering + "/")
    assert answering + "/" in tracking._answered


def test_remote_servers_get_no_local_start_command_and_other_stores_no_probe():
    line = tracking.unreachable("https://mlflow.example.com", "connection refused")
    assert line == (
        "MLflow tracking server https://mlflow.example.com is unreachable (connection refused); start it "
        "(mlflow server ...) and check that this machine can reach it, or unset MLFLOW_TRACKING_URI to use the "
        "local SQLite store"
    )
    for uri in ("sqlite:///nowhere/mlruns.db", "file:///nowhere", "databricks"):
        tracking.check_server(uri)  # no network, no error
