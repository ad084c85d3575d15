"""dpo — Direct Preference Optimization of the SFT policy against a frozen copy of itself.

Runbook
    dvc repro dpo                                  # or: scratchlm stage dpo / python -m tasks.dpo
    dvc exp run -S dpo.beta=0.3                    # a stronger pull toward the reference
    dvc exp run -S 'dpo.sources=[../shared/data/hh-rlhf-harmless-base/harmless-base_test_rows0000-1811.jsonl.gz]'
    python -m tasks.dpo                            # launcher: checks the params, then execs
        deepspeed --num_gpus <train.ranks> ... --module tasks.dpo --worker
    A killed run resumes from checkpoints/dpo/<fingerprint>/ (the shared trainer, tasks/common/trainer.py).

Reads   data/sft/model/           the SFT HF Llama: the policy's starting weights AND the frozen reference
        data/reward/model/        the reward model (RewardModel.load): judges DPO answers against SFT answers
        data/tokenizer/           tokenizer.json with the chat special tokens
        `dpo.sources`             builtin:preferences and/or prompt/chosen/rejected or HH-RLHF .jsonl files
Writes  data/dpo/model/           the aligned policy, an HF Llama folder with the tokenizer files (model.hf.save;
                                  every stop token in generation_config.json) and its model card (README.md)
        data/dpo/quarantine.jsonl every row that could not be used: {location, reason, source}
        data/dpo/samples.jsonl    SFT and DPO answers to the held-out prompts, with constraints and rewards
        data/dpo/history.jsonl    the logged training curve
        metrics/dpo.json          loss, implicit rewards (chosen, rejected, margin), preference accuracy, KL to the
                                  reference; constraint satisfaction of SFT vs DPO answers and the reward model's
                                  win rate of DPO answers over SFT answers
Checks  malformed pairs are quarantined and counted (rows_in = train + val + quarantined).
        log π(y|x) sums the reply's token log-probs (content + `<|end|>`), the prompt masked;
        loss = -log σ(β[(log π(y_c|x) - log π_ref(y_c|x)) - (log π(y_r|x) - log π_ref(y_r|x))]) (+ sft_weight x
        the chosen replies' per-token NLL when set, as in RPO); implicit reward = β(log π - log π_ref).
        KL: val/kl sums, over each held-out chosen reply's positions, the exact KL(π(.|ctx) || π_ref(.|ctx)) over
        the vocabulary; `kl_to_reference` does the same along the DPO policy's own sampled answers (an estimate of
        the sequence-level KL(π || π_ref) when sampling at temperature 1).
        The end evaluation samples SFT (= the reference) and DPO answers to the same builtin "test" prompts with the
        same seed; win rate = share of prompts where r(x, DPO answer) > r(x, SFT answer), ties counting 1/2.
Scale   the reference is a second, frozen copy of the SFT weights on each rank (forward only, no optimizer
        state); DeepSpeed ranks, ZeRO 0-3 and bf16 through `dpo.train`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from model.card import write_card
from model.heads import RewardModel
from model.hf import load, save
from model.losses import dpo_loss
from tasks.common import alignment as al
from tasks.common.chat import STOP_TOKENS
from tasks.common.config import as_dict, check
from tasks.common.distributed import init_distributed
from tasks.common.dvcio import StagePaths, fresh_dir, write_jsonl
from tasks.common.tracking import Tracker
from tasks.common.train_config import AlignmentData, SamplingConfig, TrainConfig
from tasks.common.training import check_models, print_plan, sharded_means, training_main
from tasks.sources.answers import compare_policies
from tasks.sources.examples import load_preference_data


@dataclass(frozen=True)
class DpoConfig(AlignmentData):
    sources: list[str] = field(default_factory=lambda: ["builtin:preferences"])
    builtin_train: int = 1000
    builtin_val: int = 64
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=40, lr=1e-4, warmup_steps=4))
    beta: float = 0.1
    """DPO temperature β: how far the policy may move from the reference (higher = stays closer)."""
    label_smoothing: float = 0.0
    """Conservative DPO: the share of pairs assumed mislabelled (0 = plain DPO)."""
    sft_weight: float = 0.0
    """Weight of an extra NLL term on the chosen replies (RPO, Pang et al. 2024; TRL's rpo_alpha); 0 = plain DPO."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """The stage's overrides of the top-level `sampling` section (the end evaluation: satisfaction, win rate, KL)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.beta > 0, "beta", "must be > 0")
        check(0.0 <= self.label_smoothing < 0.5, "label_smoothing", "must be in [0, 0.5)")
        check(self.sft_weight >= 0, "sft_weight", "must be >= 0")


