"""build_llm — the Prefect flow that chains the stages: one task per stage, each a `dvc repro --single-item`.

Runbook
    scratchlm run                                    # all stages, embedded defaults
    scratchlm run --stages ingest,filter --set data.builtin.n_docs=2000
    python -m flows.pipeline                         # the same, without the CLI
    prefect deployment run build_llm/scratchlm       # through a deployment (see infra/prefect.yaml)

What happens
    0. the run takes the project's run lock (`.scratchlm/run.lock`, `project_lock`) for its whole
       duration, before params.yaml is touched: a second run is refused at once, naming the holder (exit 2);
    1. the overrides are written into params.yaml (as `dvc exp run -S` does) and the whole configuration is
       validated (`load_all`), so a typo or an impossible model fails before any stage runs; a run that fails or
       is interrupted puts params.yaml back byte for byte, a run that succeeds keeps them (dvc.lock records them);
    2. an MLflow parent run opens; its id goes to each stage as SCRATCHLM_PARENT_RUN_ID;
    3. each stage, in dvc.yaml order, runs as a Prefect task calling `dvc repro --single-item <stage>`: DVC decides
       whether it is stale, the stage opens its own child run, and its output streams into the Prefect logs;
    4. a failing stage fails the flow with the stage's own error line; a transient infrastructure fault (a server
       connection, a killed process, DVC's repository lock) is retried first (`retry_transient`), anything else
       (a user error, a bug, a failed training run) is not;
    5. the flow run gets Prefect artifacts (`publish_artifacts`): the report card as Markdown when evaluate ran,
       links to the MLflow parent run and to the model version register made.
Each stage's output is streamed without the messages known to be harmless (tasks/common/quiet.py).
Prefect never holds hyperparameters (params.yaml does) and never caches (DVC does).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import io
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from tasks.common import tracking
from tasks.common.config import INHERITED, ROOT, ScratchError, params_file
from tasks.common.dvcio import pipeline_stages, stage_paths
from tasks.common.params_check import load_all
from tasks.common.quiet import HarmlessLines


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


# ------------------------------------------------------------------------------------------------ run lock

LOCK_FILE = Path(".scratchlm") / "run.lock"
"""The project's run lock, relative to the repository root (a folder that ignores itself in git)."""


class ProjectBusy(ScratchError):
    """Another process holds the project's run lock (exit 2, like every error a user resolves)."""


_held: dict[Path, list] = {}  # lock path → [file descriptor, depth]: re-entrant within one process
_held_guard = threading.Lock()


@contextlib.contextmanager
def project_lock(command: str | None = None, root: Path | None = None) -> Iterator[Path]:
    """Own the project for the duration of the block: an exclusive `flock` on `<root>/.scratchlm/run.lock`.

    The lock file names the holder (pid, host, command, start time) for whoever is refused; the kernel drops the
    lock when the process ends, however it ends (kill -9 included), so a crash never leaves a stale lock behind.
    Re-entrant in one process (`scratchlm run` takes it, then build_llm again). Refused at once, no waiting: raises
    ProjectBusy naming the holder.
    """
    path = ((root or ROOT) / LOCK_FILE).resolve()
    with _held_guard:
        if path in _held:
            _held[path][1] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield path
        finally:
            with _held_guard:
                _held[path][1] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    ignore = path.parent / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# scratchlm's run lock: never committed\n*\n")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise ProjectBusy(f"another scratchlm run holds the project ({holder}); wait for it or stop it") from None
    except BaseException:
        os.close(fd)
        raise
    try:
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": command or current_command(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        with _held_guard:
            _held[path] = [fd, 1]
        yield path
    finally:
        with _held_guard:
            _held.pop(path, None)
        os.ftruncate(fd, 0)  # an unheld lock names nobody
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _read_holder(fd: int) -> str:
    """The holder as the lock file names it, e.g. "pid 1234, `scratchlm run ...`, started 22:14:05"."""
    record = None
    for _ in range(20):
        try:
            record = json.loads(os.pread(fd, 65536, 0).decode())
            break
        except ValueError:  # empty or half-written: the holder took the lock a moment ago
            time.sleep(0.05)
    if not isinstance(record, dict):
        return "pid unknown"
    parts = [f"pid {record.get('pid', '?')}"]
    if record.get("host") and record["host"] != socket.gethostname():
        parts[0] += f" on {record['host']}"
    if record.get("command"):
        parts.append(f"`{record['command']}`")
    try:
        started = datetime.datetime.fromisoformat(record["started"])
        same_day = started.date() == datetime.datetime.now(started.tzinfo).date()
        parts.append(f"started {started.strftime('%H:%M:%S' if same_day else '%Y-%m-%d %H:%M:%S')}")
    except (KeyError, TypeError, ValueError):
        pass
    return ", ".join(parts)


