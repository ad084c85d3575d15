"""Where stages read and write, and the document shard format they share.

Layout (one name per stage everywhere): `data/<stage>/` holds a stage's outputs, `metrics/<stage>.json` its
DVC metrics. Documents are gzip JSON Lines shards `shard-00000.jsonl.gz` of `{"id", "text", "source"}`.
Writes go to a temporary name and are renamed into place, so a killed stage never leaves a half-written output
that looks complete.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tasks.common.config import ROOT, ScratchError


@dataclass(frozen=True)
class StagePaths:
    """The folders a stage may touch."""

    root: Path
    out: Path  # data/<stage>/
    metrics: Path  # metrics/<stage>.json

    def of(self, stage: str) -> Path:
        """Output folder of another (upstream) stage."""
        return self.root / "data" / stage


def stage_paths(stage: str, root: Path = ROOT) -> StagePaths:
    return StagePaths(root=root, out=root / "data" / stage, metrics=root / "metrics" / f"{stage}.json")


def pipeline_stages(root: Path = ROOT) -> list[str]:
    """The stages in pipeline order, as <root>/dvc.yaml lists them (the one place that order lives); [] without one."""
    file = root / "dvc.yaml"
    return list((yaml.safe_load(file.read_text()) or {}).get("stages", {})) if file.is_file() else []


def fresh_dir(path: Path) -> Path:
    """Empty `path` (DVC removes outs before a run; this makes direct runs behave the same)."""
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
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


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