Config = DpoConfig  # the section class params.yaml loads (tasks/common/config.py)


# ------------------------------------------------------------------------------------------------ loss, eval


class DPOLoss:
    """loss_fn of the trainer: DPO on summed reply log-probs, the reference closed over (frozen, no grad)."""

    def __init__(self, reference, beta: float, label_smoothing: float, sft_weight: float) -> None:
        self.reference, self.beta, self.label_smoothing, self.sft_weight = reference, beta, label_smoothing, sft_weight

    def terms(self, policy, batch: al.PairBatch, logits: tuple | None = None):
        """(loss, metrics) of one pair batch; `logits` = (policy, reference) reply logits when already computed."""
        k = batch.pairs
        if logits is None:
            with torch.no_grad():
                reference_logits = al.reply_logits(self.reference, batch)
            logits = (al.reply_logits(policy, batch), reference_logits)
        policy_lp = al.reply_logprobs(logits[0], batch)  # (2B,)
        reference_lp = al.reply_logprobs(logits[1], batch)
        loss, r_chosen, r_rejected = dpo_loss(
            policy_lp[:k], policy_lp[k:], reference_lp[:k], reference_lp[k:], self.beta, self.label_smoothing
        )
        metrics = {
            "rewards_chosen": r_chosen.mean(),
            "rewards_rejected": r_rejected.mean(),
            "margin": (r_chosen - r_rejected).mean(),
            "accuracy": (r_chosen > r_rejected).float().mean(),
            "dpo_loss": loss.detach(),
        }
        if self.sft_weight:
            tokens = batch.response_mask[:k, 1:].sum(-1).clamp(min=1)  # (B,) chosen reply tokens
            nll = -(policy_lp[:k] / tokens).mean()
            loss = loss + self.sft_weight * nll
            metrics["chosen_nll"] = nll.detach()
        return loss, metrics

    def __call__(self, engine, batch: dict):
        return self.terms(engine, al.PairBatch(**batch))


class PreferenceEval:
    """val/loss, val/rewards_*, val/margin, val/accuracy and val/kl (per reply, on the chosen replies), over ranks."""

    NAMES = ("loss", "rewards_chosen", "rewards_rejected", "margin", "accuracy", "kl")

    def __init__(self, loss: DPOLoss, pairs: list[al.PairExample], micro_batch_size: int, pad_id: int) -> None:
        self.loss, self.pairs, self.micro, self.pad_id = loss, pairs, micro_batch_size, pad_id

    def __call__(self, engine) -> dict[str, float]:
        return sharded_means(engine, len(self.pairs), self.micro, self.NAMES, lambda ids: self.sums(engine, ids))

    def sums(self, engine, indices: list[int]) -> torch.Tensor:
        """[pairs, *each statistic x pairs] over some held-out pairs."""
        batch = al.collate_pairs([self.pairs[i] for i in indices], self.pad_id).to(al.device_of(engine.module))
        logits = (al.reply_logits(engine, batch), al.reply_logits(self.loss.reference, batch))
        _, m = self.loss.terms(engine, batch, logits)
        chosen = slice(0, batch.pairs)
        kl = al.reply_kl(logits[0][chosen], logits[1][chosen], batch.rows(chosen)).mean()
        values = [m["dpo_loss"], m["rewards_chosen"], m["rewards_rejected"], m["margin"], m["accuracy"], kl]
        n = float(len(indices))
        return torch.stack(
            [torch.tensor(n, dtype=torch.float64)] + [torch.as_tensor(v).detach().double().cpu() * n for v in values]
        )


# ------------------------------------------------------------------------------------------------ stage


def preflight(cfg: DpoConfig, paths: StagePaths) -> None:
    """Launcher-side checks before any rank starts: upstream folders, context, batch arithmetic."""
    up = al.upstream_of("dpo", cfg, paths, "sft")
    check_models(paths, "reward")
    what = f"{cfg.train.batch_size} pairs (≤ {up.max_len} tokens a row), β={cfg.beta}, policy and reference from"
    print_plan("dpo", cfg.train, paths, 2 * up.max_len, f"{what} {up.model_dir}; sources {', '.join(cfg.sources)}")


