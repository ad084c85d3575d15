"""ppo — reinforcement learning of the SFT (or DPO) policy: PPO against the reward model, GRPO or RLOO on a
verifiable reward, with a KL penalty to the frozen starting policy.

Runbook
    dvc repro ppo                                  # or: scratchlm stage ppo / python -m tasks.ppo
    dvc exp run -S ppo.algorithm=ppo -S ppo.reward=rm           # classic RLHF: PPO on the reward model
    dvc exp run -S ppo.algorithm=grpo -S ppo.reward=checker     # GRPO on the constraint checker (the default)
    dvc exp run -S 'ppo.sources=[../shared/data/gsm8k/train.jsonl]' -S ppo.reward=checker   # GSM8K final answers
    dvc exp run -S ppo.init=dpo                    # start from the DPO policy instead of SFT
    python -m tasks.ppo                            # launcher: checks the params, then execs
        deepspeed --num_gpus <train.ranks> ... --module tasks.ppo --worker
    A killed run resumes from checkpoints/ppo/<fingerprint>/ (the shared trainer, tasks/common/trainer.py): a step's
    rollouts are a function of (weights, seed, step), so the resumed run samples exactly what the killed one did.

Reads   data/<ppo.init>/model/    the starting policy AND the frozen reference of the KL penalty (sft or dpo)
        data/reward/model/        the reward model: the reward when `ppo.reward` has rm; the judge of the end
                                  evaluation (win rate, reward hacking) always
        data/tokenizer/           tokenizer.json with the chat special tokens
        `ppo.sources`             builtin:prompts (the builtin instructions without answers: constraints to check)
                                  and/or GSM8K {question, answer}, {prompt, answer?} or chat rows ending with a user
                                  turn (tasks/sources/instructions.py: to_prompt)
Writes  data/ppo/model/           the trained policy, an HF Llama folder with the tokenizer files (the value head, a
                                  training-only part, stays in the checkpoints)
        data/ppo/quarantine.jsonl every prompt row that could not be used: {location, reason, source}
        data/ppo/samples.jsonl    starting-policy and PPO answers to the builtin held-out prompts, checked and scored
        data/ppo/history.jsonl    the logged curve: train/reward, train/checker, train/rm, train/kl, train/entropy,
                                  train/clip_fraction, train/value_loss, train/response_length, ...; val/* at each
                                  evaluation (checker score and satisfaction on the stage's held-out prompts)
        metrics/ppo.json          the run's figures; <init>_* vs ppo_* satisfaction, reward, answer length; win rate;
                                  KL to the reference; `reward_hacking` (trained on the RM: the RM's score rose while
                                  the checker's satisfaction fell)
Checks  rows in no prompt format, with no checkable answer, or leaving fewer than 32 tokens of max_len for the answer
        are quarantined and counted (rows_in = train + val + quarantined).
Algorithm (one step = one rollout batch of `train.batch_size` prompts, then ppo_epochs x minibatches updates)
        rollout   each prompt answered `group_size` times with the KV-cache generator (model/generate.py) at
                  `temperature`; old log-probs, reference log-probs (and values) by one forward each
        reward    rm: the reward model's score; checker: the share of the prompt's constraints met, or 1 for a
                  correct final number (GSM8K); rm+checker: their sum; minus `unfinished_penalty` when the answer
                  never ended (`<|end|>`) within max_new_tokens
        ppo       per-token reward -β·(log π_old - log π_ref) plus the score on the last token; GAE (gamma, lam)
                  on the value head's estimates; advantages whitened over the whole batch (every rank); clipped
                  surrogate + vf_coef x clipped value loss
        grpo      advantage = (score - group mean) / (group std + 1e-4) on every token of the answer; no value
                  head; loss = clipped surrogate + β x KL(π || π_ref) per token (the k3 estimator, DeepSeekMath)
        rloo      advantage = (score - β·KL_seq) - the mean of the group's other answers' (Ahmadian et al. 2024)
        β         fixed `kl_coef`, or adaptive toward `kl_target` nats per answer (Ziegler et al. 2019); the
                  coefficient is part of every checkpoint
Scale   the reference (and the reward model) are frozen copies on each rank, forward only; rollouts of a rank are
        its micro batches' prompts, seeded by (seed, step, slot), so 2 ranks sample what 1 rank with 2x accumulation
        does; under ZeRO-3 each rank generates with a copy of the gathered policy (`SamplingWeights`, as
        DeepSpeed-Chat's hybrid engine does). DeepSpeed ranks, ZeRO 0-3 and bf16 through `ppo.train`.
"""

from __future__ import annotations

