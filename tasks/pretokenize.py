"""pretokenize — encode the deduplicated corpus into flat token files for pretraining and evaluation.

Runbook
    dvc repro pretokenize                        # or: scratchlm stage pretokenize / python -m tasks.pretokenize
    dvc exp run -S pretokenize.batch_docs=4000   # bigger encode batches (more memory per worker)

Reads   data/dedup/shard-*.jsonl.gz                   {"id", "text", "source"}
        data/tokenizer/tokenizer.json, meta.json      the tokenizer and THE split (tasks.common.split.load_split):
                                                      no split params here, so the two stages cannot disagree
Writes  data/pretokenize/train.bin, val.bin           flat little-endian uint16 ids (uint32 when the vocabulary
                                                      needs it): each document's tokens, then one eot_id
        data/pretokenize/train.idx, val.idx           the document index: little-endian int64 offsets, one per
                                                      document (its first token in <split>.bin) plus the total
                                                      token count at the end, so document i is
                                                      bin[idx[i]:idx[i+1]] (its tokens and its eot_id); pretrain
                                                      packs whole documents into rows with it
        data/pretokenize/val_docs.jsonl.gz            the validation documents, in file order (for evaluation)
        data/pretokenize/meta.json                    dtype, vocab_size, eot_id, pad_id, per-split documents /
                                                      tokens / text_tokens / text_bytes, what each count counts,
                                                      tokenizer sha256, the split
        metrics/pretokenize.json                      tokens and bytes per split, throughput
        Read a split with `np.memmap(path, dtype=meta["dtype"], mode="r")` and its index with
        `np.memmap(path, dtype="<i8", mode="r")`.
Checks  the tokenizer's sha256 and its split counts must match what it was trained with (a changed corpus or a
        hand-edited tokenizer fails, naming the file); both splits must be non-empty; file sizes must equal the
        counted tokens and documents (the index ends at the token count). Document text is encoded as plain
        text: an `<|endoftext|>` typed in a document is ordinary characters, never the separator id.
Scale   shards are encoded in parallel on `data.parallel` (each worker: `encode_batch` over `batch_docs`
        documents at a time, appended to its own part files), then the parts are concatenated in shard order
        (the index's per-part document lengths become offsets as they are appended).
        Memory per worker is one batch, whatever the corpus size; disk holds the parts and the result briefly.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from tokenizers import Tokenizer

from tasks.common.config import DataConfig, ScratchError, check
from tasks.common.console import fmt
from tasks.common.dvcio import StagePaths, file_sha256, fresh_dir, read_json, read_jsonl_gz, shards, write_json
from tasks.common.parallel import parallel_map
from tasks.common.split import Split, load_split
from tasks.common.stage import stage_main
from tasks.common.tracking import Tracker

SPLITS = ("train", "val")
COUNTING = (
    "tokens = every id in <split>.bin: text_tokens (the documents' own tokens) + one eot_id after each "
    "document (eot_tokens = documents). text_bytes = UTF-8 bytes of the documents' texts exactly as read "
    "from data/dedup; the eot separators add tokens but no bytes. Bits per byte of a loss averaged over all "
    "of a split's tokens = loss_nats * tokens / (text_bytes * ln 2)."
)


@dataclass(frozen=True)
class PretokenizeConfig:
    batch_docs: int = 1000
    """Documents per `encode_batch` call and per write to the token files: a worker's memory is one batch."""
    dtype: Literal["auto", "uint16", "uint32"] = "auto"
    """Token id type: auto = uint16 while every id fits (vocab_size <= 65536), else uint32."""

    def __post_init__(self) -> None:
        check(self.batch_docs >= 1, "batch_docs", "must be >= 1")


Config = PretokenizeConfig  # the section class params.yaml loads (tasks/common/config.py)


def token_dtype(vocab_size: int, wanted: str = "auto") -> str:
    """The numpy dtype name for ids below `vocab_size` (always little-endian on disk)."""
    fits16 = vocab_size <= 2**16
    if wanted == "uint16" and not fits16:
        raise ScratchError(
            f"pretokenize.dtype: uint16 cannot hold ids of a {vocab_size:,}-token vocabulary; use auto or uint32"
        )
    if wanted != "auto":
        return wanted
    return "uint16" if fits16 else "uint32"


