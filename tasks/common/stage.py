"""What every stage's entry point shares: load its section, open its MLflow run, call `run`, write metrics, summarise.

A stage module ends with

    if __name__ == "__main__":          # python -m tasks.ingest (what dvc.yaml runs)
        stage_main("ingest", IngestConfig, run, summary)

and `run(cfg, paths, tracker, **sections) -> dict` is a function of its arguments: any parameter besides those
three is named after a params.yaml section (`data`, `model`) and receives it, loaded and validated, e.g.
`def run(cfg: IngestConfig, paths: StagePaths, tracker: Tracker, data: DataConfig)`. `summary(metrics, paths)`
(optional) gives the sentences of the stage's closing screen (tasks/common/console.py). A `ScratchError` (bad
params, bad input a user can fix) is printed as one `error: ...` line and exits 2, which the Prefect flow surfaces
verbatim.
"""

from __future__ import annotations

import inspect
import sys
import time
from collections.abc import Callable
from typing import Any

from tasks.common.config import ScratchError, as_dict, load_section
from tasks.common.console import closing_summary, is_rank_zero
from tasks.common.dvcio import StagePaths, stage_paths, write_json
from tasks.common.tracking import flatten, stage_run, tracking_uri

RunFn = Callable[..., dict | None]
SummaryFn = Callable[[dict, StagePaths], list[str]]


def stage_main(stage: str, config_cls: type, run: RunFn, summary: SummaryFn | None = None) -> None:
    """Entry point of `python -m tasks.<stage>`; exits 2 with one clear line on a user error."""
    with user_errors(stage):
        metrics = execute(stage, config_cls, run)
    if metrics is not None and is_rank_zero():
        paths = stage_paths(stage)
        where = {
            "outputs": f"{paths.out.relative_to(paths.root)}/",
            "metrics": str(paths.metrics.relative_to(paths.root)),
        }
        if metrics.get("_run_id"):
            where["mlflow"] = f"run {metrics['_run_id']} in {tracking_uri()}"
        print(closing_summary(stage, metrics, summary(metrics, paths) if summary else None, where), flush=True)


class user_errors:
    """`with user_errors(stage):` turns a ScratchError into one `error: <stage>: ...` line and exit 2."""

    def __init__(self, stage: str) -> None:
        self.stage = stage

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, error: BaseException | None, _tb: Any) -> bool:
        if isinstance(error, ScratchError):
            print(f"error: {self.stage}: {error}", file=sys.stderr, flush=True)
            sys.exit(2)
        if isinstance(error, KeyboardInterrupt):
            print(f"error: {self.stage}: interrupted", file=sys.stderr, flush=True)
            sys.exit(130)
        return False


STAGE_ARGS = ("cfg", "paths", "tracker")


def sections_for(fn: Callable) -> dict[str, Any]:
    """The params sections a stage function asks for by name: its parameters other than cfg, paths, tracker."""
    return {name: load_section(name) for name in inspect.signature(fn).parameters if name not in STAGE_ARGS}


def execute(stage: str, config_cls: type, run: RunFn) -> dict | None:
    """Load the section, run the stage inside its MLflow child run, write metrics/<stage>.json."""
    cfg = load_section(stage, config_cls)
    sections = sections_for(run)
    paths = stage_paths(stage)
    started = time.perf_counter()
    with stage_run(stage, as_dict(cfg)) as tracker:
        metrics = run(cfg, paths, tracker, **sections)
        if metrics is None:  # non-zero ranks of a training stage
            return None
        metrics = {**metrics, "seconds": round(time.perf_counter() - started, 2)}
        write_json(paths.metrics, metrics)
        tracker.log_metrics(flat_numbers(metrics))
        tracker.log_artifact(paths.metrics, "metrics")
    metrics["_run_id"] = tracker.run_id
    return metrics


def flat_numbers(d: dict) -> dict[str, float]:
    """The numeric leaves of a nested metrics dict, dotted keys (what MLflow takes as metrics)."""
    return {
        k: v for k, v in flatten(d, encode=False).items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