import hashlib
import json
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from model import generate
from model.card import write_card
from model.heads import PolicyWithValue, RewardModel
from model.hf import load, save
from model.losses import gae_advantages, masked_mean, ppo_losses, token_logprobs
from tasks.common import alignment as al
from tasks.common.chat import STOP_TOKENS
from tasks.common.config import as_dict, check
from tasks.common.distributed import all_reduce_sum, init_distributed
from tasks.common.dvcio import StagePaths, fresh_dir, write_jsonl
from tasks.common.tracking import Tracker
from tasks.common.train_config import AlignmentData, SamplingConfig, TrainConfig
from tasks.common.training import check_models, print_plan, sharded_means, training_main, upstream_fingerprint
from tasks.sources.answers import compare_policies
from tasks.sources.examples import Loaded, checker_score, load_prompt_data


@dataclass(frozen=True)
class PpoConfig(AlignmentData):
    sources: list[str] = field(default_factory=lambda: ["builtin:prompts"])
    builtin_train: int = 1000
    builtin_val: int = 32
    init: Literal["sft", "dpo"] = "sft"
    """The starting policy and the KL reference: the sft or the dpo stage's model."""
    algorithm: Literal["ppo", "grpo", "rloo"] = "grpo"
    """ppo (value head, GAE, per-token KL in the reward), grpo (group-normalised scores, KL in the loss, no value
    head) or rloo (leave-one-out baseline, sequence KL in the reward, no value head)."""
    reward: Literal["rm", "checker", "rm+checker"] = "checker"
    """What an answer earns: the reward model's score, the verifiable checker (constraints met, or a correct final
    number), or their sum."""
    group_size: int = 4
    """Answers sampled per prompt (grpo and rloo compare them; >= 2 there); a step trains on batch_size x this."""
    ppo_epochs: int = 2
    """Passes over each rollout batch."""
    minibatches: int = 2
    """Optimizer updates per pass: each micro batch's answers are cut into this many minibatches."""
    clip_eps: float = 0.2
    """PPO's ratio clip: the policy may move each token's probability by this share per rollout batch."""
    kl_coef: float = 0.02
    """β: weight of the KL to the reference (in the reward for ppo/rloo, in the loss for grpo); the start value
    when adaptive."""
    kl_target: float = 0.0
    """Adaptive β: the KL per answer (nats) the controller steers toward; 0 = β stays kl_coef."""
    kl_horizon: int = 50
    """Adaptive β: steps over which a KL error of 20 % changes β by about 20 % (larger = slower)."""
    vf_coef: float = 0.1
    """ppo: weight of the value loss (the value head shares the policy's backbone)."""
    value_clip: float = 0.2
    """ppo: the value estimate's clip range around its rollout value."""
    gamma: float = 1.0
    """ppo: GAE discount."""
    lam: float = 0.95
    """ppo: GAE λ."""
    unfinished_penalty: float = 0.5
    """Subtracted from the reward of an answer that did not end within max_new_tokens."""
    max_new_tokens: int = 200
    """Longest rollout answer (also cut where the context ends, as evaluation samples)."""
    temperature: float = 1.0
    """Rollout sampling temperature; log-probs are taken at the same temperature."""
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            batch_size=8, micro_batch_size=8, max_steps=48, lr=1.0e-4, warmup_steps=2, log_every=2, eval_every=12
        )
    )
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """The stage's overrides of the top-level `sampling` section (held-out evaluation during and after training)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.group_size >= 1, "group_size", "must be >= 1")
        check(
            self.algorithm == "ppo" or self.group_size >= 2,
            "group_size",
            f"{self.algorithm} compares the answers of a prompt: needs group_size >= 2",
        )
        check(self.ppo_epochs >= 1 and self.minibatches >= 1, "ppo_epochs", "ppo_epochs and minibatches must be >= 1")
        check(
            (self.train.micro_batch_size * self.group_size) % self.minibatches == 0,
            "minibatches",
            f"must divide the answers of a micro batch (train.micro_batch_size x group_size = "
            f"{self.train.micro_batch_size * self.group_size})",
        )
        check(self.train.max_steps > 0, "train.max_steps", "ppo's budget is in steps (rollout batches): set max_steps")
        check(0 < self.clip_eps < 1 and self.value_clip > 0, "clip_eps", "clip_eps must be in (0, 1), value_clip > 0")
        check(self.kl_coef >= 0 and self.kl_target >= 0 and self.kl_horizon >= 1, "kl_coef", "KL knobs must be >= 0")
        check(self.vf_coef >= 0 and self.unfinished_penalty >= 0, "vf_coef", "must be >= 0")
        check(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "gamma", "gamma and lam must be in [0, 1]")
        check(self.max_new_tokens >= 1 and self.temperature > 0, "max_new_tokens", "must be >= 1 (temperature > 0)")

    @property
    def updates_per_step(self) -> int:
        return self.ppo_epochs * self.minibatches

    @property
    def uses_rm(self) -> bool:
        return "rm" in self.reward


Config = PpoConfig  # the section class params.yaml loads (tasks/common/config.py)


# ------------------------------------------------------------------------------------------------ KL coefficient


class KLController:
    """β of the KL penalty: fixed, or adapted each step toward a target KL per answer (Ziegler et al. 2019):
    β ← β · (1 + clip(KL / target - 1, ±0.2) / horizon). Saved in every checkpoint (Recipe.state)."""

    def __init__(self, coef: float, target: float, horizon: int) -> None:
        self.coef, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float) -> None:
        if self.target > 0:
            error = max(-0.2, min(0.2, kl / self.target - 1.0))
            self.coef *= 1.0 + error / self.horizon

    def state_dict(self) -> dict:
        return {"kl_coef": self.coef}

    def load_state_dict(self, state: dict) -> None:
        self.coef = float(state["kl_coef"])


# ------------------------------------------------------------------------------------------------ rollouts


@dataclass(frozen=True)
class Prompt:
    example: dict
    """The prompt row: prompt_messages and its constraints or final answer (what the checker needs)."""
    ids: list[int]
    """Its chat-template ids, ending with the generation prompt."""


MIN_ANSWER_TOKENS = 32
"""A prompt must leave at least this many tokens of the context for its answer (or it is quarantined); a rollout's
answers are cut at max_new_tokens or the end of the context, whichever comes first, as evaluation samples them."""


def encode_prompts(loaded: Loaded, split: str, tok: al.ChatTokenizer, longest: int) -> list[Prompt]:
    """The prompts of `split` of at most `longest` tokens; longer ones are quarantined."""
    why = f"prompt leaves fewer than {MIN_ANSWER_TOKENS} tokens of max_len for its answer (over {longest} tokens)"

    def encode(example: dict) -> Prompt | None:
        ids = al.encode_prompt(tok, example["prompt_messages"])
        return Prompt(example, ids) if len(ids) <= longest else None

    return loaded.keep_encoded(split, encode, why)


def prompts_digest(prompts: list[Prompt]) -> str:
    """sha256 of the training prompts' token ids and checker targets: part of the checkpoint fingerprint."""
    rows = [[p.ids, p.example.get("constraints"), p.example.get("answer")] for p in prompts]
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]


