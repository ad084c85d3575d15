"""The pretokenize stage: the token files hold exactly the encoded documents with one eot after each, the document
index points at each document's first token, meta.json's counts match the files, the split is the tokenizer's, and
a changed corpus or tokenizer fails clearly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tasks import pretokenize as stage
from tasks.common.config import ConfigError, ScratchError, build, read_params
from tasks.common.dvcio import read_jsonl_gz, stage_paths
from tasks.common.split import load_split
from tasks.common.tracking import Tracker
from tests.conftest import ROOT
from tests.test_tokenizer import data_section, make_docs, run_tokenizer, write_corpus


def run_pretokenize(root: Path, workers: int = 1, **cfg) -> dict:
    section = {**read_params(ROOT / "params.yaml")["pretokenize"], **cfg}
    return stage.run(
        build(stage.PretokenizeConfig, section, "pretokenize"),
        stage_paths("pretokenize", root),
        Tracker("pretokenize", None),
        data_section(workers),
    )


def copy_upstream(project: Path, root: Path, docs: list[dict], n_shards: int) -> None:
    """`docs` as root/data/dedup and the project's trained tokenizer as root/data/tokenizer."""
    write_corpus(root, docs, n_shards=n_shards)
    shutil.copytree(project / "data/tokenizer", root / "data/tokenizer")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """dedup shards + a trained tokenizer + pretokenize run on 2 worker processes with small batches."""
    root = tmp_path_factory.mktemp("pre")
    write_corpus(root, make_docs(240), n_shards=3)
    run_tokenizer(root)
    run_pretokenize(root, workers=2, batch_docs=7)
    return root


def corpus(root: Path) -> list[dict]:
    return [d for p in sorted((root / "data/dedup").glob("shard-*")) for d in read_jsonl_gz(p)]


def expected_tokens(root: Path, docs: list[dict]) -> np.ndarray:
    """Each document encoded on its own (plain text, single-threaded encode), followed by eot 0."""
    tok = stage.load_plain(root / "data/tokenizer/tokenizer.json")
    ids: list[int] = []
    for d in docs:
        ids += tok.encode(d["text"], add_special_tokens=False).ids + [0]
    return np.array(ids, dtype=np.int64)


def read_tokens(root: Path, split: str) -> np.ndarray:
    meta = json.loads((root / "data/pretokenize/meta.json").read_text())
    return np.memmap(root / "data/pretokenize" / f"{split}.bin", dtype=meta["dtype"], mode="r").astype(np.int64)


def test_memmaps_hold_exactly_the_encoded_documents_with_separators(project):
    split = load_split(project / "data/tokenizer")
    docs = corpus(project)
    train = [d for d in docs if not split.is_validation(d["id"])]
    val = [d for d in docs if split.is_validation(d["id"])]
    assert len(train) > 100 and len(val) > 10
    assert any("<|endoftext|>" in d["text"] for d in train), "the corpus must type the separator as text somewhere"
    np.testing.assert_array_equal(read_tokens(project, "train"), expected_tokens(project, train))
    np.testing.assert_array_equal(read_tokens(project, "val"), expected_tokens(project, val))
    assert list(read_jsonl_gz(project / "data/pretokenize/val_docs.jsonl.gz")) == val


def test_document_index_points_at_each_documents_first_token(project, tmp_path):
    from tasks.pretrain import load_tokens

    meta = json.loads((project / "data/pretokenize/meta.json").read_text())
    for name in ("train", "val"):
        tokens = read_tokens(project, name)
        index = np.fromfile(project / "data/pretokenize" / meta["splits"][name]["index"], dtype="<i8")
        assert len(index) == meta["splits"][name]["documents"] + 1 and index[0] == 0
        np.testing.assert_array_equal(index[1:], np.flatnonzero(tokens == 0) + 1)  # each document ends with its eot
    data = load_tokens(project / "data/pretokenize")
    assert np.array_equal(data.train_index, np.fromfile(project / "data/pretokenize/train.idx", dtype="<i8"))
    # an index that does not match meta.json fails naming the file and the fix
    shutil.copytree(project / "data/pretokenize", tmp_path / "pre")
    index = np.fromfile(tmp_path / "pre/val.idx", dtype="<i8")
    index[:-1].tofile(tmp_path / "pre/val.idx")
    with pytest.raises(ScratchError, match=r"val.idx: .* offsets .* says .* documents .*; rerun pretokenize"):
        load_tokens(tmp_path / "pre")
    (tmp_path / "pre/val.idx").unlink()
    with pytest.raises(ScratchError, match=r"val.idx: not found \(the document index beside the tokens\)"):
        load_tokens(tmp_path / "pre")


