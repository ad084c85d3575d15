"""KV-cache generation: greedy equals recomputing the whole sequence, batches equal single prompts, seeds repeat."""

import pytest
import torch

from model.config import ModelConfig
from model.generate import generate, sample_next, stream
from model.llama import Llama

PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [8, 9], [10, 11, 12, 13]]


@pytest.fixture(scope="module")
def model() -> Llama:
    torch.manual_seed(0)
    return Llama(ModelConfig.from_preset("tiny", n_kv_heads=2)).eval()


def greedy_without_cache(model: Llama, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([seq]))
            seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt) :]


def test_greedy_matches_recompute_and_batch_matches_single(model):
    batched = generate(model, PROMPTS, max_new_tokens=24, temperature=0)
    for prompt, got in zip(PROMPTS, batched):
        assert got == greedy_without_cache(model, prompt, 24)
        assert got == generate(model, [prompt], max_new_tokens=24, temperature=0)[0]


def test_seeded_sampling_is_reproducible(model):
    kwargs = dict(max_new_tokens=20, temperature=1.0, top_k=100, top_p=0.95)
    a = generate(model, PROMPTS, seed=7, **kwargs)
    assert a == generate(model, PROMPTS, seed=7, **kwargs)
    assert a != generate(model, PROMPTS, seed=8, **kwargs)
    assert list(stream(model, PROMPTS[0], seed=7, **kwargs)) == generate(model, PROMPTS[:1], seed=7, **kwargs)[0]


def test_stop_tokens_end_rows_and_are_excluded(model):
    full = generate(model, PROMPTS, max_new_tokens=16, temperature=0)
    stop = full[0][5]
    out = generate(model, PROMPTS, max_new_tokens=16, temperature=0, stop_tokens=(stop,))
    for row, got in zip(full, out):
        expected = row[: row.index(stop)] if stop in row else row
        assert got == expected
    assert list(stream(model, PROMPTS[0], 16, temperature=0, stop_tokens=[stop])) == out[0]


def test_top_k_one_and_tiny_top_p_are_greedy(model):
    greedy = generate(model, PROMPTS, max_new_tokens=10, temperature=0)
    assert generate(model, PROMPTS, max_new_tokens=10, temperature=1.5, top_k=1, seed=0) == greedy
    assert generate(model, PROMPTS, max_new_tokens=10, temperature=1.5, top_p=1e-6, seed=0) == greedy


def test_sample_next_respects_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, top_k=2, generator=g)) for _ in range(200)}
    assert draws == {0, 1}
    # top_p 0.7: 0.5 alone is short of 0.7, 0.5 + 0.3 reaches it -> tokens {0, 1}
    draws = {int(sample_next(logits, 1.0, top_p=0.7, generator=g)) for _ in range(200)}
    assert draws == {0, 1}
    draws = {int(sample_next(logits, 1.0, generator=g)) for _ in range(400)}
    assert draws == {0, 1, 2, 3}


def test_generation_restores_training_mode_and_checks_lengths(model):
    model.train()
    generate(model, PROMPTS, max_new_tokens=3, temperature=0)
    assert model.training
    model.eval()
    with pytest.raises(ValueError, match="exceeds ModelConfig.max_seq_len=128"):
        generate(model, PROMPTS, max_new_tokens=125)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1], []], max_new_tokens=3)
    with pytest.raises(ValueError, match="outside"):
        generate(model, [[1, 512]], max_new_tokens=3)
