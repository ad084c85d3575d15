"""CUDA paths (skip themselves without a GPU): the bf16 training step and KV-cache generation, the SDPA kernel chosen,
the Trainer on NCCL at ZeRO-2/3 on one rank and, with 2 GPUs, 2 ranks. `python3 bench/gpu_check.py` runs them."""

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


# ------------------------------------------------------------------------------------------------ kernels and ranks


def test_flash_sdpa_kernel_is_the_one_chosen_for_training_shapes():
    """bf16, causal, no mask tensor, head_dim 64 (the 125m preset's attention): SDPA must pick a fused flash-type
    kernel (FlashAttention, or cuDNN's flash implementation), never the math fallback that materialises T x T."""
    from torch.profiler import ProfilerActivity, profile

    cfg = ModelConfig.from_preset("125m", n_layers=2, vocab_size=4096)
    model = Llama(cfg).cuda().to(torch.bfloat16).train()
    idx = torch.randint(0, cfg.vocab_size, (2, 1024), device="cuda")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        _, loss = model(idx, idx)
        loss.backward()
        torch.cuda.synchronize()
    ops = {e.key for e in prof.key_averages()}
    sdpa = sorted(op for op in ops if op.startswith("aten::_scaled_dot_product_") and "attention" in op)
    print(f"SDPA kernel: {', '.join(sdpa) or 'none seen'}")
    assert any("flash" in op or "cudnn" in op for op in sdpa), sdpa
    assert not any(op.startswith("aten::_scaled_dot_product_attention_math") for op in sdpa), sdpa


def test_one_rank_zero2_and_zero3_train_alike_on_nccl(tmp_path):
    """The Trainer on one GPU (NCCL world of one): ZeRO-2 (built on the device) and ZeRO-3 (built inside
    deepspeed.zero.Init) start from the same weights and follow the same curve, and the loss falls."""
    from bench.gpu_check import synthetic_run

    runs = {z: synthetic_run("tiny", 20, 4, 64, tmp_path, zero_stage=z, precision="fp32", name=f"z{z}") for z in (2, 3)}
    for run in runs.values():
        assert run["device"].startswith("cuda") and run["last_loss"] < 0.7 * run["first_loss"], run["losses"]
    assert runs[3]["losses"] == pytest.approx(runs[2]["losses"], rel=1e-3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_ranks_on_nccl_follow_one_rank_with_accumulation(tmp_path, zero_stage):
    from bench.gpu_check import launch_two_ranks, synthetic_run

    two = launch_two_ranks(zero_stage, tmp_path)
    one = synthetic_run("tiny", 20, 4, 64, tmp_path, zero_stage=zero_stage, accum=2, precision="fp32", name="one")
    assert two["world"] == 2 and two["losses"] == pytest.approx(one["losses"], rel=1e-3)
