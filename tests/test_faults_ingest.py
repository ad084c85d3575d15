"""Faults in ingest's input (issue 16, items 3 and 10): a read error anywhere in a file is one quarantined record
naming the file and where reading stopped, every document before it is kept, the other files are read as usual,
the counts add up (docs_in = docs_out + quarantined) and a failed run leaves no shards. Plus the filter's memory
on one huge document. Every case runs ingest's `run()` in-process."""

from __future__ import annotations

import errno
import gzip
import io
import json
import random
import tracemalloc
from pathlib import Path

import pytest

from tasks import filter as quality
from tasks import ingest
from tasks.sources import files, hf, instructions
from tests.test_ingest import run_ingest as run_ingest_with

INLINE = {"parallel": {"runner": "local", "workers": 1, "dask_address": ""}}
POOL = {"parallel": {"runner": "local", "workers": 2, "dask_address": ""}}


def run_ingest(tmp_path: Path, sources: list[str], data: dict | None = None) -> tuple[dict, list[dict], list[dict]]:
    """The stage on `sources` (inline unless `data` says otherwise); the counts must add up whatever the input."""
    return run_ingest_with(tmp_path, sources, {**INLINE, **(data or {})})


def jsonl_rows(n: int, prefix: str = "document") -> list[bytes]:
    return [json.dumps({"text": f"{prefix} number {i} with a few words"}).encode() + b"\n" for i in range(n)]


# ------------------------------------------------------------------------------------------------ Parquet


def write_parquet(path: Path, rows: int, per_group: int, compression: str = "snappy") -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [
        f"parquet cell-{i:03d} says " + " ".join(f"word{(i * 7 + k) % 97}" for k in range(12)) for i in range(rows)
    ]
    pq.write_table(
        pa.table({"n": list(range(rows)), "text": texts}),
        path,
        row_group_size=per_group,
        compression=compression,
        use_dictionary=False,
    )
    return texts


def corrupt_row_group(path: Path, group: int) -> None:
    """Overwrite 64 bytes in the middle of the text column's data page of `group`; the footer stays intact."""
    import pyarrow.parquet as pq

    chunk = pq.ParquetFile(path).metadata.row_group(group).column(1)
    middle = chunk.data_page_offset + chunk.total_compressed_size // 2
    blob = bytearray(path.read_bytes())
    blob[middle : middle + 64] = b"\xff" * 64
    path.write_bytes(bytes(blob))


def test_parquet_corrupt_in_the_middle_quarantines_its_row_group_and_keeps_the_rest(tmp_path):
    import pyarrow.parquet as pq

    texts = write_parquet(tmp_path / "bad.parquet", rows=400, per_group=50)
    corrupt_row_group(tmp_path / "bad.parquet", group=3)
    assert pq.ParquetFile(tmp_path / "bad.parquet").metadata.num_rows == 400, "the footer must still be readable"
    with pytest.raises(OSError):  # what used to come out of the worker process as a traceback
        pq.read_table(tmp_path / "bad.parquet")
    good = write_parquet(tmp_path / "good.parquet", rows=120, per_group=50)
    (tmp_path / "good.jsonl").write_bytes(b"".join(jsonl_rows(30)))

    metrics, docs, quarantine = run_ingest(tmp_path, ["bad.parquet", "good.parquet", "good.jsonl"], data=POOL)

    assert metrics["docs_in"] == 400 + 120 + 30
    assert metrics["quarantined"] == 50 and metrics["quarantined_by_reason"] == {"corrupt Parquet data": 50}
    expected = [f"bad.parquet@{i}" for i in range(400) if not 150 <= i < 200]
    expected += [f"good.parquet@{i}" for i in range(120)] + [f"good.jsonl:{i}" for i in range(1, 31)]
    assert [d["id"] for d in docs] == expected
    assert [d["text"] for d in docs if d["id"].startswith("bad")] == texts[:150] + texts[200:]
    assert [d["text"] for d in docs if d["id"].startswith("good.p")] == good
    [row] = quarantine
    assert row["location"] == "bad.parquet@150" and row["count"] == 50
    assert row["reason"].startswith("corrupt Parquet data (row group 3, 0-based, of 8; rows 150-199, 50 unread")
    assert not list((tmp_path / "data/ingest").glob(".shard-*")), "no half-written shard may remain"


