"""What the alignment stages (sft, reward, dpo) share: data in, token tensors out, sampled answers scored.

Data        `load_instruction_data` / `load_preference_data` read a stage's `sources` through
            tasks/sources/instructions.py into train and validation lists plus counted quarantine rows.
            builtin sources draw their "train" and "val" splits (disjoint seeds and (animal, place) pairs);
            file rows go to validation by a salted hash of their id (`val_fraction`), stable across runs.
Encoding    `encode_sft(tok, messages, max_len)` → SFTExample(ids, mask): the chat template's ids and a mask
            that is 1 on assistant content and its `<|end|>` only (tasks/common/chat.py), right-truncated.
            `encode_pair(tok, pair, max_len)` → PairExample(prompt, chosen, rejected): the prompt ends with the
            generation prompt `<|assistant|>\\n`, each reply ends with `<|end|>`.
Batching    each row holds one conversation, right-padded: causal attention never lets a real token see a later
            pad, so no attention mask is needed and no conversation sees another (no packing across documents).
            `length_grouped_batches` keeps rows of a batch of similar length, so padding stays small.
            `collate_sft` → (idx, targets) with -100 off the assistant tokens;
            `collate_pairs` → PairBatch of 2B rows (chosen rows first) with the response mask DPO sums over.
Sampling    `sample_answers` decodes replies to held-out prompts (fixed seed per batch, stops at `<|end|>`);
            `score_answers` checks them with tasks.sources.builtin.check_constraints.
Evaluation  `response_logprobs`, `token_kl` and `rewards_of` evaluate models on pair batches.
"""
from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from tasks.common import chat
from tasks.common.config import ScratchError, check
from tasks.common.split import Split

IGNORE_INDEX = -100
VAL_SALT = "scratchlm-align-v1"


# ------------------------------------------------------------------------------------------------ configs

