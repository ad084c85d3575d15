"""model/losses.py against numbers worked out by hand (see each test's comment), never against itself."""

import math

import pytest
import torch

from model.losses import (
    bradley_terry_loss,
    cross_entropy,
    dpo_loss,
    gae_advantages,
    masked_mean,
    ppo_losses,
    sequence_logprobs,
    token_logprobs,
)

LN3 = math.log(3.0)


def _three_positions():
    """One row, V=2. Position 0: logits (0,0) -> p=(1/2,1/2); positions 1, 2: (ln3, 0) -> p=(3/4,1/4)."""
    logits = torch.tensor([[[0.0, 0.0], [LN3, 0.0], [LN3, 0.0]]])  # (1,3,2)
    targets = torch.tensor([[0, 1, 0]])  # -log p: ln2, ln4, ln(4/3)
    return logits, targets


def test_cross_entropy_hand_computed():
    logits, targets = _three_positions()
    # all three: (ln2 + ln4 + ln(4/3)) / 3 = ln(32/3) / 3
    assert cross_entropy(logits, targets).item() == pytest.approx(0.7890413, abs=1e-6)
    # mask out position 1: (ln2 + ln(4/3)) / 2 = 0.4904146
    mask = torch.tensor([[1, 0, 1]])
    assert cross_entropy(logits, targets, mask).item() == pytest.approx(0.4904146, abs=1e-6)
    # -100 targets are ignored exactly like mask == 0
    ignored = torch.tensor([[0, -100, 0]])
    assert cross_entropy(logits, ignored).item() == pytest.approx(0.4904146, abs=1e-6)


def test_cross_entropy_nothing_counted_is_zero_not_nan():
    logits, targets = _three_positions()
    logits.requires_grad_(True)
    loss = cross_entropy(logits, targets, torch.zeros_like(targets))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()


def test_token_and_sequence_logprobs_hand_computed():
    logits, targets = _three_positions()
    lp = token_logprobs(logits, targets)  # ln(1/2), ln(1/4), ln(3/4)
    assert lp.tolist()[0] == pytest.approx([-0.6931472, -1.3862944, -0.2876821], abs=1e-6)
    # response = positions 1, 2: ln(1/4) + ln(3/4) = ln(3/16)
    seq = sequence_logprobs(logits, targets, torch.tensor([[0, 1, 1]]))
    assert seq.shape == (1,) and seq.item() == pytest.approx(-1.6739764, abs=1e-6)


def test_bradley_terry_hand_computed():
    # pairs: margin 2 -> ln(1 + e^-2) = 0.1269280; margin 0 -> ln 2 = 0.6931472; mean 0.4100376
    loss = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0]))
    assert loss.item() == pytest.approx(0.4100376, abs=1e-6)
    # swapping chosen and rejected makes it worse: ln(1 + e^2) = 2.1269280 for the first pair
    swapped = bradley_terry_loss(torch.tensor([0.0]), torch.tensor([2.0]))
    assert swapped.item() == pytest.approx(2.1269280, abs=1e-6)


def test_dpo_hand_computed():
    # log-ratios: chosen -10 - (-12) = 2, rejected -20 - (-15) = -5; margin 0.1 * 7 = 0.7
    # loss = ln(1 + e^-0.7) = 0.4031860; rewards 0.1 * 2 = 0.2 and 0.1 * -5 = -0.5
    loss, r_c, r_r = dpo_loss(
        torch.tensor([-10.0]), torch.tensor([-20.0]), torch.tensor([-12.0]), torch.tensor([-15.0]), beta=0.1
    )
    assert loss.item() == pytest.approx(0.4031860, abs=1e-6)
    assert r_c.item() == pytest.approx(0.2, abs=1e-6) and r_r.item() == pytest.approx(-0.5, abs=1e-6)
    # cDPO with e = 0.1: 0.9 ln(1 + e^-0.7) + 0.1 ln(1 + e^0.7) = ln(1 + e^-0.7) + 0.1 * 0.7 = 0.4731860
    smoothed, _, _ = dpo_loss(
        torch.tensor([-10.0]),
        torch.tensor([-20.0]),
        torch.tensor([-12.0]),
        torch.tensor([-15.0]),
        beta=0.1,
        label_smoothing=0.1,
    )
    assert smoothed.item() == pytest.approx(0.4731860, abs=1e-6)


