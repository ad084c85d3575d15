"""GPU check: one command that shows the training stack works on a CUDA host and how fast it is, as one table.

    python3 bench/gpu_check.py            # CUDA host: the whole check, < 8 min on one H100/H200
    python3 bench/gpu_check.py --dry      # no GPU (automatic without CUDA): the same code paths at tiny sizes on CPU
                                          # (eager only; --compile adds the compiled run, minutes of C++ on a CPU)

Steps (each a row; a step that fails is reported and the others still run, the exit status is 1):
  tests       pytest tests/test_model_gpu.py: the bf16 step against fp32, the flash SDPA kernel actually chosen for
              training shapes, one-rank NCCL ZeRO-2 and ZeRO-3 through the Trainer, and with 2 GPUs 2-rank NCCL ZeRO-2/3
              following one rank with 2x accumulation (dry: the one-rank runs on gloo, in the rows below)
  125m        the `125m` preset through the real Trainer (tasks/common/trainer.py: engine set-up, bf16, ZeRO-0) for
              100 steps of 16 x 1024 tokens, eager then compiled: steady tokens/s, MFU against the GPU's bf16 peak
              (distributed.GPU_PEAK_BF16), peak GPU memory, compile seconds (what train.compile: auto assumes)
  pretrain    the pretrain stage itself (`python -m tasks.pretrain`, launcher and all) on the TinyStories sample:
              the tokenizer and pretokenize stages on it, then 300 steps of the `small` preset on one GPU
              (tokens/s, MFU, val loss, seconds)

What it needs there: the GPU image's python3 (torch, transformers, tokenizers, safetensors, numpy, yaml, pytest) plus
DeepSpeed, carried as wheels (the device README's recipe; `--packages` lists what is missing without running
anything). The corpus: ../shared/data/tinystories beside the checkout, or shared/data/tinystories inside it (copy
the 2 MiB folder there: only the checkout travels). Scratch files go to --work (default: a temporary folder).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository, for `python bench/gpu_check.py`

NEEDED = ("torch", "deepspeed", "transformers", "tokenizers", "safetensors", "numpy", "yaml", "pytest")
CORPUS = "tinystories/TinyStories-train_first2MiB.txt"


@dataclass(frozen=True)
class Sizes:
    """What each step runs: the full check on a GPU, a tiny one on CPU."""

    preset: str
    steps: int
    batch: int
    seq: int
    stage_preset: str
    stage_steps: int
    stage_batch: int
    stage_seq: int
    vocab: int


FULL = Sizes("125m", 100, 16, 1024, "small", 300, 32, 256, 4096)
DRY = Sizes("tiny", 6, 4, 64, "tiny", 6, 4, 64, 512)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry", action="store_true", help="the CPU path at tiny sizes (the default without CUDA)")
    p.add_argument("--only", nargs="+", choices=["tests", "125m", "pretrain"], help="run only these steps")
    p.add_argument("--work", default="", help="scratch folder (default: a temporary one, deleted at the end)")
    p.add_argument("--corpus", default="", help=f"the TinyStories sample (default: <shared>/data/{CORPUS})")
    p.add_argument("--packages", action="store_true", help="list the Python packages missing here, then stop")
    p.add_argument("--compile", action="store_true", help="dry: also the compiled run (minutes of C++ on a CPU)")
    p.add_argument("--json", default="", help="also write the table's figures to this JSON file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--zero", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ the synthetic run


def pattern_batches(vocab: int, seq: int, per_step: int, seed: int):
    """A learnable batch function: each row counts up from a random offset (mod vocab), so the loss falls fast and a
    broken update shows; rows are a pure function of (seed, step), split by BatchIndex.examples like pretrain's."""
    import torch

    def batches(index):
        g = torch.Generator().manual_seed(seed * 1_000_003 + index.step)
        offsets = torch.randint(0, vocab, (per_step, 1), generator=g)
        rows = (offsets + torch.arange(seq + 1)) % vocab  # (per_step, T+1)
        rows = rows[index.examples.start : index.examples.stop]
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()  # (B,T) inputs, (B,T) targets

    return batches