def chunk_seed(seed: int, *keys: int) -> int:
    """A seed for one (step, slot[, epoch]): the same whatever the split of the batch over ranks."""
    return zlib.crc32("/".join(map(str, (seed, *keys))).encode())


class SamplingWeights:
    """The policy as a plain Llama for the KV-cache generator. At ZeRO 0-2 that is the live module; at ZeRO-3 a copy
    on each rank, refreshed from the gathered parameters before each rollout or evaluation (ZeRO-3's hooks would
    re-partition the parameters between the generator's decode steps; DeepSpeed-Chat's hybrid engine keeps such an
    inference copy too). Collective at ZeRO-3: call it on every rank."""

    def __init__(self, zero_stage: int, build_lm) -> None:
        self.zero_stage, self.build_lm, self.copy = zero_stage, build_lm, None

    def __call__(self, engine):
        live = engine.module.lm
        if self.zero_stage < 3:
            return live
        import deepspeed

        params = list(live.parameters())
        if self.copy is None:
            with torch.random.fork_rng(devices=[]):  # building a model must not move the training RNG
                self.copy = self.build_lm().eval().requires_grad_(False)
        with deepspeed.zero.GatheredParameters(params):
            for mine, theirs in zip(self.copy.parameters(), params, strict=True):
                mine.data = theirs.data.detach().clone().to(al.device_of(live))
        return self.copy


class Scorer:
    """The reward of answers: checker, reward model, or both; plus what is logged about each (every rank)."""

    def __init__(self, cfg: PpoConfig, tok: al.ChatTokenizer, reward_model) -> None:
        self.cfg, self.tok, self.reward_model = cfg, tok, reward_model

    def __call__(self, prompts: list[Prompt], answers: list[al.Answer]) -> dict[str, torch.Tensor]:
        """Per answer (R,): reward, checker, rm (0 when the reward model is not loaded), finished."""
        texts = [self.tok.decode(a.ids) for a in answers]
        checker = torch.tensor([checker_score(p.example, t) for p, t in zip(prompts, texts)])
        finished = torch.tensor([float(a.finished) for a in answers])
        rm = torch.zeros(len(answers))
        if self.reward_model is not None:
            replies = [a.reply(self.tok.end_id) for a in answers]
            batch = al.sequences_batch([a.prompt for a in answers], replies, self.tok.pad_id)
            rm = al.rewards_of(self.reward_model, batch.to(al.device_of(self.reward_model))).float().cpu()
        reward = {"rm": rm, "checker": checker, "rm+checker": rm + checker}[self.cfg.reward]
        reward = reward - self.cfg.unfinished_penalty * (1.0 - finished)
        return {"reward": reward, "checker": checker, "rm": rm, "finished": finished}


