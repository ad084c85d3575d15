"""A small world for the alignment tests (sft, reward, dpo): a BPE tokenizer and a tiny Llama pretrained on builtin
stories, built once per pytest session under its base temp folder and shared by every alignment test module.

    root = alignment_world(tmp_path_factory)     # root/data/tokenizer/, root/data/pretrain/model/
    stage_root(tmp_path, root)                   # a fresh root whose data/ links to the world's upstream folders

The tokenizer is the tokenizer stage's own BPE trainer and folder writer; the pretraining is a plain AdamW loop on
random windows of the tokenized stories (the pretrain stage itself is tested in tests/test_pretrain.py).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

TEST_PRESET = "tiny"
MODEL_OVERRIDES = {"max_seq_len": 320, "d_model": 128}
"""The tiny preset (2 layers) with room for a builtin instruction (about 205 tokens with this vocabulary) and its
answer, and 128 wide: at 64 wide the model never learns to copy a name from its context within a test budget, and
every constraint but length and format depends on copying the prompt's name, animal, place, object or feeling."""
VOCAB = 2048
STORY_DOCS = 3000
PRETRAIN_STEPS = 1000
"""Measured: the 128-wide tiny model starts copying names from context (an induction head) after ~900 steps of
16 x 256 tokens at lr 3e-3 (a sharp drop from loss ~0.95 to ~0.8); before that, stories change names each sentence."""


def make_tokenizer(folder: Path, vocab: int = VOCAB, docs: int = STORY_DOCS, seed: int = 7) -> Path:
    """A byte-level BPE with the chat special tokens, trained on builtin stories and instruction answers."""
    from tasks import tokenizer as tokenizer_stage
    from tasks.sources import builtin

    texts = [d.text for d in builtin.generate_corpus(docs, seed, 0.0, 0.0, 0.0)]
    texts += [m["content"] for ex in builtin.generate_instructions(300, seed, "train") for m in ex["messages"]]
    cfg = tokenizer_stage.Config(vocab_size=vocab)
    tok = tokenizer_stage.train_bpe(iter([texts[i : i + 500] for i in range(0, len(texts), 500)]), cfg, len(texts))
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer_stage.save_folder(tok, folder)
    return folder


