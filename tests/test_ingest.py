"""The ingest stage: every source format, every class of bad input with exact counts (in = out + quarantined)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from unittest import mock

import pytest

from tasks import ingest
from tasks.common.config import DataConfig, ScratchError, build, read_params
from tasks.common.dvcio import read_docs, stage_paths
from tasks.common.tracking import Tracker
from tasks.sources import hf
from tests.conftest import ROOT, shared


def run_ingest(
    tmp_path: Path, sources: list[str], data: dict | None = None, **cfg
) -> tuple[dict, list[dict], list[dict]]:
    """The stage on `sources` with the repository's params, 400 builtin documents and the `data`/`cfg` overrides."""
    params = read_params(ROOT / "params.yaml")
    builtin = {**params["data"]["builtin"], "n_docs": 400}
    data_section = build(DataConfig, {**params["data"], "sources": sources, "builtin": builtin, **(data or {})}, "data")
    ingest_cfg = build(ingest.IngestConfig, {**params["ingest"], **cfg}, "ingest")
    paths = stage_paths("ingest", root=tmp_path)
    metrics = ingest.run(ingest_cfg, paths, Tracker("ingest", None), data_section)
    docs = list(read_docs(paths.out))
    quarantine = [json.loads(line) for line in (paths.out / "quarantine.jsonl").read_text().splitlines()]
    assert metrics["docs_in"] == metrics["docs_out"] + metrics["quarantined"]
    assert metrics["docs_out"] == len(docs)
    assert metrics["quarantined"] == sum(q["count"] for q in quarantine)
    return metrics, docs, quarantine


def once_each(*reasons: str) -> dict[str, int]:
    """The expected `quarantined_by_reason` when each of `reasons` was quarantined exactly once."""
    return dict.fromkeys(reasons, 1)


def test_builtin_corpus_with_labels(tmp_path):
    metrics, docs, _ = run_ingest(tmp_path, ["builtin:stories"])
    assert metrics["docs_out"] == 400 and metrics["quarantined"] == 0
    labels = [json.loads(l) for l in (tmp_path / "data/ingest/labels.jsonl").read_text().splitlines()]
    assert [l["id"] for l in labels] == [d["id"] for d in docs]
    assert {"clean", "exact_dup", "near_dup", "junk"} <= {l["label"] for l in labels}
    assert all(d["source"] == "builtin:stories" for d in docs)
    said = ingest.summary(metrics, stage_paths("ingest", root=tmp_path))
    assert said == [f"400 records → 400 documents ({metrics['bytes_out'] / 1e6:.1f} MB), 0 quarantined"]
    (tmp_path / "again").mkdir()
    _, docs2, _ = run_ingest(tmp_path / "again", ["builtin:stories"])
    assert docs2 == docs, "the builtin corpus must be deterministic"


def test_real_tinystories_sample(tmp_path):
    folder = shared("tinystories")
    metrics, docs, quarantine = run_ingest(tmp_path, [str(folder)])
    assert metrics["docs_out"] == 2316
    assert [q["reason"].split(" (")[0] for q in quarantine] == ["unterminated tail"]
    assert len(metrics["skipped_files"]) == 1 and metrics["skipped_files"][0].endswith("tinystories/SOURCE.md")
    assert docs[0]["text"].startswith("One day, a little girl named Lily found a needle in her room.")
    assert all("<|endoftext|>" not in d["text"] for d in docs)
    (tmp_path / "k").mkdir()
    kept, _, _ = run_ingest(tmp_path / "k", [str(folder)], txt_tail="keep")
    assert kept["docs_out"] == 2317 and kept["quarantined"] == 0


