"""Benchmark: the data stages (ingest → filter → dedup → tokenizer → pretokenize) at 10 k, 100 k and 1 M documents:
docs/s, CPU per document and peak memory per stage, and how the cost per document moves with the corpus (issue 18).

Runbook (from the repository root)
    .venv/bin/python -m bench.data_scale                              # 10k, 100k, 1M documents (~15 min here)
    .venv/bin/python -m bench.data_scale --docs 10000 100000          # a quick look (~2 minutes)
    .venv/bin/python -m bench.data_scale --docs 2000000 --format txt  # ~1.2 GB as one .txt file
    .venv/bin/python -m bench.data_scale --stages ingest filter       # the first stages only (each needs those before)

What it does
  1. Writes each corpus once, before anything is timed, under <work>/corpus-<N>-<format>/: N documents of the
     builtin generator (tasks/sources/builtin.py `generate_corpus`, params.yaml's `data.builtin` seed and planted
     exact/near-duplicate and junk rates, so filter and dedup have their usual share of work), as `--files` gzip
     JSON Lines files {"id", "text"} (`--format jsonl.gz`, default: a user's corpus in a folder) or one .txt file
     separated by `data.txt_separator` (`--format txt`: one unit, read block by block by one process). A corpus
     already written with the same settings is reused (its `corpus.json` says how it was made).
  2. Copies the project (flows/sandbox.py `copy_project`, as the tests do) to <work>/project with
     data.sources = [that folder or file] and decontam.data_dir = the shared benchmark slices (absolute), then runs
     each stage as a user does without DVC, `python -m tasks.<stage>` in the copy (MLflow into the copy's
     mlruns.db), one after the other. Everything else is params.yaml's (2 workers on the local process pool).
  3. For each stage: wall seconds, CPU seconds of the stage and its worker processes (getrusage of the finished
     children), documents in (the stage's own metrics), and memory sampled every 0.1 s with psutil: the peak RSS
     of the largest process and the peak of the summed RSS of the stage's process tree (forked workers share
     pages, so the sum over-counts what they share; both are comparable across corpus sizes).
  4. Prints one table per corpus size, then the scaling table: per stage, the cost per document (wall and CPU) at
     the largest size over the smallest (the issue's target: <= 1.5x), the marginal cost per document between the
     two largest sizes over the two smallest (start-up costs cancel, so this is the linearity that remains), and
     peak memory at each size. Writes <work>/result.json.

Disk: the largest corpus plus what each stage writes (~4x the corpus compressed, plus the token files).
Machine: 2 CPU cores here; on a loaded machine wall seconds grow but CPU per document hardly moves.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for `python bench/data_scale.py`

import argparse
import contextlib
import functools
import gzip
import json
import os
import platform
import resource
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("ingest", "filter", "dedup", "tokenizer", "pretokenize")
SHARED = ROOT.parent / "shared" / "data"
# The count each stage's metrics give for the documents it read (tokenizer: both splits).
DOCS_IN = {
    "ingest": ("docs_in",),
    "filter": ("docs_in",),
    "dedup": ("docs_in",),
    "tokenizer": ("train_docs", "val_docs"),
    "pretokenize": ("train_documents", "val_documents"),
}


# ------------------------------------------------------------------------------------------------ the corpus


@functools.cache
def data_params() -> dict:
    """params.yaml's `data` section (the builtin generator's settings, the .txt separator), read once."""
    return yaml.safe_load((ROOT / "params.yaml").read_text())["data"]


def builtin_params() -> dict:
    return data_params()["builtin"]


def corpus_docs(n_docs: int) -> Iterator[dict]:
    """The builtin generator's documents as a user's file rows: {"id", "text"} (labels dropped)."""
    from tasks.sources.builtin import generate_corpus

    b = builtin_params()
    for doc in generate_corpus(n_docs, b["seed"], b["exact_dup_rate"], b["near_dup_rate"], b["junk_rate"]):
        yield {"id": doc.id, "text": doc.text}


def write_corpus(work: Path, n_docs: int, fmt: str, n_files: int, separator: str) -> Path:
    """<work>/corpus-<N>-<fmt>/ written once (reused when its corpus.json matches); the data.sources entry."""
    folder = work / f"corpus-{n_docs}-{fmt.replace('.', '')}"
    recipe = {**builtin_params(), "n_docs": n_docs, "format": fmt, "files": n_files if fmt == "jsonl.gz" else 1}
    stamp = folder / "corpus.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("recipe") == recipe:
        return folder if fmt == "jsonl.gz" else folder / "corpus.txt"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    started = time.perf_counter()
    docs = corpus_docs(n_docs)
    if fmt == "txt":
        with open(folder / "corpus.txt", "w", encoding="utf-8", newline="\n") as f:
            for doc in docs:
                f.write(f"{doc['text']}\n{separator}\n")
    else:
        per_file = -(-n_docs // n_files)
        for i in range(n_files):
            rows = (next(docs) for _ in range(min(per_file, n_docs - i * per_file)))
            with gzip.open(folder / f"part-{i:03d}.jsonl.gz", "wt", encoding="utf-8", compresslevel=1) as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
    size = sum(p.stat().st_size for p in folder.iterdir())
    stamp.write_text(json.dumps({"recipe": recipe, "bytes_on_disk": size, "seconds": time.perf_counter() - started}))
    print(f"  wrote {folder} ({size / 1e6:,.0f} MB on disk) in {time.perf_counter() - started:,.0f} s", flush=True)
    return folder if fmt == "jsonl.gz" else folder / "corpus.txt"


def text_bytes(work: Path, n_docs: int, fmt: str) -> int:
    """UTF-8 bytes of the corpus's text (what ingest writes as bytes_out), from the first run's ingest metrics."""
    stamp = work / f"corpus-{n_docs}-{fmt.replace('.', '')}" / "corpus.json"
    return json.loads(stamp.read_text()).get("text_bytes", 0)


# ------------------------------------------------------------------------------------------------ one stage


@dataclass
class StageRun:
    stage: str
    docs: int
    wall_s: float
    cpu_s: float
    peak_rss_mb: float  # the largest single process
    peak_tree_mb: float  # the stage's process tree, summed
    processes: int  # the most processes seen at once

    @property
    def docs_per_s(self) -> float:
        return self.docs / self.wall_s

    @property
    def cpu_ms_per_doc(self) -> float:
        return 1000 * self.cpu_s / max(1, self.docs)


def tree_rss(root: psutil.Process) -> list[int]:
    """RSS of `root` and every descendant alive now (a worker that exits mid-sample is skipped)."""
    rss = []
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return rss
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            rss.append(p.memory_info().rss)
    return rss


def run_stage(stage: str, project: Path, env: dict, log: Path) -> StageRun:
    """`python -m tasks.<stage>` in the project copy, sampled for memory; exits with the log's tail on failure."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    peak, peak_tree, most = 0, 0, 0
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", f"tasks.{stage}"], cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT
        )
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            rss = tree_rss(root)
            if rss:
                peak, peak_tree, most = max(peak, max(rss)), max(peak_tree, sum(rss)), max(most, len(rss))
            time.sleep(0.1)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-30:]
        sys.exit(f"bench.data_scale: {stage} failed (exit {proc.returncode}); {log}:\n" + "\n".join(tail))
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    metrics = json.loads((project / "metrics" / "all" / f"{stage}.json").read_text())
    docs = sum(int(metrics[key]) for key in DOCS_IN[stage])
    return StageRun(stage, docs, wall, cpu, peak / 2**20, peak_tree / 2**20, most)