def run(cfg: DpoConfig, paths: StagePaths, tracker: Tracker) -> dict | None:
    """One rank's DPO; rank 0 also evaluates against the SFT policy, writes the model and returns the metrics."""
    from tasks.common.trainer import Recipe, Trainer  # DeepSpeed: loaded by the ranks, not by `scratchlm params`

    world = init_distributed()
    up, reward_dir = al.upstream_of("dpo", cfg, paths, "sft"), check_models(paths, "reward")["reward"]
    loaded = load_preference_data(cfg, paths.root)
    train, val, truncated = al.encode_pairs(loaded, up.tok, up.max_len)
    if world.is_main:
        write_jsonl(fresh_dir(paths.out) / "quarantine.jsonl", loaded.quarantine)
    info = {
        "dpo": {k: v for k, v in as_dict(cfg).items() if k not in ("sampling", "train")},
        "train": cfg.train.fingerprint_dict(),
        "upstream": up.fingerprint(),
    }
    reference = al.load_model_folder(up.model_dir, "the sft stage's output").to(world.device)
    reference = reference.eval().requires_grad_(False)

    def build_model():
        torch.manual_seed(cfg.train.seed)
        return load(up.model_dir).train()

    loss = DPOLoss(reference, cfg.beta, cfg.label_smoothing, cfg.sft_weight)
    batches, mean_len = al.pair_batches(train, cfg.train, up.tok.pad_id)  # mean_len: tokens of a pair
    evaluation = PreferenceEval(loss, val, cfg.train.micro_batch_size, up.tok.pad_id) if val else None
    # the reference's forward adds a third to the policy's forward + backward
    flops = up.model_cfg.flops_per_token(mean_len // 2) * 4 / 3
    recipe = Recipe(batches, loss, mean_len, flops, eval_fn=evaluation)
    trainer = Trainer(build_model, cfg.train, recipe, name="dpo", info=info, root=paths.root, tracker=tracker)
    summary, policy = trainer.train(paths.out / "history.jsonl")
    if policy is None:  # ranks other than 0
        return None

    folder = save(policy, paths.out / "model", tokenizer_dir=up.tokenizer_dir, stop_tokens=STOP_TOKENS)
    metrics = {**summary, **al.data_metrics(loaded, truncated, up.max_len), "beta": cfg.beta}
    if cfg.sampling.prompts:
        metrics.update(
            compare_policies(
                {"sft": reference.cpu(), "dpo": policy},
                RewardModel.load(reward_dir),
                up.tok,
                cfg.sampling,
                paths.out / "samples.jsonl",
            )
        )
        tracker.log_artifact(paths.out / "samples.jsonl", "dpo")
    tracker.log_artifact(paths.out / "quarantine.jsonl", "dpo")
    write_card(
        folder,
        stage="dpo",
        training=f"direct preference optimisation on chosen/rejected answer pairs (beta {cfg.beta:g}), "
        "with its starting model, frozen, as the reference",
        base=f"the {up.model_stage} stage's model (data/{up.model_stage}/model)",
        params=info,
        metrics=metrics,
    )
    return metrics


def summary(m: dict, paths: StagePaths) -> list[str]:
    lines = al.data_summary(m, "pairs", "held out") + [f"β = {m['beta']}"]
    if "val_accuracy" in m:
        lines.append(
            f"held-out pairs: loss {m['val_loss']:.4f}  implicit rewards chosen {m['val_rewards_chosen']:+.3f} "
            f"rejected {m['val_rewards_rejected']:+.3f}  margin {m['val_margin']:.3f}  accuracy "
            f"{m['val_accuracy']:.1%}  KL/reply {m['val_kl']:.3f} nats"
        )
    if "win_rate" in m:
        lines.append(
            f"held-out constraint satisfaction ({m['eval_prompts']} prompts): SFT {m['sft_satisfaction']:.1%} "
            f"(all {m['sft_all_satisfied']:.1%}) → DPO {m['dpo_satisfaction']:.1%} "
            f"(all {m['dpo_all_satisfied']:.1%})"
        )
        lines.append(
            f"reward model: DPO beats SFT on {m['win_rate']:.1%} of prompts (mean reward "
            f"{m['sft_reward']:+.3f} → {m['dpo_reward']:+.3f}); KL(DPO || SFT) along DPO answers "
            f"{m['kl_to_reference']:.3f} nats"
        )
    return lines + [f"model, samples.jsonl, quarantine.jsonl in {paths.out}"]


HEADLINE = (
    "sft_satisfaction",
    "dpo_satisfaction",
    "kl_to_reference",
    "dpo_repeated_line_rate",
    "train_loss",
    "quarantined",
)
"""What metrics/dpo.json keeps (`dvc metrics diff`); every figure is in data/dpo/metrics.json."""


if __name__ == "__main__":
    training_main("dpo", DpoConfig, run, preflight, summary, HEADLINE)
