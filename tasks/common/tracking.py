"""MLflow tracking: one parent run per pipeline run, one child run per stage.

- Store: `MLFLOW_TRACKING_URI` when set (a server: `http://host:5000`), else the embedded default, a SQLite file
  `mlruns.db` with artifacts under `mlartifacts/` at the repository root. No code changes between the two.
- The flow opens the parent run and exports its id as `SCRATCHLM_PARENT_RUN_ID`; each stage (a separate process
  started by `dvc repro`) opens a child run named after the stage, tagged with the parent id, the git commit and,
  once DVC has locked the stage, its `dvc.lock` hashes (the flow adds those after the stage ends).
- Metrics are namespaced (`ingest/docs_out`, `train/loss`); params are the stage's params section, flattened.
- Only rank 0 writes (`RANK` unset or 0): other DeepSpeed ranks get a tracker that does nothing.
- A server is probed before anything else (`check_server`, called by `setup_mlflow`, so by every stage's run and
  the flow's parent run): one GET with a 5 s timeout, and a server that does not answer is one `ScratchError` line
  naming the URI, instead of MLflow's own retries (7 with backoff, about 4 minutes) and a long traceback. MLflow's
  retry settings (`MLFLOW_HTTP_REQUEST_MAX_RETRIES`, `..._TIMEOUT`) are left as they are: once a run is open they
  ride out a server restart, which is cheaper than rerunning a training stage.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tasks.common.config import ROOT, ScratchError, project_root
from tasks.common.console import is_rank_zero

EXPERIMENT = os.environ.get("SCRATCHLM_EXPERIMENT", "scratchlm")
PARENT_ENV = "SCRATCHLM_PARENT_RUN_ID"
EXPERIMENT_KIND = "mlflow.experimentKind"
"""The experiment tag the MLflow 3 UI reads to open an experiment as model training rather than GenAI."""
MODEL_TRAINING = "custom_model_development"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else the project's SQLite store (the project's, not an experiment copy's: `dvc exp run
    --temp` runs stages in .dvc/tmp/exps/..., which DVC deletes afterwards)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlruns.db'}"


PROBE_TIMEOUT_S = 5.0
"""How long the reachability probe of a tracking server waits (to connect, then for the answer)."""
LOOPBACK = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}
_answered: set[str] = set()  # servers that answered in this process (probed once)


def check_server(uri: str | None = None, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Make sure an http(s) tracking server answers within `timeout` seconds; a ScratchError (one line) if not.

    One GET of `<uri>/health`, no retries. Any HTTP answer counts (401/403/404 included: authentication and the
    API are MLflow's to report) except 502/503/504, a proxy whose server behind it is down. TLS follows MLflow's
    own variables (MLFLOW_TRACKING_INSECURE_TLS, MLFLOW_TRACKING_SERVER_CERT_PATH, MLFLOW_TRACKING_CLIENT_CERT_PATH)
    and proxies the usual HTTP(S)_PROXY / NO_PROXY, as MLflow's client does. Other stores (SQLite, files,
    databricks) are not probed.
    """
    uri = uri or tracking_uri()
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or uri in _answered:
        return
    import requests

    verify: bool | str = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or True
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() in ("1", "true"):
        verify = False
    try:
        answer = requests.get(
            uri.rstrip("/") + "/health",
            timeout=(timeout, timeout),
            verify=verify,
            cert=os.environ.get("MLFLOW_TRACKING_CLIENT_CERT_PATH") or None,
            allow_redirects=False,
        )
    except requests.RequestException as e:
        raise ScratchError(unreachable(uri, probe_failure(e, timeout, parts.hostname or uri))) from None
    if answer.status_code in (502, 503, 504):
        raise ScratchError(unreachable(uri, f"HTTP {answer.status_code} {answer.reason or ''}".strip()))
    _answered.add(uri)


def unreachable(uri: str, reason: str) -> str:
    """The one line for a tracking server that does not answer: the URI, why, and what to do."""
    parts = urlsplit(uri)
    if (parts.hostname or "") in LOOPBACK:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        start = f"start it (mlflow server --host {parts.hostname} --port {port})"
    else:
        start = "start it (mlflow server ...) and check that this machine can reach it,"
    return (
        f"MLflow tracking server {uri} is unreachable ({reason}); {start} "
        f"or unset MLFLOW_TRACKING_URI to use the local SQLite store"
    )


def probe_failure(error: BaseException, timeout: float, host: str) -> str:
    """A few words for why a request failed: `connection refused`, `no answer within 5 s`, ...

    requests wraps urllib3's error, which wraps the socket's: the innermost OS error says it best."""
    import requests

    if isinstance(error, requests.Timeout):
        return f"no answer within {timeout:g} s"
    found: list[BaseException] = []
    stack, seen = [error], set()
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        found.append(e)
        nested = [*e.args, getattr(e, "reason", None), e.__cause__, e.__context__]
        stack += [x for x in nested if isinstance(x, BaseException)]
    for e in found:
        if isinstance(e, socket.gaierror):
            return f"cannot resolve {host}: {e.strerror}"
    for e in reversed(found):
        if isinstance(e, OSError) and e.strerror:
            return e.strerror[:1].lower() + e.strerror[1:]
    if isinstance(error, requests.exceptions.SSLError):
        return "TLS handshake failed"
    return type(error).__name__


