"""Benchmark: the tokenizer on real text (bytes per token on validation) and pretokenize throughput against
single-threaded `Tokenizer.encode` over the same text.

1. Trains the tokenizer stage on the TinyStories sample (../shared/data/tinystories) at `--vocab` and reports
   bytes per token on its validation split and the training time.
2. Builds a corpus of the same stories repeated `--repeat` times (new ids) in `--shards` shards, trains a tokenizer
   on it (pretokenize checks it was trained on this corpus), then times, interleaved round by round:
     encode (baseline)   `Tokenizer.encode(text)` document by document in one thread, texts already in memory
     encode_batch        `Tokenizer.encode_batch_fast(texts)`: tokenizers' own thread pool, texts in memory
     pretokenize stage   `tasks.pretokenize.run`: read gzip shards, encode on `--workers` processes, write the
                         token files and val_docs, concatenate (the whole stage, I/O included)
   encode_batch and the stage each run in a fresh process per round, as `python -m tasks.pretokenize` would
   (tokenizers turns its threads off in processes forked after it used them, and this process trained BPE).
   MB/s = UTF-8 MB of document text per second. Reported: best-of-rounds MB/s and its ratio to the baseline's best,
   and the median over rounds of (baseline seconds / contender seconds) from the same round.

    .venv/bin/python bench/tokenizer.py                      # vocab 4096, 8 x 2 MiB, 2 workers, 3 rounds
    .venv/bin/python bench/tokenizer.py --repeat 8 --workers 4 --shards 8
"""

from __future__ import annotations

import sys

# This file's name shadows the stdlib `tokenize` (which inspect/linecache import) while its folder is sys.path[0].
sys.path[:] = [p for p in sys.path if p not in ("", __file__.rsplit("/", 1)[0])]

import argparse
import json
import os
import resource
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_TEXT = ROOT.parent / "shared" / "data" / "tinystories" / "TinyStories-train_first2MiB.txt"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="a .txt of documents separated by <|endoftext|>")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--repeat", type=int, default=8, help="copies of the stories in the throughput corpus")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--workers", type=int, default=2, help="pretokenize processes (data.parallel.workers)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--child", choices=["batch", "stage"], help=argparse.SUPPRESS)
    p.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    return p.parse_args()


# ------------------------------------------------------------------------------------------------ corpus


def read_stories(path: Path) -> list[dict]:
    """The documents `ingest` makes of the file (same reader, same ids, so the same validation split)."""
    from tasks.sources import files

    if not path.is_file():
        sys.exit(f"error: {path} not found (the real TinyStories sample lives in ../shared/data/tinystories)")
    return [
        {"id": files.relative_location(r.location, ROOT), "text": r.text, "source": path.name}
        for r in files.read_txt(path, "<|endoftext|>", keep_tail=False)
        if r.text is not None
    ]


