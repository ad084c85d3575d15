"""Where stages read and write, and the document shard format they share.

Layout (one name per stage everywhere): `data/<stage>/` holds a stage's outputs, `metrics/<stage>.json` its
DVC metrics. Documents are gzip JSON Lines shards `shard-00000.jsonl.gz` of `{"id", "text", "source"}`.
Writes go to a temporary name and are renamed into place, so a killed stage never leaves a half-written output
that looks complete.

A run builds its outputs in a staging folder, `data/.staging/<stage>.<host>-<pid>/` (`out/` and `<stage>.json`),
and `Staging.commit` swaps them in only when the stage succeeded: data/<stage>/ and metrics/<stage>.json always
hold the last good output, whatever happened to the run since (an error, a full disk, kill -9). A run that failed
with a user error leaves what it wrote in `data/.failed/<stage>/`, so the files its error line names can be read;
the next run of the stage removes it, and the folders of runs that died (their process is gone).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tasks.common.config import ROOT, ScratchError

# read once at import (os.umask can only be read by setting it), before any thread starts
UMASK = os.umask(0o022)
os.umask(UMASK)


@dataclass(frozen=True)
class StagePaths:
    """The folders a stage may touch."""

    root: Path
    out: Path  # data/<stage>/
    metrics: Path  # metrics/<stage>.json: the headline figures (git + `dvc metrics`)

    def of(self, stage: str) -> Path:
        """Output folder of another (upstream) stage."""
        return self.root / "data" / stage

    @property
    def details(self) -> Path:
        """metrics/all/<stage>.json: every figure the stage measured. A DVC output of its own (versioned by DVC, not
        git), outside data/<stage>/ so that a rerun's new timings do not change the data downstream stages hash."""
        return self.metrics.parent / DETAILS / self.metrics.name


DETAILS = "all"
"""The folder beside the headline metrics that holds each stage's full metrics file."""


def read_metrics(stage: str, root: Path = ROOT) -> dict:
    """Every figure `stage` measured (metrics/all/<stage>.json); {} before the stage has run."""
    file = stage_paths(stage, root).details
    return json.loads(file.read_text()) if file.is_file() else {}


def stage_paths(stage: str, root: Path = ROOT) -> StagePaths:
    return StagePaths(root=root, out=root / "data" / stage, metrics=root / "metrics" / f"{stage}.json")


def pipeline_stages(root: Path = ROOT) -> list[str]:
    """The stages in pipeline order, as <root>/dvc.yaml lists them (the one place that order lives); [] without one."""
    file = root / "dvc.yaml"
    return list((yaml.safe_load(file.read_text()) or {}).get("stages", {})) if file.is_file() else []


def fresh_dir(path: Path) -> Path:
    """Empty `path`: a stage's `paths.out` is its own staging folder (`Staging`), so this never touches the last
    good output in data/<stage>/."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; rename it onto `path` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp creates 0600; an output is as readable as any file the user writes
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


STAGING_ENV = "SCRATCHLM_STAGING_ID"
"""The id of a run's staging folder; the training launcher sets it, so that every rank derives the same folder."""


def staging_id() -> str:
    """`<host>-<pid>` of this process: unique among live runs, and tells whether the run that owns a folder died."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class Staging:
    """Where one run of a stage writes (`paths`) until `commit` swaps it in as data/<stage>/ + metrics/<stage>.json.

    Only the process that publishes the outputs (rank 0) calls `begin`, `commit` and `discard`; the others only
    read `paths` (the same folder on every rank, from STAGING_ENV).
    """

    stage: str
    final: StagePaths
    folder: Path  # data/.staging/<stage>.<id>/

    @classmethod
    def of(cls, stage: str, final: StagePaths, run_id: str | None = None) -> Staging:
        run_id = run_id or os.environ.get(STAGING_ENV) or staging_id()
        return cls(stage, final, final.root / "data" / ".staging" / f"{stage}.{run_id}")

    @property
    def paths(self) -> StagePaths:
        """What the stage's `run` sees: its out and metrics inside the staging folder, upstream folders as they are."""
        return StagePaths(root=self.final.root, out=self.folder / "out", metrics=self.folder / self.final.metrics.name)

    @property
    def failed(self) -> Path:
        """data/.failed/<stage>/: what the last run that failed with a user error had written."""
        return self.final.root / "data" / ".failed" / self.stage

    def begin(self) -> None:
        """Remove what earlier runs of the stage left (a failed output, the folders of runs that died), then create
        the empty staging folder. Raises OSError when data/ is not writable: nothing has been touched then."""
        remove_tree(self.failed)
        remove_dead_staging(self.folder.parent, self.stage, self.final.out)
        remove_tree(self.folder)
        self.paths.out.mkdir(parents=True)

    def commit(self) -> None:
        """Swap the staged outputs in: both metrics files copied beside their final names, data/<stage>/ renamed
        aside, the staged out renamed in, the full metrics then the headline metrics renamed in, the old folder
        deleted. A failure at any step puts the previous output (and full metrics) back and re-raises; the renames
        are within data/ and within metrics/, so nothing is copied."""
        out, metrics, details = self.final.out, self.final.metrics, self.final.details
        aside = self.folder.with_name(f"{self.folder.name}.previous")  # outside the folder `discard` deletes
        tmp, details_tmp, details_old = (sibling_temp(p) for p in (metrics, details, details))
        moved = swapped = details_moved = False
        try:
            shutil.copyfile(self.paths.metrics, tmp)
            shutil.copyfile(self.paths.details, details_tmp)
            if out.exists() or out.is_symlink():
                os.rename(out, aside)
                moved = True
            os.rename(self.paths.out, out)
            swapped = True
            if details.exists():
                os.replace(details, details_old)
                details_moved = True
            os.replace(details_tmp, details)
            os.replace(tmp, metrics)
        except BaseException:
            try:
                if details_moved:
                    os.replace(details_old, details)
                if swapped:
                    os.rename(out, self.paths.out)
                if moved:
                    os.rename(aside, out)
            except OSError as e:
                raise RuntimeError(f"{out}: could not put the previous output back; it is in {aside}") from e
            raise
        finally:
            for leftover in (tmp, details_tmp, details_old):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(leftover)
        remove_tree(aside)
        remove_tree(self.folder)

    def discard(self, keep: bool = False) -> Path | None:
        """Delete the staging folder; with `keep`, move what the run wrote to data/.failed/<stage>/ first (when it
        wrote anything) and return that folder. The published output is never touched."""
        kept = None
        if keep and self.paths.out.is_dir() and any(self.paths.out.iterdir()):
            with contextlib.suppress(OSError):
                remove_tree(self.failed)
                self.failed.parent.mkdir(parents=True, exist_ok=True)
                os.rename(self.paths.out, self.failed)
                kept = self.failed
        remove_tree(self.folder)
        return kept