class Rollouts:
    """The trainer's rollout_fn: a step's prompts (a pure function of seed and step), answered by the policy,
    scored, and turned into advantages; the experience its minibatches are cut from."""

    def __init__(
        self,
        cfg: PpoConfig,
        prompts: list[Prompt],
        tok: al.ChatTokenizer,
        reference,
        scorer: Scorer,
        kl: KLController,
        sampler: SamplingWeights,
    ) -> None:
        self.cfg, self.prompts, self.tok = cfg, prompts, tok
        self.reference, self.scorer, self.kl, self.sampler = reference, scorer, kl, sampler
        lengths = [len(p.ids) for p in prompts]
        self.order = al.StepBatches(prompts, lengths, cfg.train.batch_size, cfg.train.seed, list, "training prompts")
        self.world = init_distributed()
        self.accum = cfg.train.grad_accum(self.world.size)

    def slots(self) -> list[int]:
        """This rank's micro batches, as positions among the step's accum x world micro batches."""
        return [micro * self.world.size + self.world.rank for micro in range(self.accum)]

    def __call__(self, engine, step: int) -> tuple[Experience, dict[str, float]]:
        started = time.perf_counter()
        step_prompts = self.order.indices(step)
        mb = self.cfg.train.micro_batch_size
        chunks, stats = {}, []
        sampler = self.sampler(engine)
        # fp32 on purpose, even at precision autocast (which DeepSpeed applies to engine.forward only): bf16 logits
        # carry ~0.05-nat errors into the old/reference log-probs and the KL, and GRPO measured worse with them
        # (48 steps: 45.0 % held-out satisfaction against 51.2 % in fp32; docs/BENCHMARKS.md, "Session 11")
        for slot in self.slots():
            prompts = [self.prompts[i] for i in step_prompts[slot * mb : (slot + 1) * mb]]
            seed = chunk_seed(self.cfg.train.seed, step, slot)
            chunks[slot], chunk_stats = self.rollout(engine.module, sampler, prompts, seed)
            stats.append(chunk_stats)
        seconds = time.perf_counter() - started
        metrics = self.finish(chunks, stats, seconds)
        self.kl.update(metrics["kl"])
        return Experience(chunks, self.cfg.minibatches, self.cfg.train.seed, step), metrics

    def rollout(self, policy: PolicyWithValue, sampler, prompts: list[Prompt], seed: int) -> tuple[dict, torch.Tensor]:
        """Answers to a micro batch's prompts (group_size each, sampled by `sampler`, the policy's weights as a plain
        Llama) and their training tensors, plus its statistics."""
        cfg, tok = self.cfg, self.tok
        prompts = [p for p in prompts for _ in range(cfg.group_size)]  # (R,) rows: group members side by side
        answers = answer(sampler, prompts, cfg.max_new_tokens, cfg.temperature, 1.0, tok.stop_ids, seed)
        scores = self.scorer(prompts, answers)
        device = al.device_of(policy)
        batch = al.sequences_batch([a.prompt for a in answers], [a.reply(tok.end_id) for a in answers], tok.pad_id)
        batch = batch.to(device)
        mask = batch.response_mask[:, 1:].float()  # (R,T-1): positions that predict an answer token
        logits, values = policy(batch.ids[:, :-1])
        old_lp = answer_logprobs(logits, batch, cfg.temperature)  # (R,T-1)
        ref_lp = answer_logprobs(al.reply_logits(self.reference, batch), batch, cfg.temperature)
        kl_tokens = (old_lp - ref_lp) * mask  # (R,T-1) k1 estimate of KL(π_old || π_ref) per token
        chunk = {
            **batch.as_dict(),
            "old_logprobs": old_lp,
            "ref_logprobs": ref_lp,
            "score": scores["reward"].to(device),
            "kl_seq": kl_tokens.sum(-1),
        }
        if values is not None:
            chunk["old_values"] = values * mask
        lengths = mask.sum(-1).cpu()
        stats = torch.stack(
            [
                torch.tensor(float(len(answers))),
                scores["reward"].sum(),
                scores["checker"].sum(),
                scores["rm"].sum(),
                scores["finished"].sum(),
                kl_tokens.sum().cpu(),
                lengths.sum(),
                torch.tensor(float(sum(len(a.ids) for a in answers))),
            ]
        ).double()
        return chunk, stats

    def finish(self, chunks: dict[int, dict], stats: list[torch.Tensor], seconds: float) -> dict[str, float]:
        """Advantages of every chunk (whitened over all ranks for ppo), and the step's rollout metrics."""
        totals = all_reduce_sum(torch.stack(stats).sum(0).to(self.world.device)).cpu()
        n = totals[0].clamp(min=1)
        metrics = {
            "reward": totals[1] / n,
            "checker": totals[2] / n,
            "finished": totals[4] / n,
            "kl": totals[5] / n,
            "response_length": totals[6] / n,
            "kl_coef": torch.tensor(self.kl.coef),
            "rollout_tokens_per_s": totals[7] / max(seconds, 1e-9) / self.world.size,
        }
        if self.scorer.reward_model is not None:
            metrics["rm"] = totals[3] / n
        for chunk in chunks.values():
            chunk["advantages"], returns = self.advantages(chunk)
            if returns is not None:
                chunk["returns"] = returns
        if self.cfg.algorithm == "ppo":
            whiten(chunks)
        return {k: float(v) for k, v in metrics.items()}

    def advantages(self, chunk: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-token advantages (R,T-1) (and returns for ppo) of one chunk."""
        cfg, beta = self.cfg, self.kl.coef
        mask = chunk["response_mask"][:, 1:].float()
        score = chunk["score"]
        if cfg.algorithm == "ppo":
            rewards = -beta * (chunk["old_logprobs"] - chunk["ref_logprobs"]) * mask  # (R,T-1)
            last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & (mask > 0)  # the answer's last token
            rewards = rewards + score[:, None] * last.float()
            return gae_advantages(rewards, chunk["old_values"], mask, cfg.gamma, cfg.lam)
        groups = score.view(-1, cfg.group_size)  # (prompts, K)
        if cfg.algorithm == "grpo":
            advantage = (groups - groups.mean(-1, keepdim=True)) / (groups.std(-1, keepdim=True) + 1e-4)
        else:  # rloo: the score with its sequence KL penalty, minus the mean of the group's others
            shaped = groups - beta * chunk["kl_seq"].view(-1, cfg.group_size)
            advantage = shaped - (shaped.sum(-1, keepdim=True) - shaped) / (cfg.group_size - 1)
        return advantage.reshape(-1, 1) * mask, None


def answer(
    model, prompts: list[Prompt], max_new_tokens: int, temperature: float, top_p: float, stop_ids, seed: int
) -> list[al.Answer]:
    """Sampled answers of `model` (a plain Llama) to prompts, cut at max_new_tokens or the end of the context."""
    budget = min(max_new_tokens, model.cfg.max_seq_len - max(len(p.ids) for p in prompts))
    ids = [p.ids for p in prompts]
    new = generate(model, ids, budget, temperature=temperature, top_p=top_p, stop_tokens=stop_ids, seed=seed)
    return [al.Answer(p.ids, reply, len(reply) < budget) for p, reply in zip(prompts, new)]


def answer_logprobs(logits: torch.Tensor, batch: al.PairBatch, temperature: float) -> torch.Tensor:
    """log π(token) at the sampling temperature for every answer token, 0 elsewhere, (R,T-1) from (R,T-1,V)."""
    targets = batch.ids[:, 1:].masked_fill(batch.response_mask[:, 1:] == 0, -100)
    return token_logprobs(logits.float() / temperature, targets)


def whiten(chunks: dict[int, dict]) -> None:
    """Advantages to zero mean and unit variance over every answer token of the step, on every rank."""
    sums = torch.zeros(3, dtype=torch.float64)
    for chunk in chunks.values():
        mask = chunk["response_mask"][:, 1:].double()
        adv = chunk["advantages"].double()
        sums += torch.stack([mask.sum(), (adv * mask).sum(), (adv * adv * mask).sum()]).cpu()
    device = next(iter(chunks.values()))["advantages"].device
    sums = all_reduce_sum(sums.to(device)).cpu()
    mean = sums[1] / sums[0].clamp(min=1)
    std = (sums[2] / sums[0].clamp(min=1) - mean**2).clamp(min=0).sqrt()
    for chunk in chunks.values():
        mask = chunk["response_mask"][:, 1:].float()
        chunk["advantages"] = ((chunk["advantages"] - float(mean)) / (float(std) + 1e-8)) * mask


@dataclass
class Experience:
    """A step's rollouts, by micro-batch slot; `minibatch(index)` is what the trainer's batch function returns."""

    chunks: dict[int, dict]
    minibatches: int
    seed: int
    step: int

    def minibatch(self, index) -> dict:
        """Update `index.update` of the step: epoch e, minibatch j of this slot's answers in epoch e's order."""
        chunk = self.chunks[index.slot]
        epoch, j = divmod(index.update, self.minibatches)
        rows = chunk["ids"].shape[0]
        generator = torch.Generator().manual_seed(chunk_seed(self.seed, self.step, index.slot, epoch))
        order = torch.randperm(rows, generator=generator)
        size = rows // self.minibatches
        picked = order[j * size : (j + 1) * size].to(chunk["ids"].device)
        length = int(chunk["attention_mask"][picked].sum(-1).max())  # trim the padding these rows do not need
        out = {}
        for key, value in chunk.items():
            value = value[picked]
            if value.ndim == 2:
                value = (
                    value[:, :length] if key in ("ids", "attention_mask", "response_mask") else value[:, : length - 1]
                )
            out[key] = value
        return out


def experience_batches(index, experience: Experience) -> dict:
    return experience.minibatch(index)


# ------------------------------------------------------------------------------------------------ loss, eval


class PolicyLoss:
    """loss_fn of the trainer: the clipped surrogate on one minibatch (+ the value loss for ppo, + the KL to the
    reference for grpo), with the diagnostics every RL run is read by."""

    def __init__(self, cfg: PpoConfig, kl: KLController) -> None:
        self.cfg, self.kl = cfg, kl

    def __call__(self, engine, batch: dict):
        cfg = self.cfg
        rows = al.PairBatch(batch["ids"], batch["attention_mask"], batch["response_mask"])
        mask = rows.response_mask[:, 1:].float()  # (R,T-1)
        logits, values = engine(rows.ids[:, :-1])
        logprobs = answer_logprobs(logits, rows, cfg.temperature)
        zeros = torch.zeros_like(logprobs)
        out = ppo_losses(
            logprobs,
            batch["old_logprobs"],
            batch["advantages"],
            values if values is not None else zeros,
            batch.get("old_values", zeros),
            batch.get("returns", zeros),
            mask,
            cfg.clip_eps,
            cfg.value_clip,
        )
        loss = out.policy_loss
        if cfg.algorithm == "ppo":
            loss = loss + cfg.vf_coef * out.value_loss
        log_ratio_ref = batch["ref_logprobs"] - logprobs
        kl_k3 = masked_mean(log_ratio_ref.exp() - log_ratio_ref - 1.0, mask)  # ≥ 0, unbiased for KL(π || π_ref)
        if cfg.algorithm == "grpo":
            loss = loss + self.kl.coef * kl_k3
        metrics = {
            "policy_loss": out.policy_loss.detach(),
            "value_loss": out.value_loss.detach(),
            "clip_fraction": out.clip_fraction,
            "approx_kl": out.approx_kl,
            "entropy": entropy(logits.detach(), mask, cfg.temperature),
            "kl_k3": kl_k3.detach(),
        }
        return loss, metrics


def entropy(logits: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean entropy (nats) of the policy's next-token distribution over answer positions."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # (R,T-1,V)
    return masked_mean(-(logp.exp() * logp).sum(-1), mask)


class HeldOutRewards:
    """eval_fn: the policy's sampled answers to the stage's held-out prompts, over ranks: checker score, constraint
    satisfaction (builtin prompts), the reward model's score, length and the share that ended."""

    NAMES = ("checker", "rm", "response_length", "finished", "constraints_met", "constraints")

    def __init__(
        self, prompts: list[Prompt], scorer: Scorer, tok: al.ChatTokenizer, cfg: PpoConfig, sampler: SamplingWeights
    ) -> None:
        self.prompts, self.scorer, self.tok, self.cfg, self.sampler = prompts, scorer, tok, cfg, sampler

    def __call__(self, engine) -> dict[str, float]:
        model = self.sampler(engine)
        means = sharded_means(
            engine, len(self.prompts), self.cfg.sampling.batch_size, self.NAMES, lambda ids: self.sums(model, ids)
        )
        out = {k: means[k] for k in ("checker", "response_length", "finished")}
        if self.scorer.reward_model is not None:
            out["rm"] = means["rm"]
        if means["constraints"] > 0:
            out["satisfaction"] = means["constraints_met"] / means["constraints"]
        return out

    def sums(self, model, indices: list[int]) -> torch.Tensor:
        """[prompts, *sums] of the answers of `model` (a plain Llama) to some held-out prompts."""
        s = self.cfg.sampling
        prompts = [self.prompts[i] for i in indices]
        answers = answer(
            model, prompts, s.max_new_tokens, s.temperature, s.top_p, self.tok.stop_ids, s.seed + indices[0]
        )
        scores = self.scorer(prompts, answers)
        constraints = [len(p.example.get("constraints") or {}) for p in prompts]
        met = [c * float(x) for c, x in zip(constraints, scores["checker"])]
        return torch.tensor(
            [
                float(len(prompts)),
                float(scores["checker"].sum()),
                float(scores["rm"].sum()),
                float(sum(len(a.ids) for a in answers)),
                float(scores["finished"].sum()),
                sum(met),
                float(sum(constraints)),
            ],
            dtype=torch.float64,
        )


def curve_ends(history: Path) -> dict[str, float]:
    """The rollout curve's first and last logged values (train/reward, checker, rm, kl, length) and the mean rollout
    tokens/s, from the run's history."""
    rows = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "train/reward" in r]
    if not rows:
        return {}
    out = {}
    for key in ("reward", "checker", "rm", "kl", "response_length"):
        if f"train/{key}" in rows[0]:
            out[f"rollout_{key}_first"], out[f"rollout_{key}_last"] = rows[0][f"train/{key}"], rows[-1][f"train/{key}"]
    out["rollout_tokens_per_s"] = sum(r["train/rollout_tokens_per_s"] for r in rows) / len(rows)
    return out