# ------------------------------------------------------------------------------------------------ the project


def prepare_project(work: Path) -> tuple[Path, dict]:
    """A fresh copy of the repository at <work>/project and the environment its stages run in."""
    from flows.sandbox import copy_project, project_env

    project = work / "project"
    shutil.rmtree(project, ignore_errors=True)
    project.mkdir(parents=True)
    copy_project(project)
    # Compile the copy's modules now, or the first stage timed (ingest at the smallest size) pays for it.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(project)], check=True)
    return project, project_env(project)


def point_at(project: Path, source: Path) -> None:
    """data.sources = [source]; decontam reads the shared benchmark slices wherever the copy lives."""
    from flows.pipeline import apply_overrides

    overrides: dict[str, object] = {"data.sources": [str(source)]}
    if SHARED.is_dir():
        overrides["filter.decontam.data_dir"] = str(SHARED)
    apply_overrides(overrides, project / "params.yaml")


def clear_outputs(project: Path) -> None:
    """Remove every data stage's output so the next size starts from nothing (disk stays ~one corpus)."""
    for stage in STAGES:
        shutil.rmtree(project / "data" / stage, ignore_errors=True)


def run_size(n_docs: int, args: argparse.Namespace, project: Path, env: dict) -> list[StageRun]:
    source = write_corpus(args.work, n_docs, args.format, args.files, data_params()["txt_separator"])
    point_at(project, source)
    clear_outputs(project)
    logs = args.work / "logs" / str(n_docs)
    logs.mkdir(parents=True, exist_ok=True)
    runs = []
    for stage in args.stages:
        print(f"[{time.strftime('%H:%M:%S')}] {n_docs:,} docs: {stage}   (log: {logs / stage}.log)", flush=True)
        run = run_stage(stage, project, env, logs / f"{stage}.log")
        print(
            f"    {run.docs:,} docs in {run.wall_s:,.1f} s = {run.docs_per_s:,.0f} docs/s, "
            f"{run.cpu_ms_per_doc:.3f} CPU ms/doc, peak RSS {run.peak_rss_mb:,.0f} MB "
            f"(tree {run.peak_tree_mb:,.0f} MB, {run.processes} processes)",
            flush=True,
        )
        runs.append(run)
    ingest = project / "metrics" / "all" / "ingest.json"
    if ingest.is_file():
        stamp = source if source.is_dir() else source.parent
        recipe = json.loads((stamp / "corpus.json").read_text())
        recipe["text_bytes"] = json.loads(ingest.read_text())["bytes_out"]
        (stamp / "corpus.json").write_text(json.dumps(recipe))
    return runs


