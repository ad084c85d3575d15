"""build_llm — the Prefect flow that chains the stages: one task per stage, each a `dvc repro --single-item`.

Runbook
    scratchlm run                                    # all stages, embedded defaults
    scratchlm run --stages ingest,filter --set data.builtin.n_docs=2000
    python -m flows.pipeline                         # the same, without the CLI
    prefect deployment run build_llm/scratchlm       # through a deployment (see infra/prefect.yaml)

What happens
    1. the overrides are written into params.yaml (as `dvc exp run -S` does) and every section is validated,
       so a typo fails before any stage runs;
    2. an MLflow parent run opens; its id goes to each stage as SCRATCHLM_PARENT_RUN_ID;
    3. each stage, in dvc.yaml order, runs as a Prefect task calling `dvc repro --single-item <stage>`: DVC decides
       whether it is stale, the stage opens its own child run, and its output streams into the Prefect logs;
    4. a failing stage fails the flow with the stage's own error line; a transient infrastructure fault (a server
       connection, a killed process, DVC's repository lock) is retried first (`retry_transient`), anything else
       (a user error, a bug, a failed training run) is not.
Prefect never holds hyperparameters (params.yaml does) and never caches (DVC does).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task

from tasks.common import tracking
from tasks.common.config import INHERITED, ROOT, ScratchError, load_all, params_file
from tasks.common.dvcio import pipeline_stages


class StageFailed(RuntimeError):
    """A stage exited non-zero; the message is the stage's own error line.

    exit_code: the stage command's exit status as DVC reports it ("exited with N"; negative = killed by that
    signal), or None when DVC failed without running the command (unknown stage, repository lock, ...).
    tail: the last lines of DVC's and the stage's output.
    """

    def __init__(self, message: str, exit_code: int | None = None, tail: list[str] | None = None):
        super().__init__(message)
        self.exit_code = exit_code
        self.tail = tail or []


def select_stages(stages: list[str] | str | None) -> list[str]:
    order = pipeline_stages()
    if not stages:
        return order
    wanted = stages.split(",") if isinstance(stages, str) else list(stages)
    unknown = [s for s in wanted if s not in order]
    if unknown:
        raise ScratchError(f"unknown stage {unknown[0]!r} (stages: {', '.join(order)})")
    return [s for s in order if s in wanted]


# ------------------------------------------------------------------------------------------------ overrides


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`["a.b=3", "c=x"]` → {"a.b": 3, "c": "x"}; values are parsed as YAML scalars/lists."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ScratchError(f"--set {pair!r}: expected section.key=value")
        out[key.strip()] = yaml.safe_load(value)
    return out


def apply_overrides(overrides: dict[str, Any], path: Path | None = None) -> None:
    """Write dotted-key overrides into params.yaml (comments kept) and validate; restore the file on error."""
    path = path or params_file()
    if not overrides:
        load_all(path)
        return
    from ruamel.yaml import YAML

    rt = YAML()
    rt.preserve_quotes = True
    original = path.read_text()
    doc = rt.load(original)
    for key, value in overrides.items():
        node, parts = doc, key.split(".")
        # `<stage>.train.lr` may name a key the stage does not override yet: it inherits it from the `train`
        # section, so the override adds it there (load_all below rejects a key the base does not have)
        inherited = len(parts) == 3 and parts[1] in INHERITED and isinstance(doc.get(parts[0]), dict)
        if inherited and not isinstance(doc[parts[0]].get(parts[1]), dict):
            doc[parts[0]][parts[1]] = {}
        for part in parts[:-1]:
            if not isinstance(node, dict) or part not in node:
                raise ScratchError(f"override {key!r}: no section {part!r} in {path.name}")
            node = node[part]
        if parts[-1] not in node and not inherited:
            raise ScratchError(f"override {key!r}: unknown key {parts[-1]!r} in {path.name}")
        node[parts[-1]] = value
    with open(path, "w") as f:
        rt.dump(doc, f)
    try:
        load_all(path)
    except ScratchError:
        path.write_text(original)
        raise


# ------------------------------------------------------------------------------------------------ stage task


@dataclass
class StageResult:
    stage: str
    ran: bool
    seconds: float


def dvc_command(stage: str, force: bool) -> list[str]:
    dvc = Path(sys.executable).with_name("dvc")
    return [str(dvc) if dvc.exists() else "dvc", "repro", "--single-item", *(["--force"] if force else []), stage]


def stage_env(parent_run_id: str | None) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `python` = this venv
    if parent_run_id:
        env[tracking.PARENT_ENV] = parent_run_id
    return env


def run_dvc_stage(stage: str, force: bool = False, parent_run_id: str | None = None, log=print) -> StageResult:
    """Run one stage through DVC, streaming its output line by line to `log`; raise StageFailed on error."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        dvc_command(stage, force),
        cwd=ROOT,
        env=stage_env(parent_run_id),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    tail: list[str] = []
    ran = False
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip("\n").split("\r")[-1]
        if not line.strip():
            continue
        log(f"[{stage}] {line}")
        ran = ran or line.startswith(f"Running stage '{stage}'")
        tail = (tail + [line])[-40:]
    code = proc.wait()
    if code != 0:
        errors = [ln for ln in tail if ln.startswith("error:")]
        statuses = [int(m[1]) for ln in tail if (m := _DVC_CMD_STATUS.search(ln))]
        status = statuses[-1] if statuses else None
        if errors:
            message = errors[-1]
        else:  # the stage's own status when DVC names it (DVC itself exits 255 on any failure)
            message = f"stage {stage!r} failed (exit {code if status is None else status}):\n" + "\n".join(tail[-15:])
        raise StageFailed(message, exit_code=status, tail=tail)
    if ran and parent_run_id:
        tag_child_run(stage, parent_run_id)
    return StageResult(stage, ran, round(time.perf_counter() - started, 1))