def reward_hacking(metrics: dict, init: str) -> bool:
    """The reward model prefers the trained policy's answers while the checker finds them worse (what the stage
    reports when it trained on the reward model: the policy learned the RM's taste, not the prompts' asks)."""
    return (
        metrics["ppo_reward"] > metrics[f"{init}_reward"]
        and metrics["ppo_satisfaction"] < metrics[f"{init}_satisfaction"]
    )


# ------------------------------------------------------------------------------------------------ stage


def preflight(cfg: PpoConfig, paths: StagePaths) -> None:
    """Launcher-side checks before any rank starts: upstream folders, context, batch arithmetic."""
    up = al.upstream_of("ppo", cfg, paths, cfg.init)
    check_models(paths, "reward")
    rows = cfg.train.batch_size * cfg.group_size
    what = (
        f"{cfg.train.batch_size} prompts x {cfg.group_size} answers ({rows} rollouts of ≤ {cfg.max_new_tokens} "
        f"tokens), {cfg.algorithm} on {cfg.reward}, {cfg.ppo_epochs} epochs x {cfg.minibatches} minibatches, "
        f"β={cfg.kl_coef}; policy and reference from {up.model_dir}; sources {', '.join(cfg.sources)}"
    )
    print_plan("ppo", cfg.train, paths, up.max_len, what)


