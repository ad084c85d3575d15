"""Training objectives shared by the stages: next-token CE (pretrain, SFT), Bradley-Terry (reward), DPO, PPO.

Conventions: ``logits`` (B,T,V) and ``targets`` (B,T) are aligned -- logits[:, t] scores targets[:, t], i.e.
targets are the input ids shifted left by one (what ``Llama.forward(idx, targets)`` expects). Masks are (B,T) with
1 where a position counts; a target of -100 never counts. Losses are computed in float32.

    loss = cross_entropy(logits, targets, loss_mask)                       # mean over counted positions
    lp = sequence_logprobs(logits, targets, response_mask)                 # (B,) summed response log-probs (DPO)
    loss = bradley_terry_loss(r_chosen, r_rejected)                        # reward model
    loss, r_c, r_r = dpo_loss(pol_c, pol_r, ref_c, ref_r, beta=0.1)        # DPO on sequence log-probs
    out = ppo_losses(logprobs, old_logprobs, advantages, values, old_values, returns, mask)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "IGNORE_INDEX",
    "cross_entropy",
    "token_logprobs",
    "sequence_logprobs",
    "bradley_terry_loss",
    "dpo_loss",
    "PPOLosses",
    "ppo_losses",
    "masked_mean",
    "gae_advantages",
]

IGNORE_INDEX = -100


def _counted_targets(targets: Tensor, mask: Tensor | None) -> Tensor:
    """targets with IGNORE_INDEX wherever mask == 0."""
    if mask is None:
        return targets
    if mask.shape != targets.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal targets shape {tuple(targets.shape)}")
    return targets.masked_fill(mask == 0, IGNORE_INDEX)


class _CrossEntropyFunction(torch.autograd.Function):
    """Mean CE over rows with target != -100, for logits (N,V) of any float dtype; a memory-lean F.cross_entropy.

    F.cross_entropy on (N,V) logits allocates an fp32 copy (under bf16), a log-softmax output, a zero-filled NLL
    gradient and a log-softmax gradient, each (N,V). This saves only the logits and the per-row logsumexp, works
    through the rows in chunks of about 4M elements, and allocates just the (N,V) gradient in the logits' dtype.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> Tensor:
        n_rows, vocab = logits.shape
        chunk = max(1, (1 << 22) // vocab)
        valid = targets != IGNORE_INDEX  # (N,)
        safe_targets = torch.where(valid, targets, 0)
        compute = torch.promote_types(logits.dtype, torch.float32)
        lse = torch.empty(n_rows, dtype=compute, device=logits.device)  # (N,)
        for start in range(0, n_rows, chunk):
            lse[start : start + chunk] = torch.logsumexp(logits[start : start + chunk].to(compute), dim=-1)
        target_logits = logits.gather(1, safe_targets[:, None]).squeeze(1).to(compute)  # (N,)
        count = valid.sum().clamp(min=1)
        loss = ((lse - target_logits) * valid).sum() / count
        ctx.save_for_backward(logits, lse, safe_targets, valid, count)
        ctx.chunk = chunk
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor) -> tuple[Tensor, None]:
        logits, lse, safe_targets, valid, count = ctx.saved_tensors
        row_scale = (grad_loss.to(lse.dtype) / count) * valid  # (N,) d loss / d nll_row
        grad = torch.empty_like(logits)  # (N,V)
        for start in range(0, logits.shape[0], ctx.chunk):
            end = start + ctx.chunk
            # d nll / d logits = softmax - one_hot(target)
            probs = (logits[start:end].to(lse.dtype) - lse[start:end, None]).exp_()  # (n,V)
            probs.scatter_add_(1, safe_targets[start:end, None], probs.new_full((probs.shape[0], 1), -1.0))
            grad[start:end] = probs.mul_(row_scale[start:end, None])
        return grad, None


