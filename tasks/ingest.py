"""ingest — read every `data.sources` entry into gzip JSON Lines document shards.

Runbook
    dvc repro ingest                      # or: scratchlm stage ingest / python -m tasks.ingest
    dvc exp run -S ingest.workers=1       # change a knob as an experiment

Reads   `data.sources` (params.yaml), in order:
          builtin:stories            the seeded story generator (size, seed and planted rates in `data.builtin`)
          a file / folder / glob     .txt (split on `data.txt_separator`), .jsonl, .jsonl.gz, .parquet
          hf:<name>[:<split>]        a 🤗 datasets split (needs the network) or a local dataset folder
Writes  data/ingest/shard-UUUUU-PPPP.jsonl.gz   {"id", "text", "source"}, one unit (file) per shard prefix
        data/ingest/quarantine.jsonl            every unreadable record: {location, reason, count, excerpt}
        data/ingest/labels.jsonl                builtin ground truth {id, label, of} for filter/dedup scoring
        metrics/ingest.json                     docs in / out / quarantined (by reason), bytes, per source
Checks  a missing path or a malformed source entry fails before any work. Bad records (invalid UTF-8,
        malformed JSON, missing or non-string text, empty documents, binary files, a cut-off .txt tail) are
        quarantined and counted: docs_in = docs_out + quarantined, always. A read error mid-file (a corrupt
        Parquet row group, a truncated or corrupt .jsonl.gz, an I/O error) keeps every document before it and is
        one quarantined record saying where reading stopped (a Parquet row group counts its unread rows; the
        next row groups are still read); the other files are read as usual. A run that fails leaves no shards.
Scale   sources are split into units and read in parallel on `data.parallel` (a local process pool, or Prefect
        task mapping on a Dask cluster): one per file, `hf_rows_per_unit` rows of a local 🤗 dataset, one shard
        of a streamed Hub split. A .txt file is read block by block (1 MiB), so memory does not grow with it;
        it is still one unit (split a huge one into files to read it on several processes).
"""

from __future__ import annotations

import functools
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tasks.common.config import ROOT, DataConfig, ScratchError, check
from tasks.common.console import fmt
from tasks.common.dvcio import StagePaths, fresh_dir, write_jsonl, write_jsonl_gz
from tasks.common.parallel import parallel_map
from tasks.common.stage import stage_main
from tasks.common.tracking import Tracker
from tasks.sources import builtin, files, hf


@dataclass(frozen=True)
class IngestConfig:
    docs_per_shard: int = 5000
    """Documents per output shard (a unit with more is split into several shards)."""
    txt_tail: Literal["quarantine", "keep"] = "quarantine"
    """What to do with the last piece of a .txt file when no separator follows it (a byte-range sample cut
    mid-document): quarantine it (counted), or keep it as a document."""
    quarantine_excerpt_chars: int = 80
    """Characters of each quarantined record kept in quarantine.jsonl for inspection."""
    hf_rows_per_unit: int = 100_000
    """Rows of a local `hf:` dataset each process reads (a streamed Hub split is read one shard per process)."""

    def __post_init__(self) -> None:
        check(self.docs_per_shard >= 1, "docs_per_shard", "must be >= 1")
        check(self.hf_rows_per_unit >= 1, "hf_rows_per_unit", "must be >= 1")
        check(self.quarantine_excerpt_chars >= 0, "quarantine_excerpt_chars", "must be >= 0")


Config = IngestConfig  # the section class params.yaml loads (tasks/common/config.py)


@dataclass(frozen=True)
class Unit:
    """One independent piece of input: the builtin corpus, one file, or a piece of an HF split."""

    index: int
    source: str  # the data.sources entry it came from
    kind: Literal["builtin", "file", "hf"]
    path: str = ""  # the file, for kind == "file"
    piece: hf.Piece = hf.Piece()  # the rows or shard, for kind == "hf"


@dataclass
class UnitResult:
    index: int
    source: str
    docs_out: int = 0
    bytes_out: int = 0
    quarantined: int = 0
    reasons: Counter = field(default_factory=Counter)
    quarantine: list[dict] = field(default_factory=list)
    labels: list[dict] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ planning