# ------------------------------------------------------------------------------------------------ per shard


@dataclass(frozen=True)
class ShardJob:
    index: int
    path: Path
    parts: Path  # folder for this job's part files
    tokenizer_file: Path
    split: Split
    dtype: str
    eot_id: int
    batch_docs: int
    threads: int = 0  # tokenizers threads in this worker process (0 = its default: every core)


@dataclass
class SplitCount:
    documents: int = 0
    tokens: int = 0  # including one eot per document
    text_bytes: int = 0

    def add(self, other: SplitCount) -> None:
        self.documents += other.documents
        self.tokens += other.tokens
        self.text_bytes += other.text_bytes


@dataclass
class ShardResult:
    index: int
    counts: dict[str, SplitCount] = field(default_factory=lambda: {s: SplitCount() for s in SPLITS})


INDEX_DTYPE = np.dtype("<i8")  # <split>.idx: document start offsets, then the token count


def part_file(parts: Path, index: int, name: str) -> Path:
    return parts / f"{index:05d}.{name}"


def encode_shard(job: ShardJob) -> ShardResult:
    """Encode one shard into its part files: <i>.train.bin, <i>.val.bin, <i>.{train,val}.len (each document's
    token count, its eot included, int64) and <i>.val_docs.jsonl.gz (one gzip member)."""
    if job.threads:  # read when tokenizers first starts its thread pool in this (forked) worker
        os.environ["RAYON_NUM_THREADS"] = str(job.threads)
    tok = load_plain(job.tokenizer_file)
    result = ShardResult(job.index)
    pending: dict[str, list[dict]] = {s: [] for s in SPLITS}
    with (
        open(part_file(job.parts, job.index, "train.bin"), "wb") as train_bin,
        open(part_file(job.parts, job.index, "val.bin"), "wb") as val_bin,
        open(part_file(job.parts, job.index, "train.len"), "wb") as train_len,
        open(part_file(job.parts, job.index, "val.len"), "wb") as val_len,
        open(part_file(job.parts, job.index, "val_docs.jsonl.gz"), "wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz,
        io.TextIOWrapper(gz, encoding="utf-8", newline="\n") as val_docs,
    ):
        files = {"train": train_bin, "val": val_bin}
        lengths = {"train": train_len, "val": val_len}

        def flush(split: str) -> None:
            docs = pending[split]
            ids = encode_docs(tok, [d["text"] for d in docs], job.eot_id, job.dtype)
            ids.tofile(files[split])
            document_lengths(ids, job.eot_id).tofile(lengths[split])
            count = result.counts[split]
            count.documents += len(docs)
            count.tokens += len(ids)
            count.text_bytes += sum(len(d["text"].encode("utf-8")) for d in docs)
            if split == "val":
                val_docs.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)
            docs.clear()

        for doc in read_jsonl_gz(job.path):
            split = "val" if job.split.is_validation(doc["id"]) else "train"
            pending[split].append(doc)
            if len(pending[split]) >= job.batch_docs:
                flush(split)
        for split in SPLITS:
            if pending[split]:
                flush(split)
    return result


def load_plain(path: Path):
    """The tokenizer with special-token strings in text encoded as plain characters (never the eot id)."""
    tok = Tokenizer.from_file(str(path))
    tok.encode_special_tokens = True
    return tok


def document_lengths(ids: np.ndarray, eot_id: int) -> np.ndarray:
    """(documents,) int64 token counts of [doc0 ids, eot, doc1 ids, eot, ...], each eot included (plain-text
    encoding never yields eot_id inside a document, so every eot closes one)."""
    ends = np.flatnonzero(ids == eot_id) + 1  # one past each document's eot
    return np.diff(ends, prepend=0).astype(INDEX_DTYPE)


