"""The reward stage on the tiny test world: Bradley-Terry training of the SFT backbone + scalar head, held-out pair
accuracy on builtin pairs, the saved RewardModel, and HH-RLHF transcripts end to end."""

from __future__ import annotations

import json

import pytest
import torch

from model import RewardModel
from tasks import reward
from tasks.common import alignment as al
from tasks.common.train_config import AlignmentData
from tasks.sources import examples
from tests.alignment_fixtures import cached_stage, hh_rlhf_smoke, reward_config, run_stage, sft_config, stage_root


def bt_loss_by_hand(chosen: list[float], rejected: list[float]) -> float:
    import math

    return sum(math.log1p(math.exp(-(c - r))) for c, r in zip(chosen, rejected)) / len(chosen)


def test_bradley_terry_loss_fn_reports_accuracy_and_margin():
    class Scores(torch.nn.Module):
        """Reward = the first token id of the row (a stand-in backbone with known outputs)."""

        def forward(self, ids, attention_mask):
            return ids[:, 0].float()

    batch = al.PairBatch(
        torch.tensor([[3, 1], [5, 1], [2, 1], [7, 1]]),
        torch.ones(4, 2, dtype=torch.long),
        torch.ones(4, 2, dtype=torch.long),
    )
    loss, m = reward.bradley_terry(Scores(), batch.as_dict())  # pairs (3 vs 2), (5 vs 7)
    assert loss.item() == pytest.approx(bt_loss_by_hand([3, 5], [2, 7]))
    assert m["accuracy"].item() == 0.5 and m["margin"].item() == pytest.approx(-0.5)


@pytest.mark.slow
def test_reward_model_ranks_held_out_builtin_pairs(tmp_path_factory):
    cached_stage(tmp_path_factory, "sft", sft_config())
    root, m = cached_stage(tmp_path_factory, "reward", reward_config())
    assert m["val_pairs"] == 200 and m["rows_in"] == m["train_examples"] + m["val_examples"] + m["quarantined"]
    # Pairs whose rejected answer is visibly wrong on its own (cut off, too long, no title) are ranked almost
    # perfectly. Pairs that differ in one word the prompt asked for (name, animal, place, object, feeling, last
    # word) need the reward head to compare the reply with the prompt: this 2-layer, 128-wide backbone stays near
    # chance on them within a test budget (60 -> 300 steps measured: no gain), so the overall figure is ~0.6, not
    # the 0.9 the alignment issue asks for (docs/BENCHMARKS.md, "## Alignment").
    by_kind = m["accuracy_by_broken"]
    assert min(by_kind["complete"], by_kind["max_sentences"], by_kind["title"]) >= 0.85, by_kind  # ~20 pairs each
    assert m["accuracy"] >= 0.58, by_kind  # 200 pairs: chance is 0.50 +- 0.035
    assert m["margin"] > 0
    # (m["val_accuracy"], the trainer's last eval on the same pairs, runs under bf16 autocast: near-tie pairs of
    # the copy kinds flip sign there, so it is not compared with the fp32 figure above)

    # the saved model reproduces the stage's held-out ranking (truncated/too-long/untitled pairs, 16 at a time)
    rm = RewardModel.load(root / "data" / "reward" / "model")
    tok = al.load_tokenizer(root / "data" / "reward" / "model")
    pairs = examples.load_preference_data(AlignmentData(["builtin:preferences"], 0, 200, 1337, 0.0), root).val
    visible = [p for p in pairs if examples.broken_constraint(p) in ("complete", "max_sentences", "title")][:16]
    batch = al.collate_pairs([al.encode_pair(tok, p, rm.cfg.max_seq_len) for p in visible], tok.pad_id)
    with torch.no_grad():
        r = rm(batch.ids, batch.attention_mask)  # (2n,) chosen rows first, then rejected
    n = len(visible)
    assert (r[:n] > r[n:]).float().mean().item() >= 0.85


@pytest.mark.slow
def test_reward_runs_on_hh_rlhf_transcripts(tmp_path, tmp_path_factory):
    hh = hh_rlhf_smoke(val_fraction=0.02)
    world, _ = cached_stage(tmp_path_factory, "sft", sft_config())
    root = stage_root(tmp_path, world, "sft")
    m = run_stage("reward", reward_config(**hh), root)
    assert m["rows_in"] == 1812 and m["rows_in"] == m["train_examples"] + m["val_examples"] + m["quarantined"]
    assert m["val_examples"] > 10 and m["steps"] == 2 and 0.0 <= m["accuracy"] <= 1.0
    assert m["truncated"] > 0 and m["accuracy_by_broken"] == {}
    quarantine = [json.loads(line) for line in (root / "data" / "reward" / "quarantine.jsonl").read_text().splitlines()]
    assert len(quarantine) == m["quarantined"]
    assert RewardModel.load(root / "data" / "reward" / "model").cfg.max_seq_len == 320
