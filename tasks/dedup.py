"""dedup — drop exact duplicates (normalised-text hash), then near duplicates (MinHash + MinHashLSH).

Runbook
    dvc repro dedup                             # or: scratchlm stage dedup / python -m tasks.dedup
    dvc exp run -S dedup.threshold=0.7          # stricter near-duplicate threshold (only dedup reruns)
    jq -c 'select(.kind == "near")' data/dedup/clusters.jsonl | head     # what was merged, and how similar
    python bench/dedup.py                       # docs/s and F1 against plain per-document datasketch use

Reads   data/filter/shard-*.jsonl.gz, data/filter/labels.jsonl (builtin ground truth of the kept documents)
Writes  data/dedup/shard-*.jsonl.gz   the unique documents, one output shard per input shard (same name)
        data/dedup/clusters.jsonl     every duplicate cluster: {cluster, kind: exact|near, kept, duplicates,
                                      similarity (near: estimated Jaccard of each duplicate with the kept one)}
        metrics/dedup.json            docs in / kept / exact and near duplicates, duplicate rate, clusters,
                                      LSH bands x rows, candidate and verified pairs, docs/s; with labels:
                                      near-dup precision/recall, exact-dup recall
How     1. exact: a 128-bit BLAKE2b of the normalised text (NFKC, lower-case, whitespace collapsed).
        2. near: word `shingle_size`-gram shingles → MinHash signatures (`num_perm`, `seed`), computed per shard
           in parallel and vectorised (tasks/common/minhash.py: bit-equal to datasketch.MinHash with its
           `ngram_hash32` hashfunc) → LSH with the bands x rows MinHashLSH picks for `threshold` (or explicit
           `bands` x `rows`): `index: numpy` sorts each band and yields exactly MinHashLSH's candidates (tested),
           `index: datasketch` inserts every document into MinHashLSH → candidate pairs = documents sharing a
           bucket → kept when their estimated Jaccard >= `threshold` (`verify`) → connected components are the
           clusters.
        Every cluster keeps its first document by id (numbers inside ids compared as numbers, so `a.txt#2`
        comes before `a.txt#10`) and drops the rest; the order of shards or workers never changes the result.
Checks  docs_in = kept + exact_duplicates + near_duplicates, always (a test holds it).
Scale   sketches are computed shard by shard on `data.parallel` (process pool or Dask); the signatures of every
        document (num_perm x 4 bytes each), its id and exact key live in the main process, which is where
        memory must grow with the corpus: measured 2.1 GB peak at 1 M documents and num_perm=128
        (bench/data_scale.py; 512 MB signatures, ~0.3 GB ids and keys, ~0.6 GB while sorting the ids, the
        bands and the Jaccard checks a few MB each, one band and 64 k pairs at a time), so ~2 KB per document
        or ~4 M documents per 8 GB. `index: datasketch` builds MinHashLSH's dict tables instead (several times
        that memory); with `lsh_storage: redis` + `redis_url` those tables live in a Redis server, under a per-run
        key prefix deleted at the end (docs/SCALE.md; a test holds the clusters equal to in-memory), while the
        signatures stay here.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import random
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import numpy as np
import redis
from datasketch import MinHashLSH

from tasks.common.config import DataConfig, ScratchError, check
from tasks.common.console import fmt
from tasks.common.dvcio import StagePaths, fresh_dir, read_jsonl_gz, read_labels, shards, write_jsonl, write_jsonl_gz
from tasks.common.minhash import (
    EMPTY,
    MinHasher,
    band_candidate_pairs,
    estimated_jaccard,
    lsh_params,
    normalise,
    pair_jaccard,
)
from tasks.common.parallel import parallel_map
from tasks.common.stage import stage_main
from tasks.common.tracking import Tracker


@dataclass(frozen=True)
class DedupConfig:
    shingle_size: int = 3
    """Words per shingle (word n-grams of the lower-cased text, punctuation dropped)."""
    num_perm: int = 128
    """MinHash permutations (signature length); more = better Jaccard estimates, more memory and time."""
    seed: int = 1
    """Seed of the MinHash permutations (datasketch's `seed`)."""
    threshold: float = 0.5
    """Estimated Jaccard similarity at or above which two documents are near duplicates; also tunes the LSH
    bands x rows when `bands`/`rows` are 0."""
    bands: int = 0
    """LSH bands; 0 (with rows 0) lets datasketch pick bands x rows for `threshold` and `num_perm`."""
    rows: int = 0
    """Signature rows per LSH band; 0 together with bands = 0, else bands x rows <= num_perm."""
    verify: bool = True
    """Keep an LSH candidate pair only when its estimated Jaccard >= threshold (false: every shared bucket is a
    duplicate; faster, lower precision)."""
    index: Literal["numpy", "datasketch"] = "numpy"
    """LSH index: `numpy` sorts each band (the same candidate pairs as datasketch MinHashLSH insert/query, a
    test holds it, at a fraction of the cost); `datasketch` inserts every document into MinHashLSH itself
    (the reference, and the way to its Redis storage when signatures outgrow one machine)."""
    lsh_storage: Literal["memory", "redis"] = "memory"
    """Where `index: datasketch` keeps MinHashLSH's hash tables: `memory` (this process) or `redis` (datasketch's
    Redis storage at `redis_url`, under a per-run key prefix that is deleted when the stage ends)."""
    redis_url: str = "redis://127.0.0.1:6379/0"
    """The Redis server of `lsh_storage: redis`, as redis://host:port[/db]."""

    def __post_init__(self) -> None:
        check(self.shingle_size >= 1, "shingle_size", "must be >= 1")
        check(self.num_perm >= 2, "num_perm", "must be >= 2")
        check(0.0 < self.threshold <= 1.0, "threshold", "must be in (0, 1]")
        check((self.bands == 0) == (self.rows == 0), "bands", "set both bands and rows, or neither (0 and 0)")
        check(self.bands >= 0 and self.rows >= 0, "bands", "bands and rows must be >= 0")
        check(
            self.bands * self.rows <= self.num_perm,
            "bands",
            f"bands x rows = {self.bands * self.rows} exceeds num_perm = {self.num_perm}",
        )
        check(self.bands != 1, "bands", "MinHashLSH needs at least 2 bands")
        check(
            self.lsh_storage == "memory" or self.index == "datasketch",
            "lsh_storage",
            "redis storage needs index: datasketch (the numpy index is in memory only)",
        )
        if self.lsh_storage == "redis":
            redis_address(self.redis_url)


Config = DedupConfig  # the section class params.yaml loads (tasks/common/config.py)


# ------------------------------------------------------------------------------------------------ sketches


@dataclass
class Sketches:
    """What dedup needs to know about a batch of documents."""

    ids: list[str]
    exact: list[bytes]  # 16-byte BLAKE2b of each normalised text
    signatures: np.ndarray  # (n_docs, num_perm) uint32 MinHash values


def exact_key(text: str) -> bytes:
    return hashlib.blake2b(normalise(text).encode(), digest_size=16).digest()


def sketch_docs(ids: Sequence[str], texts: Sequence[str], cfg: DedupConfig) -> Sketches:
    """Exact keys and MinHash signatures of one batch of documents (vectorised over the batch)."""
    hasher = MinHasher(cfg.num_perm, cfg.seed)
    return Sketches(list(ids), [exact_key(t) for t in texts], hasher.text_signatures(texts, cfg.shingle_size))


def sketch_shard(path: Path, cfg: DedupConfig) -> Sketches:
    ids, texts = [], []
    for line, doc in enumerate(read_jsonl_gz(path), 1):
        if not isinstance(doc.get("id"), str) or not isinstance(doc.get("text"), str):
            raise ScratchError(f"{path}:{line}: document without a string id and text; rerun the upstream stages")
        ids.append(doc["id"])
        texts.append(doc["text"])
    return sketch_docs(ids, texts, cfg)


def concat(parts: list[Sketches], num_perm: int) -> Sketches:
    """One Sketches of every part, in order. Consumes `parts` (the list is emptied as it is copied), so the
    signatures are held once, not twice (512 MB per million documents at num_perm=128)."""
    ids = [i for p in parts for i in p.ids]
    if len(set(ids)) != len(ids):
        twice = next(i for i, c in Counter(ids).items() if c > 1)
        raise ScratchError(f"dedup: document id {twice!r} occurs more than once in the input; ids must be unique")
    exact = [k for p in parts for k in p.exact]
    signatures = np.empty((len(ids), num_perm), dtype=np.uint32)
    row = 0
    while parts:  # each part leaves the list as it is copied, so its signatures are freed at once
        part = parts.pop(0)
        signatures[row : row + len(part.ids)] = part.signatures
        row += len(part.ids)
    return Sketches(ids, exact, signatures)


# ------------------------------------------------------------------------------------------------ clusters

_DIGITS = re.compile(r"(\d+)")


def id_order(doc_id: str) -> tuple:
    """Sort key of an id: text pieces as text, digit runs as numbers ('a.txt#2' < 'a.txt#10')."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in _DIGITS.split(doc_id) if p)


@dataclass
class Cluster:
    kind: str  # "exact" or "near"
    kept: int  # document position
    duplicates: list[int]  # positions, in id order
    similarity: list[float] = field(default_factory=list)  # near: estimated Jaccard of each with `kept`


@dataclass
class Resolution:
    clusters: list[Cluster]
    bands: int
    rows: int
    candidate_pairs: int
    verified_pairs: int

    def removed(self) -> dict[int, str]:
        """Position of every dropped document → "exact" | "near"."""
        return {d: c.kind for c in self.clusters for d in c.duplicates}


def find_duplicates(sk: Sketches, cfg: DedupConfig) -> Resolution:
    """Exact clusters, then near clusters among the exact survivors; each keeps its first document by id."""
    order = sorted(range(len(sk.ids)), key=lambda i: id_order(sk.ids[i]))
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    exact_clusters = exact_duplicates(sk.exact, order)
    dropped = {d for c in exact_clusters for d in c.duplicates}
    # Documents without a single word have the empty signature; they can only be exact duplicates.
    has_words = (sk.signatures != EMPTY).any(axis=1)
    survivors = np.array([i for i in order if i not in dropped and has_words[i]], dtype=np.int64)
    bands, rows = (cfg.bands, cfg.rows) if cfg.bands else lsh_params(cfg.threshold, cfg.num_perm)
    if cfg.index == "numpy":
        pairs = survivors[band_candidate_pairs(sk.signatures, bands, rows, positions=survivors)]
        pairs.sort(axis=1)
    else:
        pairs = minhashlsh_candidate_pairs(sk.signatures, survivors, cfg, bands, rows)
    similarity = pair_jaccard(sk.signatures, pairs)
    verified = pairs[similarity >= cfg.threshold] if cfg.verify else pairs
    near_clusters = components(verified, rank, sk.signatures)
    return Resolution(exact_clusters + near_clusters, bands, rows, len(pairs), len(verified))


def exact_duplicates(keys: Sequence[bytes], order: Sequence[int]) -> list[Cluster]:
    first: dict[bytes, Cluster] = {}
    for i in order:
        cluster = first.get(keys[i])
        if cluster is None:
            first[keys[i]] = Cluster("exact", i, [])
        else:
            cluster.duplicates.append(i)
    return [c for c in first.values() if c.duplicates]


def minhashlsh_candidate_pairs(
    signatures: np.ndarray, positions: np.ndarray, cfg: DedupConfig, bands: int, rows: int
) -> np.ndarray:
    """Insert `positions` into a datasketch MinHashLSH; every pair sharing a bucket → (n_pairs, 2), i < j.

    Reading the buckets once gives exactly the pairs that `lsh.query` of every document would."""
    hasher = MinHasher(cfg.num_perm, cfg.seed)
    pairs: set[tuple[int, int]] = set()
    with lsh_storage(cfg) as (storage, key):
        lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm, params=(bands, rows), **storage)
        with lsh.insertion_session() as session:
            for i in positions.tolist():
                session.insert(key(i), hasher.lean(signatures[i]), check_duplication=False)
        for table in lsh.hashtables:
            shared = [bucket for bucket, n in table.itemcounts().items() if n > 1]  # one round trip on Redis
            for members in table.getmany(*shared) if shared else []:
                pairs.update(itertools.combinations(sorted(int(m) for m in members), 2))
    return np.array(sorted(pairs), dtype=np.int64).reshape(-1, 2)


def redis_address(url: str) -> dict:
    """{host, port, db} of a redis://host:port[/db] URL, or a ConfigError naming `redis_url`."""
    try:
        parts = urlsplit(url)
        port, db = parts.port or 6379, parts.path.strip("/") or "0"
    except ValueError:
        port, db, parts = 0, "", None
    check(
        parts is not None and parts.scheme == "redis" and bool(parts.hostname) and db.isdigit() and port > 0,
        "redis_url",
        f"expected redis://host:port[/db], got {url!r}",
    )
    return {"host": parts.hostname, "port": port, "db": int(db)}


@contextlib.contextmanager
def lsh_storage(cfg: DedupConfig) -> Iterator[tuple[dict, object]]:
    """MinHashLSH's storage arguments and the key of document position i: memory (ints), or Redis (bytes keys
    under a fresh prefix, so concurrent runs never mix; every key with the prefix is deleted afterwards)."""
    if cfg.lsh_storage == "memory":
        yield {}, int
        return
    address = redis_address(cfg.redis_url)
    client = redis.Redis(**address)
    try:
        client.ping()
    except redis.exceptions.RedisError as e:
        raise ScratchError(
            f"dedup.redis_url: no Redis at {cfg.redis_url} ({e}); start redis-server there or set "
            "dedup.lsh_storage: memory"
        ) from None
    prefix = f"scratchlm-dedup-{uuid.uuid4().hex[:12]}-".encode()
    try:
        yield (
            {"storage_config": {"type": "redis", "basename": prefix, "redis": address}, "prepickle": False},
            lambda i: str(i).encode(),
        )
    finally:
        stale = list(client.scan_iter(match=prefix + b"*", count=10_000))
        for start in range(0, len(stale), 10_000):
            client.delete(*stale[start : start + 10_000])


def components(pairs: np.ndarray, rank: np.ndarray, signatures: np.ndarray) -> list[Cluster]:
    """Connected components of the pair graph as near clusters, rooted at their first document by id."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(x, x) != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    for a, b in pairs.tolist():
        ra, rb = find(a), find(b)
        if ra != rb:
            first, second = (ra, rb) if rank[ra] < rank[rb] else (rb, ra)
            parent[second] = first
    members: dict[int, list[int]] = {}  # root → the other members (`parent` holds exactly the non-roots)
    for x in parent:
        members.setdefault(find(x), []).append(x)
    clusters = []
    for root in sorted(members, key=lambda r: rank[r]):
        dups = sorted(members[root], key=lambda d: rank[d])
        sims = estimated_jaccard(signatures[dups], signatures[[root] * len(dups)])
        clusters.append(Cluster("near", root, dups, [round(float(s), 4) for s in sims]))
    return clusters


# ------------------------------------------------------------------------------------------------ stage


def run(cfg: DedupConfig, paths: StagePaths, tracker: Tracker, data: DataConfig) -> dict:
    inputs = shards(paths.of("filter"))
    out = fresh_dir(paths.out)
    started = time.perf_counter()
    parts = parallel_map(
        functools.partial(sketch_shard, cfg=cfg),
        inputs,
        data.parallel,
        desc="dedup: sketch",
        postfix=lambda done: {"docs": sum(len(p.ids) for p in done)},
    )
    ids_by_shard = [part.ids for part in parts]
    sk = concat(parts, cfg.num_perm)  # empties `parts`
    sketched = time.perf_counter()
    resolution = find_duplicates(sk, cfg)
    resolved = time.perf_counter()
    removed = {sk.ids[i] for i in resolution.removed()}
    jobs = [(path, frozenset(i for i in ids if i in removed)) for path, ids in zip(inputs, ids_by_shard)]
    kept = sum(parallel_map(functools.partial(copy_unique, out_dir=out), jobs, data.parallel, desc="dedup: write"))
    write_jsonl(out / "clusters.jsonl", cluster_rows(resolution, sk.ids))
    seconds = time.perf_counter() - started
    metrics = summarise(sk, resolution, kept, seconds)
    metrics["seconds_sketch"], metrics["seconds_index"] = round(sketched - started, 3), round(resolved - sketched, 3)
    labels = read_labels(paths.of("filter") / "labels.jsonl")
    if labels:
        metrics["labelled"] = score(labels, {sk.ids[i]: kind for i, kind in resolution.removed().items()})
    tracker.log_artifact(out / "clusters.jsonl", "dedup")
    return metrics


def copy_unique(job: tuple[Path, frozenset[str]], out_dir: Path) -> int:
    """Copy one shard to `out_dir`, without the documents in `job[1]`; return how many were kept."""
    path, removed = job
    return write_jsonl_gz(out_dir / path.name, (d for d in read_jsonl_gz(path) if d["id"] not in removed))


def cluster_rows(resolution: Resolution, ids: list[str]) -> Iterator[dict]:
    for n, c in enumerate(resolution.clusters):
        row = {"cluster": n, "kind": c.kind, "kept": ids[c.kept], "duplicates": [ids[d] for d in c.duplicates]}
        if c.kind == "near":
            row["similarity"] = c.similarity
        yield row


def summarise(sk: Sketches, r: Resolution, kept: int, seconds: float) -> dict:
    kinds = Counter(r.removed().values())
    docs_in = len(sk.ids)
    if docs_in != kept + kinds["exact"] + kinds["near"]:
        raise ScratchError(
            f"dedup: counts do not add up: {docs_in} in != {kept} kept + {kinds['exact']} exact "
            f"+ {kinds['near']} near duplicates (were the input shards changed during the run?)"
        )
    return {
        "docs_in": docs_in,
        "kept": kept,
        "exact_duplicates": kinds["exact"],
        "near_duplicates": kinds["near"],
        "duplicate_rate": round((docs_in - kept) / max(1, docs_in), 6),
        "exact_clusters": sum(c.kind == "exact" for c in r.clusters),
        "near_clusters": sum(c.kind == "near" for c in r.clusters),
        "lsh_bands": r.bands,
        "lsh_rows": r.rows,
        "candidate_pairs": r.candidate_pairs,
        "verified_pairs": r.verified_pairs,
        "docs_per_s": round(docs_in / max(seconds, 1e-9), 1),
    }


# ------------------------------------------------------------------------------------------------ ground truth


def score(labels: Iterable[dict], removed: dict[str, str]) -> dict:
    """Near-dup precision/recall and exact-dup recall of `removed` (id → "exact" | "near") against labels.

    A document counts as found when it was dropped; near-dup precision is over the documents dropped as near
    duplicates (a planted near duplicate dropped by the exact pass still counts for recall)."""
    labels = list(labels)
    truth = {kind: {r["id"] for r in labels if r["label"] == kind} for kind in ("near_dup", "exact_dup", "clean")}
    near = {i for i, k in removed.items() if k == "near"}
    exact = {i for i, k in removed.items() if k == "exact"}
    found_near = truth["near_dup"] & removed.keys()
    precision = len(near & truth["near_dup"]) / len(near) if near else 1.0
    recall = len(found_near) / len(truth["near_dup"]) if truth["near_dup"] else 1.0
    return {
        "near_dup": len(truth["near_dup"]),
        "exact_dup": len(truth["exact_dup"]),
        "near_dup_precision": round(precision, 6),
        "near_dup_recall": round(recall, 6),
        "near_dup_f1": round(2 * precision * recall / max(precision + recall, 1e-12), 6),
        "exact_dup_recall": round(len(exact & truth["exact_dup"]) / max(1, len(truth["exact_dup"])), 6)
        if truth["exact_dup"]
        else 1.0,
        "clean_removed": len(truth["clean"] & removed.keys()),
    }


def perturb(text: str, rng: random.Random, edit_rate: float) -> str:
    """A near duplicate of `text`: each word is, with probability `edit_rate`, swapped with its neighbour,
    deleted, or preceded by an inserted word from the same text (at least one edit is always made)."""
    words = text.split(" ")
    out: list[str] = []
    i = edits = 0
    while i < len(words):
        roll = rng.random()
        if roll < edit_rate / 3 and i + 1 < len(words):
            out += [words[i + 1], words[i]]
            i, edits = i + 2, edits + 1
            continue
        if roll < 2 * edit_rate / 3:
            edits += 1
        elif roll < edit_rate:
            out += [rng.choice(words), words[i]]
            edits += 1
        else:
            out.append(words[i])
        i += 1
    if edits == 0 or out == words:
        at = rng.randrange(len(words))
        out = words[:at] + [rng.choice(words)] + words[at:]
    return " ".join(out)


def inject_near_duplicates(
    docs: Sequence[tuple[str, str]], fraction: float, edit_rate: float, seed: int
) -> tuple[list[tuple[str, str]], list[dict]]:
    """`docs` ((id, text) pairs) plus perturbed copies of a seeded `fraction` of them, appended after all
    originals (ids `<id>~near`); returns (documents, label rows {id, label, of})."""
    rng = random.Random(seed)
    chosen = sorted(rng.sample(range(len(docs)), round(fraction * len(docs))))
    copies = [(f"{docs[i][0]}~near", perturb(docs[i][1], rng, edit_rate)) for i in chosen]
    labels = [{"id": i, "label": "clean", "of": None} for i, _ in docs]
    labels += [{"id": cid, "label": "near_dup", "of": docs[i][0]} for (cid, _), i in zip(copies, chosen)]
    return list(docs) + copies, labels


def summary(m: dict, paths: StagePaths) -> list[str]:
    """What was dropped and why, how LSH did, and the ground-truth scores when labelled."""
    lines = [
        f"kept {fmt(m['kept'])} of {fmt(m['docs_in'])} documents: {fmt(m['exact_duplicates'])} exact and "
        f"{fmt(m['near_duplicates'])} near duplicates dropped ({m['duplicate_rate']:.2%}), "
        f"{m['docs_per_s']:,.0f} docs/s",
        f"LSH {m['lsh_bands']} bands x {m['lsh_rows']} rows: {fmt(m['candidate_pairs'])} candidate pairs, "
        f"{fmt(m['verified_pairs'])} verified",
    ]
    if "labelled" in m:
        g = m["labelled"]
        lines.append(
            f"ground truth: near-dup precision {g['near_dup_precision']:.3f} recall {g['near_dup_recall']:.3f}"
            f", exact-dup recall {g['exact_dup_recall']:.3f}, clean documents removed {g['clean_removed']}"
        )
    lines.append(f"clusters in {(paths.out / 'clusters.jsonl').relative_to(paths.root)}")
    return lines


HEADLINE = (
    "kept",
    "duplicate_rate",
    "exact_duplicates",
    "near_duplicates",
    "labelled.near_dup_f1",
    "labelled.exact_dup_recall",
)
"""What metrics/dedup.json keeps (`dvc metrics diff`); every figure is in data/dedup/metrics.json."""


if __name__ == "__main__":
    stage_main("dedup", DedupConfig, run, summary, HEADLINE)
