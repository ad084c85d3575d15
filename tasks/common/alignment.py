"""What the alignment stages (sft, reward, dpo, and evaluate) share on the tensor side: examples in, token tensors
out, models evaluated on them, answers sampled. Loading the examples and checking the answers is
tasks/sources/examples.py.

Encoding    `encode_sft(tok, messages, max_len)` → SFTExample(ids, mask): the chat template's ids and a mask
            that is 1 on assistant content and its `<|end|>` only (tasks/common/chat.py), right-truncated.
            `encode_pair(tok, pair, max_len)` → PairExample(prompt, chosen, rejected): the prompt ends with the
            generation prompt `<|assistant|>\\n`, each reply ends with `<|end|>`.
Batching    each row holds one conversation, right-padded: causal attention never lets a real token see a later
            pad, so no attention mask is needed and no conversation sees another (no packing across documents).
            `length_grouped_batches` keeps rows of a batch of similar length, so padding stays small.
            `collate_sft` → (idx, targets) with -100 off the assistant tokens;
            `collate_pairs` → PairBatch of 2B rows (chosen rows first) with the response mask DPO sums over.
Sampling    `sample_answers` decodes replies to held-out prompts (fixed seed per batch, stops at `<|end|>`).
Evaluation  `response_logprobs`, `token_kl` and `rewards_of` evaluate models on pair batches.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import Tensor

from model import ModelConfig, generate, load, load_config
from model.losses import IGNORE_INDEX, sequence_logprobs
from tasks.common import chat
from tasks.common.config import ScratchError
from tasks.common.console import progress
from tasks.common.dvcio import StagePaths
from tasks.common.train_config import AlignmentData, SamplingConfig, TrainConfig
from tasks.common.training import check_models, upstream_fingerprint

# ------------------------------------------------------------------------------------------------ tokenizer


@dataclass(frozen=True)
class ChatTokenizer:
    """A `tokenizers.Tokenizer` with the ids of scratchlm's special tokens."""

    tok: Any
    special: dict[str, int]

    @property
    def pad_id(self) -> int:
        return self.special[chat.PAD]

    @property
    def end_id(self) -> int:
        return self.special[chat.END]

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return tuple(self.special[t] for t in chat.STOP_TOKENS)

    def plain(self, text: str) -> list[int]:
        return chat.encode_plain(self.tok, text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)


