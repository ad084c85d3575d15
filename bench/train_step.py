"""Benchmark: one full training step (forward, backward, AdamW) of our Llama vs HF LlamaForCausalLM.

Both models have the same config and the same weights (HF loads our export), get the same batches, threads and
optimizer, and run interleaved step by step in this one process, so machine load hits both alike. The script also
measures the machine's peak matmul throughput (a big matmul in the benchmark dtype) and reports achieved FLOP/s
(cfg.flops_per_token * tokens/s, PaLM-style) as a fraction of it (MFU against the measured, not the datasheet, peak).

    .venv/bin/python bench/train_step.py --preset small --batch 8 --seq 256 --steps 10
    .venv/bin/python bench/train_step.py --preset small --compile          # adds torch.compile(ours) and (HF)
    .venv/bin/python bench/train_step.py --preset small --autocast         # bf16 autocast (AMX on recent Xeons)
    .venv/bin/python bench/train_step.py --threads 1 --clock cpu           # per-core CPU time: robust under load
    .venv/bin/python bench/train_step.py --preset 125m --device cuda --dtype bf16 --batch 16 --seq 1024

Prints a table and the ratio ours / HF (target >= 1.2x on CPU); with --compile also "ours compiled / HF compiled".
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for `python bench/train_step.py`

import torch  # noqa: E402

from model.config import ModelConfig  # noqa: E402
from model.hf import export_hf  # noqa: E402
from model.llama import Llama  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="ModelConfig preset (tiny, small, 125m, 1b, 7b)")
    p.add_argument("--vocab", type=int, default=None, help="override vocab_size (default: the preset's)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="timed steps per contender (after 2 warm-up steps)")
    p.add_argument(
        "--compile", action="store_true", help="also time torch.compile(ours) (what train.compile does) and of HF's"
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="parameter dtype (bf16 for GPUs)")
    p.add_argument(
        "--autocast",
        action="store_true",
        help="fp32 parameters, bf16 autocast for forward/backward (CPU AMX / GPU mixed precision)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--no-hf", action="store_true", help="skip the HF baseline")
    p.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="wall: elapsed time; cpu: this process's CPU time (with --threads 1, a figure that holds up "
        "on a shared, loaded machine: time spent descheduled is not counted)",
    )
    return p.parse_args()


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class PeakMatmul:
    """Best FLOP/s seen for an n x n matmul (n=2048 on CPU, 8192 on GPU) in the matmul dtype of the run.

    Sampled again between training steps and the best kept, so a busy moment on a shared machine does not
    lower the peak (and inflate the MFU).
    """

    def __init__(self, device: str, dtype: torch.dtype, clock: Callable[[], float] = time.perf_counter):
        n = 8192 if device == "cuda" else 2048
        self.device, self.n, self.best, self.clock = device, n, 0.0, clock
        self.a = torch.randn(n, n, device=device, dtype=dtype)
        self.b = torch.randn(n, n, device=device, dtype=dtype)
        self.a @ self.b

    def sample(self, repeats: int = 3) -> float:
        for _ in range(repeats):
            sync(self.device)
            t0 = self.clock()
            self.a @ self.b
            sync(self.device)
            self.best = max(self.best, 2 * self.n**3 / max(self.clock() - t0, 1e-9))
        return self.best


def make_step(model: torch.nn.Module, forward: Callable, autocast: bool, lr: float = 3e-4) -> Callable:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    device = next(model.parameters()).device.type

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            loss = forward(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def build_contenders(cfg: ModelConfig, args: argparse.Namespace, dtype: torch.dtype) -> dict[str, Callable]:
    torch.manual_seed(0)
    ours = Llama(cfg).to(args.device, dtype).train()
    contenders: dict[str, Callable] = {"ours": make_step(ours, lambda x, y: ours(x, y)[1], args.autocast)}
    hf_twins = []
    if not args.no_hf:
        from transformers import LlamaForCausalLM

        with tempfile.TemporaryDirectory() as tmp:
            export_hf(ours, cfg, tmp, dtype=dtype)
            for _ in range(2 if args.compile else 1):  # the second one is compiled, like ours' twin below
                hf_twins.append(LlamaForCausalLM.from_pretrained(tmp, dtype=dtype).to(args.device).train())
        hf = hf_twins[0]
        # HF shifts labels itself: give it the inputs as labels (T-1 predicted positions, same compute)
        contenders["hf"] = make_step(hf, lambda x, y: hf(input_ids=x, labels=x).loss, args.autocast)
        print(f"HF attention implementation: {hf.config._attn_implementation}")
    if args.compile:
        torch.manual_seed(0)
        twin = Llama(cfg).to(args.device, dtype).train()
        compiled = torch.compile(twin)
        contenders["ours+compile"] = make_step(twin, lambda x, y: compiled(x, y)[1], args.autocast)
        if hf_twins:
            hf_twin = hf_twins[1]
            hf_compiled = torch.compile(hf_twin)
            contenders["hf+compile"] = make_step(
                hf_twin, lambda x, y: hf_compiled(input_ids=x, labels=x).loss, args.autocast
            )
    return contenders


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    overrides = {"max_seq_len": max(args.seq, ModelConfig.from_preset(args.preset).max_seq_len)}
    if args.vocab:
        overrides["vocab_size"] = args.vocab
    cfg = ModelConfig.from_preset(args.preset, **overrides)
    tokens_per_step = args.batch * args.seq
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else _cpu_name()
    precision = f"{args.dtype} params" + (", bf16 autocast" if args.autocast else "")
    print(f"device: {device_name}, torch {torch.__version__}, threads {torch.get_num_threads()}, {precision}")
    print(f"model: preset {args.preset}, {cfg.n_params() / 1e6:.2f}M params, {cfg}")
    print(f"batch {args.batch} x seq {args.seq} = {tokens_per_step} tokens/step, {args.steps} timed steps each")

    clock = CLOCKS[args.clock]
    if args.clock == "cpu" and torch.get_num_threads() > 1:
        print("note: --clock cpu sums the CPU time of all threads; use --threads 1 for per-core figures")
    peak = PeakMatmul(args.device, torch.bfloat16 if args.autocast else dtype, clock)
    contenders = build_contenders(cfg, args, dtype)

    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g) for _ in range(4)]
    batches = [(b[:, :-1].to(args.device), b[:, 1:].to(args.device)) for b in batches]
    times: dict[str, list[float]] = {name: [] for name in contenders}
    failed: dict[str, str] = {}
    for i in range(args.steps + 2):  # interleaved: every contender sees the same load over time
        peak.sample()
        for name, step in contenders.items():
            if name in failed:
                continue
            x, y = batches[i % len(batches)]
            sync(args.device)
            t0, wall0 = clock(), time.perf_counter()
            try:
                step(x, y)
            except Exception as e:  # torch.compile may be unavailable on this box: report why, keep going
                failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                continue
            sync(args.device)
            if i >= 2:
                times[name].append(clock() - t0)
            elif i == 0 and name.endswith("+compile"):
                print(f"torch.compile {name[:-8]}, first step (compilation): {time.perf_counter() - wall0:.1f} s wall")
    print(
        f"measured peak matmul ({'bf16' if args.autocast else args.dtype}, best of the run): "
        f"{peak.best / 1e9:.1f} GFLOP/s"
    )
    report(cfg, args, peak.best, tokens_per_step, times, failed)


def report(
    cfg: ModelConfig,
    args: argparse.Namespace,
    peak: float,
    tokens_per_step: int,
    times: dict[str, list[float]],
    failed: dict[str, str],
) -> None:
    flops_per_token = cfg.flops_per_token(args.seq)
    print(f"\n{args.clock} clock")
    print(f"{'contender':<14}{'median step':>13}{'tokens/s':>11}{'GFLOP/s':>10}{'MFU':>8}")
    rates = {}
    for name, ts in times.items():
        if name in failed:
            print(f"{name:<14} FAILED -- {failed[name]}")
            continue
        median = statistics.median(ts)
        rates[name] = tokens_per_step / median
        achieved = rates[name] * flops_per_token
        print(f"{name:<14}{median * 1e3:>11.1f}ms{rates[name]:>11.0f}{achieved / 1e9:>10.1f}{achieved / peak:>8.1%}")
    if "hf" in rates:
        print(f"\nours / HF LlamaForCausalLM: {rates['ours'] / rates['hf']:.2f}x tokens/s")
    if "ours+compile" in rates:
        print(
            f"torch.compile(ours) / ours: {rates['ours+compile'] / rates['ours']:.2f}x tokens/s"
            + (f", / HF: {rates['ours+compile'] / rates['hf']:.2f}x" if "hf" in rates else "")
        )
    if "ours+compile" in rates and "hf+compile" in rates:
        print(f"ours compiled / HF compiled: {rates['ours+compile'] / rates['hf+compile']:.2f}x tokens/s")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return "cpu"


if __name__ == "__main__":
    main()
