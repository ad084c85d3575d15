"""tokenizer — decide the train/validation split and train a byte-level BPE on the train split.

Runbook
    dvc repro tokenizer                          # or: scratchlm stage tokenizer / python -m tasks.tokenizer
    dvc exp run -S tokenizer.vocab_size=32768    # a real run's vocabulary (reruns tokenizer + pretokenize only)

Reads   data/dedup/shard-*.jsonl.gz            {"id", "text", "source"}
Writes  data/tokenizer/tokenizer.json           the 🤗 `tokenizers` model (byte-level BPE, specials = ids 0..5)
        data/tokenizer/tokenizer_config.json    eos/pad/special tokens and `chat_template` (tasks/common/chat.py)
        data/tokenizer/special_tokens_map.json
        data/tokenizer/meta.json                the split (fraction, salt, rule) every later stage reads through
                                                `tasks.common.split.load_split`, split counts, vocab, special ids,
                                                sha256 of tokenizer.json
        metrics/tokenizer.json                  vocab size, bytes/token on validation, training seconds
        `AutoTokenizer.from_pretrained("data/tokenizer")` loads the folder; its `apply_chat_template` renders
        exactly `tasks.common.chat.render_chat`.
Checks  vocab_size must hold the 256 byte tokens plus the special tokens; both splits must be non-empty; every
        validation document must round-trip exactly (decode(encode(text)) == text); the saved folder is loaded
        back with transformers and its chat template compared with render_chat before the stage succeeds.
Scale   the split is a hash of each document id (tasks/common/split.py), so it needs no global view. Split
        counting and the validation pass run per shard on `data.parallel`; BPE training streams the train split
        in batches through `tokenizers` (multi-threaded Rust), holding word counts, not text; cap its input with
        `max_train_bytes` for corpora far larger than the vocabulary needs.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tasks.common import chat
from tasks.common.config import DataConfig, ScratchError, check
from tasks.common.console import fmt
from tasks.common.dvcio import StagePaths, file_sha256, fresh_dir, read_jsonl_gz, shards, write_json
from tasks.common.parallel import parallel_map
from tasks.common.split import Split
from tasks.common.stage import stage_main
from tasks.common.tracking import Tracker

BYTE_TOKENS = 256
TRAIN_BATCH_DOCS = 1000  # documents per batch handed to the BPE trainer (tokenizers' recommended way to stream)


@dataclass(frozen=True)
class TokenizerConfig:
    vocab_size: int = 4096
    """Tokens in the vocabulary, the 256 byte tokens and the special tokens included (4096 for the CPU default,
    32768-50304 for real runs). The trainer may stop below it on a tiny corpus; metrics say what it reached."""
    min_frequency: int = 2
    """A pair of tokens is merged only if it occurs at least this often in the train split."""
    val_fraction: float = 0.05
    """Share of documents held out for validation, by a hash of the document id. Decided here once for every
    later stage (pretokenize, pretrain, evaluate read it from data/tokenizer/meta.json)."""
    split_salt: str = "scratchlm-split-v1"
    """Salt of the split hash; another salt draws another validation set of the same expected size."""
    max_train_bytes: int = 0
    """Train the BPE on at most this many UTF-8 bytes of the train split, documents in order (0 = all of it)."""

    def __post_init__(self) -> None:
        smallest = BYTE_TOKENS + len(chat.SPECIAL_TOKENS)
        check(
            self.vocab_size >= smallest,
            "vocab_size",
            f"must be >= {smallest} (256 byte tokens + {len(chat.SPECIAL_TOKENS)} special tokens), "
            f"got {self.vocab_size}",
        )
        check(self.vocab_size <= 2**32, "vocab_size", "must fit uint32 token ids (<= 4294967296)")
        check(self.min_frequency >= 1, "min_frequency", "must be >= 1")
        check(
            0.0 < self.val_fraction < 1.0,
            "val_fraction",
            f"must be strictly between 0 and 1 (both splits must exist), got {self.val_fraction}",
        )
        check(self.max_train_bytes >= 0, "max_train_bytes", "must be >= 0 (0 = the whole train split)")

    @property
    def split(self) -> Split:
        return Split(self.val_fraction, self.split_salt)


Config = TokenizerConfig  # the section class params.yaml loads (tasks/common/config.py)


# ------------------------------------------------------------------------------------------------ the model


def new_tokenizer():
    """An untrained byte-level BPE: no normalizer and no prefix space, so decode(encode(text)) == text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe(texts: Iterator[list[str]], cfg: TokenizerConfig, n_docs: int):
    """Train on batches of texts; special tokens come first (ids 0..5 in chat.SPECIAL_TOKENS order)."""
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=list(chat.SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=sys.stderr.isatty() and os.environ.get("SCRATCHLM_PROGRESS") != "off",
    )
    tok.train_from_iterator(texts, trainer, length=n_docs)
    return tok