def tag_child_run(stage: str, parent_run_id: str) -> None:
    """Add the stage's dvc.lock hashes (known only once DVC has locked it) to its MLflow child run."""
    run = tracking.find_stage_runs(parent_run_id).get(stage)
    if run is not None:
        tracking.Tracker(stage, run.info.run_id).set_tags(tracking.dvc_lock_tags(stage))


# ------------------------------------------------------------------------------------------------ retries

# DVC exits 255 for any failure; the stage command's own status is on its last line:
#   ERROR: failed to reproduce 'ingest': failed to run: python -m tasks.ingest, exited with 2
_DVC_CMD_STATUS = re.compile(r"failed to run: .*, exited with (-?\d+)\s*$")
USER_ERROR, INTERRUPTED = 2, 130  # tasks/common/stage.py: a ScratchError exits 2, Ctrl-C 130
# killed from outside (OOM killer, preemption, node drain): negative as DVC reports it, 128 + n through a shell.
# The training stages checkpoint to checkpoints/, so a rerun resumes instead of starting over.
KILLED = {-signal.SIGKILL, -signal.SIGTERM, 128 + signal.SIGKILL, 128 + signal.SIGTERM}
# An uncaught exception's summary line ("pkg.SomeError: message"), as opposed to log or `error:` lines.
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Timeout)\b")
# What a server or network fault looks like (MLflow tracking/registry/artifacts, the Prefect API the Dask data
# stages use, Postgres, MinIO), and DVC's repository lock held by another dvc process. A misconfigured URI fails
# the same way (connection refused) and costs only the retry delays before failing as itself.
_TRANSIENT = re.compile(
    r"\bConnection(Refused|Reset|Aborted)?Error\b|\b(ConnectTimeout|ReadTimeout|PoolTimeout|TimeoutError)\b"
    r"|\b(MaxRetryError|NewConnectionError|RemoteProtocolError|EndpointConnectionError)\b|socket\.timeout"
    r"|Max retries exceeded|Connection refused|Connection reset by peer|Temporary failure in name resolution"
    r"|Bad Gateway|Service Unavailable|Gateway Time-?out|too many 50[0234] error responses"
    r"|database is locked|could not connect to server|server closed the connection unexpectedly"
    r"|Unable to acquire lock"
)
STAGE_RETRIES = 2
STAGE_RETRY_DELAYS = [10, 60]  # seconds before retry 1 and 2: a server restart, a lock released


