"""Llama: causality, KV-cache decoding equals a full forward (also left-padded batches), losses, masks, init."""

import math

import pytest
import torch
import torch.nn.functional as F

from model.config import ModelConfig
from model.llama import KVCache, Llama

ATOL = 1e-5


def make(seed: int = 0, **overrides) -> Llama:
    torch.manual_seed(seed)
    return Llama(ModelConfig.from_preset("tiny", **overrides)).eval()


def tokens(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 512, shape, generator=torch.Generator().manual_seed(seed))


def test_output_shapes():
    model = make()
    idx = tokens(3, 10)
    assert model(idx)[0].shape == (3, 1, 512)
    assert model(idx, all_logits=True)[0].shape == (3, 10, 512)
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 10, 512) and loss.ndim == 0
    assert model.hidden_states(idx).shape == (3, 10, 64)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_causal(n_kv_heads):
    model = make(n_kv_heads=n_kv_heads)
    idx = tokens(2, 24)
    changed = idx.clone()
    changed[:, 15] = (changed[:, 15] + 1) % 512
    with torch.no_grad():
        a, _ = model(idx, all_logits=True)
        b, _ = model(changed, all_logits=True)
    assert torch.equal(a[:, :15], b[:, :15])  # nothing before the change moves
    assert not torch.allclose(a[:, 15:], b[:, 15:])  # and the change is seen from there on


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_kv_cache_decode_matches_full_forward(n_kv_heads):
    model = make(n_kv_heads=n_kv_heads)
    idx = tokens(2, 30)
    with torch.no_grad():
        full, _ = model(idx, all_logits=True)  # (2,30,V)
        cache = KVCache.for_model(model, batch_size=2, max_len=30)
        logits, _ = model(idx[:, :8], kv_cache=cache, start_pos=0, all_logits=True)  # prefill 8
        assert torch.allclose(logits, full[:, :8], atol=ATOL)
        for pos in range(8, 20):  # one token at a time
            logits, _ = model(idx[:, pos : pos + 1], kv_cache=cache, start_pos=pos)
            assert torch.allclose(logits[:, 0], full[:, pos], atol=ATOL), pos
        logits, _ = model(idx[:, 20:30], kv_cache=cache, start_pos=20, all_logits=True)  # chunked prefill
        assert torch.allclose(logits, full[:, 20:30], atol=ATOL)


@pytest.mark.parametrize("padded", [False, True])
def test_decode_step_equals_forward(padded):
    model = make(n_kv_heads=1)
    idx = tokens(2, 12)
    mask = torch.ones(2, 12, dtype=torch.long)
    if padded:
        mask[1, :4] = 0
    with torch.inference_mode():
        a, b = KVCache.for_model(model, 2, 12), KVCache.for_model(model, 2, 12)
        model(idx[:, :8], kv_cache=a, start_pos=0, attention_mask=mask[:, :8])
        model(idx[:, :8], kv_cache=b, start_pos=0, attention_mask=mask[:, :8])
        for pos in range(8, 12):
            lean = model.decode_step(idx[:, pos : pos + 1], a, pos, mask[:, : pos + 1])
            full, _ = model(idx[:, pos : pos + 1], kv_cache=b, start_pos=pos, attention_mask=mask[:, : pos + 1])
            assert lean.shape == (2, 1, 512) and torch.allclose(lean, full, atol=ATOL)


def test_left_padded_batch_decodes_like_each_prompt_alone():
    model = make()
    prompts = [tokens(1, 9, seed=2)[0], tokens(1, 4, seed=3)[0], tokens(1, 6, seed=4)[0]]
    continuation = tokens(3, 7, seed=5)  # the same forced next tokens for every row
    P, steps = 9, 7
    idx = torch.zeros(3, P, dtype=torch.long)
    mask = torch.ones(3, P + steps, dtype=torch.long)
    for row, p in enumerate(prompts):
        idx[row, P - len(p) :] = p
        mask[row, : P - len(p)] = 0
    with torch.no_grad():
        cache = KVCache.for_model(model, batch_size=3, max_len=P + steps)
        batched = [model(idx, kv_cache=cache, start_pos=0, attention_mask=mask[:, :P])[0][:, 0]]
        for i in range(steps - 1):
            out, _ = model(
                continuation[:, i : i + 1], kv_cache=cache, start_pos=P + i, attention_mask=mask[:, : P + i + 1]
            )
            batched.append(out[:, 0])
        for row, p in enumerate(prompts):
            alone, _ = model(torch.cat([p, continuation[row, : steps - 1]])[None], all_logits=True)
            expected = alone[0, len(p) - 1 :]  # logits after the prompt, then after each forced token
            got = torch.stack([b[row] for b in batched])
            assert torch.allclose(got, expected, atol=ATOL), row


def test_right_padding_mask_leaves_real_tokens_unchanged():
    model = make()
    idx = tokens(1, 12)
    padded = torch.cat([idx, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 12), torch.zeros(1, 5)], dim=1).long()
    with torch.no_grad():
        a = model.hidden_states(idx)
        b = model.hidden_states(padded, attention_mask=mask)
    assert torch.allclose(a, b[:, :12], atol=ATOL)


def test_loss_is_the_mean_cross_entropy_over_targets_not_ignored():
    model = make()
    idx, targets = tokens(2, 16, seed=6), tokens(2, 16, seed=7)
    logits, plain = model(idx, targets)
    per_token = F.cross_entropy(logits.reshape(-1, 512), targets.reshape(-1), reduction="none").view(2, 16)
    assert plain.item() == pytest.approx(per_token.mean().item(), abs=1e-6)
    ignored = targets.clone()
    ignored[:, :10] = -100  # "response" tokens only, as SFT's targets are
    _, with_ignore = model(idx, ignored)
    assert with_ignore.item() == pytest.approx(per_token[:, 10:].mean().item(), abs=1e-6)
    assert abs(plain.item() - math.log(512)) < 0.5  # untrained: near uniform


def test_sequence_too_long_is_refused():
    model = make()
    with pytest.raises(ValueError, match="max_seq_len=128"):
        model(tokens(1, 129))


def test_dropout_active_in_training_only():
    model = make(dropout=0.3)
    idx = tokens(2, 16)
    model.train()
    assert not torch.equal(model(idx, all_logits=True)[0], model(idx, all_logits=True)[0])
    model.eval()
    assert torch.equal(model(idx, all_logits=True)[0], model(idx, all_logits=True)[0])


def test_gradient_checkpointing_gives_same_gradients():
    idx = tokens(2, 16)
    grads = []
    for ckpt in (False, True):
        model = make().train()
        model.gradient_checkpointing = ckpt
        model(idx, idx)[1].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_init_scales_residual_projections_and_ties_embeddings():
    model = make(n_layers=8, d_model=256, n_heads=4, n_kv_heads=4)
    assert model.lm_head.weight is model.tok_emb.weight
    assert model.blocks[0].attn.wq.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].attn.wo.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert model.blocks[0].ffn.w_down.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert torch.equal(model.norm.weight, torch.ones(256))
    assert "rope_cos" not in model.state_dict()  # recomputed, never checkpointed
    untied = make(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.tok_emb.weight


def test_trains_on_a_repeating_sequence():
    model = make().train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx = torch.arange(33).remainder(8)[None].repeat(4, 1)  # 0..7 repeated: fully predictable after 8 tokens
    for _ in range(60):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5