def run(cfg: PpoConfig, paths: StagePaths, tracker: Tracker) -> dict | None:
    """One rank's RL run; rank 0 also compares the policy with its start, writes the model, returns the metrics."""
    from tasks.common.trainer import Recipe, Trainer  # DeepSpeed: loaded by the ranks, not by `scratchlm params`

    world = init_distributed()
    up, reward_dir = al.upstream_of("ppo", cfg, paths, cfg.init), check_models(paths, "reward")["reward"]
    loaded = load_prompt_data(cfg, paths.root)
    longest = up.max_len - MIN_ANSWER_TOKENS
    train, val = (encode_prompts(loaded, split, up.tok, longest) for split in ("train", "val"))
    if world.is_main:
        write_jsonl(fresh_dir(paths.out) / "quarantine.jsonl", loaded.quarantine)
    info = {
        "ppo": {k: v for k, v in as_dict(cfg).items() if k not in ("sampling", "train")},
        "train": cfg.train.fingerprint_dict(),
        "upstream": {**up.fingerprint(), **(upstream_fingerprint({"reward": reward_dir}) if cfg.uses_rm else {})},
        "prompts": prompts_digest(train),  # what the rollouts draw from, whatever code or data produced it
    }
    reference = al.load_model_folder(up.model_dir, f"the {cfg.init} stage's output").to(world.device)
    reference = reference.eval().requires_grad_(False)
    reward_model = RewardModel.load(reward_dir, device=world.device) if cfg.uses_rm else None
    kl = KLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    scorer = Scorer(cfg, up.tok, reward_model)

    def build_model():
        torch.manual_seed(cfg.train.seed)
        return PolicyWithValue(load(up.model_dir), value_head=cfg.algorithm == "ppo").train()

    sampler = SamplingWeights(cfg.train.zero_stage, lambda: load(up.model_dir))

    mean_prompt = round(sum(len(p.ids) for p in train) / max(len(train), 1))
    recipe = Recipe(
        experience_batches,
        PolicyLoss(cfg, kl),
        tokens_per_example=cfg.group_size * (mean_prompt + cfg.max_new_tokens),  # a prompt's rollouts, at most
        eval_fn=HeldOutRewards(val, scorer, up.tok, cfg, sampler) if val else None,
        rollout_fn=Rollouts(cfg, train, up.tok, reference, scorer, kl, sampler),
        updates_per_step=cfg.updates_per_step,
        state=kl,
    )
    trainer = Trainer(build_model, cfg.train, recipe, name="ppo", info=info, root=paths.root, tracker=tracker)
    summary, policy = trainer.train(paths.out / "history.jsonl")
    if policy is None:  # ranks other than 0
        return None

    folder = save(policy.lm, paths.out / "model", tokenizer_dir=up.tokenizer_dir, stop_tokens=STOP_TOKENS)
    metrics = {
        **summary,
        **al.data_metrics(loaded, 0, up.max_len),
        **{k: getattr(cfg, k) for k in ("init", "algorithm", "reward", "group_size")},
        "prompts_per_step": cfg.train.batch_size,
        "kl_coef_final": kl.coef,
        "seconds_per_step": summary["train_seconds"] / max(summary["steps_this_run"], 1),
        **curve_ends(paths.out / "history.jsonl"),
    }
    if cfg.sampling.prompts:
        policies = {cfg.init: reference.cpu(), "ppo": policy.lm}
        judge = reward_model.cpu() if reward_model is not None else RewardModel.load(reward_dir)
        metrics.update(compare_policies(policies, judge, up.tok, cfg.sampling, paths.out / "samples.jsonl"))
        metrics["reward_hacking"] = cfg.uses_rm and reward_hacking(metrics, cfg.init)
        tracker.log_artifact(paths.out / "samples.jsonl", "ppo")
    write_card(
        folder,
        stage="ppo",
        training=f"{cfg.algorithm} on the {cfg.reward} reward, KL β {cfg.kl_coef} to the starting policy "
        f"({cfg.train.max_steps} steps x {cfg.train.batch_size} prompts x {cfg.group_size} answers)",
        base=f"the {up.model_stage} stage's model (data/{up.model_stage}/model)",
        params=info,
        metrics=metrics,
    )
    tracker.log_artifact(paths.out / "quarantine.jsonl", "ppo")
    return metrics