# ------------------------------------------------------------------------------------------------ report


def scaling(results: dict[int, list[StageRun]]) -> list[dict]:
    """Per stage: cost per document at the largest size over the smallest (wall and CPU), the marginal cost per
    document between the two largest sizes over the two smallest, and peak memory per size."""
    sizes = sorted(results)
    rows = []
    for i, stage in enumerate(r.stage for r in results[sizes[0]]):
        by = {n: results[n][i] for n in sizes}
        lo, hi = by[sizes[0]], by[sizes[-1]]
        row = {
            "stage": stage,
            "wall_per_doc_ratio": (hi.wall_s / hi.docs) / (lo.wall_s / lo.docs),
            "cpu_per_doc_ratio": (hi.cpu_s / hi.docs) / (lo.cpu_s / lo.docs),
            "peak_rss_mb": {n: round(by[n].peak_rss_mb) for n in sizes},
            "peak_tree_mb": {n: round(by[n].peak_tree_mb) for n in sizes},
        }
        if len(sizes) >= 3:
            a, b, c = (by[n] for n in (sizes[0], sizes[1], sizes[-1]))
            low = (b.cpu_s - a.cpu_s) / max(1, b.docs - a.docs)
            high = (c.cpu_s - b.cpu_s) / max(1, c.docs - b.docs)
            row["marginal_cpu_ratio"] = high / low if low > 0 else float("nan")  # nan: start-up noise only
        rows.append(row)
    return rows


