"""Sampling from a Llama with a preallocated KV cache: one prefill forward, then one token per step.

    new = generate(model, [[1, 5, 9], [1, 7]], max_new_tokens=64, temperature=0.8, top_p=0.95,
                   stop_tokens=(eos_id,), seed=0)        # list of new-token lists, stop token excluded
    for tok in stream(model, [1, 5, 9], max_new_tokens=64, temperature=0):   # greedy, token by token
        print(tok)
    steps = stream_rows(model, [[1, 5, 9], [1, 7]], 64, [Sampling(0.8, None, 0.95, 0), Sampling(0, None, None, None)])
    for tokens in steps:                                  # (B,) per step, each row drawn with its own settings
        ...                                               # steps.close() once every row is done

Prompts of different lengths are left-padded into one batch; the attention mask hides the padding and position
ids restart at 0 on each row's first real token, so a padded row decodes exactly as it would alone.
temperature=0 is greedy. top_k keeps the k most likely tokens, top_p the smallest set whose probability reaches p
(both after temperature). With ``seed`` set, sampling uses its own torch.Generator and is reproducible.
stream_rows gives every row its own Sampling and generator (a server batching unrelated requests): a seeded row
draws what it would draw alone, whatever else shares the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from model.llama import KVCache, Llama

__all__ = ["generate", "stream", "stream_rows", "sample_next", "sampling_probs", "Sampling"]


def sample_next(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Next token ids (B,) from last-position logits (B,V)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = sampling_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def sampling_probs(logits: Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """The distribution sample_next draws from, (B,V), for temperature > 0 (each row on its own)."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B,1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B,V)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # drop a token once the ones before it already reach top_p
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits.softmax(dim=-1)


@dataclass(frozen=True)
class Sampling:
    """How a row's tokens are drawn (see sample_next); seed None means the global RNG."""

    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int | None

    def next_token(self, logits: Tensor, generator: torch.Generator | None) -> Tensor:
        return sample_next(logits, self.temperature, self.top_k, self.top_p, generator)

    def generator(self, device: torch.device) -> torch.Generator | None:
        return None if self.seed is None else torch.Generator(device=device).manual_seed(self.seed)

    def check(self) -> None:
        temperature, top_k, top_p = self.temperature, self.top_k, self.top_p
        if temperature < 0:
            raise ValueError(f"temperature ({temperature}) must be >= 0")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def _check_args(model: Llama, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: Sampling) -> None:
    if not prompts:
        raise ValueError("generate needs at least one prompt")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty; start it with a BOS token")
        bad = [t for t in p if not 0 <= t < model.cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside [0, {model.cfg.vocab_size}): {bad[:5]}")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(
            f"longest prompt ({longest}) + max_new_tokens ({max_new_tokens}) exceeds "
            f"ModelConfig.max_seq_len={model.cfg.max_seq_len}"
        )
    if max_new_tokens < 0 or sampling.temperature < 0:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) and temperature ({sampling.temperature}) must be >= 0")
    sampling.check()


def _token_steps(
    model: Llama, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: Sampling
) -> Iterator[Tensor]:
    """Yield the next token of every row, (B,), max_new_tokens times (or until the caller stops)."""
    _check_args(model, prompts, max_new_tokens, sampling)
    generator = sampling.generator(model.tok_emb.weight.device)
    return _decode(model, prompts, max_new_tokens, lambda logits: sampling.next_token(logits, generator))


def stream_rows(
    model: Llama, prompts: Sequence[Sequence[int]], max_new_tokens: int, samplings: Sequence[Sampling]
) -> Iterator[Tensor]:
    """Yield the next token of every row, (B,), max_new_tokens times (or until the caller closes it), row i drawn
    with samplings[i] and a generator of its own: a seeded row gets the tokens it gets alone (up to the float
    rounding of a batched forward). Stops are the caller's: a finished row keeps decoding until all are done."""
    if len(samplings) != len(prompts):
        raise ValueError(f"stream_rows: {len(prompts)} prompts but {len(samplings)} samplings")
    for s in samplings:
        _check_args(model, prompts, max_new_tokens, s)
    device = model.tok_emb.weight.device
    generators = [s.generator(device) for s in samplings]
    groups: dict[tuple, list[int]] = {}  # rows sharing temperature, top_k, top_p filter their logits together
    for i, s in enumerate(samplings):
        groups.setdefault((s.temperature, s.top_k, s.top_p), []).append(i)

    def pick(logits: Tensor) -> Tensor:  # (B,V) -> (B,)
        tokens = torch.empty(len(samplings), dtype=torch.long, device=logits.device)
        for (temperature, top_k, top_p), rows in groups.items():
            if temperature == 0:
                tokens[rows] = logits[rows].argmax(dim=-1)
                continue
            probs = sampling_probs(logits[rows], temperature, top_k, top_p)  # (len(rows),V)
            for j, row in enumerate(rows):  # each row's own generator: what it would draw alone
                tokens[row] = torch.multinomial(probs[j : j + 1], num_samples=1, generator=generators[row])[0, 0]
        return tokens

    return _decode(model, prompts, max_new_tokens, pick)


@torch.inference_mode()
def _decode(
    model: Llama, prompts: Sequence[Sequence[int]], max_new_tokens: int, pick: Callable[[Tensor], Tensor]
) -> Iterator[Tensor]:
    """Prefill the left-padded prompts, then yield pick(last logits (B,V)) -> (B,) and decode it, step by step."""
    device = model.tok_emb.weight.device
    B, P = len(prompts), max(len(p) for p in prompts)
    total = P + max_new_tokens
    idx = torch.zeros(B, P, dtype=torch.long, device=device)  # (B,P) left-padded
    mask = torch.ones(B, total, dtype=torch.long, device=device)  # (B,total) 0 on padding
    for row, prompt in enumerate(prompts):
        idx[row, P - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, : P - len(prompt)] = 0
    padded = any(len(p) != P for p in prompts)
    cache = KVCache.for_model(model, batch_size=B, max_len=total)
    weights = model.decode_weights()

    was_training = model.training
    model.eval()
    try:
        logits, _ = model(idx, kv_cache=cache, start_pos=0, attention_mask=mask[:, :P] if padded else None)
        for pos in range(P, total):
            token = pick(logits[:, -1, :])  # (B,)
            yield token
            if pos + 1 < total:
                logits = model.decode_step(token[:, None], cache, pos, mask[:, : pos + 1] if padded else None, weights)
    finally:
        model.train(was_training)


def generate(
    model: Llama,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Iterable[int] = (),
    seed: int | None = None,
) -> list[list[int]]:
    """New tokens for each prompt (stop token excluded); a row ends at its first stop token or max_new_tokens."""
    stops = set(stop_tokens)
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    steps = _token_steps(model, prompts, max_new_tokens, Sampling(temperature, top_k, top_p, seed))
    for token in steps:
        for row, t in enumerate(token.tolist()):
            if done[row]:
                continue
            if t in stops:
                done[row] = True
            else:
                out[row].append(t)
        if all(done):
            steps.close()
            break
    return out


def stream(
    model: Llama,
    prompt: Sequence[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Iterable[int] = (),
    seed: int | None = None,
) -> Iterator[int]:
    """Yield new tokens of one prompt as they are decoded; stops before the first stop token."""
    stops = set(stop_tokens)
    steps = _token_steps(model, [prompt], max_new_tokens, Sampling(temperature, top_k, top_p, seed))
    try:
        for token in steps:
            t = int(token[0])
            if t in stops:
                return
            yield t
    finally:
        steps.close()
