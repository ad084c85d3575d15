"""Benchmark: the `small` preset pretrained ~10 minutes through the real pipeline on real TinyStories, scored in bits
per byte on held-out stories (issue 6). Baseline: nanoGPT (4 layers x 256, 4.2M params, byte-level BPE 4,096, fp32)
trained 10 minutes on the same sample reaches ~1.43 bits/byte at ~3,200 tokens/s on 2 cores; the bar is <= 1.30.

Runbook (from the repository root)
    .venv/bin/python -m bench.tinystories                  # THE figure: ~10 minutes of training, budget probed
    .venv/bin/python -m bench.tinystories --minutes 5      # another wall-clock budget
    .venv/bin/python -m bench.tinystories --tokens 2000000 # a fixed token budget (no probe; reproducible)
    .venv/bin/python -m bench.tinystories --tokens 50000 --set pretrain.train.warmup_steps=3 --work /tmp/ts-smoke
    .venv/bin/python -m bench.tinystories --set pretrain.train.lr=2e-3 -v       # a variant, stage output live
    .venv/bin/python -m bench.tinystories --rescore --work /tmp/ts-old   # score an earlier run's model again

What it does
  1. Splits ../shared/data/tinystories/TinyStories-train_first2MiB.txt on `<|endoftext|>`: the 2,316 complete
     stories, in file order, give the first 95 % to training and hold out the last 5 % (`--heldout`); the cut-off
     tail after the last separator is dropped. <work>/train.txt is the file's exact byte prefix up to the separator
     after the last training story; <work>/heldout.txt holds the held-out stories the same way.
  2. Copies the project (tracked + untracked, not ignored files: flows/sandbox.py `copy_project`, as the tests do) to
     <work>/project, a git + DVC repo of its own, with params: data.sources = [<work>/train.txt], model.preset
     small, tokenizer.vocab_size 4096, pretrain.train.max_tokens = the budget; everything else (2 ranks x 1 thread,
     precision auto = bf16 autocast on a CPU with native bf16, batch 16 x 256, lr 3e-3, ...) is params.yaml's.
     MLflow goes to <work>/project/mlruns.db.
  3. `dvc repro pretokenize` (ingest → filter → dedup → tokenizer → pretokenize), then `dvc repro pretrain`.
     Budget: `--tokens N` trains N tokens (rounded up to whole steps of 16 x 256). Otherwise (`--minutes M`, default
     10) a probe first runs the real pretrain stage for `--probe-steps` steps, its median tokens/s over the logged
     windows after the first (start-up excluded) sets max_tokens = tokens/s x 60 M, and the pretrain stage reruns
     with that budget. A wall-clock stop is not an option: the cosine schedule must know its last step up front.
     "Minutes" are the trainer's `train_seconds`: optimizer-step time, not evaluation, checkpoint or start-up
     (those are reported apart, as the stage's wall time).
  4. Loads data/pretrain/model with `model.hf.load` (fp32) and scores the held-out stories, read as the pipeline
     reads documents (`tasks.sources.files.read_txt`) and tokenized as pretokenize does (`encode_docs`: each story's
     tokens then one eot; special-token strings stay plain text), behind one leading eot that is context only.
     Windows of max_seq_len (256) tokens over that stream, non-overlapping by default (`--stride 0`: each window
     restarts its context); `--stride s` < 256 slides by s and scores only targets no earlier window scored. Every
     token after the leading eot is predicted exactly once, each story's closing eot included. `bpb` reads each
     story on its own (attention stops at each eot, `doc_ids`: as the evaluate stage scores documents and as a
     user prompts the model); `stream_bpb` lets a story also see the end of the one before it in the window (the
     figure this benchmark reported before whole-document training; a model trained across documents is
     scored on both).
     bits/byte = sum of NLL (nats) / ln 2 / UTF-8 bytes of the held-out stories' text as given in the file: each
     story verbatim, without the line breaks around the `<|endoftext|>` line (2 or 3 per story here; ingest strips
     them, nothing else; the eot token stands for the separator line and its NLL is counted). `file_bpb` divides
     by the held-out slice of the file instead (separator lines included: 15-16 more bytes per story, so a lower
     figure), for a baseline that counted those.
  5. Reports kept counts of ingest/filter/dedup, the pretrain stage's own metrics (tokens/s, MFU, train seconds,
     val/bpb on its own hash split of train.txt), three generated stories (the pretrain.samples prompts, sampled to
     the end of the context or the first eot), the validation curve (val/bpb at each evaluation) and which
     step's weights were exported (pretrain.train.keep_best), a summary table, and <work>/result.json.

Machine: 2 CPU cores. Taken on a shared, loaded machine, tokens/s (and so the tokens a probed budget buys) drop;
compare bpb at the same token budget (`--tokens`) across machines.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from flows.sandbox import copy_project, project_env

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tinystories" / "TinyStories-train_first2MiB.txt"
SEPARATOR = "<|endoftext|>"
BASELINE = {
    "name": "nanoGPT 4L x 256, 4.2M params, BPE 4096, fp32, 10 min on 2 cores",
    "val_bpb": 1.43,
    "tokens_per_s": 3200,
}
TARGET_BPB = 1.30
DATA_STAGES = ("ingest", "filter", "dedup", "tokenizer", "pretokenize")


# ------------------------------------------------------------------------------------------------ corpus


@dataclass(frozen=True)
class Split:
    train_stories: int
    heldout_stories: int
    tail_bytes: int  # the cut-off story after the last separator, dropped
    train_file: str
    heldout_file: str


def split_corpus(source: Path, work: Path, heldout_fraction: float) -> Split:
    """train.txt / heldout.txt: the complete stories in file order, the last `heldout_fraction` held out."""
    text = source.read_text(encoding="utf-8")
    *stories, tail = text.split(SEPARATOR)
    n_heldout = max(1, round(len(stories) * heldout_fraction))
    if n_heldout >= len(stories):
        raise SystemExit(f"--heldout {heldout_fraction}: leaves no training story of {len(stories)}")
    train_file, heldout_file = work / "train.txt", work / "heldout.txt"
    train_file.write_text(SEPARATOR.join(stories[:-n_heldout]) + SEPARATOR, encoding="utf-8")
    heldout_file.write_text(SEPARATOR.join(stories[-n_heldout:]) + SEPARATOR, encoding="utf-8")
    assert text.startswith(train_file.read_text(encoding="utf-8"))  # an exact prefix: formatting untouched
    return Split(len(stories) - n_heldout, n_heldout, len(tail.encode()), str(train_file), str(heldout_file))


def heldout_texts(heldout_file: Path) -> list[str]:
    """The held-out stories exactly as the ingest stage would read them (same reader, same separator)."""
    from tasks.sources.files import read_txt

    records = list(read_txt(heldout_file, SEPARATOR, keep_tail=False))
    bad = [r for r in records if r.text is None]
    if bad:
        raise SystemExit(
            f"{heldout_file}: {len(bad)} held-out stories unreadable, first: {bad[0].location} ({bad[0].reason})"
        )
    return [r.text for r in records]


# ------------------------------------------------------------------------------------------------ project copy


def set_params(project: Path, overrides: dict[str, object]) -> dict:
    """Write dotted-key overrides into the copy's params.yaml through the flow's own validated path (an unknown
    key or a bad value fails naming it); the resulting params."""
    from flows.pipeline import apply_overrides
    from tasks.common.config import ScratchError

    try:
        apply_overrides(overrides, project / "params.yaml")
    except ScratchError as e:
        sys.exit(f"bench.tinystories: {e}")
    return yaml.safe_load((project / "params.yaml").read_text())


class Pipeline:
    """`dvc repro` in the project copy, each call's output in <work>/logs/<name>.log (or live with verbose)."""

    def __init__(self, project: Path, logs: Path, verbose: bool) -> None:
        self.project, self.logs, self.verbose = project, logs, verbose
        logs.mkdir(parents=True, exist_ok=True)
        self.env = project_env(project)

    def repro(self, name: str, target: str) -> float:
        """Wall seconds of `dvc repro <target>`; exits with the log's tail when a stage fails."""
        log = self.logs / f"{name}.log"
        print(f"[{time.strftime('%H:%M:%S')}] {name}: dvc repro {target}   (log: {log})", flush=True)
        started = time.perf_counter()
        with open(log, "w") as f:
            out = None if self.verbose else f
            done = subprocess.run(
                ["dvc", "repro", target],
                cwd=self.project,
                env=self.env,
                stdout=out,
                stderr=None if self.verbose else subprocess.STDOUT,
            )
        seconds = time.perf_counter() - started
        if done.returncode:
            tail = "" if self.verbose else "\n".join(log.read_text().splitlines()[-40:])
            raise SystemExit(f"{name}: `dvc repro {target}` failed (exit {done.returncode}) in {self.project}\n{tail}")
        return seconds

    def metrics(self, stage: str) -> dict:
        return stage_metrics(self.project, stage)


