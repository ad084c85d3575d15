"""reward — a reward model: the SFT backbone plus a scalar head, trained on preference pairs (Bradley–Terry).

Runbook
    dvc repro reward                               # or: scratchlm stage reward / python -m tasks.reward
    dvc exp run -S ++reward.train.max_steps=300    # a longer run (reruns reward and dpo)
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

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from model.heads import RewardModel
from model.hf import load
from model.losses import bradley_terry_loss
from tasks.common import alignment as al
from tasks.common.config import as_dict
from tasks.common.distributed import init_distributed
from tasks.common.dvcio import StagePaths, fresh_dir, write_jsonl
from tasks.common.tracking import Tracker
from tasks.common.train_config import AlignmentData, TrainConfig
from tasks.common.training import print_plan, sharded_means, training_main
from tasks.sources.examples import broken_constraint, load_preference_data


@dataclass(frozen=True)
class RewardConfig(AlignmentData):
    sources: list[str] = field(default_factory=lambda: ["builtin:preferences"])
    builtin_train: int = 1000
    builtin_val: int = 200
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=3e-4))


Config = RewardConfig  # the section class params.yaml loads (tasks/common/config.py)


# ------------------------------------------------------------------------------------------------ loss, eval


def pair_rewards(model, batch: al.PairBatch):
    """(r_chosen, r_rejected), (B,) each."""
    r = al.rewards_of(model, batch)  # (2B,)
    return r[: batch.pairs], r[batch.pairs :]


def bradley_terry(engine, batch: dict):
    chosen, rejected = pair_rewards(engine, al.PairBatch(**batch))
    with_margin = (chosen - rejected).detach()
    return bradley_terry_loss(chosen, rejected), {
        "accuracy": (with_margin > 0).float().mean(),
        "margin": with_margin.mean(),
    }


class PairAccuracy:
    """val/accuracy, val/margin and val/loss over the held-out pairs, split over the ranks."""

    NAMES = ("accuracy", "margin", "loss")

    def __init__(self, pairs: list[al.PairExample], micro_batch_size: int, pad_id: int) -> None:
        self.pairs, self.micro, self.pad_id = pairs, micro_batch_size, pad_id

    def __call__(self, engine) -> dict[str, float]:
        return sharded_means(engine, len(self.pairs), self.micro, self.NAMES, lambda ids: self.sums(engine, ids))

    def sums(self, engine, indices: list[int]) -> torch.Tensor:
        """[pairs, correct, margin sum, loss sum] over some held-out pairs."""
        batch = al.collate_pairs([self.pairs[i] for i in indices], self.pad_id).to(al.device_of(engine.module))
        chosen, rejected = pair_rewards(engine, batch)
        diff = (chosen - rejected).double()
        return torch.stack(
            [
                torch.tensor(float(len(diff)), dtype=torch.float64, device=diff.device),
                (diff > 0).double().sum(),
                diff.sum(),
                -F.logsigmoid(diff).sum(),
            ]
        )


def held_out_report(model, pairs: list[al.PairExample], broken: list[str | None], pad_id: int, batch_size: int) -> dict:
    """Accuracy and margin of the final reward model on the held-out pairs, overall and by broken constraint."""
    diffs: list[float] = []
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            chosen, rejected = pair_rewards(model, al.collate_pairs(pairs[start : start + batch_size], pad_id))
            diffs += (chosen - rejected).tolist()
    by_kind: dict[str, list[float]] = defaultdict(list)
    for kind, d in zip(broken, diffs):
        if kind:
            by_kind[kind].append(d)
    n = max(len(diffs), 1)
    return {
        "accuracy": sum(d > 0 for d in diffs) / n,
        "margin": sum(diffs) / n,
        "val_pairs": len(diffs),
        "accuracy_by_broken": {k: sum(d > 0 for d in v) / len(v) for k, v in sorted(by_kind.items())},
    }


# ------------------------------------------------------------------------------------------------ stage


def preflight(cfg: RewardConfig, paths: StagePaths) -> None:
    """Launcher-side checks before any rank starts: upstream folders, context, batch arithmetic."""
    up = al.upstream_of("reward", cfg, paths, "sft")
    what = f"{cfg.train.batch_size} pairs (≤ {up.max_len} tokens a row) from {up.model_dir}"
    print_plan("reward", cfg.train, paths, 2 * up.max_len, f"{what}; sources {', '.join(cfg.sources)}")


def run(cfg: RewardConfig, paths: StagePaths, tracker: Tracker) -> dict | None:
    """One rank's reward-model training; rank 0 also writes the model and quarantine and returns the metrics."""
    from tasks.common.trainer import Recipe, Trainer  # DeepSpeed: loaded by the ranks, not by `scratchlm params`

    world = init_distributed()
    up = al.upstream_of("reward", cfg, paths, "sft")
    loaded = load_preference_data(cfg, paths.root)
    train, val, truncated = al.encode_pairs(loaded, up.tok, up.max_len)
    if world.is_main:
        write_jsonl(fresh_dir(paths.out) / "quarantine.jsonl", loaded.quarantine)
    info = {
        "reward": {k: v for k, v in as_dict(cfg).items() if k != "train"},
        "train": cfg.train.fingerprint_dict(),
        "upstream": up.fingerprint(),
    }

    def build_model():
        torch.manual_seed(cfg.train.seed)  # the head's initial weights
        return RewardModel.from_backbone(load(up.model_dir)).train()

    batches, mean_len = al.pair_batches(train, cfg.train, up.tok.pad_id)  # mean_len: tokens of a pair
    evaluation = PairAccuracy(val, cfg.train.micro_batch_size, up.tok.pad_id) if val else None
    recipe = Recipe(batches, bradley_terry, mean_len, up.model_cfg.flops_per_token(mean_len // 2), eval_fn=evaluation)
    trainer = Trainer(build_model, cfg.train, recipe, name="reward", info=info, root=paths.root, tracker=tracker)
    summary, model = trainer.train(paths.out / "history.jsonl")
    if model is None:  # ranks other than 0
        return None

    model.save(paths.out / "model", tokenizer_dir=up.tokenizer_dir)
    held_out = (
        held_out_report(
            model, val, [broken_constraint(p) for p in loaded.val], up.tok.pad_id, cfg.train.micro_batch_size
        )
        if val
        else {}
    )
    tracker.log_artifact(paths.out / "quarantine.jsonl", "reward")
    return {**summary, **al.data_metrics(loaded, truncated, up.max_len), **held_out}


def summary(m: dict, paths: StagePaths) -> list[str]:
    lines = al.data_summary(m, "pairs", "held out")
    if "accuracy" in m:
        lines.append(
            f"held-out pair accuracy {m['accuracy']:.1%}   mean margin r(chosen) - r(rejected) {m['margin']:.3f}"
        )
        if m["accuracy_by_broken"]:
            lines.append(
                "accuracy by broken constraint: "
                + "  ".join(f"{k} {v:.0%}" for k, v in m["accuracy_by_broken"].items())
            )
    return lines + [f"model (RewardModel.load) and quarantine.jsonl in {paths.out}"]


HEADLINE = (
    "val_accuracy",
    "val_margin",
    "accuracy",
    "quarantined",
)
"""What metrics/reward.json keeps (`dvc metrics diff`); every figure is in data/reward/metrics.json."""


if __name__ == "__main__":
    training_main("reward", RewardConfig, run, preflight, summary, HEADLINE)
