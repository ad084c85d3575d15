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
    4. a failing stage fails the flow with the stage's own error line.
Prefect never holds hyperparameters (params.yaml does) and never caches (DVC does).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task

from tasks.common import tracking
from tasks.common.config import ROOT, ScratchError, load_all, params_file


class StageFailed(RuntimeError):
    """A stage exited non-zero; the message is the stage's own error line."""


def stage_order(dvc_file: Path = ROOT / "dvc.yaml") -> list[str]:
    """The stages in pipeline order: the one place that order lives is dvc.yaml."""
    return list((yaml.safe_load(dvc_file.read_text()) or {}).get("stages", {}))


def select_stages(stages: list[str] | str | None) -> list[str]:
    order = stage_order()
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
        for part in parts[:-1]:
            if not isinstance(node, dict) or part not in node:
                raise ScratchError(f"override {key!r}: no section {part!r} in {path.name}")
            node = node[part]
        if parts[-1] not in node:
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
        raise StageFailed(errors[-1] if errors else f"stage {stage!r} failed (exit {code}):\n" + "\n".join(tail[-15:]))
    if ran and parent_run_id:
        tag_child_run(stage, parent_run_id)
    return StageResult(stage, ran, round(time.perf_counter() - started, 1))


def tag_child_run(stage: str, parent_run_id: str) -> None:
    """Add the stage's dvc.lock hashes (known only once DVC has locked it) to its MLflow child run."""
    run = tracking.find_stage_runs(parent_run_id).get(stage)
    if run is not None:
        tracking.Tracker(stage, run.info.run_id).set_tags(tracking.dvc_lock_tags(stage))


@task(name="stage", task_run_name="{stage}", log_prints=False)
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
