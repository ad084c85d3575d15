"""Local file sources: .txt, .jsonl, .jsonl.gz and .parquet, read record by record with counted quarantine.

Each reader yields `Record`s: either a document (`text` set) or a quarantined record (`reason` set) with the
place it came from (`path:line`, `path#doc`, `path@row`), so nothing is dropped without a count and a location.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tasks.common.config import ScratchError, input_path

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
BINARY_SNIFF_BYTES = 8192
TXT_BLOCK_BYTES = 1 << 20


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
    path = Path(os.path.abspath(input_path(spec, root)))
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


def looks_binary(head: bytes) -> bool:
    """A NUL byte in the first BINARY_SNIFF_BYTES: no UTF-8 text or JSON Lines file has one."""
    return b"\x00" in head[:BINARY_SNIFF_BYTES]


def read_txt(path: Path, separator: str, keep_tail: bool) -> Iterator[Record]:
    """Documents of a text file split on `separator`, read block by block; a trailing piece with no separator
    after it is a cut-off tail (e.g. a byte-range sample) and is quarantined unless `keep_tail`. A read error
    mid-file keeps every document before it and quarantines the rest of the file as one record."""
    sep = separator.encode("utf-8")
    buf, base, start, scan, index = b"", 0, 0, 0, 0  # buf[start:] unconsumed, from file offset base + start
    try:
        with open(path, "rb", buffering=0) as f:  # unbuffered: a failing read loses no bytes before it
            buf = f.read(max(TXT_BLOCK_BYTES, BINARY_SNIFF_BYTES))  # the first block is sniffed
            if looks_binary(buf):
                yield Record(str(path), reason="binary file (NUL bytes)", excerpt=repr(buf[:60]))
                return
            if buf.startswith(codecs.BOM_UTF8):
                start = scan = len(codecs.BOM_UTF8)
            while True:
                pos = buf.find(sep, scan) if sep else -1
                if pos >= 0:
                    yield _text_record(f"{path}#{index}", buf[start:pos])
                    index, start = index + 1, pos + len(sep)
                    scan = start
                    continue
                block = f.read(TXT_BLOCK_BYTES)
                if not block:
                    break
                base, buf = base + start, buf[start:] + block
                start, scan = 0, max(0, len(buf) - len(block) - len(sep) + 1)
    except OSError as e:
        offset = base + start
        where = f"at document {index}: the rest of the file, from byte {offset}, is unreadable"
        yield Record(f"{path}#{index}", reason=f"read error ({where}): {e}" if offset else f"unreadable file: {e}")
        return
    tail = buf[start:]
    if index == 0:
        yield _text_record(f"{path}#0", tail)  # no separator at all: the whole file is one document
    elif tail.strip():
        if keep_tail:
            yield _text_record(f"{path}#{index}", tail)
        else:
            yield Record(
                f"{path}#{index}",
                reason="unterminated tail (no separator after the last document)",
                excerpt=_excerpt(tail),
            )


def _text_record(location: str, raw: bytes) -> Record:
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        return Record(location, reason=f"invalid UTF-8 at byte {e.start}", excerpt=_excerpt(raw))
    if not text:
        return Record(location, reason="empty document")
    return Record(location, text=text)


def jsonl_lines(path: Path) -> Iterator[tuple[str, bytes] | Record]:
    """(`path:line`, raw bytes) for every non-blank line of a .jsonl / .jsonl.gz file (a UTF-8 BOM on the first
    line stripped), and the file's faults as quarantined `Record`s, each one record whatever it stands for (how
    many lines were lost is unknowable):
      a binary file (NUL bytes in its first BINARY_SNIFF_BYTES)       instead of any line
      a read error or a truncated gzip stream mid-file                after every line read before it
      a gzip member that fails its integrity check (CRC, bad data)    after the lines of the members before it:
                                                                      its decoded lines may be garbage
    """
    gz = suffix_of(path) == ".jsonl.gz"
    damaged = verify_gzip(path) if gz else None  # (first untrusted uncompressed byte, why) or None
    held: list[tuple[str, bytes]] = []  # the lines of the first BINARY_SNIFF_BYTES, held back until sniffed
    sniffing, line_no, offset = True, 0, 0
    fault: Record | None = None
    io_error = False  # the fault is the disk's, not the gzip stream's
    try:
        with (gzip.open if gz else open)(path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                start, offset = offset, offset + len(raw)
                if damaged is not None and offset > damaged[0]:
                    line_no, offset = line_no - 1, start
                    break
                if line_no == 1 and raw.startswith(codecs.BOM_UTF8):
                    raw = raw[len(codecs.BOM_UTF8) :]
                if not sniffing:
                    if raw.strip():
                        yield f"{path}:{line_no}", raw
                    continue
                if looks_binary(raw[: max(0, BINARY_SNIFF_BYTES - start)]):
                    head = b"".join(r for _, r in held) + raw
                    yield Record(str(path), reason="binary file, not JSON Lines (NUL bytes)", excerpt=repr(head[:60]))
                    return
                if raw.strip():
                    held.append((f"{path}:{line_no}", raw))
                if offset >= BINARY_SNIFF_BYTES:
                    sniffing = False
                    yield from held
                    held = []
    except (EOFError, OSError, zlib.error) as e:
        fault = _stream_fault(path, gz, line_no, offset, e)
        io_error = isinstance(e, OSError) and not isinstance(e, gzip.BadGzipFile)
    if damaged is not None and (fault is None or not io_error):  # reading reached the damaged member
        where = f"from line {line_no + 1}, uncompressed byte {offset}"
        fault = Record(
            f"{path}:{line_no + 1}",
            reason=f"corrupt or truncated gzip stream (corrupt: the rest of the file, {where}, fails gzip's "
            f"integrity check, so its lines are not trusted): {damaged[1]}",
        )
    yield from held
    if fault is not None:
        yield fault


def _stream_fault(path: Path, gz: bool, line_no: int, offset: int, error: Exception) -> Record:
    """The one record for the unreadable rest of a JSON Lines file, saying where reading stopped."""
    location = f"{path}:{line_no + 1}"
    if gz and line_no == 0 and isinstance(error, gzip.BadGzipFile) and "Not a gzipped file" in str(error):
        return Record(location, reason=f"not a gzip file: {error}")
    if line_no == 0 and offset == 0 and not isinstance(error, (EOFError, zlib.error, gzip.BadGzipFile)):
        return Record(location, reason=f"unreadable file: {error}")
    where = (
        f"after line {line_no}: the rest of the file, from {'uncompressed ' if gz else ''}byte {offset}, is unreadable"
    )
    if not gz:
        return Record(location, reason=f"read error ({where}): {error}")
    if isinstance(error, EOFError):
        return Record(
            location,
            reason=f"corrupt or truncated gzip stream (truncated {where}): "
            "the file ends before the gzip end-of-stream marker",
        )
    return Record(location, reason=f"corrupt or truncated gzip stream (corrupt {where}): {error}")


def verify_gzip(path: Path) -> tuple[int, str] | None:
    """(uncompressed offset of the first gzip member that fails its integrity check, zlib's reason), or None.

    Decoding a corrupt deflate stream yields garbage until zlib notices (often only at the member's CRC, after all
    of its data), so the lines of a failing member cannot be trusted; the members before it verified. A truncated
    stream or a file that is not gzip is left to the reader (it says where it stopped). One streaming pass of zlib
    over the compressed bytes, in bounded memory: ~1% of ingesting the file (0.5 s of 66 s for 26 MB)."""
    out = 0
    try:
        with open(path, "rb") as f:
            buf, member, started = b"", None, out
            while True:
                if not buf:
                    buf = f.read(1 << 16)
                    if not buf:
                        return None  # the end (or a truncated member: the reader reports it)
                if member is None:  # between members: zero padding, the next member, or trailing garbage
                    buf = buf.lstrip(b"\x00")
                    if not buf:
                        continue
                    if not buf.startswith(b"\x1f\x8b"):
                        return None  # not gzip: the reader reports it where it stops
                    member, started = zlib.decompressobj(wbits=31), out
                try:
                    out += len(member.decompress(buf, 1 << 20))
                except zlib.error as e:
                    why = str(e).removeprefix("Error -3 while decompressing data: ")
                    return started, "CRC check failed (incorrect data check)" if why == "incorrect data check" else why
                buf = member.unused_data if member.eof else member.unconsumed_tail
                if member.eof:
                    member = None
    except OSError:
        return None  # the reader meets the same error and reports it


def read_jsonl(path: Path, text_field: str) -> Iterator[Record]:
    """One document per JSON line; bad lines are quarantined with their line number, the rest kept."""
    for item in jsonl_lines(path):
        yield item if isinstance(item, Record) else _json_record(item[0], item[1], text_field)


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
    """Documents from a Parquet column, row group by row group, batch by batch; nulls, empty strings and invalid
    UTF-8 quarantined by row. A row group that cannot be read (corrupt pages with the footer intact) is one
    record counting its unread rows, after every row read before the fault; the next row groups are still read
    (each is a separate byte range the footer locates)."""
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
        names = file.schema_arrow.names
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        yield Record(str(path), reason=f"unreadable Parquet file: {e}")
        return
    with file:
        if text_field not in names:
            yield Record(
                str(path), reason=f"missing text column {text_field!r} (has {names})", count=file.metadata.num_rows
            )
            return
        column = f"text column {text_field!r}"
        groups = file.metadata.num_row_groups
        first = 0  # the first row of the current row group
        for group in range(groups):
            size, row = file.metadata.row_group(group).num_rows, first
            batches = file.iter_batches(batch_size=4096, row_groups=[group], columns=[text_field])
            while True:
                try:
                    batch = next(batches, None)
                    cells = None if batch is None else _cells(batch.column(0))
                except Exception as e:  # corrupt pages: OSError, ArrowInvalid, ... (pyarrow raises several types)
                    end, message = first + size - 1, str(e).strip().splitlines()
                    yield Record(
                        f"{path}@{row}",
                        reason=f"corrupt Parquet data (row group {group}, 0-based, of {groups}; rows {first}-{end}, "
                        f"{end - row + 1} unread from row {row}): {message[0] if message else type(e).__name__}",
                        count=max(1, end - row + 1),
                    )
                    break
                if cells is None:
                    break
                for cell in cells:
                    yield _cell_record(f"{path}@{row}", cell, column)
                    row += 1
            first += size


def _cell_record(location: str, cell: object, column: str) -> Record:
    if isinstance(cell, bytes):  # a cell of a string column with invalid UTF-8 somewhere in its batch (`_cells`)
        try:
            cell = cell.decode("utf-8")
        except UnicodeDecodeError as e:
            return Record(location, reason=f"invalid UTF-8 at byte {e.start}", excerpt=_excerpt(cell))
    return value_record(location, cell, column)


def _cells(array) -> list:
    """A column's values as Python objects; a string column with invalid UTF-8 in it as bytes instead, so the bad
    cells are quarantined one by one (`_cell_record`) and the good ones kept."""
    import pyarrow as pa

    try:
        return array.to_pylist()
    except UnicodeDecodeError:
        if not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
            raise
        return array.cast(pa.large_binary() if pa.types.is_large_string(array.type) else pa.binary()).to_pylist()


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