def load_plain(path: Path):
    """tokenizer.json for encoding documents: special-token strings in the text stay plain text."""
    tok = Tokenizer.from_file(str(path))
    tok.encode_special_tokens = True
    return tok


# ------------------------------------------------------------------------------------------------ passes


@dataclass
class ShardCount:
    train_docs: int = 0
    train_bytes: int = 0
    val_docs: int = 0
    val_bytes: int = 0
    val_tokens: int = 0  # filled by the validation pass
    roundtrip_failures: int = 0  # validation documents where decode(encode(text)) != text
    first_failure: str = ""


def count_shard(path: Path, split: Split) -> ShardCount:
    """Documents and UTF-8 bytes of one shard on each side of the split."""
    c = ShardCount()
    for doc in read_jsonl_gz(path):
        n = len(doc["text"].encode("utf-8"))
        if split.is_validation(doc["id"]):
            c.val_docs, c.val_bytes = c.val_docs + 1, c.val_bytes + n
        else:
            c.train_docs, c.train_bytes = c.train_docs + 1, c.train_bytes + n
    return c


def train_texts(paths: list[Path], split: Split, max_bytes: int, sent: ShardCount) -> Iterator[list[str]]:
    """Batches of train-split texts, in shard order, stopping once `max_bytes` are out (0 = no cap);
    `sent` counts what went out."""
    batch: list[str] = []
    for path in paths:
        for doc in read_jsonl_gz(path):
            if split.is_validation(doc["id"]):
                continue
            batch.append(doc["text"])
            sent.train_docs += 1
            sent.train_bytes += len(doc["text"].encode("utf-8"))
            capped = bool(max_bytes) and sent.train_bytes >= max_bytes
            if len(batch) >= TRAIN_BATCH_DOCS or capped:
                yield batch
                batch = []
            if capped:
                return
    if batch:
        yield batch


def validate_shard(path: Path, split: Split, tokenizer_file: Path, batch_docs: int = 256) -> ShardCount:
    """Tokens of one shard's validation documents, checking each decodes back to its exact text."""
    tok = load_plain(tokenizer_file)
    c = ShardCount()
    batch: list[dict] = []

    def flush() -> None:
        encodings = tok.encode_batch_fast([d["text"] for d in batch], add_special_tokens=False)
        decoded = tok.decode_batch([e.ids for e in encodings], skip_special_tokens=False)
        for doc, enc, text in zip(batch, encodings, decoded):
            c.val_docs += 1
            c.val_bytes += len(doc["text"].encode("utf-8"))
            c.val_tokens += len(enc.ids)
            if text != doc["text"]:
                c.roundtrip_failures += 1
                c.first_failure = c.first_failure or doc["id"]
        batch.clear()

    for doc in read_jsonl_gz(path):
        if split.is_validation(doc["id"]):
            batch.append(doc)
            if len(batch) >= batch_docs:
                flush()
    if batch:
        flush()
    return c


# ------------------------------------------------------------------------------------------------ the HF folder


def save_folder(tok, out: Path) -> None:
    """tokenizer.json + tokenizer_config.json (with the chat template) + special_tokens_map.json."""
    tok.save(str(out / "tokenizer.json"))
    extra = [t for t in chat.SPECIAL_TOKENS if t not in (chat.EOT, chat.PAD)]
    special_map = {"eos_token": chat.EOT, "pad_token": chat.PAD, "additional_special_tokens": extra}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_map,
        "bos_token": None,
        "unk_token": None,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,  # any cleanup would break decode(encode(text)) == text
        "chat_template": chat.CHAT_TEMPLATE,
    }
    write_json(out / "tokenizer_config.json", config)
    write_json(out / "special_tokens_map.json", special_map)


def check_hf_folder(out: Path) -> None:
    """Load the folder as transformers users will and hold its chat template to render_chat."""
    from transformers import AutoTokenizer

    logging.getLogger("transformers").setLevel(logging.ERROR)
    hf = AutoTokenizer.from_pretrained(str(out))
    sample = [
        {"role": "system", "content": "You are kind."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "A story?"},
    ]
    for gen in (False, True):
        got = hf.apply_chat_template(sample, tokenize=False, add_generation_prompt=gen)
        if got != chat.render_chat(sample, gen):
            raise ScratchError(
                f"{out}: transformers renders the chat template as {got!r}, "
                f"render_chat gives {chat.render_chat(sample, gen)!r}"
            )
    if hf.eos_token_id != 0 or hf.pad_token_id != 1:
        raise ScratchError(f"{out}: transformers sees eos/pad ids {hf.eos_token_id}/{hf.pad_token_id}, expected 0/1")