def test_txt_with_bad_pieces(tmp_path):
    (tmp_path / "corpus").mkdir()
    sep = b"<|endoftext|>"
    (tmp_path / "corpus/a.txt").write_bytes(
        b"first story."
        + sep
        + b"  \n "
        + sep
        + b"bad \xff\xfe bytes"
        + sep
        + "caf\u00e9 \u2603".encode()
        + sep
        + b"cut off tai"
    )
    (tmp_path / "corpus/b.txt").write_bytes(b"\x00\x01binary\x00" * 10)
    (tmp_path / "corpus/notes.md").write_text("not a document")
    metrics, docs, quarantine = run_ingest(tmp_path, ["corpus"])
    assert [d["text"] for d in docs] == ["first story.", "caf\u00e9 \u2603"]
    assert metrics["quarantined_by_reason"] == once_each(
        "binary file", "empty document", "invalid UTF-8", "unterminated tail"
    )
    assert metrics["docs_in"] == 6 and metrics["skipped_files"] == ["corpus/notes.md"]
    assert {q["location"].split("/")[-1] for q in quarantine} == {"a.txt#1", "a.txt#2", "a.txt#4", "b.txt"}
    assert docs[0]["id"] == "corpus/a.txt#0"
    said = ingest.summary(metrics, stage_paths("ingest", root=tmp_path))
    assert said[0].endswith("4 quarantined; 1 binary file; 1 empty document; 1 invalid UTF-8; 1 unterminated tail")
    assert said[1:] == ["1 non-document file(s) skipped (metrics: skipped_files)"]


def jsonl_lines() -> list[bytes]:
    return [
        json.dumps({"text": "good one", "meta": 1}).encode(),
        b'{"text": "broken',
        json.dumps([1, 2]).encode(),
        json.dumps({"body": "no text field"}).encode(),
        json.dumps({"text": 42}).encode(),
        json.dumps({"text": "   "}).encode(),
        b'{"text": "bad \xff utf8"}',
        b"",
        json.dumps({"text": "good two \u00fc"}, ensure_ascii=False).encode(),
    ]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_jsonl_bad_lines_are_counted(tmp_path, suffix):
    payload = b"\n".join(jsonl_lines()) + b"\n"
    path = tmp_path / f"docs{suffix}"
    path.write_bytes(gzip.compress(payload) if suffix.endswith(".gz") else payload)
    metrics, docs, quarantine = run_ingest(tmp_path, [path.name])
    assert [d["text"] for d in docs] == ["good one", "good two \u00fc"]
    assert metrics["quarantined_by_reason"] == once_each(
        "empty document",
        "invalid UTF-8",
        "malformed JSON",
        "missing text field 'text'",
        "not a JSON object",
        "text field 'text' is int, not a string",
    )
    assert [q["location"].rsplit(":", 1)[1] for q in quarantine] == ["2", "3", "4", "5", "6", "7"]
    assert docs[1]["id"] == f"docs{suffix}:9"


def test_truncated_gzip_keeps_what_was_readable(tmp_path):
    rows = b"".join(json.dumps({"text": f"document number {i}"}).encode() + b"\n" for i in range(2000))
    blob = gzip.compress(rows)
    (tmp_path / "cut.jsonl.gz").write_bytes(blob[: len(blob) // 2])
    metrics, docs, quarantine = run_ingest(tmp_path, ["cut.jsonl.gz"])
    assert 0 < len(docs) < 2000
    assert [d["text"] for d in docs] == [f"document number {i}" for i in range(len(docs))]
    assert metrics["quarantined"] == 1 and "corrupt or truncated gzip" in quarantine[0]["reason"]


def test_parquet_and_text_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["alpha doc", None, "", "beta doc"]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"other": ["x", "y", "z"]}), tmp_path / "b.parquet")
    metrics, docs, quarantine = run_ingest(tmp_path, ["*.parquet"], data={"text_field": "content"})
    assert [d["text"] for d in docs] == ["alpha doc", "beta doc"]
    assert [d["id"] for d in docs] == ["a.parquet@0", "a.parquet@3"]
    assert metrics["quarantined"] == 2 + 3  # a null, an empty string, and b.parquet's 3 rows without the column
    assert any("missing text column 'content'" in q["reason"] and q["count"] == 3 for q in quarantine)