def test_meta_counts_match_the_files(project):
    meta = json.loads((project / "data/pretokenize/meta.json").read_text())
    tmeta = json.loads((project / "data/tokenizer/meta.json").read_text())
    split = load_split(project / "data/tokenizer")
    assert meta["dtype"] == "uint16" and meta["byteorder"] == "little"
    assert (meta["vocab_size"], meta["eot_id"], meta["pad_id"]) == (tmeta["vocab_size"], 0, 1)
    assert meta["tokenizer_sha256"] == tmeta["tokenizer_sha256"] and meta["split"] == tmeta["split"]
    for name in ("train", "val"):
        tokens = read_tokens(project, name)
        docs = [d for d in corpus(project) if split.is_validation(d["id"]) == (name == "val")]
        s = meta["splits"][name]
        assert s["tokens"] == len(tokens) and s["documents"] == s["eot_tokens"] == len(docs)
        assert s["eot_tokens"] == int((tokens == 0).sum())  # plain text never yields the eot id
        assert s["text_tokens"] == s["tokens"] - s["documents"]
        assert s["text_bytes"] == sum(len(d["text"].encode("utf-8")) for d in docs)
        assert tokens.max() < meta["vocab_size"]
    assert "text_bytes" in meta["counting"] and "eot" in meta["counting"]


def test_batching_workers_and_sharding_do_not_change_the_output(project, tmp_path):
    copy_upstream(project, tmp_path, corpus(project), n_shards=1)
    m = run_pretokenize(tmp_path, workers=1, batch_docs=1000)
    for name in ("train.bin", "val.bin", "train.idx", "val.idx", "meta.json"):
        assert (tmp_path / "data/pretokenize" / name).read_bytes() == (
            project / "data/pretokenize" / name
        ).read_bytes(), name
    assert m["train_tokens"] == len(read_tokens(project, "train"))
    assert not (tmp_path / "data/pretokenize/.parts").exists()


def test_uint32_on_request_and_for_big_vocabularies(project, tmp_path):
    assert stage.token_dtype(65536) == "uint16" and stage.token_dtype(65537) == "uint32"
    with pytest.raises(ScratchError, match="pretokenize.dtype: uint16 cannot hold ids of a 100,000-token"):
        stage.token_dtype(100_000, "uint16")
    copy_upstream(project, tmp_path, corpus(project), n_shards=2)
    run_pretokenize(tmp_path, dtype="uint32")
    assert json.loads((tmp_path / "data/pretokenize/meta.json").read_text())["dtype"] == "uint32"
    np.testing.assert_array_equal(read_tokens(tmp_path, "train"), read_tokens(project, "train"))


def test_changed_corpus_or_tokenizer_fails_clearly(project, tmp_path):
    docs = corpus(project)
    copy_upstream(project, tmp_path, docs[:-5], n_shards=2)
    with pytest.raises(ScratchError, match="corpus differs from the one the tokenizer was trained on"):
        run_pretokenize(tmp_path)
    tok_file = tmp_path / "data/tokenizer/tokenizer.json"
    tok_file.write_text(tok_file.read_text().replace('"<|pad|>"', '"<|PAD|>"'))
    with pytest.raises(ScratchError, match=r"tokenizer.json: sha256 .* differs"):
        run_pretokenize(tmp_path)
    (tmp_path / "data/tokenizer/meta.json").unlink()
    with pytest.raises(ScratchError, match=r"meta.json: missing \(run the tokenizer stage first"):
        run_pretokenize(tmp_path)


def test_bad_params_fail_naming_the_key():
    with pytest.raises(ConfigError, match="pretokenize.batch_docs: must be >= 1"):
        build(stage.PretokenizeConfig, {"batch_docs": 0}, "pretokenize")
    with pytest.raises(ConfigError, match="pretokenize.dtype: must be one of"):
        build(stage.PretokenizeConfig, {"dtype": "int8"}, "pretokenize")
