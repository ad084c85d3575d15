"""Benchmark: our dedup vs plain per-document datasketch use, same corpus, same process, same params.

    .venv/bin/python bench/dedup.py                          # TinyStories sample + injected near duplicates
    .venv/bin/python bench/dedup.py --corpus builtin --docs 6000
    .venv/bin/python bench/dedup.py --edit-rate 0.08 --repeat 5

Contenders (all with params.yaml's `dedup` section: shingle size, num_perm, seed, threshold / bands x rows):
  ours       tasks.dedup as the stage runs it, minus file I/O: batches sketched through parallel_map on
             `--workers` processes (vectorised MinHash), exact-hash pass, LSH banding (params' `index`),
             verified pairs, clusters. Timed with 1 worker (per core), with `--workers`, and with
             index=datasketch (every document inserted into a MinHashLSH) on 1 worker.
  baseline   plain per-document datasketch: for each document in id order, MinHash() and MinHash.update per
             shingle (default SHA-1 hashfunc), MinHashLSH.query, verify candidates with MinHash.jaccard,
             MinHashLSH.insert; the same clustering (connected components, first by id kept).
  bulk       datasketch's own batch API for reference: MinHash.bulk over shingle lists + MinHashLSH.
Each contender runs `--repeat` times, interleaved, so machine load hits all alike; the best time counts.
F1 is over documents: dropped ones vs the planted/injected duplicates (near and exact).
Prints docs/s of each, ours/baseline, and both F1 (target: >= 10x at equal or better F1).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for `python bench/dedup.py`

import argparse
import dataclasses
import functools
import os
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from tasks import dedup  # noqa: E402
from tasks.common.config import RunnerConfig, load_section  # noqa: E402
from tasks.common.minhash import lsh_params, pair_jaccard, shingles  # noqa: E402
from tasks.common.parallel import parallel_map  # noqa: E402

TINYSTORIES = ROOT.parent / "shared" / "data" / "tinystories" / "TinyStories-train_first2MiB.txt"
Docs = list[tuple[str, str]]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--corpus",
        choices=["tinystories", "builtin"],
        default=None,
        help="default: tinystories when ../shared/data has it, else builtin",
    )
    p.add_argument("--docs", type=int, default=3000, help="builtin corpus size")
    p.add_argument("--fraction", type=float, default=0.1, help="tinystories: share of stories given a near copy")
    p.add_argument("--edit-rate", type=float, default=0.05, help="tinystories: per-word edit probability")
    p.add_argument("--workers", type=int, default=2, help="worker processes for ours (also timed with 1)")
    p.add_argument("--batch", type=int, default=1000, help="documents per sketch batch (a shard in the stage)")
    p.add_argument("--repeat", type=int, default=3)
    return p.parse_args()


def load_corpus(args: argparse.Namespace) -> tuple[str, Docs, list[dict]]:
    corpus = args.corpus or ("tinystories" if TINYSTORIES.is_file() else "builtin")
    if corpus == "tinystories":
        pieces = TINYSTORIES.read_text(encoding="utf-8").split("<|endoftext|>")[:-1]  # last one is cut off
        stories = [(f"tinystories#{i}", s.strip()) for i, s in enumerate(pieces)]
        docs, labels = dedup.inject_near_duplicates(stories, args.fraction, args.edit_rate, seed=0)
        return (
            (
                f"TinyStories sample, {len(stories):,} stories + {len(docs) - len(stories):,} injected near "
                f"duplicates ({args.edit_rate:.0%} word edits)"
            ),
            docs,
            labels,
        )
    from tasks import filter as quality
    from tasks.sources import builtin

    rows = [
        d
        for d in builtin.generate_corpus(args.docs, 1337, 0.03, 0.03, 0.05)
        if not quality.failed_rules(d.text, quality.Config())
    ]
    return (
        (f"builtin corpus, {args.docs:,} generated, {len(rows):,} after filter"),
        [(d.id, d.text) for d in rows],
        [{"id": d.id, "label": d.label, "of": d.of} for d in rows],
    )


# ------------------------------------------------------------------------------------------------ contenders


def sketch_batch(batch: Docs, cfg: dedup.Config) -> dedup.Sketches:
    return dedup.sketch_docs([i for i, _ in batch], [t for _, t in batch], cfg)


def ours(docs: Docs, cfg: dedup.Config, workers: int, batch: int) -> set[str]:
    batches = [docs[i : i + batch] for i in range(0, len(docs), batch)]
    parts = parallel_map(functools.partial(sketch_batch, cfg=cfg), batches, RunnerConfig("local", workers))
    sk = dedup.concat(parts, cfg.num_perm)
    return {sk.ids[i] for i in dedup.find_duplicates(sk, cfg).removed()}


def baseline(docs: Docs, cfg: dedup.Config) -> set[str]:
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(
        threshold=cfg.threshold, num_perm=cfg.num_perm, params=(cfg.bands, cfg.rows) if cfg.bands else None
    )
    ordered = sorted(range(len(docs)), key=lambda i: dedup.id_order(docs[i][0]))
    minhashes: dict[int, MinHash] = {}
    pairs = []
    for i in ordered:
        m = MinHash(num_perm=cfg.num_perm, seed=cfg.seed)
        for s in shingles(docs[i][1], cfg.shingle_size):
            m.update(s)
        for j in lsh.query(m):
            if not cfg.verify or m.jaccard(minhashes[j]) >= cfg.threshold:
                pairs.append((min(i, j), max(i, j)))
        lsh.insert(i, m)
        minhashes[i] = m
    return resolve(docs, ordered, pairs, np.array([minhashes[i].hashvalues for i in range(len(docs))]))


def bulk(docs: Docs, cfg: dedup.Config) -> set[str]:
    from datasketch import MinHash

    ordered = sorted(range(len(docs)), key=lambda i: dedup.id_order(docs[i][0]))
    sigs = np.array(
        [
            m.hashvalues
            for m in MinHash.bulk(
                [shingles(t, cfg.shingle_size) for _, t in docs], num_perm=cfg.num_perm, seed=cfg.seed
            )
        ]
    )
    bands, rows = (cfg.bands, cfg.rows) if cfg.bands else lsh_params(cfg.threshold, cfg.num_perm)
    pairs = dedup.minhashlsh_candidate_pairs(sigs, np.array(ordered), cfg, bands, rows)
    if cfg.verify:
        pairs = pairs[pair_jaccard(sigs, pairs) >= cfg.threshold]
    return resolve(docs, ordered, pairs, sigs)


def resolve(docs: Docs, ordered: list[int], pairs, sigs: np.ndarray) -> set[str]:
    rank = np.empty(len(docs), dtype=np.int64)
    rank[ordered] = np.arange(len(docs))
    clusters = dedup.components(np.array(pairs, dtype=np.int64).reshape(-1, 2), rank, sigs)
    return {docs[d][0] for c in clusters for d in c.duplicates}


# ------------------------------------------------------------------------------------------------ scoring


def f1(removed: set[str], labels: list[dict]) -> tuple[float, float, float]:
    truth = {r["id"] for r in labels if r["label"] in ("near_dup", "exact_dup")}
    hits = len(removed & truth)
    precision = hits / len(removed) if removed else 1.0
    recall = hits / len(truth) if truth else 1.0
    return precision, recall, 2 * precision * recall / max(precision + recall, 1e-12)


def machine() -> str:
    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor()
    )
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{cpu}, {os.cpu_count()} cores, load average {load}, Python {platform.python_version()}"


def main() -> None:
    args = parse_args()
    cfg = load_section("dedup", dedup.Config)
    title, docs, labels = load_corpus(args)
    contenders: dict[str, Callable[[], set[str]]] = {
        "ours (1 worker)": lambda: ours(docs, cfg, 1, args.batch),
        f"ours ({args.workers} workers)": lambda: ours(docs, cfg, args.workers, args.batch),
        "ours, MinHashLSH": lambda: ours(docs, dataclasses.replace(cfg, index="datasketch"), 1, args.batch),
        "datasketch bulk": lambda: bulk(docs, cfg),
        "baseline": lambda: baseline(docs, cfg),
    }
    times: dict[str, list[float]] = {name: [] for name in contenders}
    results: dict[str, set[str]] = {}
    print(f"corpus   {title}: {len(docs):,} documents")
    print(
        f"params   shingle_size={cfg.shingle_size} num_perm={cfg.num_perm} threshold={cfg.threshold} "
        f"bands x rows={cfg.bands}x{cfg.rows} (0x0: datasketch's choice) verify={cfg.verify}"
    )
    for _ in range(args.repeat):
        for name, fn in contenders.items():
            started = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - started)
    print(f"machine  {machine()}")
    print(f"\n{'contender':<20}{'docs/s':>10}{'median':>10}{'precision':>11}{'recall':>8}{'F1':>8}")
    rate = {name: len(docs) / min(t) for name, t in times.items()}
    scores = {name: f1(results[name], labels) for name in contenders}
    for name in contenders:
        p, r, f = scores[name]
        print(
            f"{name:<20}{rate[name]:>10,.0f}{len(docs) / statistics.median(times[name]):>10,.0f}"
            f"{p:>11.4f}{r:>8.4f}{f:>8.4f}"
        )
    base_f1 = scores["baseline"][2]
    for name in ("ours (1 worker)", f"ours ({args.workers} workers)"):
        print(
            f"\n{name} / baseline: {rate[name] / rate['baseline']:.1f}x docs/s; "
            f"F1 {scores[name][2]:.4f} vs {base_f1:.4f} ({'>=' if scores[name][2] >= base_f1 else '<'})",
            end="",
        )
    print()


if __name__ == "__main__":
    main()