def stage_metrics(project: Path, stage: str) -> dict:
    """A stage's metrics file in a project copy (metrics/all/<stage>.json, or metrics/<stage>.json before that)."""
    path = project / "metrics" / "all" / f"{stage}.json"
    return json.loads((path if path.is_file() else project / "metrics" / f"{stage}.json").read_text())


def val_curve(project: Path) -> list[tuple[int, float]]:
    """(step, val/bpb) of every evaluation of the pretrain stage (its own validation split)."""
    rows = [json.loads(line) for line in (project / "data" / "pretrain" / "history.jsonl").read_text().splitlines()]
    return [(r["step"], round(r["val/bpb"], 4)) for r in rows if "val/bpb" in r]


# ------------------------------------------------------------------------------------------------ budget


def probe_tokens_per_s(project: Path) -> float:
    """Steady tokens/s of a probe run: the median of its logged windows after the first (start-up excluded)."""
    rows = [json.loads(line) for line in (project / "data" / "pretrain" / "history.jsonl").read_text().splitlines()]
    speeds = [r["train/tokens_per_s"] for r in rows if "train/tokens_per_s" in r]
    if len(speeds) < 2:
        raise SystemExit(f"probe: {len(speeds)} logged training windows; raise --probe-steps")
    return statistics.median(speeds[1:])


