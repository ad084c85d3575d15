"""Benchmark: peak host memory (RSS) per rank of a few training steps, on CPU ranks (gloo), through the trainer's own
model set-up (tasks/common/trainer.py: build_for_training, build_optimizer, deepspeed_config, deepspeed.initialize)
on random tokens.

    .venv/bin/python bench/memory.py zero --preset 125m --ranks 2 --seq 64 --steps 3
        ZeRO-3 on 2 ranks (model built inside deepspeed.zero.Init) against the same model on one rank without
        sharding (ZeRO-0, the same global batch through 2x accumulation, so activations per pass are the same):
        peak RSS per rank and the ratio, plus what each rank holds of the parameters; the losses must agree
    .venv/bin/python bench/memory.py ckpt --preset small --batch 16 --seq 256 --steps 4 --every 0 1 2
        activation checkpointing (train.activation_checkpointing 0 = off, 1 = every block, 2 = every 2nd) on one
        rank: the same losses (within 1e-5), peak RSS, and the time a step costs
    .venv/bin/python bench/memory.py step --preset 1b --ranks 2 --seq 32 --precision bf16 --steps 1
        one configuration only (here: the 1b preset under ZeRO-3 on 2 ranks); refuses to start when the host's
        available memory is below the estimate (printed), rather than push a shared machine into swap or the OOM killer

Each configuration runs in fresh processes (`--worker`, started through the project's DeepSpeed launcher for several
ranks), so every peak (ru_maxrss) is that configuration's alone. "model state" is the peak minus the RSS a rank had
before it built anything (the interpreter, torch and DeepSpeed).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository, for `python bench/memory.py`

GIB = 1024**3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["zero", "ckpt", "step"])
    p.add_argument("--preset", default="125m", help="ModelConfig preset (tiny, small, 125m, 1b, 7b)")
    p.add_argument("--vocab", type=int, default=None, help="override vocab_size (default: the preset's)")
    p.add_argument("--ranks", type=int, default=2, help="ranks of the sharded run (zero, step)")
    p.add_argument("--zero-stage", type=int, default=3, help="ZeRO stage of `step` (zero compares 3 with 0)")
    p.add_argument("--batch", type=int, default=1, help="micro batch per rank")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--every", type=int, nargs="+", default=[0, 1, 2], help="ckpt: activation_checkpointing values")
    p.add_argument("--checkpointing", type=int, default=0, help="zero/step: train.activation_checkpointing")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "autocast"])
    p.add_argument("--offload", default="none", choices=["none", "optimizer", "all"])
    p.add_argument("--threads", type=int, default=1, help="OpenMP threads per rank")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--accum", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ worker (one rank)


def rss_bytes() -> int:
    """This process's resident set now (Linux /proc; ru_maxrss elsewhere)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def worker(args: argparse.Namespace) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    from model.config import ModelConfig
    from model.llama import Llama
    from tasks.common.distributed import all_reduce_sum, deepspeed_config, init_distributed, resolve_precision
    from tasks.common.train_config import TrainConfig
    from tasks.common.trainer import build_for_training, build_optimizer, offload_optimizer

    start_rss = rss_bytes()
    world = init_distributed()
    train = TrainConfig(
        ranks=world.size,
        zero_stage=args.zero_stage,
        precision=args.precision,
        batch_size=args.batch * args.accum * world.size,
        micro_batch_size=args.batch,
        max_steps=max(1, args.steps),  # 0 steps: build and deepspeed.initialize only
        warmup_steps=0,
        activation_checkpointing=args.checkpointing,
        offload=args.offload,
        compile=False,
    )
    precision = resolve_precision(train.precision, world)
    ds_config = deepspeed_config(train, world, precision)
    overrides = {"vocab_size": args.vocab} if args.vocab else {}
    cfg = ModelConfig.from_preset(args.preset, **overrides)

    def build() -> Llama:
        torch.manual_seed(1234)
        return Llama(cfg)

    t0 = time.perf_counter()
    model = build_for_training(build, train, world, ds_config, precision == "bf16", fresh_init=True)
    build_seconds = time.perf_counter() - t0
    model_rss = rss_bytes()
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())
    optimizer, optimizer_name = offload_optimizer(model, train) if train.offload != "none" else (None, "torch AdamW")
    optimizer = optimizer or build_optimizer(model, train)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, dist_init_required=False)
    engine_rss = rss_bytes()

    losses, seconds, cpu_seconds, phases = [], [], [], []
    global_rows = args.batch * args.accum * world.size
    for step in range(args.steps):
        g = torch.Generator().manual_seed(step)
        rows = torch.randint(0, cfg.vocab_size, (global_rows, args.seq + 1), generator=g)  # (rows, T+1)
        total = torch.zeros(1, dtype=torch.float64)
        t0, c0 = time.perf_counter(), time.process_time()
        for micro in range(args.accum):  # the same slot arithmetic as BatchIndex: micro x world + rank
            slot = micro * world.size + world.rank
            batch = rows[slot * args.batch : (slot + 1) * args.batch]
            _, loss = engine(batch[:, :-1].to(world.device), batch[:, 1:].to(world.device))
            phases.append(("forward", step, rss_bytes()))
            engine.backward(loss)
            phases.append(("backward", step, rss_bytes()))
            engine.step()
            phases.append(("step", step, rss_bytes()))
            total += loss.detach().double().cpu()
        seconds.append(time.perf_counter() - t0)
        cpu_seconds.append(time.process_time() - c0)
        losses.append(all_reduce_sum(total)[0].item() / (args.accum * world.size))
    result = {
        "rank": world.rank,
        "world": world.size,
        "n_params": cfg.n_params(),
        "held_params": held,
        "start_rss": start_rss,
        "model_rss": model_rss,
        "engine_rss": engine_rss,
        "peak_rss": peak_rss_bytes(),
        "build_seconds": build_seconds,
        "step_seconds": seconds,
        "step_cpu_seconds": cpu_seconds,  # this rank's CPU time: with 1 thread, robust on a loaded machine
        "losses": losses,
        "precision": precision,
        "optimizer": optimizer_name,
        "phases": phases,  # (phase, step, RSS right after it)
    }
    Path(f"{args.out}.rank{world.rank}.json").write_text(json.dumps(result))
    dist.barrier()


