"""Benchmark: which `small` shape learns fastest per CPU-second? (how the `small` preset was chosen)

Each candidate trains from the same seed on the same data for the same CPU-time budget (this process's
time.process_time, one thread, so load from other jobs on a shared machine does not shorten anyone's budget), then
reports validation bits per byte. Data: the TinyStories sample in <repo>/../shared/data/tinystories (first 95 % of
its bytes train, the rest validate), a byte-level BPE with 4,096 tokens trained on it here. Training: AdamW
(lr 3e-3, betas 0.9/0.95, wd 0.1, 30 warm-up steps, cosine to 10 %), batch 16 x 256 tokens, grad clip 1, bf16
autocast.

    .venv/bin/python bench/small_preset.py --budget 150
    .venv/bin/python bench/small_preset.py --budget 150 --candidates '{"5L": {"n_layers": 5}}'
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

_BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(_BENCH_DIR.parent))  # the repository, for `python bench/small_preset.py`

import torch  # noqa: E402

from model.config import ModelConfig  # noqa: E402
from model.llama import Llama  # noqa: E402

DATA = _BENCH_DIR.parent.parent / "shared" / "data" / "tinystories" / "TinyStories-train_first2MiB.txt"
CANDIDATES = {
    "4L-256": {"n_layers": 4},
    "6L-256": {"n_layers": 6},
    "6L-192-mqa": {"n_layers": 6, "d_model": 192, "n_heads": 3, "n_kv_heads": 1},
    "8L-256": {"n_layers": 8},
}


def tokenize(text: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]
    )
    tok.train_from_iterator([text], trainer)
    split = int(len(text) * 0.95)
    train = torch.tensor(tok.encode(text[:split]).ids)
    val_text = text[split:]
    val = torch.tensor(tok.encode(val_text).ids)
    return train, val, len(val_text.encode()) / len(val)


@torch.no_grad()
def val_bits_per_byte(model: Llama, val: torch.Tensor, bytes_per_token: float, seq: int = 256) -> float:
    model.eval()
    n = min((len(val) - 1) // seq, 64)
    x, y = val[: n * seq].view(n, seq), val[1 : n * seq + 1].view(n, seq)
    losses = [model(x[i : i + 16], y[i : i + 16])[1].item() for i in range(0, n, 16)]
    model.train()
    return sum(losses) / len(losses) / math.log(2) / bytes_per_token


def train_for(cfg: ModelConfig, train: torch.Tensor, budget: float) -> tuple[Llama, int]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = Llama(cfg).train()
    opt = torch.optim.AdamW(model.optim_groups(0.1), lr=3e-3, betas=(0.9, 0.95))
    start, steps = time.process_time(), 0
    while (used := time.process_time() - start) < budget:
        lr = 3e-3 * min(1.0, (steps + 1) / 30) * (0.1 + 0.45 * (1 + math.cos(math.pi * used / budget)))
        for group in opt.param_groups:
            group["lr"] = lr
        ix = torch.randint(0, len(train) - 257, (16,), generator=g)
        batch = torch.stack([train[i : i + 257] for i in ix])  # (16,257)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps += 1
    return model, steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=150.0, help="CPU seconds of training per candidate")
    p.add_argument("--candidates", type=json.loads, default=CANDIDATES, help="JSON {name: ModelConfig overrides}")
    args = p.parse_args()
    if not DATA.is_file():
        sys.exit(f"needs {DATA} (the shared TinyStories sample beside the checkout)")
    torch.set_num_threads(1)
    train, val, bytes_per_token = tokenize(DATA.read_text(encoding="utf-8"))
    print(
        f"train {len(train)} tokens, val {len(val)} tokens, {bytes_per_token:.3f} bytes/token; "
        f"budget {args.budget:.0f} CPU s per candidate"
    )
    for name, overrides in args.candidates.items():
        cfg = ModelConfig.from_preset("small", **overrides)
        model, steps = train_for(cfg, train, args.budget)
        tokens = steps * 16 * 256
        print(
            f"{name:<12} {cfg.n_params() / 1e6:5.2f}M params  {steps:4d} steps  {tokens / args.budget:6.0f} tok/CPU-s"
            f"  val {val_bits_per_byte(model, val, bytes_per_token):.3f} bits/byte",
            flush=True,
        )


if __name__ == "__main__":
    main()