def is_transient(error: BaseException) -> bool:
    """Whether rerunning the stage can succeed without anyone changing anything.

    Retried: the stage command killed by SIGKILL/SIGTERM (exit -9/-15/137/143: OOM killer, preemption); an
    uncaught exception (exit 1) or a DVC error whose summary line is a connection/timeout/5xx/lock fault
    (`_TRANSIENT`); the same faults raised in this process (tagging the MLflow child run after the stage).
    Not retried: exit 2 (a user error: fix params.yaml or the data), 130 (interrupted), any other exception
    (a bug, a diverged or failed training run, a failed check): those fail the same way again.
    """
    if isinstance(error, StageFailed):
        if error.exit_code in (USER_ERROR, INTERRUPTED, -signal.SIGINT):
            return False
        if error.exit_code in KILLED:
            return True
        summaries = [ln for ln in error.tail if _EXCEPTION_LINE.match(ln) or ln.startswith("ERROR:")]
        return any(_TRANSIENT.search(ln) for ln in summaries)
    chain: BaseException | None = error
    seen: set[int] = set()
    while chain is not None and id(chain) not in seen:  # the exception and its causes (MlflowException from a
        seen.add(id(chain))  # requests ConnectionError, say); `seen` guards against a cycle in __context__
        if isinstance(chain, (ConnectionError, TimeoutError)) or _TRANSIENT.search(
            f"{type(chain).__module__}.{type(chain).__qualname__}: {chain}"
        ):
            return True
        chain = chain.__cause__ or chain.__context__
    return False


def retry_transient(task, task_run, state) -> bool:
    """Prefect's retry_condition_fn for stage_task: retry only `is_transient` failures.

    A plain function on purpose: Prefect calls retry_condition_fn only when inspect.isfunction() is true.
    """
    error = state.data
    if not isinstance(error, BaseException):
        error = state.result(raise_on_failure=False)
    return isinstance(error, BaseException) and is_transient(error)


@task(
    name="stage",
    task_run_name="{stage}",
    log_prints=False,
    retries=STAGE_RETRIES,
    retry_delay_seconds=STAGE_RETRY_DELAYS,
    retry_condition_fn=retry_transient,
)
def stage_task(stage: str, force: bool = False, parent_run_id: str | None = None) -> StageResult:
    """A pipeline stage as a Prefect task (one per stage, named after it)."""
    logger = get_run_logger()
    return run_dvc_stage(stage, force, parent_run_id, log=logger.info)


# ------------------------------------------------------------------------------------------------ flow


@flow(name="build_llm", log_prints=True)
def build_llm(
    stages: list[str] | None = None, overrides: dict[str, Any] | None = None, force: bool = False
) -> dict[str, Any]:
    """Run the pipeline stages (all by default) in dvc.yaml order under one MLflow parent run.

    stages: a subset to run (names from dvc.yaml); overrides: {"section.key": value} written to params.yaml first;
    force: rerun the selected stages even when DVC finds them up to date.
    """
    logger = get_run_logger()
    selected = select_stages(stages)
    apply_overrides(overrides or {})
    mlflow = tracking.setup_mlflow()
    with mlflow.start_run(
        run_name="build_llm", tags={"scratchlm.pipeline": "build_llm", "git_commit": tracking.git_commit()}
    ) as parent:
        parent_id = parent.info.run_id
        mlflow.log_params(
            {"stages": ",".join(selected), "force": force, **{f"override.{k}": v for k, v in (overrides or {}).items()}}
        )
        logger.info(f"MLflow parent run {parent_id} in {tracking.tracking_uri()}; stages: {', '.join(selected)}")
        results = [stage_task(stage, force=force, parent_run_id=parent_id) for stage in selected]
        mlflow.log_metrics(
            {
                "pipeline/stages_ran": sum(r.ran for r in results),
                "pipeline/stages_skipped": sum(not r.ran for r in results),
            }
        )
    return {
        "parent_run_id": parent_id,
        "tracking_uri": tracking.tracking_uri(),
        "ran": [r.stage for r in results if r.ran],
        "skipped": [r.stage for r in results if not r.ran],
        "seconds": {r.stage: r.seconds for r in results},
    }


if __name__ == "__main__":
    print(build_llm())