@dataclass(frozen=True)
class SamplingConfig:
    prompts: int = 64
    """Held-out builtin "test" prompts whose sampled answers are checked against their constraints (0 = skip)."""
    prompt_seed: int = 4242
    """Seed of the builtin generator for those held-out prompts (the same prompts for base, SFT and DPO)."""
    seed: int = 0
    """Sampling seed: batch k samples with seed + k, so every model answers with the same random stream."""
    max_new_tokens: int = 200
    """Longest answer sampled (also capped by the model's context)."""
    temperature: float = 0.7
    """Sampling temperature (0 = greedy)."""
    top_p: float = 0.95
    """Nucleus sampling mass (1.0 = off)."""
    batch_size: int = 32
    """Prompts decoded together (left-padded, KV cache)."""

    def __post_init__(self) -> None:
        check(self.prompts >= 0, "prompts", "must be >= 0")
        check(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        check(self.temperature >= 0, "temperature", "must be >= 0")
        check(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")


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
    from tokenizers import Tokenizer
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
    from model import load
    if not (Path(folder) / "config.json").is_file():
        raise ScratchError(f"{folder}: no saved model ({what}); run that stage first (dvc repro)")
    return load(folder).float()


# ------------------------------------------------------------------------------------------------ data

@dataclass
class Loaded:
    """Examples of one stage's sources: train and validation lists plus what was quarantined.

    Every example carries `source` (its sources entry), so per-source counts stay exact when a later step
    (encoding) quarantines one: rows_in = train + val + quarantined, in total and per source."""
    train: list[dict] = field(default_factory=list)
    val: list[dict] = field(default_factory=list)
    quarantine: list[dict] = field(default_factory=list)
    per_source: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, example: dict, split: str) -> None:
        getattr(self, split).append(example)
        self.per_source[example["source"]][split] += 1

    def quarantine_row(self, location: str, reason: str, source: str) -> None:
        self.quarantine.append({"location": location, "reason": reason, "source": source})
        self.per_source[source]["quarantined"] += 1

    def keep_only(self, split: str, keep: Callable[[dict], str | None]) -> list[dict]:
        """Quarantine the examples of `split` for which keep() gives a reason; the kept examples, in order."""
        kept = []
        for example in getattr(self, split):
            reason = keep(example)
            if reason is None:
                kept.append(example)
            else:
                self.per_source[example["source"]][split] -= 1
                self.quarantine_row(example["id"], reason, example["source"])
        setattr(self, split, kept)
        return kept

    def counts(self) -> dict:
        reasons = Counter(_reason_key(q["reason"]) for q in self.quarantine)
        return {"rows_in": len(self.train) + len(self.val) + len(self.quarantine), "train_examples": len(self.train),
                "val_examples": len(self.val), "quarantined": len(self.quarantine),
                "quarantined_by_reason": dict(sorted(reasons.items())), "per_source": self.per_source}


def _reason_key(reason: str) -> str:
    """Group reasons for metrics ("message 1 (user): content must be ..." → "content must be ...")."""
    text = reason.split(": ")[-1] if reason.startswith(("message ", "prompt: message")) else reason
    return text.split(" at column")[0].split(" (")[0].strip()


LoaderFn = Callable[..., Iterator[tuple[dict | None, Any]]]


def _load(loader: LoaderFn, sources: list[str], root: Path, builtin_train: int, builtin_val: int, seed: int,
          val_fraction: float) -> Loaded:
    """Every source in order: builtin splits drawn directly, file rows split by id hash, bad rows quarantined."""
    if not sources:
        raise ScratchError("sources: list at least one source (e.g. builtin:instructions)")
    split = Split(val_fraction, VAL_SALT) if val_fraction > 0 else None
    out = Loaded()
    for spec in sources:
        out.per_source.setdefault(spec, {"train": 0, "val": 0, "quarantined": 0})
        if spec.startswith("builtin:"):
            parts = [("train", loader([spec], root, builtin_train, seed, "train")),
                     ("val", loader([spec], root, builtin_val, seed, "val"))]
        else:
            parts = [(None, loader([spec], root, 0, seed))]
        for fixed_split, rows in parts:
            for example, record in rows:
                if example is None:
                    out.quarantine_row(record.location, record.reason or "unreadable", spec)
                    continue
                example = {**example, "source": spec}
                in_val = bool(split and split.is_validation(example["id"]))
                out.add(example, fixed_split or ("val" if in_val else "train"))
    return out


def load_instruction_data(sources: list[str], root: Path, builtin_train: int, builtin_val: int, seed: int,
                          val_fraction: float) -> Loaded:
    """SFT examples {"id", "messages", "constraints"?} of every source, split and quarantined."""
    from tasks.sources.instructions import load_instructions
    return _load(load_instructions, sources, root, builtin_train, builtin_val, seed, val_fraction)


def load_preference_data(sources: list[str], root: Path, builtin_train: int, builtin_val: int, seed: int,
                         val_fraction: float) -> Loaded:
    """Preference pairs {"id", "prompt_messages", "chosen", "rejected", "constraints"?}, split and quarantined."""
    from tasks.sources.instructions import load_preferences
    return _load(load_preferences, sources, root, builtin_train, builtin_val, seed, val_fraction)


def held_out_prompts(n: int, seed: int) -> list[dict]:
    """n builtin "test" instructions: prompt messages and the constraints their answers are checked against."""
    from tasks.sources import builtin
    return [{"id": ex["id"], "prompt_messages": ex["messages"][:-1], "constraints": ex["constraints"]}
            for ex in builtin.generate_instructions(n, seed, "test")]


def write_quarantine(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


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
        prompt = prompt[-(max_len // 2):]
    room = max_len - len(prompt)
    chosen, rejected = chosen[:room], rejected[:room]
    if chosen == rejected:
        return None
    return PairExample(prompt, chosen, rejected, truncated=True)


# ------------------------------------------------------------------------------------------------ batching

def length_grouped_batches(lengths: Sequence[int], batch_size: int, rng: random.Random,
                           group_batches: int = 32) -> list[list[int]]:
    """Indices in batches of similar length: shuffle, sort within windows of `group_batches` batches, shuffle
    the batches. Every index appears exactly once; the last batch may be short."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * group_batches
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int) -> Iterator[list[int]]:
    """length_grouped_batches, epoch after epoch (a new order each), forever."""
    if not lengths:
        raise ScratchError("no training examples left after loading and encoding (see quarantine.jsonl)")
    epoch = 0
    while True:
        yield from length_grouped_batches(lengths, batch_size, random.Random(f"{seed}/{epoch}"))
        epoch += 1


def _pad(rows: Sequence[Sequence[int]], value: int, length: int | None = None) -> Tensor:
    length = length or max(len(r) for r in rows)
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(list(r), dtype=torch.long)
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

    def rows(self, part: slice) -> "PairBatch":
        return PairBatch(self.ids[part], self.attention_mask[part], self.response_mask[part])

    def to(self, device: torch.device | str) -> "PairBatch":
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
    from model.losses import sequence_logprobs
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


def sample_answers(model, tok: ChatTokenizer, prompts: list[list[dict]], cfg: SamplingConfig,
                   desc: str = "sampling") -> list[Answer]:
    """Sampled replies to prompt conversations. Batch k uses seed cfg.seed + k, so two models sampled with the
    same cfg on the same prompts share their random stream."""
    from model import generate
    from tasks.common.stage import progress
    encoded = [encode_prompt(tok, p) for p in prompts]
    answers: list[Answer] = []
    limit = model.cfg.max_seq_len
    starts = range(0, len(encoded), cfg.batch_size)
    for k, start in enumerate(progress(starts, total=len(starts), desc=desc, unit="batch")):
        batch = encoded[start:start + cfg.batch_size]
        longest = max(len(p) for p in batch)
        if longest >= limit:
            raise ScratchError(f"{desc}: a prompt of {longest} tokens leaves no room to answer in the model's "
                               f"context of {limit}")
        budget = min(cfg.max_new_tokens, limit - longest)
        new = generate(model, batch, budget, temperature=cfg.temperature, top_p=cfg.top_p,
                       stop_tokens=tok.stop_ids, seed=cfg.seed + k)
        answers += [Answer(p, ids, len(ids) < budget) for p, ids in zip(batch, new)]
    return answers


def score_answers(answers: Sequence[str], constraints: Sequence[dict]) -> dict:
    """Constraint satisfaction of answers: `satisfied` (share meeting every constraint), `constraint_rate` (share
    of all constraints met), and the rate of each constraint kind."""
    from tasks.sources.builtin import check_constraints
    met, total, satisfied = Counter(), Counter(), 0
    for answer, wanted in zip(answers, constraints, strict=True):
        result = check_constraints(answer.strip(), wanted)
        satisfied += result["satisfied"]
        for kind, ok in result["per_constraint"].items():
            met[kind] += ok
            total[kind] += 1
    n = max(len(answers), 1)
    return {"satisfied": satisfied / n, "constraint_rate": sum(met.values()) / max(sum(total.values()), 1),
            "per_constraint": {k: met[k] / total[k] for k in sorted(total)}}


def evaluate_answers(model, tok: ChatTokenizer, held_out: list[dict], cfg: SamplingConfig,
                     desc: str) -> tuple[dict, list[dict], list[Answer]]:
    """Sample answers to held-out prompts and score them: (scores, rows for a samples file, the answers)."""
    answers = sample_answers(model, tok, [h["prompt_messages"] for h in held_out], cfg, desc)
    texts = [tok.decode(a.ids) for a in answers]
    scores = score_answers(texts, [h["constraints"] for h in held_out])
    rows = [{"id": h["id"], "prompt": h["prompt_messages"][-1]["content"], "answer": t, "finished": a.finished,
             "constraints": h["constraints"]} for h, t, a in zip(held_out, texts, answers)]
    return scores, rows, answers


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    return write_quarantine(path, rows)


# ------------------------------------------------------------------------------------------------ training glue

class StepBatches:
    """The trainer's batch function: step s's global batch is `batch_size` examples of similar length, a pure
    function of (seed, s), so ranks split it without overlap and a resumed run sees the same data.

    Each epoch is a fresh length-grouped order; its one short leftover batch is skipped (those examples come
    back in the next epoch's order)."""

    def __init__(self, examples: Sequence[Any], lengths: Sequence[int], batch_size: int, seed: int,
                 collate: Callable[[list[Any]], Any], what: str = "training examples") -> None:
        if len(examples) < batch_size:
            raise ScratchError(f"{len(examples)} {what} is fewer than one step's train.batch_size ({batch_size}); "
                               f"add data or lower train.batch_size")
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
        chosen = self.indices(index.step)[index.examples.start:index.examples.stop]
        return self.collate([self.examples[i] for i in chosen])


def rank_share(n_items: int, micro_batch_size: int) -> list[list[int] | None]:
    """This rank's evaluation micro batches: item indices, or None for a padding pass. Every rank gets the same
    number of passes (ZeRO-3 gathers parameters collectively in each forward)."""
    import math

    import torch.distributed as dist
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    batches = [list(range(i, min(i + micro_batch_size, n_items))) for i in range(0, n_items, micro_batch_size)]
    mine = batches[rank::world]
    per_rank = max(1, math.ceil(len(batches) / world))
    return mine + [None] * (per_rank - len(mine))


def device_of(module) -> torch.device:
    return next(module.parameters()).device


def file_sha256(path: Path) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def upstream_fingerprint(folders: dict[str, Path]) -> dict[str, str]:
    """sha256 of each upstream weights file / tokenizer, so checkpoints of other inputs are never resumed."""
    out = {}
    for name, folder in folders.items():
        for fname in ("model.safetensors", "reward_head.safetensors", "tokenizer.json"):
            if (Path(folder) / fname).is_file():
                out[f"{name}/{fname}"] = file_sha256(Path(folder) / fname)
    return out


def is_main_rank() -> bool:
    import torch.distributed as dist
    return not dist.is_initialized() or dist.get_rank() == 0


def broken_constraint(pair: dict) -> str | None:
    """The constraint a builtin pair's rejected reply breaks (None for pairs without constraints)."""
    if not pair.get("constraints"):
        return None
    from tasks.sources.builtin import check_constraints
    per = check_constraints(pair["rejected"], pair["constraints"])["per_constraint"]
    failed = [k for k, ok in per.items() if not ok]
    return failed[0] if failed else None


def pair_length(e: PairExample) -> int:
    """Tokens of a pair's longer row (what the padded batch holds per row)."""
    return len(e.prompt) + max(len(e.chosen), len(e.rejected))


def encode_pairs(loaded: Loaded, tok: ChatTokenizer, max_len: int) -> tuple[list[PairExample], list[PairExample], int]:
    """(train, val, truncated) pair encodings; a pair whose replies become identical when cut is quarantined."""
    out: dict[str, list[PairExample]] = {}
    truncated = 0
    for split in ("train", "val"):
        encoded: dict[str, PairExample | None] = {}

        def fits(pair: dict) -> str | None:
            encoded[pair["id"]] = encode_pair(tok, pair, max_len)
            return None if encoded[pair["id"]] else f"chosen and rejected are identical within max_len={max_len}"

        out[split] = [encoded[p["id"]] for p in loaded.keep_only(split, fits)]
        truncated += sum(e.truncated for e in out[split])
    return out["train"], out["val"], truncated