def setup_mlflow():
    """Point MLflow at the configured store and make sure the experiment exists; return the mlflow module.

    A tracking server that does not answer is a ScratchError within seconds (`check_server`)."""
    check_server()
    import logging

    import mlflow

    logging.getLogger("alembic").setLevel(logging.WARNING)
    local = not os.environ.get("MLFLOW_TRACKING_URI")  # before set_tracking_uri, which exports it (MLflow 3)
    mlflow.set_tracking_uri(tracking_uri())
    if mlflow.get_experiment_by_name(EXPERIMENT) is None:
        artifacts = (project_root() / "mlartifacts").as_uri() if local else None
        with contextlib.suppress(Exception):  # another process may have created it meanwhile
            # the UI opens it as model training, not GenAI (MLflow 3 guesses GenAI for an experiment with no runs)
            mlflow.create_experiment(EXPERIMENT, artifact_location=artifacts, tags={EXPERIMENT_KIND: MODEL_TRAINING})
    experiment = mlflow.set_experiment(EXPERIMENT)
    if EXPERIMENT_KIND not in experiment.tags:  # made by an older scratchlm, or by hand
        with contextlib.suppress(Exception):
            mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
    return mlflow


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def dvc_lock_tags(stage: str, lock_file: Path = ROOT / "dvc.lock") -> dict[str, str]:
    """`dvc.<dep or out path>` → md5 for `stage` from dvc.lock (empty when the stage is not locked yet)."""
    import yaml

    if not lock_file.is_file():
        return {}
    entry = (yaml.safe_load(lock_file.read_text()) or {}).get("stages", {}).get(stage, {})
    tags = {}
    for kind in ("deps", "outs"):
        for item in entry.get(kind, []):
            tags[f"dvc.{kind}.{item['path']}"] = str(item.get("md5", ""))
    return tags


def flatten(d: dict[str, Any], prefix: str = "", encode: bool = True) -> dict[str, Any]:
    """A nested dict with dotted keys; lists (and empty dicts) become JSON strings when `encode`."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + ".", encode))
        else:
            out[key] = json.dumps(v) if encode and isinstance(v, (list, dict)) else v
    return out


def metric_key(name: str) -> str:
    """A name MLflow accepts (letters, digits, _ - . space /), with no path tricks like `..` or `//`."""
    name = re.sub(r"[^\w\-. /]", "_", name)
    name = re.sub(r"\.{2,}", "_", name)
    return re.sub(r"/{2,}", "/", name).strip("/ ")


class Tracker:
    """What a stage logs through; a no-op when `active` is False (ranks other than 0)."""

    def __init__(self, stage: str, run_id: str | None = None) -> None:
        self.stage, self.run_id = stage, run_id
        self.active = run_id is not None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None, namespace: str | None = None) -> None:
        """Log numeric metrics as `<namespace>/<name>` (namespace defaults to the stage name)."""
        if not self.active:
            return
        import mlflow

        ns = self.stage if namespace is None else namespace
        clean = {
            metric_key(f"{ns}/{k}" if ns and "/" not in k else k): float(v)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if clean:
            mlflow.log_metrics(clean, step=step, run_id=self.run_id)

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.active:
            return
        import mlflow

        flat = flatten(params)
        for start in range(0, len(flat), 90):  # MLflow caps a batch at 100 params
            chunk = dict(list(flat.items())[start : start + 90])
            mlflow.log_params({k: str(v)[:6000] for k, v in chunk.items()}, run_id=self.run_id)

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        if not self.active or not Path(path).exists():
            return
        import mlflow

        client = mlflow.MlflowClient()
        if Path(path).is_dir():
            client.log_artifacts(self.run_id, str(path), folder)
        else:
            client.log_artifact(self.run_id, str(path), folder)

    def log_text(self, text: str, name: str) -> None:
        if self.active:
            import mlflow

            mlflow.MlflowClient().log_text(self.run_id, text, name)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.active:
            import mlflow

            client = mlflow.MlflowClient()
            for k, v in tags.items():
                client.set_tag(self.run_id, k, str(v))


@contextlib.contextmanager
def stage_run(stage: str, params: dict[str, Any] | None = None) -> Iterator[Tracker]:
    """Open the MLflow child run of `stage` (rank 0 only) and yield its Tracker; the run ends FAILED on error."""
    if not is_rank_zero() or os.environ.get("SCRATCHLM_NO_MLFLOW") == "1":
        yield Tracker(stage, None)
        return
    mlflow = setup_mlflow()
    parent = os.environ.get(PARENT_ENV)
    commit = git_commit()
    tags = {"scratchlm.stage": stage, "mlflow.source.git.commit": commit, "git_commit": commit}
    if os.environ.get("DVC_EXP_NAME"):  # `dvc exp run`: the experiment this run belongs to (`dvc exp show` names it)
        tags["dvc.experiment"] = os.environ["DVC_EXP_NAME"]
    if parent:
        tags.update({"mlflow.parentRunId": parent, "scratchlm.parent_run_id": parent})
    tags.update(dvc_lock_tags(stage))
    run = mlflow.MlflowClient().create_run(
        mlflow.get_experiment_by_name(EXPERIMENT).experiment_id, run_name=stage, tags=tags
    )
    tracker = Tracker(stage, run.info.run_id)
    if params:
        tracker.log_params(params)
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    finally:
        mlflow.MlflowClient().set_terminated(run.info.run_id, status=status)


def find_stage_runs(parent_run_id: str) -> dict[str, Any]:
    """Child runs of a pipeline run, by stage name (latest wins)."""
    mlflow = setup_mlflow()
    runs = mlflow.search_runs(
        experiment_names=[EXPERIMENT],
        output_format="list",
        filter_string=f"tags.scratchlm.parent_run_id = '{parent_run_id}'",
        order_by=["attributes.start_time ASC"],
    )
    return {r.info.run_name: r for r in runs}
