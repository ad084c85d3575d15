"""Policies answering the builtin held-out prompts side by side: the end evaluation of the dpo and ppo stages.

    metrics = compare_policies({"sft": reference, "dpo": policy}, reward_model, tok, cfg.sampling, samples_file)

Every policy answers the same builtin "test" prompts with the same sampling seed (tasks/common/alignment.py:
sample_answers); the answers are checked against their constraints (tasks/sources/examples.py), scored by the
reward model, and measured for degeneration (tasks/common/degeneration.py: repeated lines and n-grams, distinct-n,
words outside the story world's vocabulary). The first policy is the baseline: `win_rate` is the share of prompts
where the reward model scores the last policy's answer above the baseline's (ties 1/2) and `kl_to_reference` is
KL(last || baseline) summed along the last policy's own answers (an estimate of the sequence-level KL when sampling
at temperature 1).

It lives with the sources because the checker does (the builtin world's constraints); the tensor work is
tasks/common/alignment.py's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tasks.common import alignment as al
from tasks.common import degeneration
from tasks.common.dvcio import write_jsonl
from tasks.common.train_config import SamplingConfig
from tasks.sources import world
from tasks.sources.examples import check_answers, held_out_prompts


def compare_policies(
    policies: dict, reward_model, tok: al.ChatTokenizer, sampling: SamplingConfig, samples_file: Path
) -> dict:
    """Constraint satisfaction and mean reward of each policy's answers, the reward model's win rate of the last
    policy over the first, and the KL between them along the last one's answers; every answer to samples_file."""
    held_out = held_out_prompts(sampling.prompts, sampling.prompt_seed)
    names = list(policies)
    base, last = names[0], names[-1]
    metrics: dict = {"eval_prompts": len(held_out)}
    answers, rows, rewards = {}, {}, {}
    for name, model in policies.items():
        prompts = [h["prompt_messages"] for h in held_out]
        answers[name] = al.sample_answers(model, tok, prompts, sampling, f"{name} answers")
        texts = [tok.decode(a.ids) for a in answers[name]]
        scores, rows[name] = check_answers(held_out, texts, [a.finished for a in answers[name]])
        with torch.no_grad():
            rewards[name] = reward_scores(reward_model, answers[name], tok, sampling.batch_size)
        n = max(len(texts), 1)
        metrics.update(
            {
                f"{name}_satisfaction": scores["constraint_rate"],
                f"{name}_all_satisfied": scores["satisfied"],
                f"{name}_per_constraint": scores["per_constraint"],
                f"{name}_reward": sum(rewards[name]) / n,
                f"{name}_answer_tokens": sum(len(a.ids) for a in answers[name]) / n,
                **{f"{name}_{k}": v for k, v in degeneration.text_metrics(texts, world.vocabulary()).items()},
            }
        )
    with torch.no_grad():
        kl = kl_along(policies[last], policies[base], answers[last], tok, sampling.batch_size)
    wins = [1.0 if b > a else 0.5 if b == a else 0.0 for a, b in zip(rewards[base], rewards[last])]
    n = max(len(wins), 1)
    metrics.update({"win_rate": sum(wins) / n, "kl_to_reference": sum(kl) / n})
    out = []
    for name in names:
        out += [{"model": name, "reward": r, **row} for row, r in zip(rows[name], rewards[name])]
    write_jsonl(samples_file, out)
    return metrics


def _batches(answers: list[al.Answer], tok: al.ChatTokenizer, batch_size: int):
    for start in range(0, len(answers), batch_size):
        chunk = answers[start : start + batch_size]
        yield al.sequences_batch([a.prompt for a in chunk], [a.reply(tok.end_id) for a in chunk], tok.pad_id)


def reward_scores(reward_model, answers: list[al.Answer], tok: al.ChatTokenizer, batch_size: int) -> list[float]:
    """The reward model's score of each sampled answer."""
    return [r for batch in _batches(answers, tok, batch_size) for r in al.rewards_of(reward_model, batch).tolist()]


def kl_along(policy, reference, answers: list[al.Answer], tok: al.ChatTokenizer, batch_size: int) -> list[float]:
    """KL(policy || reference) summed along each sampled answer."""
    return [k for batch in _batches(answers, tok, batch_size) for k in al.token_kl(policy, reference, batch).tolist()]