def encode_docs(tok, texts: list[str], eot_id: int, dtype: str) -> np.ndarray:
    """[doc0 ids, eot, doc1 ids, eot, ...] as a little-endian array."""
    encodings = tok.encode_batch_fast(texts, add_special_tokens=False)
    out = np.empty(sum(len(e.ids) for e in encodings) + len(encodings), dtype=np.dtype(dtype).newbyteorder("<"))
    pos = 0
    for e in encodings:
        n = len(e.ids)
        out[pos : pos + n] = e.ids
        out[pos + n] = eot_id
        pos += n + 1
    return out


# ------------------------------------------------------------------------------------------------ stage


def run(cfg: PretokenizeConfig, paths: StagePaths, tracker: Tracker, data: DataConfig) -> dict:
    tok_dir = paths.of("tokenizer")
    split = load_split(tok_dir)
    tmeta = checked_tokenizer_meta(tok_dir)
    dtype = token_dtype(tmeta["vocab_size"], cfg.dtype)
    docs = shards(paths.of("dedup"))
    out = fresh_dir(paths.out)
    parts = out / ".parts"
    parts.mkdir()

    threads = threads_per_worker(data, len(docs))
    jobs = [
        ShardJob(i, p, parts, tok_dir / "tokenizer.json", split, dtype, tmeta["eot_id"], cfg.batch_docs, threads)
        for i, p in enumerate(docs)
    ]
    started = time.perf_counter()
    results = parallel_map(
        encode_shard,
        jobs,
        data.parallel,
        desc="pretokenize",
        postfix=lambda done: {"tokens": fmt(sum(c.tokens for r in done for c in r.counts.values()))},
    )
    counts = {s: SplitCount() for s in SPLITS}
    for r in results:
        for s in SPLITS:
            counts[s].add(r.counts[s])
    check_counts(counts, tmeta, tok_dir, paths.of("dedup"))
    concatenate(parts, len(jobs), out)
    shutil.rmtree(parts)
    seconds = time.perf_counter() - started
    check_sizes(out, counts, dtype)

    meta = build_meta(counts, tmeta, split, dtype)
    write_json(out / "meta.json", meta)
    text_bytes = sum(c.text_bytes for c in counts.values())
    metrics = {
        **{f"{s}_{k}": v for s in SPLITS for k, v in vars(counts[s]).items()},
        "dtype": dtype,
        "vocab_size": tmeta["vocab_size"],
        "seconds_encoding": round(seconds, 2),
        "mb_per_second": round(text_bytes / 1e6 / max(seconds, 1e-9), 3),
        **{f"{s}_bytes_per_token": meta["splits"][s]["bytes_per_text_token"] for s in SPLITS},
    }
    tracker.log_artifact(out / "meta.json", "pretokenize")
    return metrics