def print_tables(results: dict[int, list[StageRun]], rows: list[dict], args: argparse.Namespace) -> None:
    for n, runs in sorted(results.items()):
        mb = text_bytes(args.work, n, args.format) / 1e6
        print(f"\n{n:,} documents ({mb:,.0f} MB of text, {args.format})")
        print("| stage | docs in | wall s | docs/s | CPU ms/doc | peak RSS MB (largest) | peak RSS MB (tree) |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for r in runs:
            print(
                f"| {r.stage} | {r.docs:,} | {r.wall_s:,.1f} | {r.docs_per_s:,.0f} | {r.cpu_ms_per_doc:.3f} | "
                f"{r.peak_rss_mb:,.0f} | {r.peak_tree_mb:,.0f} |"
            )
    sizes = sorted(results)
    lo, hi = f"{sizes[0] // 1000:,}k", f"{sizes[-1] // 1000:,}k"
    print(f"\nScaling: cost per document at {hi} over {lo} (target <= 1.5x)")
    marginal = "marginal CPU/doc ratio | " if len(sizes) >= 3 else ""
    print(f"| stage | wall/doc ratio | CPU/doc ratio | {marginal}peak RSS MB by size (largest process; tree) |")
    print("|---|---:|---:|" + ("---:|" if marginal else "") + "---|")
    for row in rows:
        mem = ", ".join(f"{row['peak_rss_mb'][n]:,}; {row['peak_tree_mb'][n]:,}" for n in sizes)
        m = row.get("marginal_cpu_ratio", float("nan"))
        extra = (f" {m:.2f}x |" if m == m else " n/a |") if marginal else ""
        print(f"| {row['stage']} | {row['wall_per_doc_ratio']:.2f}x | {row['cpu_per_doc_ratio']:.2f}x |{extra} {mem} |")
    worst = max(rows, key=lambda r: r["wall_per_doc_ratio"])
    verdict = "holds" if worst["wall_per_doc_ratio"] <= 1.5 else "FAILS"
    print(f"\nworst wall/doc ratio: {worst['stage']} {worst['wall_per_doc_ratio']:.2f}x: the 1.5x target {verdict}")
    print(f"result: {args.work / 'result.json'}")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--docs", type=int, nargs="+", default=[10_000, 100_000, 1_000_000], help="corpus sizes")
    p.add_argument("--format", choices=("jsonl.gz", "txt"), default="jsonl.gz")
    p.add_argument("--files", type=int, default=8, help="files of a jsonl.gz corpus (default 8)")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    p.add_argument("--work", type=Path, default=Path("/tmp/scratchlm-data-scale"))
    args = p.parse_args()
    if any(n < 1000 for n in args.docs):
        p.error("--docs: each size must be >= 1000 (the builtin generator plants duplicates by rate)")
    args.docs = sorted(set(args.docs))
    args.stages = [s for s in STAGES if s in args.stages]
    if args.stages != list(STAGES[: len(args.stages)]):
        missing = [s for s in STAGES[: STAGES.index(args.stages[-1])] if s not in args.stages]
        p.error(f"--stages: {args.stages[-1]} needs {', '.join(missing)} too (each size starts from no outputs)")
    return args


def main() -> None:
    args = parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"bench.data_scale: {', '.join(f'{n:,}' for n in args.docs)} documents, {args.format}, stages {args.stages}")
    project, env = prepare_project(args.work)
    results = {n: run_size(n, args, project, env) for n in args.docs}
    rows = scaling(results)
    out = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg": os.getloadavg()},
        "format": args.format,
        "files": args.files,
        "sizes": {
            n: {"text_bytes": text_bytes(args.work, n, args.format), "stages": [asdict(r) for r in runs]}
            for n, runs in results.items()
        },
        "scaling": rows,
    }
    (args.work / "result.json").write_text(json.dumps(out, indent=2))
    print_tables(results, rows, args)


if __name__ == "__main__":
    main()