def whole_steps(tokens: float, tokens_per_step: int) -> int:
    return max(1, math.ceil(tokens / tokens_per_step)) * tokens_per_step


def pretrain_train(params: dict) -> dict:
    """The pretrain stage's effective `train` section: the top-level one under pretrain.train's overrides."""
    return {**params["train"], **params["pretrain"]["train"]}


def check_budget(params: dict, tokens: int, probe_steps: int) -> None:
    """Fail before the data stages when a budget cannot clear the warmup (the pretrain stage would refuse it)."""
    train = pretrain_train(params)
    steps = math.ceil(tokens / (train["batch_size"] * params["pretrain"]["seq_len"])) if tokens else probe_steps
    if steps <= train["warmup_steps"]:
        what = f"--tokens {tokens:,}" if tokens else f"--probe-steps {probe_steps}"
        raise SystemExit(
            f"{what}: {steps} steps do not clear pretrain.train.warmup_steps ({train['warmup_steps']}); "
            f"raise it or add e.g. --set pretrain.train.warmup_steps={max(1, steps // 4)}"
        )


# ------------------------------------------------------------------------------------------------ scoring


def token_stream(texts: list[str], tokenizer_file: Path, eot_id: int):
    """(N,) int64 ids: eot, story 1, eot, story 2, eot, ... — pretokenize's layout behind a leading eot."""
    import numpy as np
    import torch

    from tasks.pretokenize import encode_docs, load_plain

    ids = encode_docs(load_plain(tokenizer_file), texts, eot_id, "int64")
    return torch.from_numpy(np.concatenate([[eot_id], ids]).astype(np.int64))


