"""Local file sources: .txt, .jsonl, .jsonl.gz and .parquet, read record by record with counted quarantine.

Each reader yields `Record`s: either a document (`text` set) or a quarantined record (`reason` set) with the
place it came from (`path:line`, `path#doc`, `path@row`), so nothing is dropped without a count and a location.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tasks.common.config import ScratchError

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
BINARY_SNIFF_BYTES = 8192


@dataclass(frozen=True)
class Record:
    location: str  # "path:line", "path#doc", "path@row"
    text: str | None = None  # the document, when valid
    reason: str | None = None  # why it was quarantined, when not
    count: int = 1  # records this entry stands for (a whole unreadable file may be many)
    excerpt: str = ""


def suffix_of(path: Path) -> str:
    name = path.name.lower()
    return ".jsonl.gz" if name.endswith(".jsonl.gz") else path.suffix.lower()


def expand(spec: str, root: Path) -> tuple[list[Path], list[Path]]:
    """(documents, skipped) files named by a source entry: a file, a folder searched recursively, or a glob.

    Inside folders and globs only document files (SUFFIXES) are read; others (a README, a SOURCE.md) are
    returned as skipped and reported. A named file of another type, or an entry matching nothing, is an error.
    """
    path = Path(os.path.abspath(spec if Path(spec).is_absolute() else root / spec))
    if any(ch in spec for ch in "*?["):
        found = [Path(p) for p in sorted(glob.glob(str(path), recursive=True)) if Path(p).is_file()]
    elif path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    elif path.is_file():
        if suffix_of(path) not in SUFFIXES:
            raise ScratchError(
                f"data.sources: {spec!r}: unsupported file type {suffix_of(path) or '(none)'} "
                f"(use {', '.join(SUFFIXES)})"
            )
        return [path], []
    else:
        raise ScratchError(f"data.sources: {spec!r}: no such file or folder ({path})")
    documents = [p for p in found if suffix_of(p) in SUFFIXES]
    if not documents:
        raise ScratchError(f"data.sources: {spec!r}: no {', '.join(SUFFIXES)} files there")
    return documents, [p for p in found if suffix_of(p) not in SUFFIXES]


def relative_location(location: str, root: Path) -> str:
    """A stable, readable id: a record's location (`path#doc`, `path:line`, `path@row`) relative to `root`."""
    for sep in ("#", "@", ":"):
        path, found, index = location.rpartition(sep)
        if found and index.split("/")[0].isdigit():
            return f"{os.path.relpath(path, root)}{sep}{index}"
    return os.path.relpath(location, root)


def read_file(path: Path, text_field: str, separator: str, keep_tail: bool) -> Iterator[Record]:
    """Dispatch on the suffix; an unsupported file is one quarantined record."""
    kind = suffix_of(path)
    if kind == ".txt":
        yield from read_txt(path, separator, keep_tail)
    elif kind in (".jsonl", ".jsonl.gz"):
        yield from read_jsonl(path, text_field)
    elif kind == ".parquet":
        yield from read_parquet(path, text_field)
    else:
        yield Record(str(path), reason=f"unsupported file type {kind or '(none)'} (use {', '.join(SUFFIXES)})")


def read_txt(path: Path, separator: str, keep_tail: bool) -> Iterator[Record]:
    """Documents of a text file split on `separator`; a trailing piece with no separator after it is a cut-off
    tail (e.g. a byte-range sample) and is quarantined unless `keep_tail`."""
    data = path.read_bytes()
    if b"\x00" in data[:BINARY_SNIFF_BYTES]:
        yield Record(str(path), reason="binary file (NUL bytes)", excerpt=repr(data[:60]))
        return
    sep = separator.encode("utf-8")
    pieces = data.split(sep) if sep else [data]
    for i, piece in enumerate(pieces):
        location = f"{path}#{i}"
        if sep and i == len(pieces) - 1 and len(pieces) > 1:
            if not piece.strip():
                return  # the file ends with a separator: nothing after it
            if not keep_tail:
                yield Record(
                    location, reason="unterminated tail (no separator after the last document)", excerpt=_excerpt(piece)
                )
                return
        yield _text_record(location, piece)


def _text_record(location: str, raw: bytes) -> Record:
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        return Record(location, reason=f"invalid UTF-8 at byte {e.start}", excerpt=_excerpt(raw))
    if not text:
        return Record(location, reason="empty document")
    return Record(location, text=text)


def read_jsonl(path: Path, text_field: str) -> Iterator[Record]:
    """One document per JSON line; bad lines are quarantined with their line number, the rest kept."""
    opener = gzip.open if suffix_of(path) == ".jsonl.gz" else open
    line_no = 0
    try:
        with opener(path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                if raw.strip():
                    yield _json_record(f"{path}:{line_no}", raw, text_field)
    except (EOFError, OSError, zlib.error) as e:
        yield Record(f"{path}:{line_no + 1}", reason=f"corrupt or truncated gzip after line {line_no}: {e}")


def _json_record(location: str, raw: bytes, text_field: str) -> Record:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return Record(location, reason=f"invalid UTF-8 at byte {e.start}", excerpt=_excerpt(raw))
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return Record(location, reason=f"malformed JSON: {e.msg} at column {e.colno}", excerpt=line[:80])
    if not isinstance(obj, dict):
        return Record(location, reason=f"not a JSON object ({type(obj).__name__})", excerpt=line[:80])
    if text_field not in obj:
        return Record(location, reason=f"missing text field {text_field!r}", excerpt=line[:80])
    text = obj[text_field]
    if not isinstance(text, str):
        return Record(
            location, reason=f"text field {text_field!r} is {type(text).__name__}, not a string", excerpt=line[:80]
        )
    if not text.strip():
        return Record(location, reason="empty document")
    return Record(location, text=text)


def read_parquet(path: Path, text_field: str) -> Iterator[Record]:
    """Documents from a Parquet column, batch by batch; nulls and empty strings quarantined by row."""
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        yield Record(str(path), reason=f"unreadable Parquet file: {e}")
        return
    if text_field not in file.schema_arrow.names:
        yield Record(
            str(path),
            reason=f"missing text column {text_field!r} (has {file.schema_arrow.names})",
            count=file.metadata.num_rows,
        )
        return
    row = 0
    column = f"text column {text_field!r}"
    for batch in file.iter_batches(columns=[text_field], batch_size=4096):
        for text in batch.column(0).to_pylist():
            yield value_record(f"{path}@{row}", text, column)
            row += 1


def value_record(location: str, value: object, what: str) -> Record:
    """A document from a table cell or dataset field (`what` names it in the reason): a non-string value (a null,
    a number) and a blank one are quarantined."""
    if not isinstance(value, str):
        return Record(location, reason=f"{what} is {type(value).__name__}")
    if not value.strip():
        return Record(location, reason="empty document")
    return Record(location, text=value)


def _excerpt(raw: bytes) -> str:
    return raw[:80].decode("utf-8", errors="replace")