def plan_units(
    data: DataConfig, root: Path = ROOT, hf_rows_per_unit: int = IngestConfig.hf_rows_per_unit
) -> tuple[list[Unit], list[str]]:
    """Resolve every source entry into units (and skipped non-document files) before any work."""
    units: list[Unit] = []
    skipped: list[str] = []
    seen: dict[str, str] = {}
    for source in data.sources:
        if source.startswith("builtin:"):
            if source != "builtin:stories":
                raise ScratchError(f"data.sources: {source!r}: unknown builtin (known: builtin:stories)")
            units.append(Unit(len(units), source, "builtin"))
        elif source.startswith("hf:"):
            for piece in hf.plan(source, root, hf_rows_per_unit):
                units.append(Unit(len(units), source, "hf", piece=piece))
        else:
            documents, others = files.expand(source, root)
            skipped += [os.path.relpath(p, root) for p in others]
            for path in documents:
                key = str(path.resolve())
                if key in seen:
                    raise ScratchError(f"data.sources: {path} is listed twice ({seen[key]!r} and {source!r})")
                seen[key] = source
                units.append(Unit(len(units), source, "file", str(path)))
    return units, skipped


# ------------------------------------------------------------------------------------------------ reading


def records(
    unit: Unit, data: DataConfig, cfg: IngestConfig, root: Path
) -> Iterator[tuple[str, files.Record, dict | None]]:
    """(id, record, ground-truth label or None) triples of one unit."""
    if unit.kind == "builtin":
        b = data.builtin
        for doc in builtin.generate_corpus(b.n_docs, b.seed, b.exact_dup_rate, b.near_dup_rate, b.junk_rate):
            yield doc.id, files.Record(doc.id, text=doc.text), {"id": doc.id, "label": doc.label, "of": doc.of}
    elif unit.kind == "hf":
        for rec in hf.read(unit.source, root, data.text_field, unit.piece):
            yield rec.location, rec, None
    else:
        for rec in files.read_file(Path(unit.path), data.text_field, data.txt_separator, cfg.txt_tail == "keep"):
            yield files.relative_location(rec.location, root), rec, None


def ingest_unit(unit: Unit, data: DataConfig, cfg: IngestConfig, out_dir: Path, root: Path = ROOT) -> UnitResult:
    """Read one unit into its own shards (`shard-<unit>-<part>`), returning counts and quarantined records."""
    result = UnitResult(unit.index, unit.source)
    writer = _UnitShards(out_dir, unit.index, cfg.docs_per_shard)
    for rid, rec, label in _guarded(unit, records(unit, data, cfg, root), root):
        if rec.text is not None:
            writer.write({"id": rid, "text": rec.text, "source": unit.source})
            result.docs_out += 1
            result.bytes_out += len(rec.text.encode("utf-8"))
            if label is not None:
                result.labels.append(label)
        else:
            result.quarantined += rec.count
            result.reasons[_reason_key(rec.reason)] += rec.count
            result.quarantine.append(
                {
                    "location": rid,  # for files, relative to the project like the documents' ids
                    "reason": rec.reason,
                    "count": rec.count,
                    "excerpt": rec.excerpt[: cfg.quarantine_excerpt_chars],
                }
            )
    writer.close()
    return result


def _guarded(
    unit: Unit, triples: Iterator[tuple[str, files.Record, dict | None]], root: Path
) -> Iterator[tuple[str, files.Record, dict | None]]:
    """A file unit's records, with any error its reader did not expect turned into one quarantined record for the
    rest of the file (after every record read before it), so one bad file never ends the stage. The readers
    quarantine the faults they know (tasks/sources/files.py); this is the net under them."""
    if unit.kind != "file":
        yield from triples
        return
    read = 0
    while True:
        try:
            triple = next(triples)
        except StopIteration:
            return
        except Exception as e:
            message = str(e).strip().splitlines()
            where = files.relative_location(unit.path, root)
            yield (
                where,
                files.Record(
                    where,
                    reason=f"unreadable file (after {read} records; the rest of the file is unreadable): "
                    f"{type(e).__name__}: {message[0] if message else ''}",
                ),
                None,
            )
            return
        read += 1
        yield triple


def _reason_key(reason: str | None) -> str:
    """Group quarantine reasons for metrics ('malformed JSON: ... at column 3' → 'malformed JSON')."""
    text = (reason or "unknown").split(":")[0].split(" (")[0]
    return text.split(" at byte")[0].strip()