def current_command() -> str:
    """This process's command line: `scratchlm ...` for the entry point, else `python <argv>`."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    if name == "scratchlm":
        return shlex.join(["scratchlm", *sys.argv[1:]])
    return shlex.join(["python", *sys.argv])


# ------------------------------------------------------------------------------------------------ overrides


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`["a.b=3", "c=x"]` → {"a.b": 3, "c": "x"}; values are YAML 1.2 scalars/lists, as `dvc exp run -S` reads
    them (`3e-4` is a float, `yes` a string); a value that is not YAML is one ScratchError line."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    reader = YAML(typ="safe", pure=True)
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ScratchError(f"--set {pair!r}: expected section.key=value")
        try:
            out[key.strip()] = reader.load(value) if value.strip() else ""
        except YAMLError as e:
            problem = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
            raise ScratchError(
                f"--set {pair!r}: the value is not valid YAML ({problem}); quote it, e.g. --set '{key}=\"...\"', "
                f"or write a list as [a, b]"
            ) from None
    return out


@dataclass(frozen=True)
class ParamsEdit:
    """What apply_overrides did to a params file: its bytes before and after, to put it back (`undo`)."""

    path: Path
    before: bytes
    after: bytes

    def undo(self, log=print) -> bool:
        """Put the file back as it was, unless someone changed it since (then say so and leave it)."""
        current = self.path.read_bytes() if self.path.is_file() else None
        if current == self.before:
            return True
        if current != self.after:
            log(f"warning: {self.path} changed during the run; left as it is (not restored)")
            return False
        write_atomic(self.path, self.before)
        return True


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` in one rename (a crash leaves the old or the new file, never half of one)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def same_style(old: Any, value: Any) -> Any:
    """`value` as a flow-style (`[a, b]`, `{k: v}`) ruamel node when the node it replaces was one."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    kind = {list: CommentedSeq, dict: CommentedMap}.get(type(value))
    if kind is None or not isinstance(old, (CommentedSeq, CommentedMap)) or not old.fa.flow_style():
        return value
    new = kind(value)
    new.fa.set_flow_style()
    return new


def apply_overrides(overrides: dict[str, Any], path: Path | None = None) -> ParamsEdit | None:
    """Write dotted-key overrides into params.yaml (comments kept) and validate the whole configuration; on an
    error the file is put back byte for byte. Returns the edit (None when there was nothing to write), for the
    caller to undo should the run fail."""
    path = path or params_file()
    if not overrides:
        load_all(path)
        return None
    from ruamel.yaml import YAML

    rt = YAML()  # round trip: comments, quotes and flow style kept; the file's own layout as far as ruamel can
    rt.preserve_quotes = True
    rt.width = 120
    rt.indent(mapping=2, sequence=4, offset=2)
    rt.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    original = path.read_bytes()
    doc = rt.load(original.decode())
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
        node[parts[-1]] = same_style(node.get(parts[-1]), value)
    buffer = io.BytesIO()
    rt.dump(doc, buffer)
    edit = ParamsEdit(path, original, buffer.getvalue())
    write_atomic(path, edit.after)
    try:
        load_all(path)
    except BaseException:
        edit.undo()
        raise
    return edit


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
    shown = HarmlessLines()  # DVC's git/push advice, DeepSpeed's hostfile note, ... (tasks/common/quiet.py)
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = shown(raw.rstrip("\n").split("\r")[-1])
        if line is None or not line.strip():
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


def headline_figures(root: Path = ROOT) -> dict[str, float]:
    """Every stage's headline metrics (metrics/<stage>.json) as `<stage>/<key>`: the parent run's own figures, so
    the pipeline run compares in MLflow's table as it does in `dvc metrics show`."""
    figures: dict[str, float] = {}
    for stage in pipeline_stages(root):
        file = stage_paths(stage, root).metrics
        if file.is_file():
            flat = tracking.flatten(json.loads(file.read_text()), encode=False)
            figures.update(
                {tracking.metric_key(f"{stage}/{k}"): float(v) for k, v in flat.items() if isinstance(v, (int, float))}
            )
    return figures


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
    with project_lock():  # re-entrant: `scratchlm run` holds it already; python/Prefect callers take it here
        edit = apply_overrides(overrides or {})
        try:
            result = _run_stages(selected, overrides or {}, force, logger)
        except BaseException:  # failed, interrupted, killed by SIGTERM (flows/cli.py): params.yaml as it was
            if edit is not None and edit.undo(log=logger.warning):
                logger.warning(f"{edit.path.name}: the run's overrides taken back out (the run did not finish)")
            raise
    publish_artifacts(result, log=logger.warning)
    return result