# ------------------------------------------------------------------------------------------------ driver


def run_config(args: argparse.Namespace, ranks: int, zero_stage: int, accum: int, checkpointing: int) -> list[dict]:
    """Start one configuration's ranks as fresh processes; their results, rank by rank."""
    from tasks.common.distributed import launch_command
    from tasks.common.train_config import TrainConfig

    out = Path(tempfile.mkdtemp(prefix="scratchlm-memory-")) / "result"
    passed = [
        *("--preset", args.preset, "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps)),
        *("--zero-stage", str(zero_stage), "--accum", str(accum), "--checkpointing", str(checkpointing)),
        *("--precision", args.precision, "--offload", args.offload, "--out", str(out)),
        *(["--vocab", str(args.vocab)] if args.vocab else []),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "DS_ACCELERATOR": "cpu"}
    # glibc keeps freed blocks below its (self-raising, up to 32 MB) mmap threshold in the heap: ZeRO-3's gather and
    # release of every layer each step then shows as RSS that is no longer in use (2.96 vs 2.32 GiB peak, 125m
    # rank); a fixed 1 MB threshold returns them, so the peaks compare what is live (both configurations get it)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(1024 * 1024))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if ranks == 1:
        for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_PORT"):
            env.pop(name, None)
        cmd = [sys.executable, "-u", str(Path(__file__).resolve()), "step", "--worker", *passed]
    else:
        cmd, launch_env = launch_command("bench.memory", TrainConfig(ranks=ranks, device="cpu"), ROOT)
        env = {
            **launch_env,
            **{k: v for k, v in env.items() if k in ("OMP_NUM_THREADS", "PYTHONPATH", "MALLOC_MMAP_THRESHOLD_")},
        }
        cmd = [*cmd, "step", *passed]  # `--worker` is the launcher's last word already
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    results = [json.loads(f.read_text()) for f in sorted(out.parent.glob("result.rank*.json"))]
    if done.returncode != 0 or len(results) != ranks:
        sys.exit(
            f"memory: the {ranks}-rank ZeRO-{zero_stage} run failed (exit {done.returncode}):\n{done.stdout[-3000:]}"
            f"\n{done.stderr[-3000:]}"
        )
    return sorted(results, key=lambda r: r["rank"])


def gib(x: float) -> str:
    return f"{x / GIB:.2f} GiB"


def row(name: str, results: list[dict]) -> dict:
    peak = max(r["peak_rss"] for r in results)
    state = max(r["peak_rss"] - r["start_rss"] for r in results)
    held = max(r["held_params"] for r in results)
    step = statistics.median(t for r in results for t in r["step_cpu_seconds"]) if results[0]["losses"] else 0.0
    print(
        f"{name:<34}{gib(peak):>12}{gib(state):>14}{held / 1e6:>12.2f}M{step:>10.2f}s   "
        f"loss {' '.join(f'{x:.6f}' for x in results[0]['losses'])}"
    )
    return {"peak": peak, "state": state, "step": step, "losses": results[0]["losses"]}


def header(args: argparse.Namespace, results: list[dict]) -> None:
    r = results[0]
    print(
        f"model: preset {args.preset}, {r['n_params'] / 1e6:.1f}M parameters; micro batch {args.batch} x seq "
        f"{args.seq}, {args.steps} steps, {r['precision']}, {r['optimizer']}, {args.threads} thread(s) per rank"
    )
    print(f"{'configuration':<34}{'peak RSS':>12}{'model state':>14}{'params held':>13}{'CPU s/step':>11}")


def estimate_bytes(args: argparse.Namespace, ranks: int) -> float:
    """What one rank of a ZeRO-3 run is expected to peak at: bytes of model state per parameter over the ranks, plus
    ~1 GiB of interpreter, libraries and activations. fp32: 20 (weights, DeepSpeed's fp32 copy, gradients, two Adam
    moments: measured 24 steady on `125m`); bf16: 16 (2-byte weights and gradients); without a step 8 fewer (the Adam
    moments come with the first)."""
    from model.config import ModelConfig

    n = ModelConfig.from_preset(args.preset, **({"vocab_size": args.vocab} if args.vocab else {})).n_params()
    per_param = (16.0 if args.precision == "bf16" else 20.0) - (0.0 if args.steps else 8.0)
    return per_param * n / ranks + GIB


def available_bytes() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return float("inf")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    if args.mode == "zero":
        sharded = run_config(args, args.ranks, 3, 1, args.checkpointing)
        single = run_config(args, 1, 0, args.ranks, args.checkpointing)
        header(args, single)
        one = row("1 rank, no sharding (ZeRO-0)", single)
        many = row(f"{args.ranks} ranks, ZeRO-3 (zero.Init)", sharded)
        print(f"\nZeRO-3 / unsharded, peak RSS per rank: {many['peak'] / one['peak']:.2f}")
        print(
            f"ZeRO-3 / unsharded, model state per rank: {many['state'] / one['state']:.2f}  (1/{args.ranks} = "
            f"{1 / args.ranks:.2f})"
        )
        gap = max(abs(a - b) for a, b in zip(one["losses"], many["losses"]))
        print(f"largest loss difference: {gap:.2e}")
    elif args.mode == "ckpt":
        rows = {}
        for every in args.every:
            results = run_config(args, 1, 0, 1, every)
            if not rows:
                header(args, results)
            name = {0: "off", 1: "every block", 2: "every 2nd block", 3: "every 3rd block"}.get(
                every, f"every {every}th block"
            )
            rows[every] = row(f"activation checkpointing: {name}", results)
        base = rows[args.every[0]]
        for every, r in rows.items():
            if every == args.every[0]:
                continue
            gap = max(abs(a - b) for a, b in zip(base["losses"], r["losses"]))
            print(
                f"checkpointing {every} vs {args.every[0]}: model state x{r['state'] / base['state']:.2f}, "
                f"step time x{r['step'] / base['step']:.2f}, largest loss difference {gap:.1e}"
            )
    else:
        need, have = estimate_bytes(args, args.ranks) * args.ranks, available_bytes()
        print(f"estimate: {gib(need / args.ranks)} per rank, {gib(need)} in all; available now: {gib(have)}")
        if need > 0.95 * have:
            sys.exit("memory: not started: the estimate exceeds what the host has available")
        results = run_config(args, args.ranks, args.zero_stage, 1, args.checkpointing)
        header(args, results)
        row(f"{args.ranks} rank(s), ZeRO-{args.zero_stage}", results)
        r = results[0]
        print(
            f"build {r['build_seconds']:.1f} s; RSS after build {gib(r['model_rss'])}, after "
            f"deepspeed.initialize {gib(r['engine_rss'])}"
        )


if __name__ == "__main__":
    main()
