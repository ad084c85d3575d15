"""What every stage's `main()` shares: load its section, open its MLflow run, call `run`, write metrics, summarise.

A stage module ends with

    def main() -> None:
        stage_main("ingest", Config, run)

and `run(cfg, paths, tracker) -> dict` stays pure of these concerns. A `ScratchError` (bad params, bad input
a user can fix) is printed as one `error: ...` line and exits 2, which the Prefect flow surfaces verbatim.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, Iterable, Iterator, TypeVar

from tasks.common.config import ScratchError, as_dict, load_section
from tasks.common.dvcio import StagePaths, stage_paths, write_json
from tasks.common.tracking import Tracker, is_rank_zero, stage_run, tracking_uri

T = TypeVar("T")
RunFn = Callable[[Any, StagePaths, Tracker], dict]


def stage_main(stage: str, config_cls: type, run: RunFn) -> None:
    """Entry point of `python -m tasks.<stage>`; exits 2 with one clear line on a user error."""
    try:
        metrics = execute(stage, config_cls, run)
    except ScratchError as e:
        print(f"error: {stage}: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"error: {stage}: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    if metrics is not None and is_rank_zero():
        print_summary(stage, metrics)


def execute(stage: str, config_cls: type, run: RunFn) -> dict | None:
    """Load the section, run the stage inside its MLflow child run, write metrics/<stage>.json."""
    cfg = load_section(stage, config_cls)
    paths = stage_paths(stage)
    started = time.perf_counter()
    with stage_run(stage, as_dict(cfg)) as tracker:
        metrics = run(cfg, paths, tracker)
        if metrics is None:  # non-zero ranks of a training stage
            return None
        metrics = {**metrics, "seconds": round(time.perf_counter() - started, 2)}
        write_json(paths.metrics, metrics)
        tracker.log_metrics(flat_numbers(metrics))
        tracker.log_artifact(paths.metrics, "metrics")
    metrics["_run_id"] = tracker.run_id
    return metrics


def flat_numbers(d: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_numbers(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


def print_summary(stage: str, metrics: dict) -> None:
    """The closing screen of a stage: headline numbers and where everything went."""
    paths = stage_paths(stage)
    rows = [(k, v) for k, v in metrics.items() if not k.startswith("_") and not isinstance(v, (dict, list))]
    width = max([len(k) for k, _ in rows] + [8])
    print(f"\n── {stage} done in {metrics.get('seconds', 0):.1f}s " + "─" * 40)
    for k, v in rows:
        if k != "seconds":
            print(f"  {k:<{width}}  {_fmt(v)}")
    print(f"  {'outputs':<{width}}  {paths.out.relative_to(paths.root)}/")
    print(f"  {'metrics':<{width}}  {paths.metrics.relative_to(paths.root)}")
    if metrics.get("_run_id"):
        print(f"  {'mlflow':<{width}}  run {metrics['_run_id']} in {tracking_uri()}")
    sys.stdout.flush()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.4f}" if abs(v) < 100 else f"{v:,.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def progress(items: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it",
             **kwargs: Any) -> Iterator[T]:
    """A tqdm bar; refreshed every few seconds when the output is a log (Prefect, CI), not a terminal."""
    from tqdm.auto import tqdm
    interactive = sys.stderr.isatty()
    return tqdm(items, total=total, desc=desc, unit=unit, dynamic_ncols=True,
                mininterval=0.2 if interactive else 10.0, disable=not is_rank_zero() or
                os.environ.get("SCRATCHLM_PROGRESS") == "off", **kwargs)
