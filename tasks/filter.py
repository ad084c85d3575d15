"""filter — drop low-quality documents: Gopher/C4-style text rules, language identification, a fastText quality
classifier and benchmark decontamination, each with its switch and thresholds in params.yaml; then scrub PII from
what is kept.

Runbook
    dvc repro filter                                   # or: scratchlm stage filter / python -m tasks.filter
    dvc exp run -S filter.word_count.min_words=10      # loosen one threshold
    dvc exp run -S filter.boilerplate.enabled=false    # switch one rule off
    dvc exp run -S filter.classifier.threshold=0.5     # a stricter quality classifier
    dvc exp run -S filter.classifier.source=model -S filter.classifier.model_path=/models/dclm.bin
                                                       # your own fastText classifier (DCLM's: __label__hq)
    zcat data/filter/shard-*.jsonl.gz | head           # look at what was kept
    jq -r '[.rule, .detail, .excerpt] | @tsv' data/filter/rejects.jsonl | less    # and at what was not
    jq .labelled.without metrics/all/filter.json       # the ground-truth scores had each model rule been off

Reads   data/ingest/shard-*.jsonl.gz, data/ingest/labels.jsonl (builtin ground truth, may be empty);
        for decontam: the evaluation sets (tasks/sources/evalsets.py): builtin cloze items and held-out prompts
        (generated from the seeds in params) and the HellaSwag/PIQA slices in `decontam.data_dir`;
        for classifier source=files: `classifier.positive` / `negative` (list them under deps in dvc.yaml)
Writes  data/filter/shard-*.jsonl.gz   the kept documents, PII replaced, one output shard per input shard (same name)
        data/filter/rejects.jsonl      up to `reject_samples` rejects per rule: {id, rule, detail, failed, excerpt}
        data/filter/labels.jsonl       the ground-truth rows of the kept documents (for dedup's scores)
        data/filter/classifier/        model.bin (the trained fastText classifier) + training.json (its examples,
                                       held-out scores, settings); also the MLflow artifact filter/classifier
        data/filter/decontam_ngrams.tsv.gz   the evaluation n-grams, `benchmark<TAB>n-gram` per line
        metrics/filter.json            docs in / kept / rejected, rejects by first failed rule, kept fraction,
                                       docs/s, PII replaced per kind; with labels: junk recall and the clean
                                       false-reject rate, also as if each model rule were off (`without`)
        metrics/all/filter.json        every figure: rejects by any failed rule, per junk kind, the classifier's
                                       training and held-out scores, what decontam indexed (sha256 per file)
Rules   in this order; a document is attributed to the first rule it fails (`rejected_by_rule`), and every rule
        it fails is counted too (`failed_by_rule`). Each rule has `enabled` and its thresholds:
          word_count            whitespace words outside [min_words, max_words]                   (Gopher)
                                (a document over max_words is judged by this rule alone: bounded memory)
          mean_word_length      mean characters per word outside [min_length, max_length]         (Gopher)
          symbol_ratio          ('#' + '...' + '…') per word above max_ratio                        (Gopher)
          ellipsis_lines        fraction of lines ending in '...' or '…' above max_fraction        (Gopher)
          bullet_lines          fraction of lines starting with a bullet above max_fraction        (Gopher)
          duplicate_lines       repeated lines: fraction of lines / of characters above the maxima (Gopher)
          duplicate_paragraphs  the same for blank-line separated paragraphs                       (Gopher)
          top_ngrams            characters in the most frequent word n-gram, n = 2..4              (Gopher)
          duplicate_ngrams      characters inside repeated word n-grams, n = 5..10                 (Gopher)
          alpha_ratio           alphabetic share of non-space characters below min_ratio
          boilerplate           lines containing a blocklisted phrase (cookie notices, lorem ipsum, ...) (C4)
        model rules (tasks/common/quality.py, tasks/common/decontam.py):
          language              most likely language (py3langid, first max_chars characters) outside `keep`
                                with probability >= min_score; an unsure call keeps the document
          classifier            fastText probability of positive_label below threshold              (DCLM)
                                source builtin: trained here on a builtin world of its own seed (clean stories
                                vs every junk kind); files: on positive/negative files; model: the user's .bin
          decontam              shares an n-gram (n = 13, normalised lowercase words) with an evaluation item:
                                its gold answer, or the span from its context into the answer; a held-out prompt
                                itself (GPT-3 / datatrove); with context_ngrams, the context alone too
Then    pii (after the rules, on kept documents): e-mail addresses, IPv4 and IPv6 addresses (global ones only with
        public_ips_only), phone numbers replaced by documentation placeholders (tasks/common/pii.py), counted
        per kind in metrics (`pii.replaced`); the labels are unchanged.
Checks  docs_in = kept + rejected, always (metrics carry both; a test holds it). An unknown or impossible
        threshold fails before any work, naming the key; so does a classifier model that cannot load or lacks
        positive_label. decontam's seeds must equal evaluate.cloze_seed and sampling.prompt_seed (a test holds
        the defaults equal); an absent HellaSwag/PIQA folder is skipped and named in metrics, as evaluate does.
Scale   shards are filtered independently in parallel on `data.parallel` (a local process pool or a Dask
        cluster); memory is one shard at a time per worker, plus the models, each loaded once per worker
        process (language model ~2.5 s, classifier ~bucket x dim x 4 bytes, n-gram index ~10 MB). The classifier
        is trained and the index built once, before the shards.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import re
import string
import time
import unicodedata
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from tasks.common import decontam, pii, quality
from tasks.common.config import DataConfig, ScratchError, check, input_path
from tasks.common.console import fmt
from tasks.common.dvcio import (
    StagePaths,
    fresh_dir,
    read_jsonl_gz,
    read_labels,
    shards,
    write_json,
    write_jsonl,
    write_jsonl_gz,
)
from tasks.common.parallel import parallel_map
from tasks.common.stage import stage_main
from tasks.common.tracking import Tracker
from tasks.sources import builtin, evalsets, files

BULLETS = ("•", "●", "◦", "▪", "▫", "‣", "⁃", "∙", "·", "-", "*", "–", "—", "►", "→")
ELLIPSES = ("...", "…")


# ------------------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class WordCount:
    enabled: bool = True
    """Apply this rule."""
    min_words: int = 20
    """Fewest whitespace-separated words a document may have (Gopher: 50; stories are short)."""
    max_words: int = 100_000
    """Most words a document may have (Gopher: 100,000)."""

    def __post_init__(self) -> None:
        check(0 <= self.min_words <= self.max_words, "min_words", "must satisfy 0 <= min_words <= max_words")


@dataclass(frozen=True)
class MeanWordLength:
    enabled: bool = True
    """Apply this rule."""
    min_length: float = 3.0
    """Smallest mean word length in characters, punctuation around words not counted (Gopher: 3)."""
    max_length: float = 10.0
    """Largest mean word length (Gopher: 10)."""

    def __post_init__(self) -> None:
        check(0 <= self.min_length <= self.max_length, "min_length", "must satisfy 0 <= min_length <= max_length")


@dataclass(frozen=True)
class SymbolRatio:
    enabled: bool = True
    """Apply this rule."""
    max_ratio: float = 0.1
    """Most '#' and ellipsis ('...' or '…') occurrences per word (Gopher: 0.1)."""

    def __post_init__(self) -> None:
        check(self.max_ratio >= 0, "max_ratio", "must be >= 0")


@dataclass(frozen=True)
class LineFraction:
    enabled: bool = True
    """Apply this rule."""
    max_fraction: float = 0.3
    """Largest fraction of non-empty lines that may have the property."""

    def __post_init__(self) -> None:
        check(0 <= self.max_fraction <= 1, "max_fraction", "must be in [0, 1]")


@dataclass(frozen=True)
class Repetition:
    enabled: bool = True
    """Apply this rule."""
    max_fraction: float = 0.3
    """Largest fraction of the pieces (lines or paragraphs) that repeat an earlier piece (Gopher: 0.3)."""
    max_char_fraction: float = 0.2
    """Largest fraction of characters inside pieces that repeat an earlier piece (Gopher: 0.2)."""

    def __post_init__(self) -> None:
        check(0 <= self.max_fraction <= 1, "max_fraction", "must be in [0, 1]")
        check(0 <= self.max_char_fraction <= 1, "max_char_fraction", "must be in [0, 1]")


@dataclass(frozen=True)
class NgramRule:
    enabled: bool = True
    """Apply this rule."""
    n: list[int] = field(default_factory=lambda: [2, 3, 4])
    """Word n-gram sizes to check (words lower-cased, punctuation around them stripped)."""
    max_char_fraction: list[float] = field(default_factory=lambda: [0.2, 0.18, 0.16])
    """Largest character fraction for each size in `n`, in the same order."""

    def __post_init__(self) -> None:
        check(len(self.n) == len(self.max_char_fraction), "max_char_fraction", "needs one value per entry of n")
        check(all(k >= 1 for k in self.n), "n", "sizes must be >= 1")
        check(all(0 <= f <= 1 for f in self.max_char_fraction), "max_char_fraction", "values must be in [0, 1]")


@dataclass(frozen=True)
class AlphaRatio:
    enabled: bool = True
    """Apply this rule."""
    min_ratio: float = 0.7
    """Smallest share of alphabetic characters among non-whitespace characters."""

    def __post_init__(self) -> None:
        check(0 <= self.min_ratio <= 1, "min_ratio", "must be in [0, 1]")


@dataclass(frozen=True)
class Boilerplate:
    enabled: bool = True
    """Apply this rule."""
    phrases: list[str] = field(
        default_factory=lambda: [
            "lorem ipsum",
            "terms of use",
            "privacy policy",
            "cookie policy",
            "uses cookies",
            "use of cookies",
            "use cookies",
            "enable javascript",
        ]
    )
    """Blocklisted phrases, matched case-insensitively inside lines (C4 drops whole pages holding any of these)."""
    max_line_fraction: float = 0.0
    """Largest fraction of non-empty lines that may contain a blocklisted phrase (0: none may)."""

    def __post_init__(self) -> None:
        check(all(p.strip() for p in self.phrases), "phrases", "must not contain empty phrases")
        check(0 <= self.max_line_fraction <= 1, "max_line_fraction", "must be in [0, 1]")


@dataclass(frozen=True)
class Language:
    enabled: bool = True
    """Apply this rule."""
    keep: list[str] = field(default_factory=lambda: ["en"])
    """Languages to keep (ISO 639-1 codes of py3langid's 97): a document confidently in another one is
    rejected."""
    min_score: float = 0.5
    """Probability (normalised over all languages) from which a most likely language outside `keep` rejects the
    document; below it the identifier is unsure (short, numeric or list-like text) and the document is kept."""
    max_chars: int = 500
    """Characters read from the start of each document (bounds the cost per document; 0 = all of it)."""

    def __post_init__(self) -> None:
        check(len(self.keep) > 0, "keep", "list at least one language (or switch the rule off)")
        check(all(re.fullmatch(r"[a-z]{2,3}", k) for k in self.keep), "keep", "ISO 639-1 codes, e.g. [en, de]")
        check(0 <= self.min_score <= 1, "min_score", "must be in [0, 1]")
        check(self.max_chars >= 0, "max_chars", "must be >= 0 (0 = the whole document)")


@dataclass(frozen=True)
class Classifier:
    enabled: bool = True
    """Apply this rule."""
    source: Literal["builtin", "files", "model"] = "builtin"
    """Where the classifier comes from: `builtin` = trained here on a builtin world of its own seed (clean stories
    positive, every junk kind negative); `files` = trained here on `positive` and `negative`; `model` = the
    fastText/floret supervised .bin at `model_path`, not trained."""
    threshold: float = 0.1
    """Documents whose probability of `positive_label` is below this are rejected (0.1: no real TinyStories
    story falls below it, every planted fluent junk document does; docs/BENCHMARKS.md, "Data quality")."""
    builtin_docs: int = 4000
    """source=builtin: documents of the training world (half clean stories, half junk)."""
    builtin_seed: int = 7331
    """source=builtin: its seed (not data.builtin.seed, so the classifier is scored on documents it never saw)."""
    positive: list[str] = field(default_factory=list)
    """source=files: files, folders or globs of good documents (the formats of data.sources)."""
    negative: list[str] = field(default_factory=list)
    """source=files: files, folders or globs of bad documents."""
    model_path: str = ""
    """source=model: the model file (relative to the project, or absolute)."""
    positive_label: str = "__label__hq"
    """The label whose probability is the score (the label trained models give the positives)."""
    dim: int = 16
    """Training: embedding size."""
    epoch: int = 10
    """Training: passes over the examples."""
    lr: float = 0.5
    """Training: learning rate."""
    word_ngrams: int = 2
    """Training: word n-grams up to this size are features."""
    bucket: int = 100_000
    """Training: hash buckets for the n-gram features (the model file is about bucket x dim x 4 bytes)."""

    def __post_init__(self) -> None:
        check(0 <= self.threshold <= 1, "threshold", "must be in [0, 1]")
        check(self.builtin_docs >= 20, "builtin_docs", "must be >= 20")
        check(self.source != "model" or bool(self.model_path), "model_path", "source=model needs a model_path")
        check(
            self.source != "files" or bool(self.positive and self.negative),
            "positive",
            "source=files needs both positive and negative files",
        )
        check(self.positive_label.startswith("__label__"), "positive_label", "must start with __label__")
        check(self.dim >= 1 and self.epoch >= 1 and self.word_ngrams >= 1, "dim", "dim, epoch, word_ngrams >= 1")
        check(self.lr > 0, "lr", "must be > 0")
        check(self.bucket >= 0, "bucket", "must be >= 0")


@dataclass(frozen=True)
class Decontam:
    enabled: bool = True
    """Apply this rule."""
    n: int = 13
    """Word n-gram size (GPT-3: 13; datatrove: 12)."""
    benchmarks: list[str] = field(default_factory=lambda: ["cloze", "hellaswag", "piqa", "prompts"])
    """Evaluation sets to decontaminate against (tasks/sources/evalsets.py): the evaluate stage's benchmarks and
    the held-out prompts that evaluate, dpo and ppo answer."""
    data_dir: str = "../shared/data"
    """Folder of the hellaswag/ and piqa/ slices: the same as evaluate.data_dir (absent slices are skipped)."""
    cloze_seed: int = 9001
    """The cloze items' seed: the same as evaluate.cloze_seed."""
    cloze_items: int = 500
    """Cloze items indexed (evaluate draws 2 x evaluate.limit; item i is the same for any count)."""
    prompt_seed: int = 4242
    """The held-out prompts' seed: the same as sampling.prompt_seed."""
    prompt_items: int = 500
    """Held-out prompts indexed (at least the largest `prompts` of the sampling sections)."""
    context_ngrams: bool = False
    """Also count n-grams of an item's context alone (GPT-3 style). Off (datatrove's default): on the builtin
    world the cloze contexts are the corpus's own template text and would flag most clean stories."""

    def __post_init__(self) -> None:
        check(self.n >= 5, "n", "must be >= 5 (shorter n-grams match ordinary phrases)")
        unknown = [b for b in self.benchmarks if b not in evalsets.BENCHMARKS]
        check(not unknown, "benchmarks", f"unknown {unknown} (known: {', '.join(evalsets.BENCHMARKS)})")
        check(self.cloze_items >= 0 and self.prompt_items >= 0, "cloze_items", "item counts must be >= 0")


@dataclass(frozen=True)
class Pii:
    enabled: bool = True
    """Scrub the kept documents (after the rules)."""
    kinds: list[str] = field(default_factory=lambda: list(pii.KINDS))
    """What to replace (tasks/common/pii.py): email, ipv4, ipv6, phone."""
    public_ips_only: bool = True
    """Replace only global IP addresses (datatrove's default): 192.168.x.x, 127.0.0.1, fe80:: stay."""

    def __post_init__(self) -> None:
        unknown = [k for k in self.kinds if k not in pii.KINDS]
        check(not unknown, "kinds", f"unknown {unknown} (known: {', '.join(pii.KINDS)})")


@dataclass(frozen=True)
class FilterConfig:
    word_count: WordCount = field(default_factory=WordCount)
    """Document length bounds in words."""
    mean_word_length: MeanWordLength = field(default_factory=MeanWordLength)
    """Bounds on the mean word length (catches symbol soup and run-together tokens)."""
    symbol_ratio: SymbolRatio = field(default_factory=SymbolRatio)
    """Hash/ellipsis symbols per word."""
    ellipsis_lines: LineFraction = field(default_factory=lambda: LineFraction(max_fraction=0.3))
    """Lines ending in an ellipsis (truncated snippets, teaser lists)."""
    bullet_lines: LineFraction = field(default_factory=lambda: LineFraction(max_fraction=0.9))
    """Lines starting with a bullet (menus, link lists)."""
    duplicate_lines: Repetition = field(default_factory=Repetition)
    """Repeated lines."""
    duplicate_paragraphs: Repetition = field(default_factory=Repetition)
    """Repeated paragraphs (blank-line separated)."""
    top_ngrams: NgramRule = field(default_factory=lambda: NgramRule(n=[2, 3, 4], max_char_fraction=[0.25, 0.22, 0.2]))
    """Characters covered by the single most frequent word n-gram, per n (Gopher: n=2,3,4 → 0.20, 0.18, 0.16;
    looser here because children's stories repeat their hero's name and refrains)."""
    duplicate_ngrams: NgramRule = field(
        default_factory=lambda: NgramRule(n=[5, 6, 7, 8, 9, 10], max_char_fraction=[0.3, 0.27, 0.24, 0.21, 0.18, 0.15])
    )
    """Characters covered by repeats of an earlier word n-gram, per n (Gopher: n=5..10 → 0.15 .. 0.10; looser
    here for the same reason)."""
    alpha_ratio: AlphaRatio = field(default_factory=AlphaRatio)
    """Share of alphabetic characters."""
    boilerplate: Boilerplate = field(default_factory=Boilerplate)
    """Blocklisted boilerplate phrases."""
    language: Language = field(default_factory=Language)
    """Language identification (py3langid)."""
    classifier: Classifier = field(default_factory=Classifier)
    """The fastText quality classifier (DCLM-style)."""
    decontam: Decontam = field(default_factory=Decontam)
    """Benchmark decontamination: n-gram overlap with the evaluation sets."""
    pii: Pii = field(default_factory=Pii)
    """PII scrubbing of the kept documents."""
    reject_samples: int = 5
    """Rejected documents kept per rule in rejects.jsonl for inspection."""
    reject_excerpt_chars: int = 300
    """Characters of each sampled reject written to rejects.jsonl."""

    def __post_init__(self) -> None:
        check(self.reject_samples >= 0, "reject_samples", "must be >= 0")
        check(self.reject_excerpt_chars >= 0, "reject_excerpt_chars", "must be >= 0")


Config = FilterConfig  # the section class params.yaml loads (tasks/common/config.py)


# ------------------------------------------------------------------------------------------------ text statistics

# Punctuation stripped from both ends of a word before length and n-gram statistics.
_PUNCTUATION = string.punctuation + "\u2018\u2019\u201c\u201d\u00ab\u00bb\u2026\u2013\u2014\u00bf\u00a1"
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_NOT_LETTER = re.compile(r"[\W\d_]+")


@dataclass
class TextStats:
    """What the rules look at, computed once per document."""

    text: str
    words: list[str]  # whitespace tokens
    norm_words: list[str]  # lower-cased, punctuation around them stripped, empty ones dropped
    lines: list[str]  # non-empty lines, stripped
    paragraphs: list[str]  # non-empty paragraphs, stripped
    _ranks: list[np.ndarray] = field(default_factory=list, repr=False)

    @classmethod
    def of(cls, text: str) -> TextStats:
        words = text.split()
        norm = [w for w in (t.strip(_PUNCTUATION) for t in text.lower().split()) if w]
        lines = [s for s in (line.strip() for line in text.splitlines()) if s]
        paragraphs = [s for s in (p.strip() for p in _PARAGRAPH_BREAK.split(text)) if s]
        return cls(text, words, norm, lines, paragraphs)

    def ngram_ids(self, n: int) -> np.ndarray:
        """An id per word n-gram of norm_words, equal ids for equal n-grams → (len(norm_words) - n + 1,) int64.

        Built up exactly, one n at a time: the id of an n-gram ranks the pair (id of its (n-1)-gram prefix,
        id of its last word)."""
        if not self._ranks:
            vocab: dict[str, int] = {}
            self._ranks.append(np.array([vocab.setdefault(w, len(vocab)) for w in self.norm_words], dtype=np.int64))
        while len(self._ranks) < n:
            prev, unigram = self._ranks[-1], self._ranks[0]
            k = len(self._ranks) + 1  # the n-gram size being built
            if len(unigram) < k:
                self._ranks.append(np.zeros(0, dtype=np.int64))
                continue
            pair = prev[: len(unigram) - k + 1] * (len(unigram) + 1) + unigram[k - 1 :]
            self._ranks.append(np.unique(pair, return_inverse=True)[1].astype(np.int64))
        return self._ranks[n - 1]

    def word_chars(self) -> np.ndarray:
        """Characters per normalised word → (len(norm_words),) int64."""
        return np.fromiter(map(len, self.norm_words), dtype=np.int64, count=len(self.norm_words))


def count_words(text: str, block: int = 1 << 20) -> int:
    """`len(text.split())` without the list: whitespace words counted `block` characters at a time."""
    n, after_space = 0, True
    for i in range(0, len(text), block):
        chunk = text[i : i + block]
        n += len(chunk.split()) - (not after_space and not chunk[0].isspace())  # a word across the boundary
        after_space = chunk[-1].isspace()
    return n


def repeated_fractions(pieces: list[str]) -> tuple[float, float]:
    """(fraction of pieces equal to an earlier piece, fraction of their characters)."""
    if not pieces:
        return 0.0, 0.0
    seen: set[str] = set()
    repeats = repeat_chars = 0
    for piece in pieces:
        if piece in seen:
            repeats += 1
            repeat_chars += len(piece)
        seen.add(piece)
    return repeats / len(pieces), repeat_chars / max(1, sum(map(len, pieces)))


def top_ngram_char_fraction(s: TextStats, n: int) -> float:
    """Characters covered by the most frequent n-gram (if it occurs more than once; among equally frequent ones
    the longest) over all word characters."""
    ids = s.ngram_ids(n)
    if len(ids) == 0:
        return 0.0
    counts = np.bincount(ids)
    if counts.max() < 2:
        return 0.0
    window_chars = np.convolve(s.word_chars(), np.ones(n, dtype=np.int64), mode="valid")  # chars per window
    top = counts[ids] == counts.max()
    return float(counts.max() * window_chars[top].max() / s.word_chars().sum())


def duplicate_ngram_char_fraction(s: TextStats, n: int) -> float:
    """Characters of the words covered by repeats of an earlier n-gram (overlaps counted once); the first
    occurrence of each n-gram is not counted, so a document that says one thing twice scores about 0.5."""
    ids = s.ngram_ids(n)
    if len(ids) == 0:
        return 0.0
    first = np.full(ids.max() + 1, len(ids), dtype=np.int64)
    np.minimum.at(first, ids, np.arange(len(ids)))
    repeat_starts = np.flatnonzero(first[ids] != np.arange(len(ids)))
    if len(repeat_starts) == 0:
        return 0.0
    edges = np.zeros(len(s.norm_words) + 1, dtype=np.int64)  # +1 where a repeat starts, -1 after it ends
    np.add.at(edges, repeat_starts, 1)
    np.add.at(edges, repeat_starts + n, -1)
    covered = np.cumsum(edges[:-1]) > 0
    chars = s.word_chars()
    return float(chars[covered].sum() / chars.sum())


# ------------------------------------------------------------------------------------------------ rules

# A rule returns None when the document passes, or a short human-readable reason when it fails.
RuleFn = Callable[[TextStats, object], "str | None"]


def rule_word_count(s: TextStats, r: WordCount) -> str | None:
    n = len(s.words)
    if n < r.min_words:
        return f"{n} words < {r.min_words}"
    if n > r.max_words:
        return f"{n} words > {r.max_words}"
    return None


def rule_mean_word_length(s: TextStats, r: MeanWordLength) -> str | None:
    if not s.norm_words:
        return "no words"
    mean = sum(map(len, s.norm_words)) / len(s.norm_words)
    if not r.min_length <= mean <= r.max_length:
        return f"mean word length {mean:.2f} outside [{r.min_length}, {r.max_length}]"
    return None


def rule_symbol_ratio(s: TextStats, r: SymbolRatio) -> str | None:
    symbols = s.text.count("#") + s.text.count("...") + s.text.count("…")
    ratio = symbols / max(1, len(s.words))
    return f"{ratio:.3f} symbols per word > {r.max_ratio}" if ratio > r.max_ratio else None


def rule_ellipsis_lines(s: TextStats, r: LineFraction) -> str | None:
    frac = sum(line.endswith(ELLIPSES) for line in s.lines) / max(1, len(s.lines))
    return f"{frac:.2f} of lines end in an ellipsis > {r.max_fraction}" if frac > r.max_fraction else None


def rule_bullet_lines(s: TextStats, r: LineFraction) -> str | None:
    frac = sum(line.startswith(BULLETS) for line in s.lines) / max(1, len(s.lines))
    return f"{frac:.2f} of lines start with a bullet > {r.max_fraction}" if frac > r.max_fraction else None


def _repetition(pieces: list[str], r: Repetition, what: str) -> str | None:
    frac, char_frac = repeated_fractions(pieces)
    if frac > r.max_fraction:
        return f"{frac:.2f} of {what} repeat > {r.max_fraction}"
    if char_frac > r.max_char_fraction:
        return f"{char_frac:.2f} of {what} characters repeat > {r.max_char_fraction}"
    return None


def rule_duplicate_lines(s: TextStats, r: Repetition) -> str | None:
    return _repetition(s.lines, r, "lines")


def rule_duplicate_paragraphs(s: TextStats, r: Repetition) -> str | None:
    return _repetition(s.paragraphs, r, "paragraphs")


def rule_top_ngrams(s: TextStats, r: NgramRule) -> str | None:
    for n, limit in zip(r.n, r.max_char_fraction):
        frac = top_ngram_char_fraction(s, n)
        if frac > limit:
            return f"top {n}-gram covers {frac:.2f} of characters > {limit}"
    return None


def rule_duplicate_ngrams(s: TextStats, r: NgramRule) -> str | None:
    for n, limit in zip(r.n, r.max_char_fraction):
        frac = duplicate_ngram_char_fraction(s, n)
        if frac > limit:
            return f"repeated {n}-grams cover {frac:.2f} of characters > {limit}"
    return None


def rule_alpha_ratio(s: TextStats, r: AlphaRatio) -> str | None:
    visible = sum(map(len, s.words))  # non-whitespace characters
    ratio = len(_NOT_LETTER.sub("", s.text)) / max(1, visible)
    return f"alphabetic share {ratio:.2f} < {r.min_ratio}" if ratio < r.min_ratio else None


def rule_boilerplate(s: TextStats, r: Boilerplate) -> str | None:
    phrases = [p.lower() for p in r.phrases]
    hits = [line for line in s.lines if any(p in line.lower() for p in phrases)]
    frac = len(hits) / max(1, len(s.lines))
    if hits and frac > r.max_line_fraction:
        found = next(p for p in phrases if p in hits[0].lower())
        return f"{len(hits)} of {len(s.lines)} lines hold blocklisted phrases (first: {found!r})"
    return None


# Rule name (= its Config field) → check. Order matters: a reject is attributed to the first rule it fails.
RULES: dict[str, RuleFn] = {
    "word_count": rule_word_count,
    "mean_word_length": rule_mean_word_length,
    "symbol_ratio": rule_symbol_ratio,
    "ellipsis_lines": rule_ellipsis_lines,
    "bullet_lines": rule_bullet_lines,
    "duplicate_lines": rule_duplicate_lines,
    "duplicate_paragraphs": rule_duplicate_paragraphs,
    "top_ngrams": rule_top_ngrams,
    "duplicate_ngrams": rule_duplicate_ngrams,
    "alpha_ratio": rule_alpha_ratio,
    "boilerplate": rule_boilerplate,
}


# ------------------------------------------------------------------------------------------------ model rules


@dataclass(frozen=True)
class Models:
    """The files the classifier and decontam rules read (paths only: picklable to pool workers, where each file
    loads once per process). The language rule needs none: its model ships with py3langid."""

    classifier: Path | None = None
    """The fastText/floret model (rule `classifier`); None: the rule is not evaluated."""
    label: str = quality.POSITIVE
    """The classifier label whose probability is the score."""
    decontam: Path | None = None
    """The n-gram index (rule `decontam`, tasks/common/decontam.py); None: the rule is not evaluated."""


def rule_language(text: str, r: Language, models: Models | None) -> str | None:
    lang, score = quality.language(text[: r.max_chars] if r.max_chars else text)
    if lang not in r.keep and score >= r.min_score:
        return f"language {lang} ({score:.2f}) not in {r.keep}"
    return None


def rule_classifier(text: str, r: Classifier, models: Models | None) -> str | None:
    if models is None or models.classifier is None:
        return None
    score = quality.score(models.classifier, text, models.label)
    return f"quality score {score:.3f} < {r.threshold}" if score < r.threshold else None


def rule_decontam(text: str, r: Decontam, models: Models | None) -> str | None:
    if models is None or models.decontam is None:
        return None
    hit = decontam.first_overlap(text, decontam.load(models.decontam), r.n)
    return f"{r.n}-gram of {hit[1]}: {hit[0]!r}" if hit else None


# Rules that need a model or an index, after the text rules (same attribution: the first failed rule).
MODEL_RULES: dict[str, Callable[[str, object, Models | None], str | None]] = {
    "language": rule_language,
    "classifier": rule_classifier,
    "decontam": rule_decontam,
}
ALL_RULES: tuple[str, ...] = (*RULES, *MODEL_RULES)


def failed_rules(text: str, cfg: FilterConfig, models: Models | None = None) -> dict[str, str]:
    """Every enabled rule `text` fails → its reason, in rule order (empty: the document is kept).

    The text rules and the language rule always run; the classifier and decontam rules run when `models` names
    their file (the stage always passes them; without, this judges the text rules and the language alone).
    A document with more than `word_count.max_words` words is judged by word_count alone: the other rules'
    statistics (word lists, n-gram ids) take ~50 bytes per character (one 50 MB document: 2.6 GB peak).
    Its words are counted block by block instead, in memory independent of its length."""
    text = unicodedata.normalize("NFC", text)
    if cfg.word_count.enabled and (len(text) + 1) // 2 > cfg.word_count.max_words:  # could have too many words
        n = count_words(text)
        if n > cfg.word_count.max_words:
            return {"word_count": f"{n} words > {cfg.word_count.max_words} (other rules not evaluated)"}
    stats = TextStats.of(text)
    failed = {}
    for name, rule in RULES.items():
        rule_cfg = getattr(cfg, name)
        if rule_cfg.enabled:
            reason = rule(stats, rule_cfg)
            if reason is not None:
                failed[name] = reason
    for name, model_rule in MODEL_RULES.items():
        rule_cfg = getattr(cfg, name)
        if rule_cfg.enabled:
            reason = model_rule(text, rule_cfg, models)
            if reason is not None:
                failed[name] = reason
    return failed


# ------------------------------------------------------------------------------------------------ per shard


@dataclass
class ShardResult:
    shard: str
    docs_in: int = 0
    kept: int = 0
    rejected_by_rule: Counter = field(default_factory=Counter)  # first failed rule
    failed_by_rule: Counter = field(default_factory=Counter)  # every failed rule
    samples: dict[str, list[dict]] = field(default_factory=dict)  # rule → first rejects in this shard
    rejected: dict[str, list[str]] = field(default_factory=dict)  # id → every rule it failed, first first
    pii_found: Counter = field(default_factory=Counter)  # PII kind → replacements in kept documents
    pii_docs: int = 0  # kept documents with at least one replacement


def filter_shard(path: Path, out_dir: Path, cfg: FilterConfig, models: Models | None = None) -> ShardResult:
    """Filter one input shard into `out_dir/<same name>` (kept documents, PII scrubbed); return its counts,
    reject samples and rejected ids."""
    result = ShardResult(path.name)

    def kept_docs() -> Iterable[dict]:
        for doc in read_jsonl_gz(path):
            result.docs_in += 1
            failed = failed_rules(doc["text"], cfg, models)
            if not failed:
                result.kept += 1
                yield scrubbed(doc, cfg.pii, result) if cfg.pii.enabled else doc
                continue
            first = next(iter(failed))
            result.rejected_by_rule[first] += 1
            result.failed_by_rule.update(failed.keys())
            result.rejected[doc["id"]] = list(failed)
            bucket = result.samples.setdefault(first, [])
            if len(bucket) < cfg.reject_samples:
                bucket.append(
                    {
                        "id": doc["id"],
                        "rule": first,
                        "detail": failed[first],
                        "failed": list(failed),
                        "excerpt": doc["text"][: cfg.reject_excerpt_chars],
                    }
                )

    write_jsonl_gz(out_dir / path.name, kept_docs())
    return result


def scrubbed(doc: dict, r: Pii, result: ShardResult) -> dict:
    """The document with its PII replaced (counted into `result`)."""
    text, found = pii.scrub(doc["text"], r.kinds, r.public_ips_only)
    if not found:
        return doc
    result.pii_found.update(found)
    result.pii_docs += 1
    return {**doc, "text": text}


# ------------------------------------------------------------------------------------------------ stage


def run(cfg: FilterConfig, paths: StagePaths, tracker: Tracker, data: DataConfig) -> dict:
    inputs = shards(paths.of("ingest"))
    out = fresh_dir(paths.out)
    models, prepared = prepare_models(cfg, out, data, paths.root)
    started = time.perf_counter()
    results = parallel_map(
        functools.partial(filter_shard, out_dir=out, cfg=cfg, models=models),
        inputs,
        data.parallel,
        desc="filter",
        postfix=lambda done: {"docs": sum(r.docs_in for r in done), "kept": sum(r.kept for r in done)},
    )
    seconds = time.perf_counter() - started
    write_jsonl(out / "rejects.jsonl", first_rejects(results, cfg.reject_samples))
    labels = read_labels(paths.of("ingest") / "labels.jsonl")
    rejected = {i: rules for r in results for i, rules in r.rejected.items()}
    write_jsonl(out / "labels.jsonl", [row for row in labels if row["id"] not in rejected])
    metrics = {
        **summarise(results, seconds),
        **prepared,
        **pii_summary(results, cfg.pii),
        **ground_truth_scores(labels, rejected),
    }
    tracker.log_artifact(out / "rejects.jsonl", "filter")
    if (out / "classifier").is_dir():
        tracker.log_artifact(out / "classifier", "filter/classifier")
    return metrics


# ------------------------------------------------------------------------------------------------ models


def prepare_models(cfg: FilterConfig, out: Path, data: DataConfig, root: Path) -> tuple[Models, dict]:
    """Train or locate the classifier and build the decontamination index, before any shard is read:
    (the Models the workers load, what was prepared for the metrics)."""
    info: dict = {}
    classifier_path, label = None, cfg.classifier.positive_label
    if cfg.classifier.enabled:
        started = time.perf_counter()
        classifier_path, info["classifier"] = prepare_classifier(cfg.classifier, out / "classifier", data, root)
        info["classifier"]["seconds"] = round(time.perf_counter() - started, 2)
    index_path = None
    if cfg.decontam.enabled:
        started = time.perf_counter()
        index_path, info["decontam"] = build_decontam(cfg.decontam, out, root)
        info["decontam"]["seconds"] = round(time.perf_counter() - started, 2)
    if cfg.language.enabled:
        started = time.perf_counter()
        quality.warm()  # a broken install fails here, before any shard; workers load it again, once each
        info["language"] = {"keep": list(cfg.language.keep), "load_seconds": round(time.perf_counter() - started, 2)}
    return Models(classifier_path, label, index_path), info


def classifier_examples(r: Classifier, data: DataConfig, root: Path) -> tuple[Iterator[tuple[str, bool]], dict]:
    """The (text, positive) training examples of source builtin or files, and what they are."""
    if r.source == "builtin":
        docs = builtin.generate_corpus(r.builtin_docs, r.builtin_seed, 0.0, 0.0, 0.5)
        what = {"source": f"builtin world: {r.builtin_docs} documents, seed {r.builtin_seed}, half junk"}
        return ((d.text, d.label == "clean") for d in docs), what
    unreadable: Counter = Counter()

    def read(specs: list[str], positive: bool, key: str) -> Iterator[tuple[str, bool]]:
        for spec in specs:
            try:
                paths, _skipped = files.expand(spec, root)
            except ScratchError as e:  # its message names data.sources: name the key it came from instead
                raise ScratchError(f"filter.classifier.{key}: {str(e).removeprefix('data.sources: ')}") from None
            for path in paths:
                for record in files.read_file(path, data.text_field, data.txt_separator, keep_tail=True):
                    if record.text is None:
                        unreadable[key] += record.count
                    else:
                        yield record.text, positive

    examples = itertools.chain(read(r.positive, True, "positive"), read(r.negative, False, "negative"))
    return examples, {"source": f"files: positive {r.positive}, negative {r.negative}", "unreadable": unreadable}


def prepare_classifier(r: Classifier, folder: Path, data: DataConfig, root: Path) -> tuple[Path, dict]:
    """Train the classifier into folder/model.bin (builtin, files) or check the user's (model): (path, info).

    Training holds out every tenth example (by a hash of its text) and scores the model on them."""
    if r.source == "model":
        path = input_path(r.model_path, root)
        found = quality.labels(path)
        if r.positive_label not in found:
            raise ScratchError(
                f"filter.classifier.positive_label: {r.positive_label!r} is not a label of {path} (its labels: {found})"
            )
        return path, {"source": f"model {path}", "labels": found}
    examples, info = classifier_examples(r, data, root)
    held_out: list[tuple[str, bool]] = []

    def training() -> Iterator[tuple[str, bool]]:
        for text, positive in examples:
            if zlib.crc32(text.encode("utf-8")) % 10 == 0:
                held_out.append((text, positive))
            else:
                yield text, positive

    folder.mkdir(parents=True, exist_ok=True)
    hyper = quality.Hyper(r.dim, r.epoch, r.lr, r.word_ngrams, r.bucket)
    path = folder / "model.bin"
    info["trained_on"] = quality.train(training(), path, hyper)
    info["held_out"] = held_out_scores(path, held_out, r.threshold)
    info["unreadable"] = dict(info.get("unreadable", {}))
    info["model_bytes"] = path.stat().st_size
    write_json(folder / "training.json", {**info, "hyper": dataclasses.asdict(hyper), "threshold": r.threshold})
    return path, info


def held_out_scores(path: Path, held_out: list[tuple[str, bool]], threshold: float) -> dict:
    """How the model does on the examples held out of training: negatives rejected, positives rejected."""
    pos = [quality.score(path, t) for t, positive in held_out if positive]
    neg = [quality.score(path, t) for t, positive in held_out if not positive]
    return {
        "positive": len(pos),
        "negative": len(neg),
        "negative_recall": round(sum(s < threshold for s in neg) / max(1, len(neg)), 6),
        "positive_false_reject_rate": round(sum(s < threshold for s in pos) / max(1, len(pos)), 6),
    }


def build_decontam(r: Decontam, out: Path, root: Path) -> tuple[Path, dict]:
    """The n-gram index of the evaluation sets, written to out/decontam_ngrams.tsv.gz: (path, info)."""
    items, read, skipped = evalsets.items(
        r.benchmarks, input_path(r.data_dir, root), r.cloze_seed, r.cloze_items, r.prompt_seed, r.prompt_items
    )
    for name, reason in skipped.items():
        print(f"filter: decontam skips {name}: {reason}")
    index = decontam.build(items, r.n, r.context_ngrams)
    path = decontam.write(out / "decontam_ngrams.tsv.gz", index)
    per_bench = Counter(index.values())
    for name in read:
        read[name]["ngrams"] = per_bench[name]
    return path, {"n": r.n, "ngrams": len(index), "benchmarks": read, "skipped": skipped}


# ------------------------------------------------------------------------------------------------ metrics


def first_rejects(results: list[ShardResult], per_rule: int) -> Iterator[dict]:
    """The first `per_rule` rejects of each rule in corpus order (rule by rule)."""
    for rule in ALL_RULES:
        yield from itertools.islice((row for r in results for row in r.samples.get(rule, [])), per_rule)


def summarise(results: list[ShardResult], seconds: float) -> dict:
    rejected_by_rule: Counter = Counter()
    failed_by_rule: Counter = Counter()
    for r in results:
        rejected_by_rule.update(r.rejected_by_rule)
        failed_by_rule.update(r.failed_by_rule)
    docs_in = sum(r.docs_in for r in results)
    kept = sum(r.kept for r in results)
    return {
        "docs_in": docs_in,
        "kept": kept,
        "rejected": docs_in - kept,
        "kept_fraction": round(kept / max(1, docs_in), 6),
        "docs_per_s": round(docs_in / max(seconds, 1e-9), 1),
        "rejected_by_rule": {k: rejected_by_rule[k] for k in ALL_RULES if rejected_by_rule[k]},
        "failed_by_rule": {k: failed_by_rule[k] for k in ALL_RULES if failed_by_rule[k]},
    }


def pii_summary(results: list[ShardResult], r: Pii) -> dict:
    """PII replaced in the kept documents, per kind (every enabled kind listed, 0 included)."""
    if not r.enabled:
        return {}
    found: Counter = Counter()
    for result in results:
        found.update(result.pii_found)
    return {
        "pii": {
            "docs_changed": sum(x.pii_docs for x in results),
            "replaced": {k: found[k] for k in pii.KINDS if k in r.kinds},
        }
    }


def ground_truth_scores(labels: list[dict], rejected: dict[str, list[str]] | set[str]) -> dict:
    """Junk recall (overall and per junk kind) and clean false-reject rate against builtin labels; with the rules
    each reject failed (`rejected`: id → rules, first first): the clean rejects by first rule, and for each model
    rule that rejected anything, the same scores had it been off (`without`)."""
    if not labels:
        return {}
    failed = rejected if isinstance(rejected, dict) else {i: ["?"] for i in rejected}
    scores = _scores(labels, set(failed))
    clean_by_rule = Counter(failed[r["id"]][0] for r in labels if r["label"] == "clean" and r["id"] in failed)
    scores["clean_rejected_by_rule"] = {k: clean_by_rule[k] for k in (*ALL_RULES, "?") if clean_by_rule[k]}
    used = {rule for rules in failed.values() for rule in rules} & set(MODEL_RULES)
    scores["without"] = {
        rule: _scores(labels, {i for i, rules in failed.items() if set(rules) - {rule}})
        for rule in MODEL_RULES
        if rule in used
    }
    return {"labelled": scores}


def _scores(labels: list[dict], rejected_ids: set[str]) -> dict:
    junk = [row for row in labels if row["label"] == "junk"]
    clean = [row for row in labels if row["label"] == "clean"]
    by_kind: dict[str, list[int]] = {}
    for row in junk:
        hit_total = by_kind.setdefault(str(row["of"]), [0, 0])
        hit_total[0] += row["id"] in rejected_ids
        hit_total[1] += 1
    return {
        "junk": len(junk),
        "clean": len(clean),
        "junk_recall": round(sum(r["id"] in rejected_ids for r in junk) / max(1, len(junk)), 6),
        "clean_false_reject_rate": round(sum(r["id"] in rejected_ids for r in clean) / max(1, len(clean)), 6),
        "junk_recall_by_kind": {k: round(h / t, 6) for k, (h, t) in sorted(by_kind.items())},
    }


def summary(m: dict, paths: StagePaths) -> list[str]:
    """Kept share, rejects by the first rule they failed, the model rules, PII, the ground-truth scores."""
    lines = [
        f"kept {fmt(m['kept'])} of {fmt(m['docs_in'])} documents ({m['kept_fraction']:.1%}), "
        f"{m['docs_per_s']:,.0f} docs/s"
    ]
    if m["rejected"]:
        lines.append(
            "rejected by the first rule failed: "
            + ", ".join(f"{rule} {fmt(n)}" for rule, n in m["rejected_by_rule"].items())
        )
    if "classifier" in m:
        c = m["classifier"]
        held = c.get("held_out")
        lines.append(
            f"classifier: {c['source']}"
            + (
                f"; held-out negatives rejected {held['negative_recall']:.3f}, positives rejected "
                f"{held['positive_false_reject_rate']:.3f}"
                if held
                else ""
            )
        )
    if "decontam" in m:
        d = m["decontam"]
        skipped = f" (skipped: {', '.join(d['skipped'])})" if d["skipped"] else ""
        lines.append(f"decontam: {fmt(d['ngrams'])} {d['n']}-grams of {', '.join(d['benchmarks'])}{skipped}")
    if "pii" in m:
        p = m["pii"]
        found = ", ".join(f"{k} {fmt(n)}" for k, n in p["replaced"].items())
        lines.append(f"PII replaced in {fmt(p['docs_changed'])} kept documents: {found}")
    if "labelled" in m:
        g = m["labelled"]
        lines.append(
            f"ground truth: junk recall {g['junk_recall']:.3f} of {fmt(g['junk'])}, clean false-reject "
            f"rate {g['clean_false_reject_rate']:.4f} of {fmt(g['clean'])}"
        )
    lines.append(f"samples of rejects in {(paths.out / 'rejects.jsonl').relative_to(paths.root)}")
    return lines


HEADLINE = (
    "docs_in",
    "kept",
    "kept_fraction",
    "docs_per_s",
    "labelled.junk_recall",
    "labelled.clean_false_reject_rate",
    "pii.docs_changed",
)
"""What metrics/filter.json keeps (`dvc metrics diff`); every figure (rejects per rule, the scores as if each model
rule were off, PII per kind) is in metrics/all/filter.json."""


if __name__ == "__main__":
    stage_main("filter", FilterConfig, run, summary, HEADLINE)
