"""reward — a reward model: the SFT backbone plus a scalar head, trained on preference pairs (Bradley–Terry).

Runbook
    dvc repro reward                               # or: scratchlm stage reward / python -m tasks.reward
    dvc exp run -S reward.train.max_steps=300      # a longer run (reruns reward and dpo)
    dvc exp run -S 'reward.sources=[../shared/data/hh-rlhf-harmless-base/harmless-base_test_rows0000-1811.jsonl.gz]'
    python -m tasks.reward                         # launcher: checks the params, then execs
        deepspeed --num_gpus <train.ranks> ... --module tasks.reward --worker
    A killed run resumes from checkpoints/reward/<fingerprint>/ (the shared trainer, tasks/common/trainer.py).

Reads   data/sft/model/           the SFT HF Llama folder: the backbone's starting weights
        data/tokenizer/           tokenizer.json with the chat special tokens
        `reward.sources`          builtin:preferences (chosen meets every constraint of the prompt, rejected breaks
                                  exactly one) and/or .jsonl files: {prompt, chosen, rejected} or HH-RLHF
                                  {chosen, rejected} transcripts split at the last assistant turn
Writes  data/reward/model/        model.heads.RewardModel.save: the backbone as an HF Llama folder (+ tokenizer
                                  files) and reward_head.safetensors (weight (1,D), bias (1,))
        data/reward/quarantine.jsonl   every row that could not be used: {location, reason, source}
        data/reward/history.jsonl the logged training curve (train/loss, train/accuracy, val/accuracy, ...)
        metrics/reward.json       held-out pair accuracy and reward margin (overall and by broken constraint), counts
Checks  rows in no known format, non-string or empty replies, identical chosen/rejected, HH transcripts that
        differ before the last assistant turn are quarantined and counted (rows_in = train + val + quarantined).
        r(x, y) = head(h), h = the backbone's final hidden state at the last real token (the reply's `<|end|>`);
        loss = -log sigmoid(r(x, chosen) - r(x, rejected)). Accuracy = share of held-out pairs with
        r(chosen) > r(rejected); margin = their mean r(chosen) - r(rejected).
Scale   each pair is two right-padded rows of one batch (chosen rows, then rejected rows), batches of similar
        length; DeepSpeed ranks, ZeRO 0-3 and bf16 through `reward.train`.
"""
from __future__ import annotations

import shutil
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from tasks.common import alignment as al
from tasks.common.checkpoint import checkpoint_dir, fingerprint
from tasks.common.config import ScratchError, as_dict, check
from tasks.common.distributed import WORKER_FLAG, launch_main, planned_world_size
from tasks.common.dvcio import StagePaths, fresh_dir, stage_paths
from tasks.common.stage import stage_main
from tasks.common.tracking import Tracker
from tasks.common.trainer import TrainConfig


