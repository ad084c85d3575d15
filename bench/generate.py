"""Benchmark: decode tokens/s of our KV-cache generate vs HF generate (same weights) vs our no-cache recompute.

Greedy decoding, so all three must produce the same tokens (checked: a mismatch is reported, not hidden).
The contenders run interleaved, round after round, in this one process, so machine load hits them alike; the
figure per contender is its median round. Decode rate = new tokens / wall time of the whole call (prefill included,
it is one forward of a short prompt).

    .venv/bin/python bench/generate.py --preset small --new 256 --rounds 3
    .venv/bin/python bench/generate.py --threads 1 --clock cpu           # per-core CPU time: robust under load
    .venv/bin/python bench/generate.py --preset 125m --device cuda --dtype bf16

Prints tokens/s per contender and the ratios ours / HF (target >= 2x) and ours / no-cache.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for `python bench/generate.py`

import torch  # noqa: E402

from bench.train_step import CLOCKS, DTYPES, _cpu_name, sync  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.generate import generate  # noqa: E402
from model.hf import export_hf  # noqa: E402
from model.llama import Llama  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=16, help="prompt length in tokens")
    p.add_argument("--new", type=int, default=256, help="new tokens per prompt")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-recompute", action="store_true", help="skip the slow no-cache contender")
    p.add_argument(
        "--clock",
        default="wall",
        choices=sorted(CLOCKS),
        help="cpu: this process's CPU time (use with --threads 1 on a shared, loaded machine)",
    )
    return p.parse_args()


@torch.inference_mode()
def recompute_greedy(model: Llama, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Baseline without a cache: a full forward over the whole sequence for every new token."""
    idx = torch.tensor(prompts, device=model.tok_emb.weight.device)  # (B,P), equal lengths
    for _ in range(max_new_tokens):
        logits, _ = model(idx)  # (B,1,V)
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx[:, len(prompts[0]) :].tolist()


def hf_greedy(hf, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    idx = torch.tensor(prompts, device=hf.device)
    out = hf.generate(
        idx,
        attention_mask=torch.ones_like(idx),
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    return out[:, idx.shape[1] :].tolist()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    base = ModelConfig.from_preset(args.preset)
    cfg = ModelConfig.from_preset(args.preset, max_seq_len=max(base.max_seq_len, args.prompt + args.new))
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else _cpu_name()
    print(f"device: {device_name}, torch {torch.__version__}, threads {torch.get_num_threads()}, dtype {args.dtype}")
    print(
        f"model: preset {args.preset}, {cfg.n_params() / 1e6:.2f}M params; batch {args.batch}, "
        f"prompt {args.prompt}, {args.new} new tokens, greedy, {args.rounds} rounds"
    )

    torch.manual_seed(0)
    ours = Llama(cfg).to(args.device, dtype).eval()
    from transformers import LlamaForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        export_hf(ours, cfg, tmp, dtype=dtype)
        hf = LlamaForCausalLM.from_pretrained(tmp, dtype=dtype).to(args.device).eval()
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt), generator=g).tolist()

    contenders: dict[str, Callable[[], list[list[int]]]] = {
        "ours (KV cache)": lambda: generate(ours, prompts, args.new, temperature=0),
        "HF generate": lambda: hf_greedy(hf, prompts, args.new),
    }
    if not args.no_recompute:
        contenders["ours (no cache)"] = lambda: recompute_greedy(ours, prompts, args.new)

    times: dict[str, list[float]] = {name: [] for name in contenders}
    outputs: dict[str, list[list[int]]] = {}
    for name, fn in contenders.items():  # warm-up (allocations, lazy init)
        outputs[name] = fn()
    clock = CLOCKS[args.clock]
    for _ in range(args.rounds):
        for name, fn in contenders.items():
            sync(args.device)
            t0 = clock()
            fn()
            sync(args.device)
            times[name].append(clock() - t0)

    new_tokens = args.batch * args.new
    rates = {name: new_tokens / statistics.median(ts) for name, ts in times.items()}
    print(f"\n{args.clock} clock")
    print(f"{'contender':<18}{'median time':>13}{'tokens/s':>11}{'same tokens as ours':>22}")
    reference = outputs["ours (KV cache)"]
    for name, rate in rates.items():
        same = "yes" if outputs[name] == reference else "NO (greedy mismatch)"
        print(f"{name:<18}{statistics.median(times[name]):>12.2f}s{rate:>11.0f}{same:>22}")
    print(f"\nours / HF generate: {rates['ours (KV cache)'] / rates['HF generate']:.2f}x tokens/s")
    if "ours (no cache)" in rates:
        print(f"ours / ours without cache: {rates['ours (KV cache)'] / rates['ours (no cache)']:.2f}x tokens/s")


if __name__ == "__main__":
    main()
