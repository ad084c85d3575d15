"""The Prefect stage task retries what a retry can fix (a server that blinked, a killed process, DVC's lock held by
another run) and never a user error or a failed training run (flows/pipeline.py `retry_transient`)."""

import sys
import textwrap

import pytest
from prefect.states import Failed

from flows.pipeline import StageFailed, is_transient, retry_transient, stage_task

DVC_FAILED = "ERROR: failed to reproduce 'pretrain': failed to run: python -m tasks.pretrain, exited with {}"


def failure(code, *lines):
    return StageFailed("stage failed", exit_code=code, tail=[*lines, DVC_FAILED.format(code)])


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (failure(2, "error: pretrain: train.lr: must be > 0"), False),  # user error
        (failure(130, "error: pretrain: interrupted"), False),  # Ctrl-C
        (
            failure(
                1,
                "Traceback (most recent call last):",
                '  File "x.py", line 1, in <module>',
                "FloatingPointError: loss is nan at step 40",
            ),
            False,
        ),  # failed training
        (
            failure(
                1,
                "WARNING urllib3: Retrying after connection broken by 'NewConnectionError'",
                "ValueError: shapes (2, 3) and (4,) do not match",
            ),
            False,
        ),  # a warning is not the cause
        (failure(-9), True),
        (failure(137), True),
        (failure(-15), True),  # killed from outside
        (
            failure(
                1,
                "mlflow.exceptions.MlflowException: API request to http://mlflow:5000/api/2.0/mlflow/runs/create "
                "failed with exception HTTPConnectionPool(host='mlflow', port=5000): Max retries exceeded",
            ),
            True,
        ),
        (failure(1, "requests.exceptions.ConnectionError: ('Connection aborted.', RemoteDisconnected())"), True),
        (failure(1, "httpx.ConnectError: [Errno 111] Connection refused"), True),  # Prefect API (Dask stages)
        (failure(1, "sqlalchemy.exc.OperationalError: (sqlite3.OperationalError) database is locked"), True),
        (
            StageFailed(
                "lock",
                exit_code=None,
                tail=[
                    "ERROR: Unable to acquire lock. Most likely another DVC process is "
                    "running or was terminated abruptly."
                ],
            ),
            True,
        ),
        (
            StageFailed("no stage", exit_code=None, tail=["ERROR: Stage 'nosuch' not found inside 'dvc.yaml' file"]),
            False,
        ),
        (ConnectionRefusedError(111, "Connection refused"), True),  # raised in the task itself
        (RuntimeError("wrapped"), False),
        (FileNotFoundError("dvc"), False),
    ],
)
def test_only_transient_stage_failures_are_retried(error, retried):
    assert is_transient(error) is retried
    assert retry_transient(stage_task, None, Failed(data=error)) is retried


def test_chained_connection_error_is_transient():
    try:
        try:
            raise ConnectionResetError("reset by peer")
        except ConnectionResetError as e:
            raise RuntimeError("tagging the child run failed") from e
    except RuntimeError as e:
        assert is_transient(e)


def test_stage_task_retries_are_configured():
    assert stage_task.retries == 2 and stage_task.retry_condition_fn is retry_transient


FAKE_DVC = textwrap.dedent("""
    import pathlib, sys
    counter = pathlib.Path(sys.argv[1]); mode = sys.argv[2]
    n = int(counter.read_text()) if counter.exists() else 0
    counter.write_text(str(n + 1))
    if mode == "transient" and n == 0:
        print("Running stage 'ingest':")
        print("httpx.ConnectError: [Errno 111] Connection refused")
        print("ERROR: failed to reproduce 'ingest': failed to run: python -m tasks.ingest, exited with 1")
        sys.exit(255)
    if mode == "user":
        print("error: ingest: data.sources: 'x': no such file or folder")
        print("ERROR: failed to reproduce 'ingest': failed to run: python -m tasks.ingest, exited with 2")
        sys.exit(255)
    print("Running stage 'ingest':")
""")


@pytest.mark.slow
def test_stage_task_retries_a_transient_failure_and_not_a_user_error(tmp_path, monkeypatch):
    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    import flows.pipeline as pipeline

    script = tmp_path / "fake_dvc.py"
    script.write_text(FAKE_DVC)
    mode = {"value": "transient"}
    monkeypatch.setattr(
        pipeline,
        "dvc_command",
        lambda stage, force: [sys.executable, str(script), str(tmp_path / mode["value"]), mode["value"]],
    )
    fast = stage_task.with_options(retry_delay_seconds=0)

    @flow
    def one(stage: str):
        return fast(stage)

    with prefect_test_harness(server_startup_timeout=120):
        assert one("ingest").ran
        assert (tmp_path / "transient").read_text() == "2", "one retry after the connection error"
        mode["value"] = "user"
        with pytest.raises(StageFailed, match="no such file"):
            one("ingest")
        assert (tmp_path / "user").read_text() == "1", "a user error runs once"
