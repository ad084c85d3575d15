"""RewardModel: reads the last real token under any padding, round-trips through save/load, learns a preference."""

import pytest
import torch

from model.config import ModelConfig
from model.heads import RewardModel, last_token_index
from model.hf import load
from model.llama import Llama
from model.losses import bradley_terry_loss


def make(seed: int = 0) -> RewardModel:
    torch.manual_seed(seed)
    return RewardModel(ModelConfig.from_preset("tiny")).eval()


def test_last_token_index():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 4, 4]


def test_padding_does_not_change_rewards():
    rm = make()
    a, b = [5, 6, 7, 8, 9, 10], [11, 12, 13]
    with torch.no_grad():
        alone = torch.cat([rm(torch.tensor([a])), rm(torch.tensor([b]))])
        right = rm(torch.tensor([a, b + [0, 0, 0]]), torch.tensor([[1] * 6, [1] * 3 + [0] * 3]))
        left = rm(torch.tensor([a, [0, 0, 0] + b]), torch.tensor([[1] * 6, [0] * 3 + [1] * 3]))
    assert alone.shape == (2,)
    assert torch.allclose(right, alone, atol=1e-5) and torch.allclose(left, alone, atol=1e-5)


def test_save_load_round_trip(tmp_path):
    rm = make()
    idx = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))
    rm.save(tmp_path)
    back = RewardModel.load(tmp_path)
    with torch.no_grad():
        assert torch.equal(rm(idx), back(idx))
    assert isinstance(load(tmp_path), Llama)  # the folder stays a plain HF Llama for other tools
    with pytest.raises(FileNotFoundError, match="not a saved RewardModel"):
        RewardModel.load(tmp_path / "missing")


def test_from_backbone_learns_a_preference():
    torch.manual_seed(0)
    rm = RewardModel.from_backbone(Llama(ModelConfig.from_preset("tiny"))).train()
    chosen, rejected = torch.tensor([[1, 2, 3, 4]] * 4), torch.tensor([[1, 2, 3, 9]] * 4)
    opt = torch.optim.AdamW(rm.parameters(), lr=1e-3)
    for _ in range(30):
        loss = bradley_terry_loss(rm(chosen), rm(rejected))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1
    assert rm.backbone.tok_emb.weight.grad is not None  # the backbone trains too
