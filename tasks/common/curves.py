"""A training stage's logged curve as DVC plots read it: data/<stage>/history.jsonl → data/<stage>/curves.json.

    write_curves(paths.out / "history.jsonl")      # beside it: curves.json, what dvc.yaml's `plots:` name
    dvc plots show                                 # dvc_plots/index.html: loss, val bpb, lr, reward, KL by step

Why a second file: DVC plots read JSON, YAML, CSV and TSV, not JSON Lines, and DVC takes a JSON list as data only
when every row has the same keys (`dvc.render.converter.vega._is_datapoints`; otherwise the plot shows nothing).
The trainer's history has two kinds of rows, train/* every `log_every` steps and val/* at each evaluation, so the
rows here all carry every numeric key of the history, `null` where a row has none (vega leaves nulls out of a
line) and for a non-finite value (NaN is not JSON). Torch-free: the trainer's rank 0 calls it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tasks.common.dvcio import atomic_path

CURVES_FILE = "curves.json"
LEADING = ("step", "tokens")  # first in every row, the rest sorted: train/* before val/*


def curve_rows(rows: list[dict[str, Any]]) -> list[dict[str, float | int | None]]:
    """Uniform rows, in step order: every numeric key of any row in each, None where the row has no finite value.

    Non-numeric fields (a per-kind dict, a string) are left out: no plot can draw them."""
    keys: set[str] = set()
    for row in rows:
        keys.update(k for k, v in row.items() if _number(v) is not None or _is_nonfinite(v))
    order = [k for k in LEADING if k in keys] + sorted(keys - set(LEADING))
    return [{k: _number(row.get(k)) for k in order} for row in sorted(rows, key=lambda r: r.get("step", 0))]


def read_history(history: Path) -> list[dict[str, Any]]:
    """The rows of a history.jsonl; a line that is not a JSON object is a ValueError naming file and line."""
    rows = []
    for n, line in enumerate(history.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{history}:{n}: not JSON ({e})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{history}:{n}: a row must be a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def write_curves(history: Path, out: Path | None = None) -> Path:
    """Write `curve_rows` of `history` as a JSON list to `out` (default: curves.json beside it); returns `out`."""
    out = out or history.with_name(CURVES_FILE)
    rows = curve_rows(read_history(history))
    with atomic_path(out) as tmp:  # one row a line: a diff or a `head` reads like the history
        tmp.write_text("[\n" + ",\n".join(json.dumps(r, allow_nan=False) for r in rows) + "\n]\n")
    return out


def _number(v: Any) -> float | int | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return v if math.isfinite(v) else None


def _is_nonfinite(v: Any) -> bool:
    return isinstance(v, float) and not math.isfinite(v)