class _UnitShards:
    """Shards of one unit: shard-UUUUU-PPPP.jsonl.gz, so units written in parallel never collide."""

    def __init__(self, out_dir: Path, unit: int, docs_per_shard: int) -> None:
        self.out_dir, self.unit, self.size = out_dir, unit, docs_per_shard
        self.buffer: list[dict] = []
        self.part = 0

    def write(self, doc: dict) -> None:
        self.buffer.append(doc)
        if len(self.buffer) >= self.size:
            self._flush()

    def _flush(self) -> None:
        write_jsonl_gz(self.out_dir / f"shard-{self.unit:05d}-{self.part:04d}.jsonl.gz", self.buffer)
        self.part, self.buffer = self.part + 1, []

    def close(self) -> None:
        if self.buffer:
            self._flush()


# ------------------------------------------------------------------------------------------------ stage


def run(cfg: IngestConfig, paths: StagePaths, tracker: Tracker, data: DataConfig) -> dict:
    units, skipped = plan_units(data, paths.root, cfg.hf_rows_per_unit)
    out = fresh_dir(paths.out)
    try:
        results = run_units(units, data, cfg, out, paths.root)
        write_jsonl(out / "quarantine.jsonl", (row for r in results for row in r.quarantine))
        write_jsonl(out / "labels.jsonl", (row for r in results for row in r.labels))
        metrics = {**summarise(results), "skipped_files": skipped}
        if metrics["docs_out"] == 0:
            raise ScratchError(
                f"data.sources: no valid documents in {data.sources} "
                f"({metrics['quarantined']} quarantined, see {out / 'quarantine.jsonl'})"
            )
    except BaseException:
        remove_shards(out)  # a failed run leaves no shards a following stage would read as complete
        raise
    tracker.log_artifact(out / "quarantine.jsonl", "ingest")
    return metrics


def remove_shards(out: Path) -> None:
    """Delete the document shards (and half-written temporaries) in `out`; quarantine.jsonl stays to be read."""
    for path in [*out.glob("shard-*.jsonl.gz"), *out.glob(".shard-*")]:
        path.unlink(missing_ok=True)


def run_units(units: list[Unit], data: DataConfig, cfg: IngestConfig, out: Path, root: Path) -> list[UnitResult]:
    """Read units on the configured runner (`data.parallel`); results come back in unit order."""
    return parallel_map(
        functools.partial(ingest_unit, data=data, cfg=cfg, out_dir=out, root=root),
        units,
        data.parallel,
        desc="ingest",
        unit="unit",
        postfix=lambda done: {
            "docs": sum(r.docs_out for r in done),
            "MB": round(sum(r.bytes_out for r in done) / 1e6, 1),
        },
    )


def summarise(results: list[UnitResult]) -> dict:
    reasons: Counter = Counter()
    labels: Counter = Counter()
    per_source: dict[str, dict[str, int]] = {}
    for r in results:
        reasons.update(r.reasons)
        labels.update(row["label"] for row in r.labels)
        s = per_source.setdefault(r.source, {"docs_out": 0, "quarantined": 0})
        s["docs_out"] += r.docs_out
        s["quarantined"] += r.quarantined
    docs_out = sum(r.docs_out for r in results)
    quarantined = sum(r.quarantined for r in results)
    return {
        "docs_in": docs_out + quarantined,
        "docs_out": docs_out,
        "quarantined": quarantined,
        "bytes_out": sum(r.bytes_out for r in results),
        "units": len(results),
        "quarantined_by_reason": dict(sorted(reasons.items())),
        "builtin_labels": dict(sorted(labels.items())),
        "per_source": per_source,
    }


def summary(m: dict, paths: StagePaths) -> list[str]:
    """The funnel in one line, then what was quarantined (by reason), per source when there are several."""
    lines = [
        f"{fmt(m['docs_in'])} records → {fmt(m['docs_out'])} documents ({m['bytes_out'] / 1e6:.1f} MB), "
        f"{fmt(m['quarantined'])} quarantined"
        + "".join(f"; {fmt(n)} {reason}" for reason, n in m["quarantined_by_reason"].items())
    ]
    if len(m["per_source"]) > 1:
        lines += [
            f"{fmt(s['docs_out'])} documents, {fmt(s['quarantined'])} quarantined from {source}"
            for source, s in m["per_source"].items()
        ]
    if m["skipped_files"]:
        lines.append(f"{len(m['skipped_files'])} non-document file(s) skipped (metrics: skipped_files)")
    return lines


HEADLINE = (
    "docs_out",
    "quarantined",
    "bytes_out",
)
"""What metrics/ingest.json keeps (`dvc metrics diff`); every figure is in metrics/all/ingest.json."""


if __name__ == "__main__":
    stage_main("ingest", IngestConfig, run, summary, HEADLINE)