def cross_entropy(logits: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean next-token CE over positions where mask == 1 and target != -100; 0 (with a gradient) if none count.

    logits (B,T,V) in any float dtype (computed in float32), targets (B,T) int, mask (B,T) or None.
    """
    targets = _counted_targets(targets, mask).reshape(-1)  # (B*T,)
    return _CrossEntropyFunction.apply(logits.reshape(-1, logits.shape[-1]), targets)


def token_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """log p(targets[b,t]) under logits[b,t], (B,T) float32; 0 where target == -100."""
    flat = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    )  # (B*T,) = -log p, 0 when ignored
    return -flat.view(targets.shape)


def sequence_logprobs(logits: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
    """Sum of log p(target) over counted positions per row, (B,): a response's log-likelihood for DPO."""
    return token_logprobs(logits, _counted_targets(targets, mask)).sum(dim=-1)


def bradley_terry_loss(r_chosen: Tensor, r_rejected: Tensor) -> Tensor:
    """-log sigmoid(r_chosen - r_rejected), averaged over pairs; r_* are (B,) scalar rewards."""
    return -F.logsigmoid(r_chosen.float() - r_rejected.float()).mean()


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """DPO (Rafailov et al. 2023) on summed sequence log-probs, each (B,).

    loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), averaged; with label_smoothing e (cDPO) the
    loss is (1-e) * that + e * the same with chosen and rejected swapped.
    Returns (loss, chosen_rewards, rejected_rewards); the rewards beta * (pi - ref) are detached, (B,) each.
    """
    chosen_logratio = policy_chosen.float() - ref_chosen.float()
    rejected_logratio = policy_rejected.float() - ref_rejected.float()
    margin = beta * (chosen_logratio - rejected_logratio)
    loss = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return loss.mean(), beta * chosen_logratio.detach(), beta * rejected_logratio.detach()


def masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of x over mask == 1 (all of x when mask is None); 0 when nothing counts."""
    if mask is None:
        return x.mean()
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


class PPOLosses(NamedTuple):
    """PPO objective pieces; add them as ``policy_loss + vf_coef * value_loss``."""

    policy_loss: Tensor
    """Clipped surrogate: mean of max(-A * ratio, -A * clip(ratio, 1-eps, 1+eps))."""
    value_loss: Tensor
    """0.5 * mean of max((V - R)^2, (V_clipped - R)^2)."""
    clip_fraction: Tensor
    """Share of counted tokens whose ratio left [1-eps, 1+eps] (detached)."""
    approx_kl: Tensor
    """0.5 * mean (log ratio)^2, a KL(old || new) estimate (detached)."""


def ppo_losses(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor | None = None,
    clip_eps: float = 0.2,
    value_clip: float = 0.2,
) -> PPOLosses:
    """PPO clipped policy loss and clipped value loss, per token; all inputs (B,T) (or any equal shape)."""
    log_ratio = logprobs.float() - old_logprobs.float()
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    policy_loss = masked_mean(torch.maximum(unclipped, clipped), mask)

    values_clipped = old_values + (values - old_values).clamp(-value_clip, value_clip)
    value_err = torch.maximum((values - returns) ** 2, (values_clipped - returns) ** 2)
    value_loss = 0.5 * masked_mean(value_err, mask)

    with torch.no_grad():
        clip_fraction = masked_mean(((ratio - 1.0).abs() > clip_eps).float(), mask)
        approx_kl = masked_mean(0.5 * log_ratio**2, mask)
    return PPOLosses(policy_loss, value_loss, clip_fraction, approx_kl)


def gae_advantages(
    rewards: Tensor, values: Tensor, mask: Tensor | None = None, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over (B,T) per-token rewards/values; returns (advantages, returns).

    Positions with mask == 0 (right padding) end the episode: nothing flows back across them and their
    advantages are 0. returns = advantages + values.
    """
    B, T = rewards.shape
    mask = torch.ones_like(rewards) if mask is None else mask.to(rewards.dtype)
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        next_alive = mask[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        next_value = values[:, t + 1] * next_alive if t + 1 < T else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * next_alive * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask
