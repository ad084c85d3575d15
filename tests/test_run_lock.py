"""A run owns the project (issue 16, item 1): a second run is refused at once naming the holder, and a refused,
failed or interrupted run leaves params.yaml byte for byte as it found it; a successful one keeps its overrides."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import ROOT, copy_project, run_in

SMALL = {"data": {"builtin": {"n_docs": 300}, "parallel": {"workers": 1}}}
HOLDER_COMMAND = "scratchlm run --stages ingest,filter,dedup --force --set data.builtin.seed=1"
REFUSED = re.compile(
    r"^error: another scratchlm run holds the project \(pid (\d+), `(.+)`, started \d\d:\d\d:\d\d\); "
    r"wait for it or stop it$"
)


@contextmanager
def holder(root: Path, command: str = HOLDER_COMMAND):
    """Another process holding `root`'s run lock until the block ends; yields its pid."""
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from flows.pipeline import project_lock
        with project_lock({command!r}, root=Path({str(root)!r})):
            print("held", flush=True)
            sys.stdin.read()
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc.pid
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


@pytest.mark.slow  # the holder is a process of its own (~3 s of imports)
def test_a_second_holder_is_refused_at_once_naming_the_first(tmp_path):
    from flows.pipeline import ProjectBusy, project_lock

    with holder(tmp_path) as pid:
        started = time.perf_counter()
        with pytest.raises(ProjectBusy) as err, project_lock("scratchlm run --set data.builtin.seed=2", root=tmp_path):
            pass
        assert time.perf_counter() - started < 2, "refused at once, not after waiting"
        match = REFUSED.match(f"error: {err.value}")
        assert match, str(err.value)
        assert (int(match[1]), match[2]) == (pid, HOLDER_COMMAND)
    # the holder is gone: the lock is free again; and re-entrant within one process (scratchlm run, then build_llm)
    with project_lock("next", root=tmp_path), project_lock(root=tmp_path):
        assert '"command": "next"' in (tmp_path / ".scratchlm" / "run.lock").read_text()
    assert (tmp_path / ".scratchlm" / "run.lock").read_text() == "", "a free lock names nobody"
    assert (tmp_path / ".scratchlm" / ".gitignore").read_text().splitlines()[-1] == "*"


@pytest.mark.slow  # three processes: the holder, `scratchlm run`, `scratchlm stage` (~5 s)
def test_a_refused_run_and_stage_leave_params_yaml_byte_identical(tmp_path):
    project = copy_project(tmp_path / "project", SMALL)
    before = (project / "params.yaml").read_bytes()
    with holder(project) as pid:
        for args in (["run", "--stages", "ingest", "--force", "--set", "data.builtin.seed=2"], ["stage", "ingest"]):
            proc = run_in(project, sys.executable, "-m", "flows.cli", *args, timeout=60)
            assert proc.returncode == 2, proc.stdout + proc.stderr
            lines = proc.stderr.strip().splitlines()
            assert len(lines) == 1 and REFUSED.match(lines[0]), proc.stderr
            assert f"pid {pid}," in lines[0]
            assert (project / "params.yaml").read_bytes() == before
    assert not (project / "data" / "ingest").exists(), "nothing ran"


# ------------------------------------------------------------------------------------------------ the flow


@pytest.fixture
def flow_env(tmp_path, monkeypatch):
    """build_llm's body in this process without Prefect or MLflow: the stages are a stub, params.yaml a copy, the
    run lock in tmp_path. Yields (params path, calls), `calls` the stub's list of (stage, params text) seen."""
    import flows.pipeline as pipeline

    params = tmp_path / "params.yaml"
    params.write_bytes((ROOT / "params.yaml").read_bytes())
    monkeypatch.setenv("SCRATCHLM_PARAMS", str(params))
    monkeypatch.setattr(pipeline, "ROOT", tmp_path)  # the run lock
    monkeypatch.setattr(pipeline, "get_run_logger", lambda: logging.getLogger("test_run_lock"))
    run = SimpleNamespace(info=SimpleNamespace(run_id="parent"))
    fake_mlflow = SimpleNamespace(
        start_run=lambda **kw: nullcontext_of(run), log_params=lambda p: None, log_metrics=lambda m: None
    )
    monkeypatch.setattr(pipeline.tracking, "setup_mlflow", lambda: fake_mlflow)
    monkeypatch.setattr(pipeline.tracking, "tracking_uri", lambda: "sqlite:///fake.db")
    monkeypatch.setattr(pipeline.tracking, "git_commit", lambda: "0" * 40)
    return params


@contextmanager
def nullcontext_of(value):
    yield value


def stub_stages(monkeypatch, fail_at: str | None = None, error: BaseException | None = None, edit=None):
    import flows.pipeline as pipeline

    def stage_task(stage, force=False, parent_run_id=None):
        if edit is not None:
            edit()
        if stage == fail_at:
            raise error
        return pipeline.StageResult(stage, True, 0.0)

    monkeypatch.setattr(pipeline, "stage_task", stage_task)


@pytest.mark.parametrize(
    "error",
    [
        KeyboardInterrupt(),  # Ctrl-C; SIGTERM arrives as one too under `scratchlm run` (terminate_as_interrupt)
        pytest.param("stage", id="StageFailed"),
    ],
)
def test_a_failed_or_interrupted_flow_puts_params_yaml_back_byte_for_byte(flow_env, monkeypatch, error):
    from flows.pipeline import StageFailed, build_llm

    if error == "stage":
        error = StageFailed("error: filter: something broke", exit_code=1)
    before = flow_env.read_bytes()
    stub_stages(monkeypatch, fail_at="filter", error=error)
    with pytest.raises(type(error)):
        build_llm.fn(stages=["ingest", "filter"], overrides={"data.builtin.seed": 2})
    assert flow_env.read_bytes() == before
    assert (flow_env.parent / ".scratchlm" / "run.lock").read_text() == "", "the lock is released"


def test_a_successful_flow_keeps_its_overrides_as_dvc_lock_records_them(flow_env, monkeypatch):
    from flows.pipeline import build_llm
    from tasks.common.config import load_section

    stub_stages(monkeypatch)
    result = build_llm.fn(stages=["ingest"], overrides={"data.builtin.seed": 2})
    assert result["ran"] == ["ingest"]
    assert load_section("data").builtin.seed == 2


def test_an_edit_made_by_someone_else_during_the_run_is_not_undone(flow_env, monkeypatch):
    from flows.pipeline import StageFailed, build_llm

    def someone_edits():
        flow_env.write_text(flow_env.read_text().replace("n_docs: 12000", "n_docs: 11000"))

    stub_stages(monkeypatch, fail_at="ingest", error=StageFailed("error: ingest: no", exit_code=2), edit=someone_edits)
    with pytest.raises(StageFailed):
        build_llm.fn(stages=["ingest"], overrides={"data.builtin.seed": 2})
    assert "n_docs: 11000" in flow_env.read_text()


def test_sigterm_unwinds_a_cli_run_as_ctrl_c_does():
    """`kill <pid>` of `scratchlm run` raises KeyboardInterrupt in it: the flow puts params.yaml back, as above."""
    import os
    import signal

    from flows.cli import terminate_as_interrupt

    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), terminate_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert signal.getsignal(signal.SIGTERM) is previous


# ------------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_a_failed_cli_run_leaves_params_yaml_byte_identical_and_the_lock_free(tmp_path, mlflow_uri):
    """The real thing: `scratchlm run --set` whose stage fails (ingest on a missing source, a few seconds in)."""
    project = copy_project(tmp_path / "project", SMALL)
    before = (project / "params.yaml").read_bytes()
    proc = run_in(
        project,
        sys.executable,
        "-m",
        "flows.cli",
        "run",
        "--stages",
        "ingest",
        "--set",
        "data.sources=[no/such/dir]",
        env={"MLFLOW_TRACKING_URI": mlflow_uri},
        timeout=300,
    )
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "\nerror: ingest: data.sources: 'no/such/dir': no such file or folder" in proc.stderr
    assert "error: error:" not in proc.stderr
    assert (project / "params.yaml").read_bytes() == before
    assert (project / ".scratchlm" / "run.lock").read_text() == ""
    status = run_in(project, "git", "status", "--porcelain")
    assert status.stdout == "", "the lock folder ignores itself: " + status.stdout