def synthetic_run(
    preset: str,
    steps: int,
    micro: int,
    seq: int,
    root: Path,
    *,
    zero_stage: int = 0,
    compile: bool = False,
    accum: int = 1,
    precision: str = "auto",
    name: str = "gpu-check",
    vocab: int | None = None,
) -> dict:
    """`steps` steps of the real Trainer on pattern batches in this process's world (a world of one, or the ranks the
    DeepSpeed launcher started); the run's summary plus the steady tokens/s (median of the logged windows after the
    first), the first and last logged losses and the peak memory (GPU: max allocated; CPU: peak RSS)."""
    import torch

    from model.config import ModelConfig
    from model.llama import Llama
    from tasks.common.distributed import init_distributed
    from tasks.common.train_config import TrainConfig
    from tasks.common.trainer import Recipe, Trainer

    world = init_distributed()
    cfg = ModelConfig.from_preset(preset, **({"vocab_size": vocab} if vocab else {}))
    train = TrainConfig(
        ranks=world.size,
        zero_stage=zero_stage,
        precision=precision,
        batch_size=micro * accum * world.size,
        micro_batch_size=micro,
        max_steps=steps,
        lr=1e-3,
        warmup_steps=min(10, steps // 5),
        log_every=max(1, steps // 10),
        resume=False,
        compile=compile,
    )

    def build_model() -> Llama:
        torch.manual_seed(1234)
        return Llama(cfg)

    def loss_fn(engine, batch):
        x, y = batch
        return engine(x, y)[1], {}

    recipe = Recipe(
        pattern_batches(cfg.vocab_size, seq, train.batch_size, 1234),
        loss_fn,
        seq,
        cfg.flops_per_token(seq),
        fixed_shapes=True,
    )
    info = {"check": name, "model": cfg.to_dict(), "train": train.fingerprint_dict(), "seq": seq}
    if not world.on_cpu:
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(build_model, train, recipe, name=name, info=info, root=root, fresh_init=True)
    summary = trainer.fit()
    rows = [json.loads(line) for line in trainer.history_path.read_text().splitlines()] if world.is_main else []
    rates = [r["train/tokens_per_s"] for r in rows if "train/tokens_per_s" in r]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    peak = (
        torch.cuda.max_memory_allocated()
        if not world.on_cpu
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {
        **{k: summary[k] for k in ("tokens_per_s", "mfu", "train_seconds", "precision", "compiled", "peak_flops")},
        "steady_tokens_per_s": statistics.median(rates[1:] or rates) if rates else float("nan"),
        "first_loss": losses[0] if losses else float("nan"),
        "last_loss": losses[-1] if losses else float("nan"),
        "losses": losses,
        "peak_memory": peak,
        "n_params": cfg.n_params(),
        "device": str(world.device),
        "world": world.size,
        "gpu": torch.cuda.get_device_name(world.device) if not world.on_cpu else "",
    }


def worker(args: argparse.Namespace) -> None:
    """One rank of a launched multi-rank synthetic run (the 2-GPU test); rank 0 writes the result to --out."""
    result = synthetic_run(
        "tiny",
        20,
        4,
        64,
        Path(args.work),
        zero_stage=args.zero,
        precision="fp32",
        name=f"gpu-check-2rank-zero{args.zero}",
    )
    if os.environ.get("RANK", "0") == "0":
        Path(args.out).write_text(json.dumps(result))


def launch_two_ranks(zero_stage: int, work: Path, timeout: int = 300) -> dict:
    """The 2-rank NCCL run of `worker` through the project's DeepSpeed launcher; rank 0's result."""
    from tasks.common.distributed import launch_command
    from tasks.common.train_config import TrainConfig

    out = work / f"two-ranks-zero{zero_stage}.json"
    cmd, env = launch_command("bench.gpu_check", TrainConfig(ranks=2, device="cuda"), ROOT)
    cmd += ["--zero", str(zero_stage), "--work", str(work), "--out", str(out)]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0 or not out.is_file():
        raise RuntimeError(f"2-rank ZeRO-{zero_stage} run failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return json.loads(out.read_text())


# ------------------------------------------------------------------------------------------------ the steps


def step_tests(dry: bool, work: Path, sizes: Sizes) -> list[tuple[str, str, str]]:
    if dry:  # the GPU tests skip without CUDA; the one-rank Trainer runs they make, on gloo instead of NCCL
        rows = []
        for zero in (2, 3):
            r = synthetic_run(
                sizes.preset, 20, 4, 64, work, zero_stage=zero, precision="fp32", name=f"gpu-check-zero{zero}"
            )
            ok = r["last_loss"] < r["first_loss"]
            rows.append(
                (
                    f"tests (dry): 1-rank ZeRO-{zero}",
                    "ok" if ok else "FAILED",
                    f"gloo; loss {r['first_loss']:.3f} -> {r['last_loss']:.3f} in 20 steps",
                )
            )
        return rows
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-s", "-p", "no:cacheprovider", "tests/test_model_gpu.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "SCRATCHLM_GPU_CHECK_WORK": str(work)},
    )
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    summary = lines[-1] if lines else done.stderr.strip()[-200:]
    chosen = next(
        (line.split("SDPA kernel: ", 1)[1] for line in done.stdout.splitlines() if "SDPA kernel: " in line), ""
    )
    detail = summary + (f"; SDPA kernel {chosen}" if chosen else "")
    if done.returncode != 0:
        print(done.stdout[-4000:], done.stderr[-2000:], sep="\n")
    return [("tests: tests/test_model_gpu.py", "ok" if done.returncode == 0 else "FAILED", detail)]


def step_125m(work: Path, sizes: Sizes, figures: dict, compile_too: bool) -> list[tuple[str, str, str]]:
    rows = []
    for compiled in (False, True) if compile_too else (False,):
        label = "compiled" if compiled else "eager"
        r = synthetic_run(
            sizes.preset,
            sizes.steps,
            sizes.batch,
            sizes.seq,
            work,
            compile=compiled,
            name=f"gpu-check-{sizes.preset}-{label}",
        )
        figures[f"{sizes.preset}_{label}"] = r
        memory = f"{r['peak_memory'] / 1024**3:.1f} GiB {'GPU' if r['gpu'] else 'RSS'}"
        rows.append(
            (
                f"{sizes.preset} {label}: {sizes.steps} steps x {sizes.batch} x {sizes.seq}",
                "ok" if r["last_loss"] < r["first_loss"] else "FAILED",
                f"{r['steady_tokens_per_s']:,.0f} tok/s, MFU {100 * r['mfu']:.1f}%, {memory}, {r['precision']}, "
                f"{r['train_seconds']:.0f} s, loss {r['first_loss']:.2f} -> {r['last_loss']:.2f}",
            )
        )
    if not compile_too:
        return rows
    eager, comp = figures[f"{sizes.preset}_eager"], figures[f"{sizes.preset}_compiled"]
    speedup = comp["steady_tokens_per_s"] / eager["steady_tokens_per_s"]
    # compiling = the compiled run's time beyond its steps at the steady rate
    overhead = comp["train_seconds"] - sizes.steps * sizes.batch * sizes.seq / comp["steady_tokens_per_s"]
    figures["compile"] = {"speedup": speedup, "compile_seconds": overhead}
    rows.append(("compile: compiled / eager", "ok", f"{speedup:.2f}x steady tokens/s, ~{overhead:.0f} s compiling"))
    return rows


def step_pretrain(dry: bool, work: Path, sizes: Sizes, corpus: Path, figures: dict) -> list[tuple[str, str, str]]:
    project = make_stage_project(work / "project", corpus, sizes, device="cpu" if dry else "cuda")
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "tasks.pretrain"],
        cwd=project,
        env=stage_env(project, dry),
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - t0
    # every figure: metrics/all/pretrain.json (metrics/pretrain.json keeps the headline ones)
    metrics_file = next(
        (
            f
            for f in (project / "metrics" / "all" / "pretrain.json", project / "metrics" / "pretrain.json")
            if f.is_file()
        ),
        project / "metrics" / "pretrain.json",
    )
    if done.returncode != 0 or not metrics_file.is_file():
        print(done.stdout[-4000:], done.stderr[-4000:], sep="\n")
        return [("pretrain stage (TinyStories)", "FAILED", f"exit {done.returncode}: {done.stderr.strip()[-200:]}")]
    m = json.loads(metrics_file.read_text())
    figures["pretrain"] = m
    return [
        (
            f"pretrain stage: {m['steps']} steps, {sizes.stage_preset}, {m['world_size']} rank",
            "ok",
            f"{m['tokens_per_s']:,.0f} tok/s, MFU {100 * m['mfu']:.1f}%, val loss {m.get('val_loss', math.nan):.3f}, "
            f"{m['precision']}{', compiled' if m['compiled'] else ''}, {m['train_seconds']:.0f} s training, "
            f"{seconds:.0f} s in all",
        )
    ]


def make_stage_project(dest: Path, corpus: Path, sizes: Sizes, device: str) -> Path:
    """A scratch copy of the code (tasks/, model/) with the corpus as deduplicated shards, the tokenizer and
    pretokenize stages run on it in this process, and params for a short pretrain on `device`."""
    import yaml

    from tasks import pretokenize, tokenizer
    from tasks.common.config import load_section
    from tasks.common.dvcio import shard_name, stage_paths, write_jsonl_gz
    from tasks.common.stage import sections_for
    from tasks.common.tracking import Tracker

    for folder in ("tasks", "model"):
        shutil.copytree(ROOT / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
    stories = [s.strip() for s in corpus.read_text(encoding="utf-8").split("<|endoftext|>") if s.strip()]
    docs = [{"id": f"tinystories-{i}", "text": s, "source": str(corpus)} for i, s in enumerate(stories)]
    (dest / "data" / "dedup").mkdir(parents=True, exist_ok=True)
    write_jsonl_gz(dest / "data" / "dedup" / shard_name(0), docs)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"] = {"preset": sizes.stage_preset, "overrides": {}}
    params["tokenizer"].update({"vocab_size": sizes.vocab, "val_fraction": 0.05})
    params["pretrain"]["seq_len"] = sizes.stage_seq
    params["pretrain"]["train"] = {
        "ranks": 1,
        "device": device,
        "batch_size": sizes.stage_batch,
        "micro_batch_size": sizes.stage_batch,
        "max_steps": sizes.stage_steps,
        "max_tokens": 0,
        "lr": 3.0e-3,
        "warmup_steps": max(1, sizes.stage_steps // 10),
        "eval_every": max(1, sizes.stage_steps // 3),
        "checkpoint_every": 0,
        "log_every": max(1, sizes.stage_steps // 10),
        "resume": False,
    }
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    os.environ["SCRATCHLM_PARAMS"] = str(dest / "params.yaml")
    os.environ["SCRATCHLM_NO_MLFLOW"] = "1"
    for stage in (tokenizer, pretokenize):
        name = stage.__name__.rsplit(".", 1)[1]
        stage.run(load_section(name), stage_paths(name, dest), Tracker(name, None), **sections_for(stage.run))
    return dest


def stage_env(project: Path, dry: bool) -> dict[str, str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(project),
        "SCRATCHLM_PARAMS": str(project / "params.yaml"),
        "SCRATCHLM_NO_MLFLOW": "1",
        "SCRATCHLM_PROGRESS": "off",
        "SCRATCHLM_DEVICE": "cpu" if dry else "cuda",
        "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlruns.db'}",
    }
    env["DS_ACCELERATOR"] = env["SCRATCHLM_DEVICE"]
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(name, None)  # this process's DeepSpeed world of one must not leak into the stage's launcher
    return env


# ------------------------------------------------------------------------------------------------ driver


def find_corpus(given: str) -> Path | None:
    candidates = (
        [Path(given)] if given else [ROOT.parent / "shared" / "data" / CORPUS, ROOT / "shared" / "data" / CORPUS]
    )
    return next((c for c in candidates if c.is_file()), None)


def missing_packages() -> list[str]:
    return [name for name in NEEDED if importlib.util.find_spec(name) is None]


def print_table(rows: list[tuple[str, str, str]], header: str) -> None:
    width = max(len(r[0]) for r in rows)
    print(f"\n{header}\n{'step':<{width}}  {'result':<7} figures")
    for name, status, detail in rows:
        print(f"{name:<{width}}  {status:<7} {detail}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    missing = missing_packages()
    if args.packages or missing:
        print("missing Python packages: " + (", ".join(missing) or "none"))
        return 1 if missing else 0
    import torch

    dry = args.dry or not torch.cuda.is_available()
    sizes = DRY if dry else FULL
    os.environ.setdefault("SCRATCHLM_PROGRESS", "off")
    os.environ["DS_ACCELERATOR"] = os.environ["SCRATCHLM_DEVICE"] = "cpu" if dry else "cuda"
    if dry:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    corpus = find_corpus(args.corpus)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="scratchlm-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    wanted = args.only or ["tests", "125m", "pretrain"]
    where = "dry run on CPU (tiny sizes)" if dry else f"{torch.cuda.get_device_name()} x{torch.cuda.device_count()}"
    print(f"gpu_check: {where}; torch {torch.__version__}; scratch {work}", flush=True)
    rows, figures, t0 = [], {}, time.perf_counter()
    steps = {
        "tests": lambda: step_tests(dry, work, sizes),
        "125m": lambda: step_125m(work, sizes, figures, compile_too=not dry or args.compile),
        "pretrain": lambda: (
            step_pretrain(dry, work, sizes, corpus, figures)
            if corpus
            else [
                ("pretrain stage (TinyStories)", "FAILED", "no corpus: copy ../shared/data/tinystories to shared/data/")
            ]
        ),
    }
    for name in wanted:
        start = time.perf_counter()
        try:
            rows += steps[name]()
        except Exception as e:  # noqa: BLE001 (one failed step must not hide the others' figures)
            rows.append(
                (
                    name,
                    "FAILED",
                    f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200] if str(e).strip() else ''}",
                )
            )
        print(f"  {name}: {time.perf_counter() - start:.0f} s", flush=True)
    print_table(rows, f"gpu_check ({where}), {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "figures": figures}, indent=2, default=str))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(status == "ok" for _, status, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