def threads_per_worker(data: DataConfig, n_shards: int) -> int:
    """Share this machine's cores among local worker processes, so N workers x all-core thread pools do not
    oversubscribe it; 0 (tokenizers' default) when encoding runs in this process or on a Dask cluster."""
    procs = min(data.parallel.workers, n_shards)
    if data.parallel.runner != "local" or procs <= 1:
        return 0
    return max(1, (os.cpu_count() or 1) // procs)


def checked_tokenizer_meta(tok_dir: Path) -> dict:
    """data/tokenizer/meta.json, after checking tokenizer.json is the file it describes."""
    tmeta = read_json(tok_dir / "meta.json")
    tok_file = tok_dir / "tokenizer.json"
    if not tok_file.is_file():
        raise ScratchError(f"{tok_file}: missing (rerun the tokenizer stage: dvc repro tokenizer)")
    sha = file_sha256(tok_file)
    if sha != tmeta["tokenizer_sha256"]:
        raise ScratchError(
            f"{tok_file}: sha256 {sha[:12]}… differs from {tok_dir / 'meta.json'} "
            f"({tmeta['tokenizer_sha256'][:12]}…); the tokenizer was changed after training, "
            f"rerun the tokenizer stage"
        )
    return {**tmeta, "tokenizer_sha256": sha}


def check_counts(counts: dict[str, SplitCount], tmeta: dict, tok_dir: Path, dedup: Path) -> None:
    """The split here must be the one the tokenizer saw: same documents and bytes on each side."""
    seen = tmeta["counts"]
    here = {
        "train_docs": counts["train"].documents,
        "train_bytes": counts["train"].text_bytes,
        "val_docs": counts["val"].documents,
        "val_bytes": counts["val"].text_bytes,
    }
    if here != seen:
        raise ScratchError(
            f"{dedup}: the corpus differs from the one the tokenizer was trained on "
            f"({tok_dir / 'meta.json'} counts {seen}, found {here}); rerun the tokenizer stage"
        )
    for s in SPLITS:
        if counts[s].documents == 0:
            raise ScratchError(f"{dedup}: the {s} split is empty; change tokenizer.val_fraction or add documents")


def concatenate(parts: Path, n: int, out: Path) -> None:
    """Append the part files in shard order (multi-member gzip is one valid gzip stream), and turn the parts'
    document lengths into <split>.idx offsets."""
    for name in ("train.bin", "val.bin", "val_docs.jsonl.gz"):
        with open(out / name, "wb") as dst:
            for i in range(n):
                with open(part_file(parts, i, name), "rb") as src:
                    shutil.copyfileobj(src, dst, length=16 << 20)
    for split in SPLITS:
        with open(out / f"{split}.idx", "wb") as dst:
            end = np.zeros(1, dtype=INDEX_DTYPE)  # offset of the next document
            end.tofile(dst)
            for i in range(n):
                lengths = np.fromfile(part_file(parts, i, f"{split}.len"), dtype=INDEX_DTYPE)  # (docs of part i,)
                (end[0] + np.cumsum(lengths, dtype=INDEX_DTYPE)).tofile(dst)
                end[0] += lengths.sum()


def check_sizes(out: Path, counts: dict[str, SplitCount], dtype: str) -> None:
    itemsize = np.dtype(dtype).itemsize
    for s in SPLITS:
        size = (out / f"{s}.bin").stat().st_size
        if size != counts[s].tokens * itemsize:
            raise ScratchError(f"{out / f'{s}.bin'}: {size} bytes, expected {counts[s].tokens} tokens x {itemsize}")
        index = np.memmap(out / f"{s}.idx", dtype=INDEX_DTYPE, mode="r")
        if len(index) != counts[s].documents + 1 or index[-1] != counts[s].tokens:
            raise ScratchError(
                f"{out / f'{s}.idx'}: {len(index)} offsets ending at {index[-1] if len(index) else None}, expected "
                f"{counts[s].documents} documents + 1 ending at {counts[s].tokens} tokens"
            )


def build_meta(counts: dict[str, SplitCount], tmeta: dict, split: Split, dtype: str) -> dict:
    splits = {}
    for s in SPLITS:
        c = counts[s]
        splits[s] = {
            "file": f"{s}.bin",
            "index": f"{s}.idx",
            "documents": c.documents,
            "tokens": c.tokens,
            "text_tokens": c.tokens - c.documents,
            "eot_tokens": c.documents,
            "text_bytes": c.text_bytes,
            "bytes_per_text_token": round(c.text_bytes / max(c.tokens - c.documents, 1), 4),
        }
    return {
        "format": f"flat little-endian {dtype} token ids: each document's tokens followed by one eot_id",
        "index_format": "little-endian int64 offsets: each document's first token in <split>.bin, then the token "
        "count (document i = bin[idx[i]:idx[i+1]], its eot_id included)",
        "dtype": dtype,
        "byteorder": "little",
        "vocab_size": tmeta["vocab_size"],
        "eot_id": tmeta["eot_id"],
        "pad_id": tmeta["pad_id"],
        "special_tokens": tmeta["special_tokens"],
        "splits": splits,
        "counting": COUNTING,
        "val_docs": "val_docs.jsonl.gz",
        "tokenizer_sha256": tmeta["tokenizer_sha256"],
        "tokenizer": "data/tokenizer",
        "split": split.as_dict(),
        "source": "data/dedup",
    }


HEADLINE = (
    "train_tokens",
    "val_tokens",
    "val_bytes_per_token",
)
"""What metrics/pretokenize.json keeps (`dvc metrics diff`); every figure is in metrics/all/pretokenize.json."""


if __name__ == "__main__":
    stage_main("pretokenize", PretokenizeConfig, run, headline=HEADLINE)