def test_parquet_invalid_utf8_cell_is_quarantined_alone(tmp_path):
    texts = write_parquet(tmp_path / "cells.parquet", rows=60, per_group=60, compression="none")
    blob = (tmp_path / "cells.parquet").read_bytes()
    assert blob.count(b"cell-017") == 1
    (tmp_path / "cells.parquet").write_bytes(blob.replace(b"cell-017", b"cell\xff017"))

    metrics, docs, quarantine = run_ingest(tmp_path, ["cells.parquet"])

    assert [d["text"] for d in docs] == texts[:17] + texts[18:]
    assert [(q["location"], q["reason"], q["count"]) for q in quarantine] == [
        ("cells.parquet@17", "invalid UTF-8 at byte 12", 1)
    ]


# ------------------------------------------------------------------------------------------------ gzip JSON Lines


def test_truncated_jsonl_gz_is_one_record_saying_where_the_rest_begins(tmp_path):
    rows = jsonl_rows(2000)
    blob = gzip.compress(b"".join(rows), mtime=0)
    (tmp_path / "cut.jsonl.gz").write_bytes(blob[: len(blob) // 2])

    metrics, docs, quarantine = run_ingest(tmp_path, ["cut.jsonl.gz"])

    kept = len(docs)
    assert 0 < kept < 2000
    assert [d["id"] for d in docs] == [f"cut.jsonl.gz:{i}" for i in range(1, kept + 1)]
    assert [d["text"] for d in docs] == [json.loads(r)["text"] for r in rows[:kept]]
    assert metrics["quarantined"] == 1 and metrics["quarantined_by_reason"] == {"corrupt or truncated gzip stream": 1}
    [row] = quarantine
    assert row["location"] == f"cut.jsonl.gz:{kept + 1}" and row["count"] == 1
    offset = sum(map(len, rows[:kept]))
    assert row["reason"] == (
        f"corrupt or truncated gzip stream (truncated after line {kept}: the rest of the file, from uncompressed "
        f"byte {offset}, is unreadable): the file ends before the gzip end-of-stream marker"
    )


def test_corrupt_gzip_member_is_not_trusted_but_the_members_before_it_are(tmp_path):
    rows = jsonl_rows(300)
    second = bytearray(gzip.compress(b"".join(rows[100:]), mtime=0))
    second[len(second) // 2] ^= 0xFF  # bit rot: zlib decodes garbage until the member's check fails
    (tmp_path / "rot.jsonl.gz").write_bytes(gzip.compress(b"".join(rows[:100]), mtime=0) + bytes(second))
    (tmp_path / "fine.jsonl").write_bytes(b"".join(jsonl_rows(5, "fine")))

    metrics, docs, quarantine = run_ingest(tmp_path, ["rot.jsonl.gz", "fine.jsonl"])

    assert [d["id"] for d in docs] == [f"rot.jsonl.gz:{i}" for i in range(1, 101)] + [
        f"fine.jsonl:{i}" for i in range(1, 6)
    ]
    [row] = quarantine
    assert row["location"] == "rot.jsonl.gz:101" and row["count"] == 1
    assert row["reason"].startswith(
        f"corrupt or truncated gzip stream (corrupt: the rest of the file, from line 101, uncompressed byte "
        f"{sum(map(len, rows[:100]))}, fails gzip's integrity check, so its lines are not trusted): "
    )


# ------------------------------------------------------------------------------------------------ small ones (item 10)


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".txt"])
def test_utf8_bom_does_not_cost_the_first_document(tmp_path, suffix):
    if suffix == ".txt":
        payload = "\ufefffirst story.<|endoftext|>second story.<|endoftext|>".encode()
    else:
        payload = b"\xef\xbb\xbf" + b"".join(jsonl_rows(3))
    path = tmp_path / f"bom{suffix}"
    path.write_bytes(gzip.compress(payload) if suffix.endswith(".gz") else payload)

    metrics, docs, _ = run_ingest(tmp_path, [path.name])

    assert metrics["quarantined"] == 0
    first = "first story." if suffix == ".txt" else "document number 0 with a few words"
    assert docs[0]["text"] == first and "\ufeff" not in docs[0]["text"]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_binary_file_named_jsonl_is_one_record(tmp_path, suffix):
    blob = random.Random(0).randbytes(64 * 1024)  # hundreds of "lines" (newline bytes) and NULs
    assert blob.count(b"\n") > 200
    path = tmp_path / f"image{suffix}"
    path.write_bytes(gzip.compress(blob) if suffix.endswith(".gz") else blob)
    (tmp_path / "ok.jsonl").write_bytes(b"".join(jsonl_rows(4)))

    metrics, docs, quarantine = run_ingest(tmp_path, [path.name, "ok.jsonl"])

    assert [d["id"] for d in docs] == [f"ok.jsonl:{i}" for i in range(1, 5)]
    assert metrics["quarantined_by_reason"] == {"binary file, not JSON Lines": 1}
    assert [(q["location"], q["reason"], q["count"]) for q in quarantine] == [
        (path.name, "binary file, not JSON Lines (NUL bytes)", 1)
    ]


# ------------------------------------------------------------------------------------------------ read errors mid-file


class FailingRaw(io.RawIOBase):
    """A file whose reads fail with EIO once `fail_at` bytes have been delivered (a bad sector, a dropped mount)."""

    def __init__(self, data: bytes, fail_at: int) -> None:
        self.data, self.fail_at, self.pos = data, fail_at, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.pos >= self.fail_at:
            raise OSError(errno.EIO, "Input/output error")
        n = min(len(b), self.fail_at - self.pos)
        b[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n


def fail_reads_of(monkeypatch, name: str, fail_at: int) -> None:
    real_open = open

    def fake_open(path, mode="r", *args, **kwargs):
        if Path(path).name == name:
            return io.BufferedReader(FailingRaw(Path(path).read_bytes(), fail_at), buffer_size=64)
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(files, "open", fake_open, raising=False)
    monkeypatch.setattr(files, "TXT_BLOCK_BYTES", 64)


def test_read_error_mid_jsonl_keeps_the_lines_before_it(tmp_path, monkeypatch):
    rows = jsonl_rows(100)
    (tmp_path / "disk.jsonl").write_bytes(b"".join(rows))
    fail_reads_of(monkeypatch, "disk.jsonl", fail_at=sum(map(len, rows[:60])) + 10)

    metrics, docs, quarantine = run_ingest(tmp_path, ["disk.jsonl"])

    kept = len(docs)
    assert 50 <= kept <= 60
    assert [d["id"] for d in docs] == [f"disk.jsonl:{i}" for i in range(1, kept + 1)]
    assert [(q["location"], q["count"]) for q in quarantine] == [(f"disk.jsonl:{kept + 1}", 1)]
    assert quarantine[0]["reason"] == (
        f"read error (after line {kept}: the rest of the file, from byte {sum(map(len, rows[:kept]))}, is "
        "unreadable): [Errno 5] Input/output error"
    )
    assert metrics["quarantined_by_reason"] == {"read error": 1}


def test_read_error_mid_txt_keeps_the_documents_before_it(tmp_path, monkeypatch):
    stories = [f"story {i}: " + "once upon a time " * (i % 5 + 1) for i in range(400)]
    pieces = [s.encode() + b"<|endoftext|>" for s in stories]
    (tmp_path / "disk.txt").write_bytes(b"".join(pieces))
    fail_reads_of(monkeypatch, "disk.txt", fail_at=sum(map(len, pieces[:250])) + 5)  # past the first 8 KiB

    metrics, docs, quarantine = run_ingest(tmp_path, ["disk.txt"])

    kept = len(docs)
    assert 240 <= kept <= 250
    assert [d["text"] for d in docs] == [s.strip() for s in stories[:kept]]
    [row] = quarantine
    assert (row["location"], row["count"]) == (f"disk.txt#{kept}", 1)
    assert row["reason"] == (
        f"read error (at document {kept}: the rest of the file, from byte {sum(map(len, pieces[:kept]))}, is "
        "unreadable): [Errno 5] Input/output error"
    )


def test_txt_read_block_by_block_equals_reading_it_whole(tmp_path, monkeypatch):
    rng = random.Random(3)
    sep = "<|endoftext|>"
    parts = ["".join(rng.choice("ab <|>\n\u00e9") for _ in range(rng.randint(0, 40))) for _ in range(800)]
    for name, body in {
        "plain": sep.join(parts) + sep,
        "tail": sep.join(parts) + "cut off",
        "none": "no separator at all",
        "empty": "",
        "bom": "\ufeff" + sep.join(parts),
    }.items():
        path = tmp_path / f"{name}.txt"
        path.write_bytes(body.encode())
        assert len(body) in (0, 19) or len(body.encode()) > 2 * files.BINARY_SNIFF_BYTES  # blocks after the first
        whole = list(files.read_txt(path, sep, keep_tail=False))
        for block in (1, 5, 13, 64):
            monkeypatch.setattr(files, "TXT_BLOCK_BYTES", block)
            assert list(files.read_txt(path, sep, keep_tail=False)) == whole, (name, block)
        monkeypatch.undo()
        if name != "bom":
            pieces = body.split(sep)
            texts = [p.strip() for p in (pieces[:-1] if len(pieces) > 1 else pieces)]
            assert [r.text for r in whole if r.text] == [t for t in texts if t], name


def test_unexpected_reader_error_is_one_record_not_a_traceback(tmp_path, monkeypatch):
    def exploding(path, text_field):
        yield files.Record(f"{path}:1", text="first document")
        yield files.Record(f"{path}:2", text="second document")
        raise RuntimeError("reader bug")

    (tmp_path / "odd.jsonl").write_text("{}\n")
    (tmp_path / "fine.txt").write_text("a fine document<|endoftext|>")
    monkeypatch.setattr(files, "read_jsonl", exploding)

    metrics, docs, quarantine = run_ingest(tmp_path, ["odd.jsonl", "fine.txt"])

    assert [d["text"] for d in docs] == ["first document", "second document", "a fine document"]
    assert [(q["location"], q["reason"], q["count"]) for q in quarantine] == [
        (
            "odd.jsonl",
            "unreadable file (after 2 records; the rest of the file is unreadable): RuntimeError: reader bug",
            1,
        )
    ]


def test_a_failed_run_leaves_no_shards(tmp_path, monkeypatch):
    (tmp_path / "docs.jsonl").write_bytes(b"".join(jsonl_rows(50)))

    def disk_full(path, rows):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ingest, "write_jsonl", disk_full)  # after the shards, before the metrics
    with pytest.raises(OSError, match="No space left"):
        run_ingest(tmp_path, ["docs.jsonl"])
    out = tmp_path / "data/ingest"
    assert out.is_dir() and not list(out.glob("*shard-*")), "shards without metrics would pass for a finished run"
    assert not (tmp_path / "metrics/ingest.json").exists()


def test_hf_read_error_mid_split_keeps_the_rows_before_it(tmp_path, monkeypatch):
    def rows():
        yield from ({"text": f"hf row {i}"} for i in range(3))
        raise ConnectionError("connection reset by peer")

    monkeypatch.setattr(hf, "load", lambda spec, root: rows())

    metrics, docs, quarantine = run_ingest(tmp_path, ["hf:some/dataset"])

    assert [d["text"] for d in docs] == ["hf row 0", "hf row 1", "hf row 2"]
    assert [(q["location"], q["reason"], q["count"]) for q in quarantine] == [
        (
            "hf:some/dataset@3",
            "read error (at row 3; the rest of the split is unreadable): ConnectionError: connection reset by peer",
            1,
        )
    ]


def test_instruction_files_share_the_faults(tmp_path):
    chat = [json.dumps({"instruction": f"say {i}", "output": f"{i}"}).encode() + b"\n" for i in range(400)]
    blob = gzip.compress(b"".join(chat), mtime=0)
    (tmp_path / "cut.jsonl.gz").write_bytes(blob[: len(blob) // 2])
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + chat[0])
    (tmp_path / "bin.jsonl").write_bytes(random.Random(1).randbytes(16 * 1024))
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([{"question": "q", "answer": "a"}]).encode())

    out = list(instructions.load_instructions(["cut.jsonl.gz", "bom.jsonl", "bin.jsonl", "bom.json"], tmp_path, 0, 0))

    examples = [ex["id"] for ex, _ in out if ex]
    bad = [(rec.location, rec.reason.split(" (")[0]) for _, rec in out if rec]
    cut = len([e for e in examples if e.startswith("cut")])
    assert 0 < cut < 400 and examples == [f"cut.jsonl.gz:{i}" for i in range(1, cut + 1)] + [
        "bom.jsonl:1",
        "bom.json@0",
    ]
    assert bad == [
        (f"cut.jsonl.gz:{cut + 1}", "corrupt or truncated gzip stream"),
        ("bin.jsonl", "binary file, not JSON Lines"),
    ]


# ------------------------------------------------------------------------------------------------ filter memory


def test_filter_memory_on_one_huge_document_is_bounded():
    rng = random.Random(0)
    vocab = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 8))) for _ in range(500)]
    text = "\n".join(" ".join(rng.choices(vocab, k=12)) + "." for _ in range(100_000))  # ~6 MB, ~1.2M words
    cfg = quality.FilterConfig()
    assert len(text.split()) > cfg.word_count.max_words
    tracemalloc.start()
    try:
        failed = quality.failed_rules(text, cfg)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert failed == {"word_count": f"{len(text.split())} words > 100000 (other rules not evaluated)"}
    assert peak < 3 * len(text), f"peak {peak / 1e6:.0f} MB for a {len(text) / 1e6:.0f} MB document"


def test_count_words_equals_split_across_blocks():
    rng = random.Random(5)
    for _ in range(50):
        text = "".join(rng.choice("ab \n\t\u3000") for _ in range(rng.randint(0, 60)))
        for block in (1, 2, 3, 7):
            assert quality.count_words(text, block) == len(text.split()), (text, block)