def make_project(root: Path, docs: list[dict], shards: int, vocab: int, workers: int) -> Path:
    """root/data/dedup shards and root/params.yaml (the repo's params with the bench's knobs)."""
    import yaml

    from tasks.common.dvcio import shard_name, write_jsonl_gz

    folder = root / "data" / "dedup"
    folder.mkdir(parents=True)
    per = -(-len(docs) // shards)
    for i in range(shards):
        write_jsonl_gz(folder / shard_name(i), docs[i * per : (i + 1) * per])
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["tokenizer"]["vocab_size"] = vocab
    params["data"]["parallel"].update({"runner": "local", "workers": workers})
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def run_stage(name: str, root: Path) -> dict:
    import importlib

    from tasks.common.config import load_section
    from tasks.common.dvcio import stage_paths
    from tasks.common.stage import sections_for
    from tasks.common.tracking import Tracker

    os.environ["SCRATCHLM_PARAMS"] = str(root / "params.yaml")
    module = importlib.import_module(f"tasks.{name}")
    return module.run(load_section(name), stage_paths(name, root), Tracker(name, None), **sections_for(module.run))


def corpus_texts(root: Path) -> list[str]:
    from tasks.common.dvcio import read_docs

    return [d["text"] for d in read_docs(root / "data" / "dedup")]


# ------------------------------------------------------------------------------------------------ contenders


def cpu_seconds() -> float:
    """CPU time of this process (all its threads) and of its waited-for children (pool workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def time_single_encode(root: Path, texts: list[str]) -> tuple[float, float]:
    """(wall, cpu) seconds of encoding every text, one at a time, in this thread."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(root / "data" / "tokenizer" / "tokenizer.json"))
    tok.encode_special_tokens = True
    started, cpu = time.perf_counter(), time.process_time()
    for text in texts:
        tok.encode(text, add_special_tokens=False)
    return time.perf_counter() - started, time.process_time() - cpu


def child(kind: str, root: Path) -> None:
    """One timed contender in a fresh process; prints {"seconds": ...}."""
    os.environ["SCRATCHLM_PROGRESS"] = "off"
    if kind == "batch":
        from tokenizers import Tokenizer

        texts = corpus_texts(root)
        tok = Tokenizer.from_file(str(root / "data" / "tokenizer" / "tokenizer.json"))
        tok.encode_special_tokens = True
        started, cpu = time.perf_counter(), cpu_seconds()
        tok.encode_batch_fast(texts, add_special_tokens=False)
    else:
        import contextlib
        import io

        import tasks.pretokenize  # noqa: F401  (imports are start-up, not throughput)

        started, cpu = time.perf_counter(), cpu_seconds()
        with contextlib.redirect_stdout(io.StringIO()):
            run_stage("pretokenize", root)
    print(json.dumps({"seconds": time.perf_counter() - started, "cpu": cpu_seconds() - cpu}))


def time_child(kind: str, root: Path) -> tuple[float, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TOKENIZERS_PARALLELISM", None)  # let tokenizers use its threads, as a real stage run would
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, "--root", str(root)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if out.returncode != 0:
        sys.exit(f"error: {kind} contender failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["seconds"], result["cpu"]


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    args = parse_args()
    if args.child:
        child(args.child, args.root)
        return
    import contextlib
    import io

    stories = read_stories(args.text)
    print(f"machine: {os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f}), python {sys.version.split()[0]}")
    print(
        f"text: {args.text.name}: {len(stories):,} documents, "
        f"{sum(len(d['text'].encode()) for d in stories) / 1e6:.2f} MB"
    )
    with tempfile.TemporaryDirectory(prefix="bench-tokenize-") as tmp:
        quality_root = make_project(Path(tmp) / "quality", stories, args.shards, args.vocab, args.workers)
        with contextlib.redirect_stdout(io.StringIO()):
            quality = run_stage("tokenizer", quality_root)
        print(
            f"\ntokenizer @ vocab {quality['vocab_size']:,}: {quality['val_bytes_per_token']:.3f} bytes/token on "
            f"validation ({quality['val_docs']:,} docs, {quality['val_bytes']:,} bytes), trained in "
            f"{quality['train_seconds']:.1f}s on {quality['train_bytes'] / 1e6:.2f} MB"
        )

        copies = [{**d, "id": f"{d['id']}~{k}"} for k in range(args.repeat) for d in stories]
        speed_root = make_project(Path(tmp) / "speed", copies, args.shards, args.vocab, args.workers)
        with contextlib.redirect_stdout(io.StringIO()):
            run_stage("tokenizer", speed_root)
        texts = corpus_texts(speed_root)
        mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
        print(
            f"throughput corpus: {len(texts):,} documents, {mb:.2f} MB in {args.shards} shards, "
            f"{args.workers} pretokenize workers, {args.rounds} interleaved rounds"
        )
        seconds: dict[str, list[float]] = {"encode (baseline)": [], "encode_batch": [], "pretokenize stage": []}
        cpu: dict[str, list[float]] = {k: [] for k in seconds}
        for r in range(args.rounds):
            for name, timed in (
                ("encode (baseline)", lambda: time_single_encode(speed_root, texts)),
                ("encode_batch", lambda: time_child("batch", speed_root)),
                ("pretokenize stage", lambda: time_child("stage", speed_root)),
            ):
                wall, used = timed()
                seconds[name].append(wall)
                cpu[name].append(used)
            print(f"  round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in seconds.items()))
    report(quality, seconds, cpu, mb, args)


def report(
    quality: dict, seconds: dict[str, list[float]], cpu: dict[str, list[float]], mb: float, args: argparse.Namespace
) -> None:
    """Best-of-rounds MB/s (least disturbed by other load), the median of per-round ratios (each round runs
    the contenders back to back, so a round's ratio sees roughly the same load), and MB per CPU-second (the work
    each contender spends, whatever the load: on an idle machine wall time approaches CPU time / cores used)."""
    baseline = seconds["encode (baseline)"]
    print(
        f"\n{'contender':<20}{'best s':>8}{'median s':>10}{'best MB/s':>11}{'best vs base':>14}{'median ratio':>14}"
        f"{'MB/CPU-s':>10}"
    )
    rows = {}
    for name, values in seconds.items():
        best_ratio = min(baseline) / min(values)
        round_ratio = statistics.median(b / v for b, v in zip(baseline, values))
        rows[name] = {
            "best_seconds": round(min(values), 3),
            "median_seconds": round(statistics.median(values), 3),
            "best_mb_per_s": round(mb / min(values), 3),
            "best_ratio": round(best_ratio, 2),
            "median_round_ratio": round(round_ratio, 2),
            "mb_per_cpu_second": round(mb / statistics.median(cpu[name]), 3),
        }
        print(
            f"{name:<20}{min(values):>8.2f}{statistics.median(values):>10.2f}{mb / min(values):>11.2f}"
            f"{best_ratio:>13.2f}x{round_ratio:>13.2f}x{mb / statistics.median(cpu[name]):>10.2f}"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "tokenizer": quality,
                    "throughput": rows,
                    "mb": mb,
                    "seconds": seconds,
                    "cpu_seconds": cpu,
                    "args": {k: str(v) for k, v in vars(args).items()},
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
