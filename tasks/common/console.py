"""What a stage shows on the terminal: progress bars, lines that do not break them, and the one closing summary.

Only rank 0 speaks: `is_rank_zero()` is the one predicate for "this process may print and write" (DeepSpeed sets
RANK for every rank; a process started without a launcher is rank 0).

The closing summary is one screen per stage: a stage's `summary(metrics, paths) -> list[str]` gives its sentences
(what a number alone does not say); without one, the numeric metrics are listed. Both end with where the outputs,
the metrics file and the MLflow run are.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def progress(
    items: Iterable[T] | None, total: int | None = None, desc: str = "", unit: str = "it", **kwargs: Any
) -> Iterator[T]:
    """A tqdm bar; refreshed every few seconds when the output is a log (Prefect, CI), not a terminal."""
    interactive = sys.stderr.isatty()
    off = not is_rank_zero() or os.environ.get("SCRATCHLM_PROGRESS") == "off"
    return tqdm(
        items,
        total=total,
        desc=desc,
        unit=unit,
        dynamic_ncols=True,
        mininterval=0.2 if interactive else 10.0,
        disable=off,
        **kwargs,
    )


def progress_write(text: str) -> None:
    """Print a line without breaking an active progress bar."""
    tqdm.write(text)


def fmt(v: Any) -> str:
    """A number as a summary or report shows it: thousands separators, 4 decimals below 100."""
    if isinstance(v, float):
        return f"{v:,.4f}" if abs(v) < 100 else f"{v:,.1f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def closing_summary(stage: str, metrics: dict, lines: list[str] | None, where: dict[str, str]) -> str:
    """The stage's closing screen: its own lines (or its numeric metrics), then where everything went."""
    rows = [
        (k, v)
        for k, v in metrics.items()
        if not k.startswith("_") and k != "seconds" and not isinstance(v, (dict, list))
    ]
    width = max([len(k) for k in where] + ([len(k) for k, _ in rows] if lines is None else []) + [8])
    out = [f"\n── {stage} done in {metrics.get('seconds', 0):.1f}s " + "─" * 40]
    if lines is None:
        out += [f"  {k:<{width}}  {fmt(v)}" for k, v in rows]
    else:
        out += [f"  {line}" for line in lines]
    out += [f"  {k:<{width}}  {v}" for k, v in where.items()]
    return "\n".join(out)