@dataclass(frozen=True)
class Config:
    sources: list[str] = field(default_factory=lambda: ["builtin:preferences"])
    """Preference pairs, in order: builtin:preferences and/or .json/.jsonl/.jsonl.gz files (relative paths are
    relative to the repository) with prompt/chosen/rejected rows or HH-RLHF chosen/rejected transcripts."""
    builtin_train: int = 1000
    """Pairs drawn from the builtin generator's "train" split."""
    builtin_val: int = 200
    """Pairs drawn from the builtin generator's "val" split (held-out accuracy)."""
    data_seed: int = 1337
    """Seed of the builtin preference generator."""
    val_fraction: float = 0.1
    """Share of file rows held out for validation, chosen by a hash of the row's location (0 = none)."""
    max_len: int = 0
    """Longest prompt + reply in tokens (a longer prompt keeps its end, then replies are cut); 0 = the model's
    max_seq_len."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=60, batch_size=16, micro_batch_size=16, lr=3e-4, warmup_steps=5, weight_decay=0.0,
        eval_every=0, checkpoint_every=0))
    """The shared training loop: ranks, ZeRO stage, precision, batch split, AdamW, schedule, budget, cadence."""

    def __post_init__(self) -> None:
        check(len(self.sources) > 0, "sources", "list at least one source (e.g. builtin:preferences)")
        check(self.builtin_train >= 0 and self.builtin_val >= 0, "builtin_train", "counts must be >= 0")
        check(0.0 <= self.val_fraction < 1.0, "val_fraction", "must be in [0, 1)")
        check(self.max_len >= 0, "max_len", "must be >= 0 (0 = the model's max_seq_len)")


def max_len_of(cfg: Config, model_max: int) -> int:
    if cfg.max_len > model_max:
        raise ScratchError(f"reward.max_len: {cfg.max_len} is longer than the model's max_seq_len ({model_max})")
    return cfg.max_len or model_max


# ------------------------------------------------------------------------------------------------ loss, eval

def pair_rewards(model, batch: al.PairBatch):
    """(r_chosen, r_rejected), (B,) each."""
    r = al.rewards_of(model, batch)  # (2B,)
    return r[:batch.pairs], r[batch.pairs:]


def bradley_terry(engine, batch: dict):
    from model.losses import bradley_terry_loss
    chosen, rejected = pair_rewards(engine, al.PairBatch(**batch))
    with_margin = (chosen - rejected).detach()
    return bradley_terry_loss(chosen, rejected), {"accuracy": (with_margin > 0).float().mean(),
                                                  "margin": with_margin.mean()}


class PairAccuracy:
    """val/accuracy, val/margin and val/loss over the held-out pairs, split over the ranks."""

    def __init__(self, pairs: list[al.PairExample], micro_batch_size: int, pad_id: int) -> None:
        self.pairs, self.micro, self.pad_id = pairs, micro_batch_size, pad_id

    def __call__(self, engine) -> dict[str, float]:
        import torch
        import torch.nn.functional as F

        from tasks.common.distributed import all_reduce_sum
        device = al.device_of(engine.module)
        totals = torch.zeros(4, dtype=torch.float64, device=device)  # [pairs, correct, margin sum, loss sum]
        for share in al.rank_share(len(self.pairs), self.micro):
            batch = al.collate_pairs([self.pairs[i] for i in (share or [0])], self.pad_id).to(device)
            chosen, rejected = pair_rewards(engine, batch)
            if share is None:
                continue  # a padding pass: every rank runs the same number of forwards
            diff = (chosen - rejected).double()
            totals += torch.stack([torch.tensor(float(len(diff)), device=device, dtype=torch.float64),
                                   (diff > 0).double().sum(), diff.sum(), -F.logsigmoid(diff).sum()])
        all_reduce_sum(totals)
        n = totals[0].clamp(min=1)
        return {"accuracy": (totals[1] / n).item(), "margin": (totals[2] / n).item(), "loss": (totals[3] / n).item()}


def held_out_report(model, pairs: list[al.PairExample], broken: list[str | None], pad_id: int,
                    batch_size: int) -> dict:
    """Accuracy and margin of the final reward model on the held-out pairs, overall and by broken constraint."""
    import torch
    diffs: list[float] = []
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            chosen, rejected = pair_rewards(model, al.collate_pairs(pairs[start:start + batch_size], pad_id))
            diffs += (chosen - rejected).tolist()
    by_kind: dict[str, list[float]] = defaultdict(list)
    for kind, d in zip(broken, diffs):
        if kind:
            by_kind[kind].append(d)
    n = max(len(diffs), 1)
    return {"accuracy": sum(d > 0 for d in diffs) / n, "margin": sum(diffs) / n, "val_pairs": len(diffs),
            "accuracy_by_broken": {k: sum(d > 0 for d in v) / len(v) for k, v in sorted(by_kind.items())}}


# ------------------------------------------------------------------------------------------------ stage

def preflight(cfg: Config, root: Path | None = None) -> TrainConfig:
    """Launcher-side checks before any rank starts: upstream folders, context, batch arithmetic."""
    from model.hf import load_config
    paths = stage_paths("reward", root) if root else stage_paths("reward")
    al.load_tokenizer(paths.of("tokenizer"))
    sft = paths.of("sft") / "model"
    if not (sft / "config.json").is_file():
        raise ScratchError(f"{sft}: no SFT model; run the sft stage first (dvc repro sft)")
    max_len = max_len_of(cfg, load_config(sft).max_seq_len)
    world = planned_world_size(cfg.train, paths.root)
    accum = cfg.train.grad_accum(world)
    steps = cfg.train.total_steps(2 * max_len)
    print(f"reward: {steps:,} steps x {cfg.train.batch_size} pairs (≤ {max_len} tokens a row) from {sft}\n"
          f"  batch {cfg.train.batch_size} = micro {cfg.train.micro_batch_size} x accumulation {accum} x ranks "
          f"{world}; sources {', '.join(cfg.sources)}", flush=True)
    return cfg.train


def run(cfg: Config, paths: StagePaths, tracker: Tracker) -> dict | None:
    """One rank's reward-model training; rank 0 also writes the model and quarantine and returns the metrics."""
    import torch

    from model.heads import RewardModel
    from model.hf import load, load_config
    from tasks.common.distributed import init_distributed
    from tasks.common.trainer import Trainer

    world = init_distributed()
    tokenizer_dir, sft = paths.of("tokenizer"), paths.of("sft") / "model"
    tok = al.load_tokenizer(tokenizer_dir)
    model_cfg = load_config(sft)
    max_len = max_len_of(cfg, model_cfg.max_seq_len)
    loaded = al.load_preference_data(cfg.sources, paths.root, cfg.builtin_train, cfg.builtin_val, cfg.data_seed,
                                     cfg.val_fraction)
    train, val, truncated = al.encode_pairs(loaded, tok, max_len)
    if world.is_main:
        fresh_dir(paths.out)
        al.write_quarantine(paths.out / "quarantine.jsonl", loaded.quarantine)

    info = {"reward": {k: v for k, v in as_dict(cfg).items() if k != "train"}, "train": cfg.train.fingerprint_dict(),
            "upstream": al.upstream_fingerprint({"sft": sft, "tokenizer": tokenizer_dir})}
    folder = checkpoint_dir("reward", fingerprint(info), paths.root)

    def build_model():
        torch.manual_seed(cfg.train.seed)  # the head's initial weights
        return RewardModel.from_backbone(load(sft)).train()

    lengths = [al.pair_length(e) for e in train]
    mean_len = round(2 * sum(lengths) / max(len(lengths), 1))  # tokens a pair puts through the model
    trainer = Trainer(
        build_model, cfg.train, name="reward", checkpoint_dir=folder, fingerprint_info=info, tracker=tracker,
        batches=al.StepBatches(train, lengths, cfg.train.batch_size, cfg.train.seed,
                               lambda exs: al.collate_pairs(exs, tok.pad_id).as_dict(), "training pairs"),
        loss_fn=bradley_terry,
        eval_fn=PairAccuracy(val, cfg.train.micro_batch_size, tok.pad_id) if val else None,
        tokens_per_example=mean_len, flops_per_token=model_cfg.flops_per_token(mean_len // 2))
    summary = trainer.fit()
    model = trainer.final_model()
    if not world.is_main:
        return None

    model.save(paths.out / "model", tokenizer_dir=tokenizer_dir)
    shutil.copy2(trainer.history_path, paths.out / "history.jsonl")
    held_out = held_out_report(model, val, [al.broken_constraint(p) for p in loaded.val], tok.pad_id,
                               cfg.train.micro_batch_size) if val else {}
    metrics = {**summary, **loaded.counts(), **held_out, "truncated": truncated, "max_len": max_len,
               "fingerprint": folder.name}
    tracker.log_artifact(paths.out / "quarantine.jsonl", "reward")
    print_summary(metrics, paths)
    return metrics


def print_summary(m: dict, paths: StagePaths) -> None:
    print(f"\nreward: {m['steps']:,} steps on {m['train_examples']:,} pairs ({m['val_examples']:,} held out, "
          f"{m['quarantined']:,} quarantined, {m['truncated']:,} cut at {m['max_len']} tokens)")
    for reason, n in m["quarantined_by_reason"].items():
        print(f"  quarantined {n:>6,}  {reason}")
    print(f"  train loss {m['train_loss']:.4f}   {m['tokens_per_s']:,.0f} tokens/s")
    if "accuracy" in m:
        print(f"  held-out pair accuracy {m['accuracy']:.1%}   mean margin r(chosen) - r(rejected) {m['margin']:.3f}")
        if m["accuracy_by_broken"]:
            print("  accuracy by broken constraint: " +
                  "  ".join(f"{k} {v:.0%}" for k, v in m["accuracy_by_broken"].items()))
    print(f"  model        {paths.out / 'model'}  (RewardModel.load)")
    print(f"  quarantine   {paths.out / 'quarantine.jsonl'}")


def main() -> None:
    if WORKER_FLAG in sys.argv[1:]:
        stage_main("reward", Config, run)
    else:
        launch_main("reward", Config, preflight)


if __name__ == "__main__":
    main()