def load_tokenizer(folder: Path) -> ChatTokenizer:
    """The tokenizer stage's (or a saved model folder's) tokenizer.json, with a clear error when absent."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise ScratchError(f"{path}: missing (run the tokenizer stage first: dvc repro tokenizer)")
    tok = Tokenizer.from_file(str(path))
    try:
        special = chat.special_ids(tok)
    except ValueError as e:
        raise ScratchError(f"{path}: {e}") from None
    return ChatTokenizer(tok, special)


def load_model_folder(folder: Path, what: str):
    """model.hf.load with a ScratchError naming the upstream stage when the folder is missing."""
    if not (Path(folder) / "config.json").is_file():
        raise ScratchError(f"{folder}: no saved model ({what}); run that stage first (dvc repro)")
    return load(folder).float()


@dataclass(frozen=True)
class Upstream:
    """What an alignment stage starts from: the tokenizer, the upstream model folder and its context."""

    tok: ChatTokenizer
    tokenizer_dir: Path
    model_dir: Path
    model_cfg: ModelConfig
    max_len: int
    """The row length the stage trains on (its max_len, or the model's context)."""
    model_stage: str

    def fingerprint(self) -> dict[str, str]:
        """sha256 of the upstream weights and tokenizer (part of the stage's checkpoint fingerprint)."""
        return upstream_fingerprint({self.model_stage: self.model_dir, "tokenizer": self.tokenizer_dir})


def upstream_of(stage: str, cfg: AlignmentData, paths: StagePaths, model_stage: str) -> Upstream:
    """Load and check an alignment stage's inputs: the tokenizer stage's tokenizer and `model_stage`'s model."""
    tok = load_tokenizer(paths.of("tokenizer"))
    model_dir = check_models(paths, model_stage)[model_stage]
    model_cfg = load_config(model_dir)
    return Upstream(
        tok, paths.of("tokenizer"), model_dir, model_cfg, cfg.max_len_for(stage, model_cfg.max_seq_len), model_stage
    )


def data_metrics(loaded: Any, truncated: int, max_len: int) -> dict:
    """What every alignment stage reports about its data: the counts of its tasks.sources.examples.Loaded (rows in,
    train, validation, quarantined by reason and source) and how many rows were cut to max_len."""
    return {**loaded.counts(), "truncated": truncated, "max_len": max_len}


def data_summary(m: dict, unit: str, held_out: str) -> list[str]:
    """The closing-summary lines every alignment stage shares: examples, quarantine, loss and speed."""
    lines = [
        f"{m['steps']:,} steps on {m['train_examples']:,} {unit} ({m['val_examples']:,} {held_out}, "
        f"{m['quarantined']:,} quarantined, {m['truncated']:,} cut at {m['max_len']} tokens)"
    ]
    lines += [f"quarantined {n:>6,}  {reason}" for reason, n in m["quarantined_by_reason"].items()]
    return lines + [f"train loss {m['train_loss']:.4f}   {m['tokens_per_s']:,.0f} tokens/s"]


# ------------------------------------------------------------------------------------------------ encoding


@dataclass(frozen=True)
class SFTExample:
    ids: list[int]
    """The rendered conversation's token ids."""
    mask: list[int]
    """1 where the token is assistant content or an assistant `<|end|>` (the tokens SFT learns to produce)."""
    truncated: bool = False


def encode_sft(tok: ChatTokenizer, messages: list[dict], max_len: int) -> SFTExample | None:
    """The conversation's ids and assistant mask, cut to max_len tokens; None when no assistant token is left."""
    ids, mask = chat.encode_chat(tok.tok, messages)
    truncated = len(ids) > max_len
    ids, mask = ids[:max_len], mask[:max_len]
    if sum(mask[1:]) == 0:  # the first token is never a target
        return None
    return SFTExample(ids, mask, truncated)


@dataclass(frozen=True)
class PairExample:
    prompt: list[int]
    """The prompt conversation's ids, ending with the generation prompt `<|assistant|>\\n`."""
    chosen: list[int]
    """The preferred reply's ids, ending with `<|end|>`."""
    rejected: list[int]
    """The other reply's ids, ending with `<|end|>`."""
    truncated: bool = False


def encode_prompt(tok: ChatTokenizer, prompt_messages: list[dict]) -> list[int]:
    return chat.encode_chat(tok.tok, prompt_messages, add_generation_prompt=True)[0]


def encode_reply(tok: ChatTokenizer, reply: str) -> list[int]:
    """A reply as the chat template renders it after the generation prompt: its content, then `<|end|>`."""
    return tok.plain(reply) + [tok.end_id]


def encode_pair(tok: ChatTokenizer, pair: dict, max_len: int) -> PairExample | None:
    """Prompt and replies fitted into max_len: a prompt over half of it keeps its last max_len/2 tokens (the turn
    being answered), then replies are cut to the room left. None when the replies become identical."""
    prompt = encode_prompt(tok, pair["prompt_messages"])
    chosen, rejected = encode_reply(tok, pair["chosen"]), encode_reply(tok, pair["rejected"])
    longest = len(prompt) + max(len(chosen), len(rejected))
    if longest <= max_len:
        return PairExample(prompt, chosen, rejected)
    if len(prompt) > max_len // 2:
        prompt = prompt[-(max_len // 2) :]
    room = max_len - len(prompt)
    chosen, rejected = chosen[:room], rejected[:room]
    if chosen == rejected:
        return None
    return PairExample(prompt, chosen, rejected, truncated=True)


# ------------------------------------------------------------------------------------------------ batching


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, rng: random.Random, group_batches: int = 32
) -> list[list[int]]:
    """Indices in batches of similar length: shuffle, sort within windows of `group_batches` batches, shuffle
    the batches. Every index appears exactly once; the last batch may be short."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * group_batches
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def _pad(rows: Sequence[Sequence[int]], value: int, length: int | None = None) -> Tensor:
    length = length or max(len(r) for r in rows)
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
    return out


def collate_sft(examples: Sequence[SFTExample], pad_id: int) -> tuple[Tensor, Tensor]:
    """(idx, targets), both (B, T-1): targets are the next tokens, -100 off assistant tokens and on padding."""
    ids = _pad([e.ids for e in examples], pad_id)  # (B,T)
    mask = _pad([e.mask for e in examples], 0)  # (B,T)
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE_INDEX)  # (B,T-1)
    return ids[:, :-1].contiguous(), targets.contiguous()


@dataclass
class PairBatch:
    """2B rows: chosen replies in rows [0, B), rejected in [B, 2B); each row = prompt + reply, right-padded."""

    ids: Tensor
    """(2B,T) token ids, pad after the reply."""
    attention_mask: Tensor
    """(2B,T) 1 on real tokens."""
    response_mask: Tensor
    """(2B,T) 1 on reply tokens (content and `<|end|>`), 0 on prompt and padding."""

    @property
    def pairs(self) -> int:
        return self.ids.shape[0] // 2

    def rows(self, part: slice) -> PairBatch:
        return PairBatch(self.ids[part], self.attention_mask[part], self.response_mask[part])

    def to(self, device: torch.device | str) -> PairBatch:
        return PairBatch(self.ids.to(device), self.attention_mask.to(device), self.response_mask.to(device))

    def as_dict(self) -> dict[str, Tensor]:
        """What the trainer's batch function returns (it moves dicts of tensors to the device)."""
        return {"ids": self.ids, "attention_mask": self.attention_mask, "response_mask": self.response_mask}


def collate_pairs(examples: Sequence[PairExample], pad_id: int) -> PairBatch:
    rows, replies = [], []
    for side in ("chosen", "rejected"):
        for e in examples:
            rows.append(e.prompt + getattr(e, side))
            replies.append(len(getattr(e, side)))
    ids = _pad(rows, pad_id)
    attention = _pad([[1] * len(r) for r in rows], 0, ids.shape[1])
    response = _pad([[0] * (len(r) - n) + [1] * n for r, n in zip(rows, replies)], 0, ids.shape[1])
    return PairBatch(ids, attention, response)


def sequences_batch(prompts: Sequence[Sequence[int]], replies: Sequence[Sequence[int]], pad_id: int) -> PairBatch:
    """One row per (prompt, reply) -- for scoring sampled answers -- in PairBatch form (no chosen/rejected halves)."""
    rows = [list(p) + list(r) for p, r in zip(prompts, replies)]
    ids = _pad(rows, pad_id)
    attention = _pad([[1] * len(r) for r in rows], 0, ids.shape[1])
    response = _pad([[0] * len(p) + [1] * len(r) for p, r in zip(prompts, replies)], 0, ids.shape[1])
    return PairBatch(ids, attention, response)


# ------------------------------------------------------------------------------------------------ model math


def reply_logits(model, batch: PairBatch) -> Tensor:
    """Next-token logits of every row, (R,T-1,V); right padding needs no attention mask."""
    return model(batch.ids[:, :-1], all_logits=True)[0]


def reply_logprobs(logits: Tensor, batch: PairBatch) -> Tensor:
    """Summed log-prob of every row's reply tokens given its prompt, (R,) -- prompt and padding masked."""
    return sequence_logprobs(logits, batch.ids[:, 1:], batch.response_mask[:, 1:])


def response_logprobs(model, batch: PairBatch) -> Tensor:
    """reply_logprobs of `model` on the batch, (R,)."""
    return reply_logprobs(reply_logits(model, batch), batch)


def reply_kl(logits_p: Tensor, logits_q: Tensor, batch: PairBatch) -> Tensor:
    """Per row, the sum over reply positions of KL(p(.|context) || q(.|context)), (R,), from (R,T-1,V) logits."""
    mask = batch.response_mask[:, 1:].float()  # (R,T-1): positions that predict a reply token
    logp = F.log_softmax(logits_p.float(), dim=-1)
    logq = F.log_softmax(logits_q.float(), dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)  # (R,T-1)
    return (kl * mask).sum(-1)


def token_kl(policy, reference, batch: PairBatch) -> Tensor:
    """Per row, the sum over reply positions of KL(policy(.|context) || reference(.|context)), (R,).

    Exact over the vocabulary at each position; on the policy's own samples the mean over rows estimates the
    sequence-level KL(policy || reference)."""
    return reply_kl(reply_logits(policy, batch), reply_logits(reference, batch), batch)


def rewards_of(reward_model, batch: PairBatch) -> Tensor:
    """The reward model's score of each row, (rows,), read at the row's last real token."""
    return reward_model(batch.ids, batch.attention_mask)


# ------------------------------------------------------------------------------------------------ sampling


@dataclass(frozen=True)
class Answer:
    """One sampled reply."""

    prompt: list[int]
    """The prompt's ids (ending with the generation prompt)."""
    ids: list[int]
    """The reply's ids, without the stop token."""
    finished: bool
    """The model ended the reply itself (a stop token) rather than running out of `max_new_tokens`."""

    def reply(self, end_id: int) -> list[int]:
        """The reply as training data holds it: `<|end|>` appended when the model finished it."""
        return self.ids + [end_id] if self.finished else list(self.ids)


def sample_answers(
    model, tok: ChatTokenizer, prompts: list[list[dict]], cfg: SamplingConfig, desc: str = "sampling"
) -> list[Answer]:
    """Sampled replies to prompt conversations. Batch k uses seed cfg.seed + k, so two models sampled with the
    same cfg on the same prompts share their random stream."""
    encoded = [encode_prompt(tok, p) for p in prompts]
    answers: list[Answer] = []
    limit = model.cfg.max_seq_len
    starts = range(0, len(encoded), cfg.batch_size)
    for k, start in enumerate(progress(starts, total=len(starts), desc=desc, unit="batch")):
        batch = encoded[start : start + cfg.batch_size]
        longest = max(len(p) for p in batch)
        if longest >= limit:
            raise ScratchError(
                f"{desc}: a prompt of {longest} tokens leaves no room to answer in the model's context of {limit}"
            )
        budget = min(cfg.max_new_tokens, limit - longest)
        new = generate(
            model,
            batch,
            budget,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            stop_tokens=tok.stop_ids,
            seed=cfg.seed + k,
        )
        answers += [Answer(p, ids, len(ids) < budget) for p, ids in zip(batch, new)]
    return answers


# ------------------------------------------------------------------------------------------------ training glue


class StepBatches:
    """The trainer's batch function: step s's global batch is `batch_size` examples of similar length, a pure
    function of (seed, s), so ranks split it without overlap and a resumed run sees the same data.

    Each epoch is a fresh length-grouped order; its one short leftover batch is skipped (those examples come
    back in the next epoch's order)."""

    def __init__(
        self,
        examples: Sequence[Any],
        lengths: Sequence[int],
        batch_size: int,
        seed: int,
        collate: Callable[[list[Any]], Any],
        what: str = "training examples",
    ) -> None:
        if len(examples) < batch_size:
            raise ScratchError(
                f"{len(examples)} {what} is fewer than one step's train.batch_size ({batch_size}); "
                f"add data or lower train.batch_size"
            )
        self.examples, self.lengths, self.batch_size = examples, list(lengths), batch_size
        self.seed, self.collate = seed, collate
        self.per_epoch = len(examples) // batch_size
        self._epoch: tuple[int, list[list[int]]] | None = None

    def indices(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            batches = length_grouped_batches(self.lengths, self.batch_size, random.Random(f"{self.seed}/{epoch}"))
            self._epoch = (epoch, [b for b in batches if len(b) == self.batch_size])
        return self._epoch[1][k]

    def __call__(self, index) -> Any:
        chosen = self.indices(index.step)[index.examples.start : index.examples.stop]
        return self.collate([self.examples[i] for i in chosen])


def device_of(module) -> torch.device:
    return next(module.parameters()).device


def pair_batches(pairs: list[PairExample], train: TrainConfig, pad_id: int) -> tuple[StepBatches, int]:
    """The trainer's batches of preference pairs (chosen rows, then rejected rows) and the tokens one pair puts
    through the model (both rows), for tokens/s and the budget."""
    lengths = [pair_length(e) for e in pairs]
    per_pair = round(2 * sum(lengths) / max(len(lengths), 1))

    def collate(examples: list[PairExample]) -> dict:
        return collate_pairs(examples, pad_id).as_dict()

    return StepBatches(pairs, lengths, train.batch_size, train.seed, collate, "training pairs"), per_pair


def pair_length(e: PairExample) -> int:
    """Tokens of a pair's longer row (what the padded batch holds per row)."""
    return len(e.prompt) + max(len(e.chosen), len(e.rejected))


def encode_pairs(loaded: Any, tok: ChatTokenizer, max_len: int) -> tuple[list[PairExample], list[PairExample], int]:
    """(train, val, truncated) pair encodings of a tasks.sources.examples.Loaded; a pair whose replies become
    identical when cut is quarantined."""
    why_not = f"chosen and rejected are identical within max_len={max_len}"
    train, val = (
        loaded.keep_encoded(split, lambda p: encode_pair(tok, p, max_len), why_not) for split in ("train", "val")
    )
    return train, val, sum(e.truncated for e in train + val)