def test_dpo_gradient_pushes_chosen_up_rejected_down():
    pol_c, pol_r = torch.tensor([-10.0], requires_grad=True), torch.tensor([-20.0], requires_grad=True)
    loss, _, _ = dpo_loss(pol_c, pol_r, torch.tensor([-12.0]), torch.tensor([-15.0]), beta=0.1)
    loss.backward()
    # d/d pol_c = -beta * sigmoid(-0.7) = -0.1 * 0.3318122
    assert pol_c.grad.item() == pytest.approx(-0.03318122, abs=1e-6)
    assert pol_r.grad.item() == pytest.approx(0.03318122, abs=1e-6)


def test_ppo_policy_loss_hand_computed():
    # ratios 1.5, 0.5, 0.5, 1.0 with advantages +1, +1, -1, +2 and eps 0.2:
    #   max(-1.5, -1.2) = -1.2 ; max(-0.5, -0.8) = -0.5 ; max(0.5, 0.8) = 0.8 ; max(-2, -2) = -2 -> mean -0.725
    ratios = torch.tensor([1.5, 0.5, 0.5, 1.0])
    old = torch.tensor([-1.0, -2.0, -3.0, -4.0])
    adv = torch.tensor([1.0, 1.0, -1.0, 2.0])
    zeros = torch.zeros(4)
    out = ppo_losses(old + ratios.log(), old, adv, zeros, zeros, zeros, clip_eps=0.2)
    assert out.policy_loss.item() == pytest.approx(-0.725, abs=1e-6)
    assert out.clip_fraction.item() == pytest.approx(0.75, abs=1e-6)  # the first three left [0.8, 1.2]
    # 0.5 * mean(ln(1.5)^2, ln(0.5)^2, ln(0.5)^2, 0) = 0.1406635
    assert out.approx_kl.item() == pytest.approx(0.1406635, abs=1e-6)
    # masking out the last token: (-1.2 - 0.5 + 0.8) / 3 = -0.3
    masked = ppo_losses(old + ratios.log(), old, adv, zeros, zeros, zeros, torch.tensor([1, 1, 1, 0]))
    assert masked.policy_loss.item() == pytest.approx(-0.3, abs=1e-6)


def test_ppo_value_loss_hand_computed():
    # token 1: v=1, old=0.5, R=0: clipped v = 0.7; max(1, 0.49) = 1
    # token 2: v=1, old=0,   R=2: clipped v = 0.2; max(1, 3.24) = 3.24     -> 0.5 * mean = 1.06
    values, old_values, returns = torch.tensor([1.0, 1.0]), torch.tensor([0.5, 0.0]), torch.tensor([0.0, 2.0])
    zeros = torch.zeros(2)
    out = ppo_losses(zeros, zeros, zeros, values, old_values, returns, value_clip=0.2)
    assert out.value_loss.item() == pytest.approx(1.06, abs=1e-6)


def test_masked_mean_and_gae_hand_computed():
    assert masked_mean(torch.tensor([1.0, 2.0, 9.0]), torch.tensor([1, 1, 0])).item() == pytest.approx(1.5)
    # gamma 1, lambda 0.5, rewards (0, 0, 1), values (0.5, 0.6, 0.7):
    #   deltas: 0.6-0.5 = 0.1, 0.7-0.6 = 0.1, 1-0.7 = 0.3 ; A2 = 0.3, A1 = 0.1 + 0.5*0.3 = 0.25, A0 = 0.1 + 0.125
    # second row is right-padded after two tokens: A1 = 1 - 0.6 = 0.4, A0 = 0.1 + 0.5*0.4 = 0.3, A2 = 0
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [0.5, 0.6, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.5)
    assert adv.tolist()[0] == pytest.approx([0.225, 0.25, 0.3], abs=1e-6)
    assert adv.tolist()[1] == pytest.approx([0.3, 0.4, 0.0], abs=1e-6)
    assert ret.tolist()[0] == pytest.approx([0.725, 0.85, 1.0], abs=1e-6)
    assert ret.tolist()[1] == pytest.approx([0.8, 1.0, 0.0], abs=1e-6)