def sibling_temp(path: Path) -> Path:
    """A new empty temporary file beside `path` (its folder created), for a rename onto `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def remove_tree(path: Path) -> None:
    """Delete a folder (or file) if it exists; errors are ignored (what is left is cleaned up by a later run)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def remove_dead_staging(folder: Path, stage: str, out: Path | None = None) -> None:
    """Delete the staging folders of `stage` whose run died (killed, crashed): same host, process gone. A run killed
    in the middle of its swap may have left the previous output renamed aside (`<name>.previous`) and `out` missing:
    that output goes back to `out`."""
    host = socket.gethostname()
    for path in sorted(folder.glob(f"{stage}.*")) if folder.is_dir() else []:
        name = path.name[len(stage) + 1 :]
        aside = name.endswith(".previous")
        owner, _, pid = name.removesuffix(".previous").rpartition("-")
        if owner != host or not pid.isdigit() or _alive(int(pid)):
            continue
        if aside and out is not None and not (out.exists() or out.is_symlink()):
            with contextlib.suppress(OSError):  # when it cannot go back, it stays where it is
                os.rename(path, out)
            continue
        remove_tree(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_json(path: Path, obj: Any) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n")
    return path


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def _jsonable(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


# ------------------------------------------------------------------------------------------------ JSONL shards


def write_jsonl(path: Path, rows: Iterable[dict]) -> Path:
    """Plain JSON Lines (quarantines, samples): one UTF-8 object per line, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False, default=_jsonable) + "\n" for row in rows)
    return path


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_labels(path: Path) -> list[dict]:
    """The builtin corpus's ground-truth rows {id, label, of} (ingest writes them beside the documents, filter and
    dedup carry them on); empty when the file is missing or empty: real corpora have none."""
    if not path.is_file():
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows.append({"id": row["id"], "label": row["label"], "of": row.get("of")})
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ScratchError(
                    f"{path}:{number}: not a label row {{id, label, of}} ({e}); rerun ingest to rewrite it"
                ) from None
    return rows


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.jsonl.gz"


def write_jsonl_gz(path: Path, rows: Iterable[dict]) -> int:
    """Write rows to a gzip JSON Lines file atomically (deterministic bytes: mtime 0); return the row count."""
    n = 0
    with (
        atomic_path(path) as tmp,
        open(tmp, "wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz,
        io.TextIOWrapper(gz, encoding="utf-8", newline="\n") as f,
    ):
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl_gz(path: Path) -> Iterator[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def shards(folder: Path) -> list[Path]:
    """The document shards of a stage folder, in order; a clear error when there are none."""
    found = sorted(Path(folder).glob("shard-*.jsonl.gz"))
    if not found:
        from tasks.common.config import ScratchError

        raise ScratchError(f"{folder}: no shard-*.jsonl.gz documents (has the upstream stage run?)")
    return found


def read_docs(folder: Path) -> Iterator[dict]:
    """Every document of a stage folder, shard by shard, in order."""
    for path in shards(folder):
        yield from read_jsonl_gz(path)


class ShardWriter:
    """Write documents into numbered shards of at most `docs_per_shard` documents."""

    def __init__(self, folder: Path, docs_per_shard: int = 5000) -> None:
        self.folder, self.docs_per_shard = Path(folder), docs_per_shard
        self.folder.mkdir(parents=True, exist_ok=True)
        self._buffer: list[dict] = []
        self.n_shards = self.n_docs = 0

    def write(self, doc: dict) -> None:
        self._buffer.append(doc)
        if len(self._buffer) >= self.docs_per_shard:
            self.flush()

    def flush(self) -> None:
        if self._buffer or self.n_shards == 0:
            self.n_docs += write_jsonl_gz(self.folder / shard_name(self.n_shards), self._buffer)
            self.n_shards += 1
            self._buffer = []

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.flush()
