"""What every stage's entry point shares: load its section, open its MLflow run, call `run`, write metrics, summarise.

A stage module ends with

    if __name__ == "__main__":          # python -m tasks.ingest (what dvc.yaml runs)
        stage_main("ingest", IngestConfig, run, summary, HEADLINE)

and `run(cfg, paths, tracker, **sections) -> dict` is a function of its arguments: any parameter besides those
three is named after a params.yaml section (`data`, `model`) and receives it, loaded and validated, e.g.
`def run(cfg: IngestConfig, paths: StagePaths, tracker: Tracker, data: DataConfig)`. `summary(metrics, paths)`
(optional) gives the sentences of the stage's closing screen (tasks/common/console.py). A `ScratchError` (bad
params, bad input a user can fix) is printed as one `error: ...` line and exits 2, which the Prefect flow surfaces
verbatim; so is a full disk or a folder that cannot be written (`filesystem_fault`).

Metrics: the dict `run` returns is the stage's full record, metrics/all/<stage>.json (an output: DVC versions it,
git does not; `read_metrics` reads it back), also an MLflow artifact. `HEADLINE`, the stage's list of dotted keys
(`*` matches any key at its level), picks the few figures a person compares between runs: they go to
metrics/<stage>.json (committed; what `dvc metrics show/diff` and `dvc exp show` list) and are the run's MLflow
metrics. Figures that describe the set-up rather than the result (world size, sequence length, parameters) are
logged as MLflow params (`SETUP_KEYS`), so MLflow's charts hold results and curves only.

Nothing a run does reaches data/<stage>/ or metrics/<stage>.json before it has succeeded: `run` gets a `paths`
whose `out` and `metrics` are a staging folder (tasks/common/dvcio.py: Staging), swapped in at the end. A failure
(an error, a full disk, an interrupt, kill -9) leaves the last good output and its metrics as they were, under
each entry point: `python -m tasks.<stage>`, `dvc repro` (the outs are `persist: true` in dvc.yaml, so DVC does not
delete them before the command runs) and the Prefect flow (a `dvc repro` per stage).
"""

from __future__ import annotations

import errno
import inspect
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

from tasks.common.config import ScratchError, as_dict, load_section
from tasks.common.console import closing_summary, is_rank_zero
from tasks.common.dvcio import StagePaths, Staging, stage_paths, write_json
from tasks.common.tracking import flatten, stage_run, tracking_uri

RunFn = Callable[..., dict | None]
SummaryFn = Callable[[dict, StagePaths], list[str]]


