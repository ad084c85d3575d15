"""CUDA paths of model/: bf16 training step and KV-cache generation (skip themselves without a GPU)."""

import pytest
import torch

from model.config import ModelConfig
from model.generate import generate
from model.llama import Llama

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_bf16_step_tracks_fp32_and_generation_matches_cpu():
    torch.manual_seed(0)
    cpu = Llama(ModelConfig.from_preset("tiny")).eval()
    gpu = Llama(ModelConfig.from_preset("tiny")).cuda().eval()
    gpu.load_state_dict(cpu.state_dict())
    idx = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        ref, _ = cpu(idx, all_logits=True)
        fp32, _ = gpu(idx.cuda(), all_logits=True)
        bf16, _ = gpu.to(torch.bfloat16)(idx.cuda(), all_logits=True)
    assert (fp32.cpu() - ref).abs().max().item() < 1e-3
    assert (bf16.float().cpu() - ref).abs().max().item() < 0.1
    gpu.float().train()
    _, loss = gpu(idx.cuda(), idx.cuda())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gpu.parameters())
    gpu.eval()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    for prompt, new in zip(prompts, generate(gpu, prompts, 16, temperature=0)):
        assert len(new) == 16
        with torch.no_grad():  # every greedy pick on the GPU is an argmax (up to rounding) of the CPU model
            logits, _ = cpu(torch.tensor([prompt + new]), all_logits=True)
        picked = logits[0, len(prompt) - 1 : -1].gather(-1, torch.tensor(new)[:, None]).squeeze(-1)
        assert (logits[0, len(prompt) - 1 : -1].max(-1).values - picked).max().item() < 1e-3