def sum_nll(model, ids, window: int, stride: int, eot_id: int | None = None) -> tuple[float, int]:
    """(nats, targets): NLL summed over ids[1:], each target scored once, windows of `window` tokens by `stride`.
    With eot_id, attention stops at each eot: a story is read on its own, never after the end of the one before."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    nats, scored_to = 0.0, 1  # ids[0], the leading eot, is context only
    with torch.inference_mode():
        for start in tqdm(range(0, len(ids) - 1, stride), desc="held-out", unit="window", leave=False):
            chunk = ids[start : start + window + 1]  # (<= window+1,)
            x, y = chunk[:-1], chunk[1:]  # (T,), (T,) y[j] = ids[start + 1 + j]
            new = scored_to - (start + 1)  # targets before this index were scored by an earlier window
            doc = None if eot_id is None else torch.cumsum(x == eot_id, 0)[None]  # (1,T) document ids
            logits, _ = model(x[None], all_logits=True, doc_ids=doc)  # (1,T,V)
            nats += F.cross_entropy(logits[0, new:].float(), y[new:], reduction="sum").item()
            scored_to = start + len(chunk)
            if scored_to >= len(ids):
                break
    assert scored_to == len(ids), (scored_to, len(ids))
    return nats, len(ids) - 1


def score_heldout(project: Path, heldout_file: Path, stride: int) -> dict:
    from model.hf import load

    model = load(project / "data" / "pretrain" / "model").eval()
    window = model.cfg.max_seq_len
    stride = stride or window
    if not 1 <= stride <= window:
        raise SystemExit(f"--stride {stride}: must be in [1, {window}] (the model's max_seq_len)")
    meta = json.loads((project / "data" / "pretokenize" / "meta.json").read_text())
    texts = heldout_texts(heldout_file)
    ids = token_stream(texts, project / "data" / "tokenizer" / "tokenizer.json", int(meta["eot_id"]))
    started = time.perf_counter()
    nats, targets = sum_nll(model, ids, window, stride, eot_id=int(meta["eot_id"]))
    stream_nats, _ = sum_nll(model, ids, window, stride)
    story_bytes = sum(len(t.encode("utf-8")) for t in texts)
    file_bytes = heldout_file.stat().st_size
    bits = nats / math.log(2)
    return {
        "stories": len(texts),
        "tokens_scored": targets,
        "story_bytes": story_bytes,
        "file_bytes": file_bytes,
        "bytes_per_token": story_bytes / targets,
        "nats_per_token": nats / targets,
        "bpb": bits / story_bytes,
        "stream_bpb": stream_nats / math.log(2) / story_bytes,
        "file_bpb": bits / file_bytes,
        "window": window,
        "stride": stride,
        "precision": "fp32",
        "seconds": round(time.perf_counter() - started, 2),
    }


def sample_stories(project: Path, params: dict, seed: int = 0) -> list[str]:
    """Stories from the pretrain.samples prompts, each after an eot, sampled to the end of the context or an eot."""
    from tokenizers import Tokenizer

    from model.generate import generate
    from model.hf import load

    model = load(project / "data" / "pretrain" / "model").eval()
    tok = Tokenizer.from_file(str(project / "data" / "tokenizer" / "tokenizer.json"))
    eot = tok.token_to_id(SEPARATOR)
    cfg = params["pretrain"]["samples"]
    prompts = [[eot] + tok.encode(p, add_special_tokens=False).ids for p in cfg["openings"]]
    new = generate(
        model,
        prompts,
        max_new_tokens=model.cfg.max_seq_len - max(map(len, prompts)),
        temperature=cfg["temperature"],
        top_k=cfg["top_k"] or None,
        stop_tokens=(eot,),
        seed=seed,
    )
    return [p + tok.decode(ids, skip_special_tokens=False) for p, ids in zip(cfg["openings"], new)]


# ------------------------------------------------------------------------------------------------ report


def data_counts(pipe: Pipeline) -> dict:
    ingest, filt, dedup = (pipe.metrics(s) for s in ("ingest", "filter", "dedup"))
    pretok = pipe.metrics("pretokenize")
    return {
        "ingest_docs_in": ingest["docs_in"],
        "ingest_docs_out": ingest["docs_out"],
        "ingest_quarantined": ingest["quarantined"],
        "filter_kept": filt["kept"],
        "filter_rejected_by_rule": filt["rejected_by_rule"],
        "dedup_kept": dedup["kept"],
        "dedup_exact": dedup["exact_duplicates"],
        "dedup_near": dedup["near_duplicates"],
        "pipeline_train_docs": pretok["train_documents"],
        "pipeline_val_docs": pretok["val_documents"],
        "pipeline_train_tokens": pretok["train_tokens"],
        "pipeline_val_tokens": pretok["val_tokens"],
    }


def print_summary(result: dict) -> None:
    c, p, h, s = result["data"], result["pretrain"], result["heldout"], result["split"]
    rows = [
        (
            "corpus",
            f"{s['train_stories']:,} train + {s['heldout_stories']:,} held-out stories "
            f"(tail of {s['tail_bytes']} bytes dropped)",
        ),
        (
            "ingest → filter → dedup",
            f"{c['ingest_docs_in']:,} → {c['filter_kept']:,} → {c['dedup_kept']:,} docs "
            f"({c['ingest_quarantined']} quarantined, rejects {c['filter_rejected_by_rule']}, "
            f"dups {c['dedup_exact']} exact + {c['dedup_near']} near)",
        ),
        (
            "pipeline split",
            f"{c['pipeline_train_docs']:,} train docs / {c['pipeline_train_tokens']:,} tokens, "
            f"{c['pipeline_val_docs']:,} val docs",
        ),
        ("model", f"{p['preset']}, {p['n_params']:,} params, {p['world_size']} ranks, {p['precision']}"),
        (
            "budget",
            f"{p['tokens']:,} tokens = {p['steps']:,} steps ({result['budget']['how']}), {p['epochs']:.2f} epochs",
        ),
        (
            "training",
            f"{p['train_seconds']:.0f} s of steps, {result['seconds']['pretrain_stage']:.0f} s stage wall "
            f"(launch, evals, checkpoints, export included)",
        ),
        ("tokens/s", f"{p['tokens_per_s']:,.0f}   (baseline {BASELINE['tokens_per_s']:,})"),
        ("MFU", f"{100 * p['mfu']:.2f} %"),
        ("pipeline val/bpb", f"{p.get('val_bpb', math.nan):.4f}  ({p['val_windows']} rows of its hash split)"),
        ("  by step", "  ".join(f"{step}: {bpb:.3f}" for step, bpb in result["curve"])),
        (
            "exported weights",
            f"step {p.get('exported_step', p['steps'])} of {p['steps']} "
            f"({p.get('exported_because', 'the last step')})"
            + (f"; stopped early, {p['planned_steps']} planned" if p.get("stopped_early") else ""),
        ),
        (
            "HELD-OUT bits/byte",
            f"{h['bpb']:.4f}   (baseline {BASELINE['val_bpb']}, bar <= {TARGET_BPB}; "
            f"ratio {h['bpb'] / BASELINE['val_bpb']:.3f})",
        ),
        (
            "  counted over",
            f"{h['stories']} stories, {h['story_bytes']:,} bytes, {h['tokens_scored']:,} tokens "
            f"({h['bytes_per_token']:.2f} bytes/token), windows {h['window']} stride {h['stride']}",
        ),
        ("  per file byte", f"{h['file_bpb']:.4f}  ({h['file_bytes']:,} bytes, separator lines included)"),
        ("  as one stream", f"{h['stream_bpb']:.4f}  (no document mask: a story also sees the end of the one before)"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n── tinystories: small preset, real pipeline " + "─" * 40)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    for i, story in enumerate(result["samples"], 1):
        print(f"  sample {i}: " + story.replace("\n", "\n            "))
    print(f"  {'result':<{width}}  {result['result_file']}")
    print(
        f"  {'project copy':<{width}}  {result['project']}  (mlflow: {result['project']}/mlruns.db, "
        f"logs: {Path(result['project']).parent / 'logs'})"
    )
    print(
        f"  (figures from this machine, {result['cpu_count']} cores, 1-min load {result['loadavg_at_start'][0]:.1f} at "
        f"start and {result['loadavg_at_end'][0]:.1f} at the end; under load tokens/s and a probed budget drop)"
    )


def git_state() -> dict:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    return {"commit": head, "dirty": bool(dirty)}


# ------------------------------------------------------------------------------------------------ main


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.tinystories", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--minutes", type=float, default=10.0, help="training minutes to size the budget for (probed)")
    p.add_argument("--tokens", type=int, default=0, help="a fixed token budget instead (no probe)")
    p.add_argument("--probe-steps", type=int, default=50, help="steps of the throughput probe (> warmup_steps)")
    p.add_argument("--heldout", type=float, default=0.05, help="fraction of stories held out, from the end")
    p.add_argument(
        "--stride", type=int, default=0, help="window stride of the held-out scoring (0 = the window: disjoint windows)"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="extra params for the copy (repeatable), e.g. pretrain.train.lr=2e-3",
    )
    p.add_argument(
        "--work",
        type=Path,
        default=ROOT / "bench" / "out" / "tinystories",
        help="work folder (train/held-out files, project copy, logs, result.json); wiped first",
    )
    p.add_argument("--data", type=Path, default=DATA, help="the TinyStories sample")
    p.add_argument("-v", "--verbose", action="store_true", help="show the stages' output live instead of logs")
    p.add_argument(
        "--rescore", action="store_true", help="only score the model of the --work folder again (no training)"
    )
    args = p.parse_args()
    if args.tokens < 0 or args.minutes <= 0:
        p.error("--tokens must be >= 0 and --minutes > 0")
    return args


def fresh_work_folder(work: Path) -> Path:
    work = work.resolve()
    if work.exists() and any(work.iterdir()):
        if not (work / "train.txt").is_file():
            sys.exit(f"--work {work}: not empty and not an earlier work folder of this benchmark; pick another")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    return work


def plan_budget(args: argparse.Namespace, pipe: Pipeline, seconds: dict) -> dict:
    """max_tokens of the measured run: --tokens, or --minutes at the tokens/s of a probe run of the stage."""
    params = yaml.safe_load((pipe.project / "params.yaml").read_text())
    tokens_per_step = pretrain_train(params)["batch_size"] * params["pretrain"]["seq_len"]
    if args.tokens:
        return {"how": f"--tokens {args.tokens:,}", "max_tokens": whole_steps(args.tokens, tokens_per_step)}
    set_params(pipe.project, {"pretrain.train.max_steps": args.probe_steps, "pretrain.train.max_tokens": 0})
    seconds["probe_stage"] = pipe.repro("probe", "pretrain")
    speed = probe_tokens_per_s(pipe.project)
    return {
        "how": f"{args.minutes:g} min at a probed {speed:,.0f} tokens/s",
        "probe_tokens_per_s": speed,
        "max_tokens": whole_steps(speed * 60 * args.minutes, tokens_per_step),
    }


def rescore(work: Path, stride: int) -> None:
    """--rescore: score the model of an earlier work folder again (e.g. after a change to the scoring), into
    <work>/rescore.json, without training anything."""
    import torch

    work = work.resolve()
    project, heldout_file = work / "project", work / "heldout.txt"
    if not (project / "data" / "pretrain" / "model").is_dir() or not heldout_file.is_file():
        sys.exit(f"--rescore {work}: not a work folder of this benchmark with a trained model")
    torch.set_num_threads(1)
    out = {
        "heldout": score_heldout(project, heldout_file, stride),
        "pretrain": stage_metrics(project, "pretrain"),
        "curve": val_curve(project),
    }
    (work / "rescore.json").write_text(json.dumps(out, indent=2) + "\n")
    h, p = out["heldout"], out["pretrain"]
    print(
        f"{work}: held-out bpb {h['bpb']:.4f} (each story on its own), {h['stream_bpb']:.4f} (one stream); "
        f"{p['tokens']:,} tokens, {p['steps']} steps, exported step {p.get('exported_step', p['steps'])}\n"
        f"  val/bpb by step: {out['curve']}"
    )


def main() -> None:
    args = parse_args()
    if args.rescore:
        rescore(args.work, args.stride)
        return
    if not args.data.is_file():
        sys.exit(f"needs {args.data} (the shared TinyStories sample beside the checkout)")
    load_at_start = os.getloadavg()
    work = fresh_work_folder(args.work)
    split = split_corpus(args.data, work, args.heldout)
    from flows.pipeline import parse_overrides

    overrides = {
        "data.sources": [split.train_file],
        "model.preset": "small",
        "model.overrides": {},
        "tokenizer.vocab_size": 4096,
        **parse_overrides(args.set),
    }
    project = copy_project(work / "project")
    check_budget(set_params(project, overrides), args.tokens, args.probe_steps)
    pipe = Pipeline(project, work / "logs", args.verbose)
    seconds = {"data_stages": pipe.repro("data", "pretokenize")}
    budget = plan_budget(args, pipe, seconds)
    params = set_params(project, {"pretrain.train.max_steps": 0, "pretrain.train.max_tokens": budget["max_tokens"]})
    seconds["pretrain_stage"] = pipe.repro("pretrain", "pretrain")

    print("scoring the held-out stories and sampling ...", flush=True)
    import torch

    # one thread: with another job on a core, two threads wait on each other (sampling took 153 s instead of 3 s)
    torch.set_num_threads(1)
    heldout = score_heldout(project, Path(split.heldout_file), args.stride)
    result = {
        "split": asdict(split),
        "data": data_counts(pipe),
        "budget": budget,
        "seconds": seconds,
        "pretrain": pipe.metrics("pretrain"),
        "curve": val_curve(project),
        "heldout": heldout,
        "samples": sample_stories(project, params),
        "baseline": BASELINE,
        "target_bpb": TARGET_BPB,
        "params_overrides": overrides,
        "git": git_state(),
        "project": str(project),
        "result_file": str(work / "result.json"),
        "cpu_count": os.cpu_count(),
        "loadavg_at_start": load_at_start,
        "loadavg_at_end": os.getloadavg(),
    }
    (work / "result.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print_summary(result)


if __name__ == "__main__":
    main()