def test_hf_source_loads_a_local_dataset_folder(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["from hf one", "", "from hf two"]}).save_to_disk(str(tmp_path / "saved"))
    metrics, docs, _ = run_ingest(tmp_path, ["hf:saved"])
    assert [d["text"] for d in docs] == ["from hf one", "from hf two"] and metrics["quarantined"] == 1


def test_hf_dataset_is_read_in_row_ranges_with_the_same_ids(tmp_path):
    import datasets

    texts = [f"hf row {i}" if i % 7 else "" for i in range(25)]
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "saved"))
    whole, whole_docs, whole_q = run_ingest(tmp_path / "a", [f"hf:{tmp_path / 'saved'}"])
    split, split_docs, split_q = run_ingest(tmp_path / "b", [f"hf:{tmp_path / 'saved'}"], hf_rows_per_unit=10)
    assert (whole["units"], split["units"]) == (1, 3)  # rows 0-9, 10-19, 20-24, one process each
    assert [d["id"] for d in split_docs] == [d["id"] for d in whole_docs]
    assert [d["text"] for d in split_docs] == [t for t in texts if t]
    assert (
        [q["location"] for q in split_q]
        == [f"hf:{tmp_path / 'saved'}@{i}" for i in (0, 7, 14, 21)]
        == [q["location"] for q in whole_q]
    )


def test_a_streamed_split_is_read_one_shard_per_unit():
    import datasets

    def rows(shards):
        for shard in shards:
            yield from ({"text": f"{shard} row {i}"} for i in range(3))

    stream = datasets.IterableDataset.from_generator(rows, gen_kwargs={"shards": ["a", "b"]})
    pieces = hf.pieces_of(stream, rows_per_piece=100)
    assert [p.describe() for p in pieces] == ["shard 0 of 2", "shard 1 of 2"]
    read = {}
    for piece in pieces:
        with mock.patch.object(hf, "load", lambda spec, root: stream):
            read[piece.start] = [(r.location, r.text) for r in hf.read("hf:hub/ds", Path("."), "text", piece)]
    assert read[1] == [(f"hf:hub/ds@1.{i}", f"b row {i}") for i in range(3)]
    assert len(read[0]) == 3 and read[0][0] == ("hf:hub/ds@0.0", "a row 0")


def test_hf_hub_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ScratchError, match=r"data.sources: 'hf:roneneldan/TinyStories:validation': could not load"):
        run_ingest(tmp_path, ["hf:roneneldan/TinyStories:validation"])


@pytest.mark.parametrize(
    "sources, message",
    [
        (["missing/folder"], "data.sources: 'missing/folder': no such file or folder"),
        (["builtin:poems"], "unknown builtin"),
        (["notes.md"], "unsupported file type .md"),
        (["a.txt", "a.txt"], "is listed twice"),
    ],
)
def test_bad_sources_fail_before_any_work(tmp_path, sources, message):
    (tmp_path / "notes.md").write_text("x")
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ScratchError, match=message):
        run_ingest(tmp_path, sources)
    assert not (tmp_path / "data" / "ingest").exists(), "nothing may be written before the sources check out"


def test_parallel_units_match_inline(tmp_path):
    for i in range(4):
        (tmp_path / f"f{i}.jsonl").write_text("".join(json.dumps({"text": f"doc {i}-{j}"}) + "\n" for j in range(30)))
    (tmp_path / "one").mkdir(), (tmp_path / "two").mkdir()
    _, inline, _ = run_ingest(
        tmp_path / "one",
        [str(tmp_path / "*.jsonl")],
        data={"parallel": {"runner": "local", "workers": 1, "dask_address": ""}},
    )
    _, pooled, _ = run_ingest(
        tmp_path / "two",
        [str(tmp_path / "*.jsonl")],
        data={"parallel": {"runner": "local", "workers": 2, "dask_address": ""}},
    )
    assert [d["text"] for d in pooled] == [d["text"] for d in inline] and len(inline) == 120