def stage_main(
    stage: str, config_cls: type, run: RunFn, summary: SummaryFn | None = None, headline: tuple[str, ...] = ()
) -> None:
    """Entry point of `python -m tasks.<stage>`; exits 2 with one clear line on a user error."""
    with user_errors(stage):
        metrics = execute(stage, config_cls, run, headline)
    if metrics is not None and is_rank_zero():
        paths = stage_paths(stage)
        where = {
            "outputs": f"{paths.out.relative_to(paths.root)}/",
            "metrics": f"{paths.metrics.relative_to(paths.root)} (headline), {paths.details.relative_to(paths.root)}",
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
        fault = filesystem_fault(error) if isinstance(error, Exception) else None
        if fault:
            print(f"error: {self.stage}: {fault}", file=sys.stderr, flush=True)
            sys.exit(2)
        if isinstance(error, KeyboardInterrupt):
            print(f"error: {self.stage}: interrupted", file=sys.stderr, flush=True)
            sys.exit(130)
        return False


STAGE_ARGS = ("cfg", "paths", "tracker")


def sections_for(fn: Callable) -> dict[str, Any]:
    """The params sections a stage function asks for by name: its parameters other than cfg, paths, tracker."""
    return {name: load_section(name) for name in inspect.signature(fn).parameters if name not in STAGE_ARGS}


def execute(stage: str, config_cls: type, run: RunFn, headline: tuple[str, ...] = ()) -> dict | None:
    """Load the section, run the stage inside its MLflow child run on a staging folder, then swap its outputs in as
    data/<stage>/ (with metrics.json, every figure) and metrics/<stage>.json (the `headline` figures); on any failure
    the previous ones stay as they were."""
    cfg = load_section(stage, config_cls)
    sections = sections_for(run)
    staging = Staging.of(stage, stage_paths(stage))
    started = time.perf_counter()
    with stage_run(stage, as_dict(cfg)) as tracker, published(staging, is_rank_zero()) as publish:
        metrics = run(cfg, staging.paths, tracker, **sections)
        if metrics is None:  # non-zero ranks of a training stage
            return None
        metrics = {**metrics, "seconds": round(time.perf_counter() - started, 2)}
        headline_figures = pick(metrics, headline)
        write_json(staging.paths.details, metrics)
        write_json(staging.paths.metrics, headline_figures)
        tracker.log_metrics(flat_numbers(headline_figures))
        tracker.log_params({f"setup.{k}": v for k, v in metrics.items() if k in SETUP_KEYS})
        tracker.log_text(staging.paths.details.read_text(), f"metrics/{stage}.json")  # as written: JSON-safe
        publish()
    metrics["_run_id"] = tracker.run_id
    return metrics


class published:
    """`with published(staging, main) as publish:` the block writes into `staging.paths`; `publish()` swaps them in.

    On the publishing process (`main`: rank 0) the staging folder is created on entry and removed on exit, whatever
    happened; a block that ends without `publish()` publishes nothing. A ScratchError keeps what the run wrote in
    data/.failed/<stage>/ and its message names that folder instead of the staging one (which is gone); a full disk
    or an unwritable folder becomes a ScratchError saying what to do and that the previous output is unchanged.
    Other ranks touch no folder, but get the same one-line errors.
    """

    def __init__(self, staging: Staging, main: bool) -> None:
        self.staging, self.main, self.done = staging, main, False

    def __enter__(self) -> Callable[[], None]:
        if self.main:
            try:
                self.staging.begin()
            except OSError as e:
                self._reraise(e)
        return self._publish

    def _publish(self) -> None:
        if self.main:
            self.staging.commit()
            self.done = True

    def __exit__(self, kind: type | None, error: BaseException | None, _tb: Any) -> bool:
        if not self.main or self.done:
            return False
        if isinstance(error, ScratchError):  # its own message; what the run wrote is kept unless the disk is full
            kept = self.staging.discard(keep=fault_of(error)[0] not in DISK_FULL)
            staged, text = str(self.staging.paths.out), str(error)
            if staged in text and len(error.args) == 1:  # the same error (its type kept), naming a folder that exists
                error.args = (text.replace(staged, str(kept or self.staging.final.out)),)
            return False
        self.staging.discard()
        fault = filesystem_fault(error, self._shown) if isinstance(error, Exception) else None
        if fault:
            raise ScratchError(f"{fault} ({self._unchanged()})") from None
        return False

    def _reraise(self, error: OSError) -> None:
        fault = filesystem_fault(error, self._shown)
        if fault:
            raise ScratchError(f"{fault} ({self._unchanged()})") from None
        raise error

    def _shown(self, path: str) -> str:
        """A path as the error line shows it: relative to the project, the staging folder as the stage's own."""
        text = str(path)
        for staged, final in (
            (self.staging.paths.out, self.staging.final.out),
            (self.staging.paths.metrics, self.staging.final.metrics),
        ):
            text = text.replace(str(staged), str(final))
        text = ATOMIC_TMP.sub(r"\1", text)  # `.name.x1y2z3w4`, atomic_path's temporary: the file it stands for
        return text.removeprefix(f"{self.staging.final.root}{os.sep}")

    def _unchanged(self) -> str:
        final = self.staging.final
        return f"{self._shown(str(final.out))}/ and {self._shown(str(final.metrics))} are unchanged"


ATOMIC_TMP = re.compile(r"(?<=/)\.([^/]+)\.[a-z0-9_]{8}$")
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
NOT_ALLOWED = (errno.EACCES, errno.EPERM, errno.EROFS)


def filesystem_fault(error: BaseException | None, shown: Callable[[str], str] = str) -> str | None:
    """What to tell the user about an error caused by a full disk or a folder that cannot be written (or read), for
    an error line; None for anything else."""
    code, filename = fault_of(error)
    if code is None:
        return None
    reason = os.strerror(code).lower()
    where = shown(filename) if filename else None
    if code in DISK_FULL:
        return f"{reason}{f' writing {where}' if where else ''}: free some space and rerun"
    return f"{where + ': ' if where else ''}{reason}: fix the permissions and rerun"


def fault_of(error: BaseException | None) -> tuple[int | None, str | None]:
    """(errno, file) of the full-disk or permission OSError behind `error`, else (None, None). Follows the causes,
    as Python prints them: libraries wrap OSErrors in their own (safetensors, torch: by message only)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in DISK_FULL + NOT_ALLOWED:
            return error.errno, os.fsdecode(error.filename) if error.filename else None
        if "No space left on device" in str(error):
            return errno.ENOSPC, None
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return None, None


SETUP_KEYS = frozenset(
    "world_size zero_stage seq_len max_len micro_batch_size grad_accum tokens_per_step n_params peak_flops precision "
    "compiled preset steps group_size prompts_per_step eval_prompts vocab_size_requested lsh_bands lsh_rows units "
    "device dtype".split()
)
"""Top-level figures that describe how a stage ran, not what it achieved: MLflow params (`setup.<key>`)."""


def pick(metrics: dict, patterns: tuple[str, ...]) -> dict:
    """The leaves of `metrics` that the dotted `patterns` name (`*` = any key at that level), nested as in
    `metrics`: numbers and booleans only (a path or a name is no figure to compare)."""
    out: dict = {}
    for pattern in patterns:
        _pick(metrics, pattern.split("."), out)
    return out


def _pick(node: Any, parts: list[str], out: dict) -> None:
    if not isinstance(node, dict):
        return
    head, rest = parts[0], parts[1:]
    for key in list(node) if head == "*" else [head] if head in node else []:
        value = node[key]
        if rest:
            if isinstance(value, dict):
                sub = out.setdefault(key, {})
                _pick(value, rest, sub)
                if not sub:
                    del out[key]
        elif isinstance(value, (int, float)):
            out[key] = value


def flat_numbers(d: dict) -> dict[str, float]:
    """The numeric leaves of a nested metrics dict, dotted keys (what MLflow takes as metrics)."""
    return {
        k: v for k, v in flatten(d, encode=False).items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