def _run_stages(selected: list[str], overrides: dict[str, Any], force: bool, logger) -> dict[str, Any]:
    """The flow's body, under the run lock with the overrides in place: the parent run, then each stage."""
    mlflow = tracking.setup_mlflow()
    with mlflow.start_run(
        run_name="build_llm", tags={"scratchlm.pipeline": "build_llm", "git_commit": tracking.git_commit()}
    ) as parent:
        parent_id = parent.info.run_id
        mlflow.log_params(
            {"stages": ",".join(selected), "force": force, **{f"override.{k}": v for k, v in overrides.items()}}
        )
        logger.info(f"MLflow parent run {parent_id} in {tracking.tracking_uri()}; stages: {', '.join(selected)}")
        results = [stage_task(stage, force=force, parent_run_id=parent_id) for stage in selected]
        mlflow.log_metrics(
            {
                "pipeline/stages_ran": sum(r.ran for r in results),
                "pipeline/stages_skipped": sum(not r.ran for r in results),
                **headline_figures(),
            }
        )
    if not any(r.ran for r in results):  # nothing ran: an empty parent run would only clutter the experiment
        mlflow.MlflowClient().delete_run(parent_id)
        logger.info(f"every stage was up to date: nothing ran, so MLflow parent run {parent_id} was deleted")
    return {
        "parent_run_id": parent_id if any(r.ran for r in results) else None,
        "tracking_uri": tracking.tracking_uri(),
        "ran": [r.stage for r in results if r.ran],
        "skipped": [r.stage for r in results if not r.ran],
        "seconds": {r.stage: r.seconds for r in results},
    }


# ------------------------------------------------------------------------------------------------ artifacts

MLFLOW_UI = "http://127.0.0.1:5000"
"""Where `mlflow ui` listens by default: the links of a local (SQLite) store point there, once it is started."""


def mlflow_links(result: dict[str, Any], root: Path = ROOT) -> list[tuple[str, str, str]]:
    """(key, URL, description) of the MLflow pages a run made: its parent run, and the version register made."""
    uri = result["tracking_uri"]
    server = uri.startswith(("http://", "https://"))
    base = uri.rstrip("/") if server else MLFLOW_UI
    how = "" if server else f" (start the UI first: mlflow ui --backend-store-uri {shlex.quote(uri)})"
    links = []
    if result.get("parent_run_id"):
        experiment = tracking.setup_mlflow().get_run(result["parent_run_id"]).info.experiment_id
        url = f"{base}/#/experiments/{experiment}/runs/{result['parent_run_id']}"
        links.append(("mlflow-run", url, f"MLflow parent run of this pipeline run, one child run per stage{how}"))
    record = registered(root) if "register" in result.get("ran", []) else None
    if record:
        url = f"{base}/#/models/{record['name']}/versions/{record['version']}"
        text = f"{record['model_uri']} = version {record['version']}, registered by this run{how}"
        links.append(("registered-model", url, text))
    return links


def registered(root: Path) -> dict | None:
    """data/register/registered.json, or None when absent or unreadable."""
    try:
        record = json.loads((root / "data" / "register" / "registered.json").read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and {"name", "version", "model_uri"} <= record.keys() else None


def publish_artifacts(result: dict[str, Any], root: Path = ROOT, log=print) -> list[str]:
    """Prefect artifacts on the current flow run: the report card (Markdown) when evaluate ran in it, and links to
    the MLflow parent run and the registered version. Returns their keys. A Prefect API that refuses them costs a
    warning, never the pipeline run that has just finished."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact

    made = []
    try:
        report = root / "reports" / "report.md"
        if "evaluate" in result.get("ran", []) and report.is_file():
            note = (
                f"\n\n---\nThe plots are PNG files beside it: {report.parent}/ (and the `evaluate` run's `report/`).\n"
            )
            create_markdown_artifact(
                report.read_text(encoding="utf-8") + note, key="report-card", description=str(report)
            )
            made.append("report-card")
        for key, url, description in mlflow_links(result, root):
            create_link_artifact(url, link_text=url, key=key, description=description)
            made.append(key)
    except Exception as e:  # the run succeeded; only its Prefect artifacts are missing
        log(f"Prefect artifacts not created ({type(e).__name__}: {e}); the run's outputs and MLflow runs are complete")
    return made


if __name__ == "__main__":
    print(build_llm())
