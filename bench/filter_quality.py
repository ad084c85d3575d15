"""Benchmark: the filter stage's model rules (language ID, quality classifier, decontamination) and PII scrubbing,
against the same stage with the text rules only, on the builtin world and on the real corpora of ../shared/data.

    .venv/bin/python bench/filter_quality.py                  # the default world (12,000 docs) + real corpora
    .venv/bin/python bench/filter_quality.py --docs 3000 --repeat 1 --json /tmp/filter_quality.json

Builtin world (data.builtin's seed and rates, `--docs` documents written as data/ingest shards of 5,000 in a
scratch folder): `tasks.filter.run` as the stage runs it (params.yaml's `filter` section, data.parallel's pool),
three configurations interleaved `--repeat` times (best docs/s counts; the machine may be shared):
  all          params.yaml as it is: text rules + language + classifier + decontam, PII on the kept documents
  no_classifier the same with filter.classifier.enabled=false
  text_only    the text rules alone (language, classifier, decontam and PII off): the stage before these rules
Per configuration: docs in = kept + rejected, rejects by first rule, junk recall per kind, clean false rejects,
docs/s of the shard pass (the classifier's training and the n-gram index are timed apart: `prepare_s`), and CPU
milliseconds per document of the same judgement (rules + PII) in this process on the first `--cpu-docs` documents,
models loaded first (`time.process_time`: holds up on a loaded machine, where wall-clock docs/s does not).

Leave-one-kind-out (`--holdout`): the classifier retrained with one fluent junk kind left out of its negatives,
its recall on that kind in the corpus: how far the classifier generalises beyond the kinds it was shown.

Real corpora (skipped, naming the folder, where ../shared/data lacks them): TinyStories 2 MiB sample, Alpaca demo
+ seed tasks (instruction, input and output as one document), HH-RLHF harmless-base (chosen and rejected, one
document each), read through `failed_rules` with the models of the `all` run: kept fraction with the language
rule alone and with every rule, first failed rules, and PII replaced per kind in them.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for `python bench/filter_quality.py`

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time
from collections import Counter

ROOT = Path(__file__).resolve().parents[1]

from tasks import filter as quality_filter  # noqa: E402
from tasks.common import pii, quality  # noqa: E402
from tasks.common.config import load_section  # noqa: E402
from tasks.common.dvcio import fresh_dir, read_jsonl_gz, stage_paths, write_jsonl_gz  # noqa: E402
from tasks.common.tracking import Tracker  # noqa: E402
from tasks.sources import builtin  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
FLUENT = ("off_domain", "spam", "filler")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=12000, help="builtin corpus size (default: the pipeline's)")
    p.add_argument("--repeat", type=int, default=2, help="runs of each configuration (best docs/s counts)")
    p.add_argument("--cpu-docs", type=int, default=3000, help="documents timed in-process per configuration")
    p.add_argument("--holdout", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--json", type=Path, default=None, help="also write every figure here")
    return p.parse_args()


def configs(cfg: quality_filter.FilterConfig) -> dict[str, quality_filter.FilterConfig]:
    off = {name: dataclasses.replace(getattr(cfg, name), enabled=False) for name in ("classifier",)}
    text_only = {
        name: dataclasses.replace(getattr(cfg, name), enabled=False)
        for name in ("language", "classifier", "decontam", "pii")
    }
    return {
        "all": cfg,
        "no_classifier": dataclasses.replace(cfg, **off),
        "text_only": dataclasses.replace(cfg, **text_only),
    }


def write_world(root: Path, n: int) -> None:
    b = load_section("data").builtin
    docs = list(builtin.generate_corpus(n, b.seed, b.exact_dup_rate, b.near_dup_rate, b.junk_rate))
    folder = root / "data" / "ingest"
    folder.mkdir(parents=True)
    for k, start in enumerate(range(0, n, 5000)):
        rows = [{"id": d.id, "text": d.text, "source": "builtin:stories"} for d in docs[start : start + 5000]]
        write_jsonl_gz(folder / f"shard-00000-{k:04d}.jsonl.gz", rows)
    labels = "".join(json.dumps({"id": d.id, "label": d.label, "of": d.of}) + "\n" for d in docs)
    (folder / "labels.jsonl").write_text(labels)


def run_stage(root: Path, name: str, cfg: quality_filter.FilterConfig) -> dict:
    """One stage run in its own project folder under `root` (sharing the ingest shards)."""
    project = root / name
    if not (project / "data" / "ingest").exists():
        (project / "data").mkdir(parents=True, exist_ok=True)
        os.symlink(root / "data" / "ingest", project / "data" / "ingest")
    paths = stage_paths("filter", root=project)
    fresh_dir(paths.out)
    started = time.perf_counter()
    m = quality_filter.run(cfg, paths, Tracker("filter", None), load_section("data"))
    m["wall_s"] = round(time.perf_counter() - started, 2)
    m["prepare_s"] = round(sum(m.get(k, {}).get("seconds", 0.0) for k in ("classifier", "decontam")), 2)
    return m


def cpu_ms_per_doc(texts: list[str], cfg: quality_filter.FilterConfig, models: quality_filter.Models) -> float:
    """CPU milliseconds per document of what filter_shard does to it: every rule, then PII on a kept one."""
    quality_filter.failed_rules(texts[0], cfg, models)  # load the models first
    started = time.process_time()
    for text in texts:
        if not quality_filter.failed_rules(text, cfg, models) and cfg.pii.enabled:
            pii.scrub(text, cfg.pii.kinds, cfg.pii.public_ips_only)
    return round((time.process_time() - started) * 1000 / len(texts), 3)


def holdout_recall(root: Path, cfg: quality_filter.FilterConfig, kind: str) -> float:
    """Recall on `kind` in the corpus of a classifier whose training negatives never include `kind`."""
    r = cfg.classifier
    train = builtin.generate_corpus(r.builtin_docs, r.builtin_seed, 0.0, 0.0, 0.5)
    path = root / f"holdout-{kind}.bin"
    hyper = quality.Hyper(r.dim, r.epoch, r.lr, r.word_ngrams, r.bucket)
    quality.train(((d.text, d.label == "clean") for d in train if d.of != kind), path, hyper)
    labels = [json.loads(line) for line in (root / "data" / "ingest" / "labels.jsonl").read_text().splitlines()]
    ids = {row["id"] for row in labels if row["of"] == kind}
    texts = [
        doc["text"]
        for shard in sorted((root / "data" / "ingest").glob("shard-*.jsonl.gz"))
        for doc in read_jsonl_gz(shard)
        if doc["id"] in ids
    ]
    return sum(quality.score(path, t) < r.threshold for t in texts) / max(1, len(texts))


def real_corpora() -> dict[str, list[str] | str]:
    """name → documents, or the reason a corpus is absent."""
    out: dict[str, list[str] | str] = {}
    ts = SHARED / "tinystories" / "TinyStories-train_first2MiB.txt"
    out["tinystories"] = (
        [p.strip() for p in ts.read_text(encoding="utf-8").split("<|endoftext|>")[:-1]] if ts.is_file() else str(ts)
    )
    demo, seeds = SHARED / "alpaca-en-demo" / "alpaca_en_demo.json", SHARED / "alpaca-seed-tasks" / "seed_tasks.jsonl"
    if demo.is_file() and seeds.is_file():
        rows = json.loads(demo.read_text(encoding="utf-8"))
        docs = ["\n\n".join(x for x in (r["instruction"], r["input"], r["output"]) if x) for r in rows]
        for line in seeds.read_text(encoding="utf-8").splitlines():
            task = json.loads(line)
            for inst in task["instances"]:
                docs.append("\n\n".join(x for x in (task["instruction"], inst["input"], inst["output"]) if x))
        out["alpaca"] = docs
    else:
        out["alpaca"] = f"{demo} / {seeds}"
    hh = sorted((SHARED / "hh-rlhf-harmless-base").glob("*.jsonl.gz"))
    if hh:
        rows = list(read_jsonl_gz(hh[0]))
        out["hh_rlhf"] = [r[k].strip() for r in rows for k in ("chosen", "rejected")]
    else:
        out["hh_rlhf"] = str(SHARED / "hh-rlhf-harmless-base")
    return out


def judge_real(docs: list[str], cfg: quality_filter.FilterConfig, models: quality_filter.Models) -> dict:
    lang_only = configs(cfg)["text_only"]
    lang_only = dataclasses.replace(lang_only, language=cfg.language)
    every = [quality_filter.failed_rules(d, cfg, models) for d in docs]
    lang = [quality_filter.failed_rules(d, lang_only) for d in docs]
    found: Counter = Counter()
    changed = 0
    for d in docs:
        _, hits = pii.scrub(d, cfg.pii.kinds, cfg.pii.public_ips_only)
        found.update(hits)
        changed += bool(hits)
    return {
        "docs": len(docs),
        "kept_language_only": round(sum("language" not in f for f in lang) / len(docs), 4),
        "kept_text_rules": round(sum(not set(f) - {"language"} for f in lang) / len(docs), 4),
        "kept_every_rule": round(sum(not f for f in every) / len(docs), 4),
        "first_failed": dict(Counter(next(iter(f)) for f in every if f).most_common()),
        "language_rejects": [d[:80] for d, f in zip(docs, lang) if "language" in f][:3],
        "pii_docs": changed,
        "pii": {k: found[k] for k in pii.KINDS},
    }


def machine() -> str:
    cores = os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{platform.processor() or platform.machine()}, {cores} cores, load average {load:.1f} at start"


def main() -> None:
    args = parse_args()
    cfg = load_section("filter", quality_filter.FilterConfig)
    out: dict = {"machine": machine(), "docs": args.docs}
    with tempfile.TemporaryDirectory(prefix="filter_quality-") as tmp:
        root = Path(tmp)
        write_world(root, args.docs)
        runs: dict[str, list[dict]] = {}
        for _ in range(args.repeat):
            for name, c in configs(cfg).items():
                runs.setdefault(name, []).append(run_stage(root, name, c))
        best = {name: max(ms, key=lambda m: m["docs_per_s"]) for name, ms in runs.items()}
        out["builtin"] = best
        if args.holdout and cfg.classifier.enabled:
            out["holdout_recall"] = {k: round(holdout_recall(root, cfg, k), 4) for k in FLUENT}
        folder = root / "all" / "data" / "filter"
        models = quality_filter.Models(
            folder / "classifier" / "model.bin", "__label__hq", folder / "decontam_ngrams.tsv.gz"
        )
        texts = [d["text"] for d in read_jsonl_gz(root / "data" / "ingest" / "shard-00000-0000.jsonl.gz")]
        for name, c in configs(cfg).items():
            best[name]["cpu_ms_per_doc"] = cpu_ms_per_doc(texts[: args.cpu_docs], c, models)
        out["real"] = {}
        for name, docs in real_corpora().items():
            out["real"][name] = judge_real(docs, cfg, models) if isinstance(docs, list) else {"skipped": docs}
    report(out)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


def report(out: dict) -> None:
    print(f"machine: {out['machine']}; builtin world of {out['docs']:,} documents")
    for name, m in out["builtin"].items():
        g = m.get("labelled", {})
        fluent = {k: g.get("junk_recall_by_kind", {}).get(k) for k in (*FLUENT, "non_english")}
        print(
            f"{name:14s} kept {m['kept']:,} + rejected {m['rejected']:,} = {m['docs_in']:,}; "
            f"{m['docs_per_s']:,.0f} docs/s (prepare {m['prepare_s']} s), {m['cpu_ms_per_doc']} CPU ms/doc; "
            f"junk recall {g.get('junk_recall')}, "
            f"clean false rejects {g.get('clean_false_reject_rate')}; fluent kinds {fluent}"
        )
        print(f"{'':14s} rejected_by_rule {m['rejected_by_rule']}; clean rejects {g.get('clean_rejected_by_rule')}")
    if "holdout_recall" in out:
        print(f"classifier recall on a kind left out of its training negatives: {out['holdout_recall']}")
    for name, r in out["real"].items():
        print(f"{name:12s} {r}")


if __name__ == "__main__":
    main()