# ------------------------------------------------------------------------------------------------ stage


def run(cfg: TokenizerConfig, paths: StagePaths, tracker: Tracker, data: DataConfig) -> dict:
    docs = shards(paths.of("dedup"))
    counts = total(parallel_map(functools.partial(count_shard, split=cfg.split), docs, data.parallel))
    check_splits(counts, cfg, paths.of("dedup"))
    out = fresh_dir(paths.out)

    started = time.perf_counter()
    sent = ShardCount()
    tok = train_bpe(train_texts(docs, cfg.split, cfg.max_train_bytes, sent), cfg, counts.train_docs)
    train_seconds = time.perf_counter() - started
    save_folder(tok, out)

    work = functools.partial(validate_shard, split=cfg.split, tokenizer_file=out / "tokenizer.json")
    val = total(parallel_map(work, docs, data.parallel, desc="tokenizer: validation"))
    if val.roundtrip_failures:
        raise ScratchError(
            f"tokenizer: {val.roundtrip_failures} validation documents do not decode back to their "
            f"text (first: id {val.first_failure!r}); the tokenizer is not lossless"
        )
    check_hf_folder(out)

    metrics = {
        "vocab_size": tok.get_vocab_size(),
        "vocab_size_requested": cfg.vocab_size,
        "train_docs": counts.train_docs,
        "train_bytes": counts.train_bytes,
        "val_docs": counts.val_docs,
        "val_bytes": counts.val_bytes,
        "val_tokens": val.val_tokens,
        "val_bytes_per_token": round(val.val_bytes / val.val_tokens, 4),
        "trained_on_docs": sent.train_docs,
        "trained_on_bytes": sent.train_bytes,
        "train_seconds": round(train_seconds, 2),
    }
    meta = {
        "split": cfg.split.as_dict(),
        "vocab_size": metrics["vocab_size"],
        "special_tokens": chat.special_ids(tok),
        "eot_id": tok.token_to_id(chat.EOT),
        "pad_id": tok.token_to_id(chat.PAD),
        "tokenizer_sha256": file_sha256(out / "tokenizer.json"),
        "source": "data/dedup",
        "counts": {k: metrics[k] for k in ("train_docs", "train_bytes", "val_docs", "val_bytes")},
    }
    write_json(out / "meta.json", meta)
    tracker.log_artifact(out, "tokenizer")
    return metrics


def total(parts: list[ShardCount]) -> ShardCount:
    t = ShardCount()
    for p in parts:
        for name in ("train_docs", "train_bytes", "val_docs", "val_bytes", "val_tokens", "roundtrip_failures"):
            setattr(t, name, getattr(t, name) + getattr(p, name))
        t.first_failure = t.first_failure or p.first_failure
    return t


def check_splits(c: ShardCount, cfg: TokenizerConfig, folder: Path) -> None:
    n = c.train_docs + c.val_docs
    for name, docs in (("train", c.train_docs), ("validation", c.val_docs)):
        if docs == 0:
            raise ScratchError(
                f"tokenizer.val_fraction: the {name} split of {folder} is empty ({n} documents at "
                f"val_fraction={cfg.val_fraction}); change tokenizer.val_fraction or add documents"
            )
    if c.train_bytes == 0:
        raise ScratchError(f"{folder}: the train split has {c.train_docs} documents but no text to train on")


def summary(m: dict, paths: StagePaths) -> list[str]:
    """What was trained on what, how well it compresses, and a vocabulary that fell short of the request."""
    lines = [
        f"byte-level BPE of {fmt(m['vocab_size'])} tokens trained in {m['train_seconds']:.1f}s on "
        f"{m['trained_on_bytes'] / 1e6:.1f} MB ({fmt(m['trained_on_docs'])} of {fmt(m['train_docs'])} train "
        f"documents; {fmt(m['val_docs'])} held out for validation)",
        f"validation: {m['val_bytes_per_token']:.3f} bytes/token, every document round-trips; "
        f"AutoTokenizer.from_pretrained({str(paths.out.relative_to(paths.root))!r}) loads it",
    ]
    if m["vocab_size"] < m["vocab_size_requested"]:
        lines.append(
            f"the corpus ran out of merges below the {fmt(m['vocab_size_requested'])} tokens asked for; "
            f"pretokenize and the model use {fmt(m['vocab_size'])}"
        )
    return lines


HEADLINE = (
    "vocab_size",
    "val_bytes_per_token",
)
"""What metrics/tokenizer.json keeps (`dvc metrics diff`); every figure is in metrics/all/tokenizer.json."""


if __name__ == "__main__":
    stage_main("tokenizer", TokenizerConfig, run, summary, HEADLINE)