def pretrain_tiny(
    tokenizer_dir: Path,
    out: Path,
    steps: int = PRETRAIN_STEPS,
    docs: int = STORY_DOCS,
    seed: int = 11,
    batch: int = 16,
    seq_len: int = 256,
    lr: float = 3e-3,
) -> Path:
    """A tiny Llama trained on builtin stories (each followed by <|endoftext|>), saved as an HF folder."""
    from model import Llama, ModelConfig, save
    from tasks.common import alignment as al
    from tasks.sources import builtin

    tok = al.load_tokenizer(tokenizer_dir)
    eot = tok.special["<|endoftext|>"]
    ids: list[int] = []
    for d in builtin.generate_corpus(docs, seed, 0.0, 0.0, 0.0):
        ids += [eot] + tok.plain(d.text)
    tokens = torch.tensor(ids, dtype=torch.long)
    cfg = ModelConfig.from_preset(TEST_PRESET, vocab_size=tok.tok.get_vocab_size(), **MODEL_OVERRIDES)
    torch.manual_seed(seed)
    model = Llama(cfg).train()
    opt = torch.optim.AdamW(model.optim_groups(0.0), lr=lr, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * constant_then_decay(step, steps, warmup=20, decay_from=0.9)
        starts = torch.randint(0, len(tokens) - seq_len - 1, (batch,), generator=g)
        rows = torch.stack([tokens[s : s + seq_len + 1] for s in starts])
        _, loss = model(rows[:, :-1], rows[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    save(model.eval(), out, tokenizer_dir=tokenizer_dir)
    (out / "pretrain_loss.json").write_text(json.dumps({"loss": loss.item(), "steps": steps}))
    return out


def constant_then_decay(step: int, steps: int, warmup: int, decay_from: float) -> float:
    """Warmup, a constant rate (a cosine's early decay delays the induction-head phase change), then linear to 10%."""
    tail = max(1, steps - int(steps * decay_from))
    return min(1.0, (step + 1) / warmup) * min(1.0, 0.1 + 0.9 * (steps - step) / tail)


def alignment_world(tmp_path_factory) -> Path:
    """The shared world (built on first use in this session): data/tokenizer and data/pretrain/model."""
    root = tmp_path_factory.getbasetemp() / "alignment-world"
    done = root / "ready"
    if not done.is_file():
        started = time.perf_counter()
        make_tokenizer(root / "data" / "tokenizer")
        pretrain_tiny(root / "data" / "tokenizer", root / "data" / "pretrain" / "model")
        done.write_text(f"{time.perf_counter() - started:.1f}s\n")
    return root


def stage_root(tmp_path: Path, world: Path, *upstream: str) -> Path:
    """A fresh project root for one stage run: data/<stage> of `upstream` link to the world's folders."""
    (tmp_path / "data").mkdir(parents=True, exist_ok=True)
    for stage in ("tokenizer", "pretrain", *upstream):
        link = tmp_path / "data" / stage
        if not link.exists():
            os.symlink(world / "data" / stage, link)
    return tmp_path


# ------------------------------------------------------------------------------------------------ stage runs


def run_stage(stage: str, cfg, root: Path) -> dict:
    """`tasks.<stage>.run` in-process (a world of one rank, no MLflow) with outputs under root."""
    import importlib

    from tasks.common.dvcio import stage_paths, write_json
    from tasks.common.tracking import Tracker

    module = importlib.import_module(f"tasks.{stage}")
    paths = stage_paths(stage, root)
    started = time.perf_counter()
    metrics = module.run(cfg, paths, Tracker(stage, None))
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    write_json(paths.details, metrics)
    return metrics


def cached_stage(tmp_path_factory, stage: str, cfg) -> tuple[Path, dict]:
    """Run `stage` once per session in the shared world (after its upstream); (world root, its metrics)."""
    from tasks.common.dvcio import read_json, stage_paths

    root = alignment_world(tmp_path_factory)
    metrics_file = stage_paths(stage, root).details
    if not metrics_file.is_file():
        run_stage(stage, cfg, root)
    return root, read_json(metrics_file)


# ------------------------------------------------------------------------------------------------ test budgets


def smoke_train(**changes):
    """A few steps of 4 examples in micro batches of 2: does the stage run on this data at all."""
    from tasks.common.train_config import TrainConfig

    return TrainConfig(**{"batch_size": 4, "micro_batch_size": 2, "warmup_steps": 1, "log_every": 1, **changes})


def hh_rlhf_smoke(val_fraction: float) -> dict:
    """Stage config changes for a 2-step run on the 1812 HH-RLHF harmless-base test rows alone (no builtin rows);
    skips the test when the shared data folder is absent."""
    from tests.conftest import shared

    hh = shared("hh-rlhf-harmless-base") / "harmless-base_test_rows0000-1811.jsonl.gz"
    return dict(
        sources=[str(hh)],
        builtin_train=0,
        builtin_val=0,
        val_fraction=val_fraction,
        max_len=192,
        train=smoke_train(max_steps=2, lr=1e-4),
    )


EVAL = dict(prompts=32, prompt_seed=4242, seed=0, max_new_tokens=160, temperature=0.7, top_p=0.95, batch_size=32)


def sft_config(**changes):
    """A short SFT: enough to learn the chat format, short enough to leave DPO room to improve."""
    from tasks.common.train_config import SamplingConfig, TrainConfig
    from tasks.sft import Config

    train = TrainConfig(max_steps=12, lr=2e-3, warmup_steps=2, log_every=4)
    base = dict(builtin_train=400, builtin_val=32, sampling=SamplingConfig(**EVAL), train=train)
    return Config(**{**base, **changes})


def reward_config(**changes):
    from tasks.common.train_config import TrainConfig
    from tasks.reward import Config

    train = TrainConfig(max_steps=150, lr=1e-3, warmup_steps=4, log_every=10)
    return Config(**{**dict(builtin_train=2400, builtin_val=200, train=train), **changes})


def dpo_config(**changes):
    from tasks.common.train_config import SamplingConfig, TrainConfig
    from tasks.dpo import Config

    train = TrainConfig(max_steps=120, lr=5e-4, warmup_steps=4, log_every=10)
    base = dict(builtin_train=1920, builtin_val=32, beta=0.1, sampling=SamplingConfig(**EVAL), train=train)
    return Config(**{**base, **changes})
