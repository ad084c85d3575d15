"""RewardModel: a Llama backbone with a scalar head read at each sequence's last real token; PolicyWithValue: a
Llama policy whose backbone also feeds a per-token value head (PPO's critic).

    rm = RewardModel.from_backbone(load("out/sft/model"))       # SFT weights + a fresh head
    rewards = rm(idx, attention_mask)                             # (B,) one scalar per sequence
    loss = bradley_terry_loss(rm(chosen, cm), rm(rejected, rm_mask))
    rm.save("out/reward/model", tokenizer_dir=...)                # HF backbone folder + reward_head.safetensors
    rm = RewardModel.load("out/reward/model")

    policy = PolicyWithValue(load("out/sft/model"), value_head=True)
    logits, values = policy(idx)                                  # (B,T,V) and (B,T) (values None without a head)

The backbone folder stays a loadable HF Llama (its lm_head is unused here and kept only when untied);
``reward_head.safetensors`` holds the head's weight (1,D) and bias (1,).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from model.config import ModelConfig
from model.hf import load as load_llama
from model.hf import save as save_llama
from model.llama import Llama

__all__ = ["RewardModel", "PolicyWithValue", "last_token_index", "HEAD_WEIGHTS_NAME"]

HEAD_WEIGHTS_NAME = "reward_head.safetensors"


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index of the last 1 in each row of a (B,T) mask, (B,); works for left and right padding."""
    T = attention_mask.shape[1]
    return T - 1 - attention_mask.flip(dims=[1]).long().argmax(dim=1)


class RewardModel(nn.Module):
    """Scalar reward r(x) = head(h_last), h = the backbone's final-norm hidden state at the last real token."""

    def __init__(self, cfg_or_backbone: ModelConfig | Llama):
        super().__init__()
        backbone = cfg_or_backbone if isinstance(cfg_or_backbone, Llama) else Llama(cfg_or_backbone)
        self.backbone = backbone
        self.cfg = backbone.cfg
        self.head = nn.Linear(self.cfg.d_model, 1)
        nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(self.cfg.d_model + 1))
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_backbone(cls, backbone: Llama) -> RewardModel:
        """Wrap a trained Llama (usually the SFT model) with a freshly initialised head."""
        return cls(backbone)

    def forward(self, idx: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Rewards (B,) for token ids idx (B,T); attention_mask (B,T) marks real tokens (1) vs padding (0)."""
        h = self.backbone.hidden_states(idx, attention_mask)  # (B,T,D)
        if attention_mask is None:
            last = h[:, -1, :]  # (B,D)
        else:
            rows = torch.arange(idx.shape[0], device=idx.device)
            last = h[rows, last_token_index(attention_mask)]  # (B,D)
        return self.head(last).squeeze(-1)  # (B,)

    def save(
        self,
        out_dir: str | Path,
        tokenizer_dir: str | Path | None = None,
        dtype: torch.dtype = torch.float32,
        **token_ids: int | None,
    ) -> Path:
        """HF Llama folder for the backbone plus reward_head.safetensors."""
        out = save_llama(self.backbone, out_dir, tokenizer_dir=tokenizer_dir, dtype=dtype, **token_ids)
        head = {
            "weight": self.head.weight.detach().to("cpu", dtype).contiguous(),
            "bias": self.head.bias.detach().to("cpu", dtype).contiguous(),
        }
        save_file(head, str(out / HEAD_WEIGHTS_NAME), metadata={"format": "pt"})
        return out

    @classmethod
    def load(
        cls, path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> RewardModel:
        """Inverse of save; the model comes back in eval mode."""
        head_file = Path(path) / HEAD_WEIGHTS_NAME
        if not head_file.is_file():
            raise FileNotFoundError(f"{head_file} not found: {path} is not a saved RewardModel")
        model = cls(load_llama(path, device=device, dtype=dtype))
        head = load_file(str(head_file))
        want = {"weight": (1, model.cfg.d_model), "bias": (1,)}
        got = {k: tuple(v.shape) for k, v in head.items()}
        if got != want:
            raise ValueError(f"{head_file}: expected tensors {want}, found {got}")
        model.head.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in head.items()})
        return model.to(device=device, dtype=dtype).eval()


class PolicyWithValue(nn.Module):
    """A causal LM policy with an optional scalar value head on the same final hidden states.

    One backbone serves both: one forward gives the token logits and the values, one optimizer (one DeepSpeed
    engine) trains both, and memory is that of one model. The cost is that the value loss also moves the policy's
    backbone (weighted by PPO's vf_coef); a separate critic (OpenRLHF, DeepSpeed-Chat) doubles the forwards and the
    optimizer state. GRPO and RLOO need no value head (value_head=False).
    """

    def __init__(self, lm: Llama, value_head: bool):
        super().__init__()
        self.lm, self.cfg = lm, lm.cfg
        self.value_head = nn.Linear(self.cfg.d_model, 1) if value_head else None
        if self.value_head is not None:
            nn.init.normal_(self.value_head.weight, std=1.0 / math.sqrt(self.cfg.d_model + 1))
            nn.init.zeros_(self.value_head.bias)

    def forward(self, idx: Tensor) -> tuple[Tensor, Tensor | None]:
        """(logits (B,T,V), values (B,T) in float32 or None) for right-padded token ids idx (B,T)."""
        h = self.lm.hidden_states(idx)  # (B,T,D)
        values = self.value_head(h).squeeze(-1).float() if self.value_head is not None else None
        return self.lm.lm_head(h), values

    def optim_groups(self, weight_decay: float) -> list[dict]:
        """The backbone's AdamW groups, plus the value head (no weight decay)."""
        groups = self.lm.optim_groups(weight_decay)
        if self.value_head is not None:
            groups.append({"params": list(self.value_head.parameters()), "weight_decay": 0.0})
        return groups
