"""The dedup stage: signatures bit-equal to datasketch, LSH candidates equal to MinHashLSH, clusters keeping the
first id, counts that add up, planted duplicates of the builtin corpus, and injected ones in real TinyStories."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest
import yaml
from datasketch import MinHash, MinHashLSH

from tasks import dedup
from tasks import filter as quality
from tasks.common.config import ConfigError, load_section
from tasks.common.dvcio import read_docs, stage_paths
from tasks.common.minhash import (
    EMPTY,
    MinHasher,
    band_candidate_pairs,
    estimated_jaccard,
    lsh_params,
    ngram_hash32,
    pair_jaccard,
    shingles,
    words,
)
from tasks.common.tracking import Tracker
from tasks.sources import builtin
from tests.conftest import ROOT, shared
from tests.test_filter import write_shards

ODD_TEXTS = [
    "",
    "   ",
    "one",
    "two words",
    "a b c",
    "!!! ???",
    "Café au lait, s'il vous plaît — naïve façade.",
    "Tab\tseparated\nand\r\nnewlines",
    "under_score and digits 42 x2",
    "日本語のテキスト と English mixed",
]


def datasketch_signature(items: list[bytes], num_perm: int, seed: int, hashfunc=None) -> np.ndarray:
    m = MinHash(num_perm=num_perm, seed=seed, **({"hashfunc": hashfunc} if hashfunc else {}))
    for item in items:
        m.update(item)
    return m.hashvalues


@pytest.fixture(scope="module")
def corpus() -> list[builtin.BuiltinDoc]:
    return list(builtin.generate_corpus(3000, seed=5, exact_dup_rate=0.03, near_dup_rate=0.03, junk_rate=0.05))


# ------------------------------------------------------------------------------------------------ signatures


@pytest.mark.parametrize("num_perm, seed, n", [(128, 1, 3), (64, 7, 5), (16, 42, 1)])
def test_text_signatures_equal_datasketch(corpus, num_perm, seed, n):
    texts = [d.text for d in corpus[:40]] + ODD_TEXTS
    ours = MinHasher(num_perm, seed, chunk_rows=97).text_signatures(texts, n)  # odd chunks cross documents
    expected = np.array([datasketch_signature(shingles(t, n), num_perm, seed, ngram_hash32) for t in texts])
    assert ours.dtype == expected.dtype == np.uint32 and ours.shape == (len(texts), num_perm)
    np.testing.assert_array_equal(ours, expected)


def test_explicit_shingle_signatures_equal_datasketch_default_hash_and_bulk(corpus):
    sets = [shingles(d.text, 3) for d in corpus[:30]] + [[], [b"x"]]
    ours = MinHasher(128, 3, chunk_rows=200).signatures(sets)
    np.testing.assert_array_equal(ours, np.array([datasketch_signature(s, 128, 3) for s in sets]))
    np.testing.assert_array_equal(ours, np.array([m.hashvalues for m in MinHash.bulk(sets, num_perm=128, seed=3)]))
    assert (ours[-2] == EMPTY).all(), "no shingles: datasketch's empty signature"
    lean = MinHasher(128, 3).lean(ours[0])
    assert lean.jaccard(MinHash.bulk([sets[0]], num_perm=128, seed=3)[0]) == 1.0


def test_shingles_and_words():
    assert words("Hello, World! It's 2 o'clock.") == ["hello", "world", "it", "s", "2", "o", "clock"]
    assert words("Ünïcode ÉTÉ") == ["ünïcode", "été"]
    assert shingles("a b c a b c", 2) == [b"a b", b"b c", b"c a"]
    assert shingles("just two", 3) == [b"just two"] and shingles("...", 3) == []


# ------------------------------------------------------------------------------------------------ LSH


def test_band_pairs_equal_minhashlsh_query(corpus):
    texts = [d.text for d in corpus[:600]] + [corpus[0].text] * 3  # a bucket of more than two
    docs, _ = dedup.inject_near_duplicates([(str(i), t) for i, t in enumerate(texts)], 0.2, 0.08, seed=1)
    hasher = MinHasher(128, 1)
    sig = hasher.text_signatures([t for _, t in docs], 3)
    for threshold in (0.3, 0.5, 0.8):
        bands, rows = lsh_params(threshold, 128)
        lsh = MinHashLSH(threshold=threshold, num_perm=128)
        assert (lsh.b, lsh.r) == (bands, rows)
        for i, row in enumerate(sig):
            lsh.insert(i, hasher.lean(row))
        expected = sorted(
            {(min(i, j), max(i, j)) for i, row in enumerate(sig) for j in lsh.query(hasher.lean(row)) if j != i}
        )
        got = band_candidate_pairs(sig, bands, rows)
        assert len(expected) > 20
        assert got.tolist() == [list(p) for p in expected]


def test_banding_a_subset_and_chunked_jaccard_match_the_copies(corpus):
    """`positions` bands only those rows without copying them; `pair_jaccard` in chunks equals one gather."""
    texts = [d.text for d in corpus[:400]]
    docs, _ = dedup.inject_near_duplicates([(str(i), t) for i, t in enumerate(texts)], 0.3, 0.05, seed=2)
    sig = MinHasher(128, 1).text_signatures([t for _, t in docs], 3)
    positions = np.arange(len(sig))[::3][::-1].copy()  # every third row, in reverse: order must not matter
    bands, rows = lsh_params(0.5, 128)
    got = band_candidate_pairs(sig, bands, rows, positions=positions)
    assert len(got) > 5 and got.tolist() == band_candidate_pairs(sig[positions], bands, rows).tolist()
    pairs = positions[got]
    whole = estimated_jaccard(sig[pairs[:, 0]], sig[pairs[:, 1]])
    assert np.array_equal(pair_jaccard(sig, pairs, chunk=4), whole) and pair_jaccard(sig, pairs[:0]).shape == (0,)


def test_numpy_and_minhashlsh_index_find_the_same_clusters(corpus):
    docs = corpus[:800]
    sk = dedup.sketch_docs([d.id for d in docs], [d.text for d in docs], dedup.DedupConfig())
    a = dedup.find_duplicates(sk, dedup.DedupConfig(index="numpy"))
    b = dedup.find_duplicates(sk, dedup.DedupConfig(index="datasketch"))
    assert a.removed() == b.removed() and (a.candidate_pairs, a.verified_pairs) == (b.candidate_pairs, b.verified_pairs)
    assert [(c.kind, c.kept, c.duplicates) for c in a.clusters] == [(c.kind, c.kept, c.duplicates) for c in b.clusters]


# ------------------------------------------------------------------------------------------------ clusters


def test_id_order_compares_numbers_as_numbers():
    ids = ["a.txt#10", "a.txt#2", "b.txt#1", "a.txt#1", "builtin-000010", "builtin-000009"]
    assert sorted(ids, key=dedup.id_order) == [
        "a.txt#1",
        "a.txt#2",
        "a.txt#10",
        "b.txt#1",
        "builtin-000009",
        "builtin-000010",
    ]


def test_clusters_keep_the_first_id_whatever_the_input_order():
    story = builtin.generate_corpus(1, seed=3, exact_dup_rate=0, near_dup_rate=0, junk_rate=0)
    text = next(story).text
    near = dedup.perturb(text, random.Random(0), 0.02)
    docs = [
        ("x#10", text),
        ("x#2", "  " + text.upper() + "\n"),
        ("x#7", near),
        ("x#1", "something else entirely, with no words in common"),
    ]
    for shuffled in (docs, docs[::-1]):
        sk = dedup.sketch_docs([i for i, _ in shuffled], [t for _, t in shuffled], dedup.DedupConfig())
        res = dedup.find_duplicates(sk, dedup.DedupConfig())
        named = {sk.ids[i]: kind for i, kind in res.removed().items()}
        assert named == {"x#10": "exact", "x#7": "near"}
        exact = next(c for c in res.clusters if c.kind == "exact")
        near_cluster = next(c for c in res.clusters if c.kind == "near")
        assert sk.ids[exact.kept] == "x#2" and sk.ids[near_cluster.kept] == "x#2"
        assert 0.5 <= near_cluster.similarity[0] < 1.0


def test_perturb_is_seeded_and_always_edits():
    text = "the quick brown fox jumps over the lazy dog " * 5
    assert dedup.perturb(text, random.Random(3), 0.05) == dedup.perturb(text, random.Random(3), 0.05)
    assert all(dedup.perturb(text, random.Random(s), 0.0) != text for s in range(20))
    docs, labels = dedup.inject_near_duplicates([(f"d{i}", text + str(i)) for i in range(50)], 0.2, 0.05, seed=0)
    assert len(docs) == 60 and sum(r["label"] == "near_dup" for r in labels) == 10


@pytest.mark.parametrize(
    "values, message",
    [
        ({"bands": 20}, "dedup.bands: set both bands and rows"),
        ({"bands": 20, "rows": 10}, "dedup.bands: bands x rows = 200 exceeds num_perm = 128"),
        ({"threshold": 0}, "dedup.threshold: must be in (0, 1]"),
        ({"index": "faiss"}, "dedup.index: must be one of 'numpy', 'datasketch'"),
    ],
)
def test_bad_params_fail_naming_the_key(tmp_path, values, message):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["dedup"].update(values)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError) as err:
        load_section("dedup", path=tmp_path / "params.yaml")
    assert message in str(err.value)


def test_dvc_stage_order_and_params():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    names = list(stages)
    assert names.index("ingest") < names.index("filter") < names.index("dedup")
    # data.parallel (workers, runner) may be declared too: it changes no output byte (test_scale_dask.py)
    assert set(stages["filter"]["params"]) - {"data.parallel"} == {"filter"}
    assert "data/ingest" in stages["filter"]["deps"]
    assert set(stages["dedup"]["params"]) - {"data.parallel"} == {"dedup"}, "a dedup param change must rerun dedup only"
    assert "data/filter" in stages["dedup"]["deps"] and {"data/dedup": {"persist": True}} in stages["dedup"]["outs"]


# ------------------------------------------------------------------------------------------------ ground truth


def test_builtin_planted_duplicates_are_found(corpus):
    """Filter then dedup, as the pipeline runs them, scored against the planted labels."""
    kept = [d for d in corpus if not quality.failed_rules(d.text, quality.FilterConfig())]
    cfg = load_section("dedup", dedup.DedupConfig, path=ROOT / "params.yaml")
    sk = dedup.sketch_docs([d.id for d in kept], [d.text for d in kept], cfg)
    res = dedup.find_duplicates(sk, cfg)
    s = dedup.score(
        [{"id": d.id, "label": d.label, "of": d.of} for d in kept],
        {sk.ids[i]: kind for i, kind in res.removed().items()},
    )
    assert s["near_dup"] == 90 and s["exact_dup"] == 90
    assert s["near_dup_precision"] >= 0.95 and s["near_dup_recall"] >= 0.90
    assert s["exact_dup_recall"] == 1.0 and s["clean_removed"] == 0


def test_real_tinystories_with_injected_near_duplicates():
    folder = shared("tinystories")
    pieces = (folder / "TinyStories-train_first2MiB.txt").read_text(encoding="utf-8").split("<|endoftext|>")[:-1]
    stories = [(f"tinystories#{i}", p.strip()) for i, p in enumerate(pieces)]
    docs, labels = dedup.inject_near_duplicates(stories, fraction=0.1, edit_rate=0.05, seed=0)
    cfg = load_section("dedup", dedup.DedupConfig, path=ROOT / "params.yaml")
    sk = dedup.sketch_docs([i for i, _ in docs], [t for _, t in docs], cfg)
    s = dedup.score(labels, {sk.ids[i]: k for i, k in dedup.find_duplicates(sk, cfg).removed().items()})
    assert s["near_dup"] == 232
    assert s["near_dup_precision"] >= 0.9 and s["near_dup_recall"] >= 0.8, s


# ------------------------------------------------------------------------------------------------ stage


def run_stage(root: Path, workers: int, **cfg) -> tuple[dict, list[dict], list[dict]]:
    data = load_section("data", path=ROOT / "params.yaml")
    data = dataclasses.replace(data, parallel=dataclasses.replace(data.parallel, workers=workers))
    paths = stage_paths("dedup", root=root)
    m = dedup.run(dataclasses.replace(dedup.DedupConfig(), **cfg), paths, Tracker("dedup", None), data)
    said = " ".join(dedup.summary(m, paths))
    assert f"kept {m['kept']:,} of {m['docs_in']:,} documents" in said and "data/dedup/clusters.jsonl" in said
    clusters = [json.loads(line) for line in (paths.out / "clusters.jsonl").read_text().splitlines()]
    return m, list(read_docs(paths.out)), clusters


def test_stage_counts_clusters_and_outputs_agree(tmp_path, corpus):
    docs = [d for d in corpus[:1500] if d.label != "junk"]
    write_shards(tmp_path, "filter", docs, per_shard=400)
    m, kept, clusters = run_stage(tmp_path, workers=2)

    assert (
        m["docs_in"]
        == len(docs)
        == m["kept"] + m["exact_duplicates"] + m["near_duplicates"]
        == len(kept) + sum(len(c["duplicates"]) for c in clusters)
    )
    removed = [i for c in clusters for i in c["duplicates"]]
    assert len(removed) == len(set(removed)) and not set(removed) & {d["id"] for d in kept}
    assert [d["id"] for d in kept] == [d.id for d in docs if d.id not in set(removed)]
    for c in clusters:
        assert min([c["kept"], *c["duplicates"]], key=dedup.id_order) == c["kept"]
        assert c["kept"] in {d["id"] for d in kept} or c["kind"] == "exact"
        assert (c["kind"] == "near") == ("similarity" in c)
    assert m["exact_clusters"] == sum(c["kind"] == "exact" for c in clusters)
    g = m["labelled"]
    assert g["near_dup_precision"] >= 0.95 and g["near_dup_recall"] >= 0.9 and g["exact_dup_recall"] == 1.0

    # Another split into shards and another worker count give the same documents and clusters.
    other = tmp_path / "other"
    write_shards(other, "filter", docs[::-1], per_shard=700)
    m2, kept2, clusters2 = run_stage(other, workers=1)
    assert sorted(d["id"] for d in kept2) == sorted(d["id"] for d in kept)
    assert sorted(map(json.dumps, ({k: v for k, v in c.items() if k != "cluster"} for c in clusters2))) == sorted(
        map(json.dumps, ({k: v for k, v in c.items() if k != "cluster"} for c in clusters))
    )


def test_duplicate_input_ids_are_an_error(tmp_path, corpus):
    docs = [d for d in corpus[:30] if d.label != "junk"]
    write_shards(tmp_path, "filter", docs + docs[:1], per_shard=20)
    with pytest.raises(Exception, match=f"document id '{docs[0].id}' occurs more than once"):
        run_stage(tmp_path, workers=1)