def summary(m: dict, paths: StagePaths) -> list[str]:
    lines = [
        f"{m['algorithm']} on {m['reward']} from {m['init']}: {m['steps']:,} steps x {m['prompts_per_step']} prompts x "
        f"{m['group_size']} answers; {m['seconds_per_step']:.1f} s/step, rollouts "
        f"{m.get('rollout_tokens_per_s', float('nan')):,.0f} tokens/s",
        f"prompts: {m['train_examples']:,} train, {m['val_examples']:,} held out, {m['quarantined']:,} quarantined",
    ]
    lines += [f"quarantined {n:>6,}  {reason}" for reason, n in m["quarantined_by_reason"].items()]
    if "rollout_reward_first" in m:
        curve = "  ".join(
            f"{k} {m[f'rollout_{k}_first']:.3f} → {m[f'rollout_{k}_last']:.3f}"
            for k in ("reward", "checker", "rm", "kl")
            if f"rollout_{k}_first" in m
        )
        lines.append(f"rollouts, first → last logged step: {curve}")
    if "val_checker" in m:
        held = f"held-out prompts at the end: checker {m['val_checker']:.3f}"
        if "val_satisfaction" in m:
            held += f", satisfaction {m['val_satisfaction']:.1%}"
        lines.append(held + f", answers {m['val_response_length']:.0f} tokens, {m['val_finished']:.0%} ended")
    if "win_rate" in m:
        init = m["init"]
        lines.append(
            f"builtin held-out satisfaction ({m['eval_prompts']} prompts): {init} {m[f'{init}_satisfaction']:.1%} → "
            f"ppo {m['ppo_satisfaction']:.1%}; reward model: ppo beats {init} on {m['win_rate']:.1%} "
            f"({m[f'{init}_reward']:+.3f} → {m['ppo_reward']:+.3f}); KL {m['kl_to_reference']:.2f} nats"
        )
        if m["reward_hacking"]:
            lines.append("REWARD HACKING: the reward model's score rose while the checker's satisfaction fell")
    return lines + [f"model, samples.jsonl, quarantine.jsonl in {paths.out}"]


HEADLINE = (
    "sft_satisfaction",
    "ppo_satisfaction",
    "ppo_repeated_line_rate",
    "kl_to_reference",
    "rollout_reward_first",
    "rollout_reward_last",
    "reward_hacking",
    "seconds_per_step",
    "quarantined",
)
"""What metrics/ppo.json keeps (`dvc metrics diff`); every figure is in metrics/all/ppo.json."""


if __name__ == "__main__":
    training_main("ppo", PpoConfig, run, preflight, summary, HEADLINE)
