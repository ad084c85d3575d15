"""Degeneration metrics of sampled answers: does a model's text loop, stutter, collapse or make up words?

Pure text functions (standard library only, no torch). The evaluate stage scores every model's answers to the
held-out prompts with them; any stage holding a list of answers can do the same:

    from tasks.common import degeneration
    from tasks.sources import world
    degeneration.text_metrics(answers, world.vocabulary())
    # {"repeated_line_rate": 0.0, "repeated_ngram_rate": 0.04, "distinct_1": 0.21, "distinct_2": 0.49,
    #  "mean_words": 84.1, "nonword_rate": 0.0}

Words are runs of the letters a-z, lowercased ("Tom's" is "tom" + "s"): `words()`, which the story world's
`vocabulary()` uses too, so both sides of `nonword_rate` split text the same way.

    repeated_line_rate   per answer: the share of its lines (those with a letter or digit) that repeat an earlier
                         line of the same answer. A line repeats an earlier one when the two, lowercased and reduced
                         to letters, digits and single spaces, share a prefix at least half as long as the longer of
                         the two: exact repeats, and one line restarted with new endings ("Tom and the Sr" /
                         "Tom and the Kov" / "Tom and theendden": 2 of 3 lines). A title never repeats the story's
                         first paragraph that starts like it (the paragraph is far longer than the shared prefix).
    repeated_ngram_rate  per answer: the share of its word 3-grams that occurred earlier in it, 1 - unique/total
                         (seq-rep-3 of Welleck et al. 2019, "Neural text degeneration with unlikelihood training").
    distinct_1/2         unique word 1-grams (2-grams) / all word 1-grams (2-grams) of all the answers pooled (Li et
                         al. 2016, "A diversity-promoting objective function"): low = the answers say the same thing.
    mean_words           mean answer length in words (empty answers count as 0).
    nonword_rate         per answer: the share of its words outside `vocabulary`.

The per-answer rates are averaged over the answers that have something to measure (a line, a 3-gram, a word), so
each answer weighs the same however long it is; an empty answer shows in `mean_words`, not as a perfect score.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Sequence

NGRAM = 3
"""Word n-gram length of `repeated_ngram_rate`."""
METRIC_KEYS: tuple[str, ...] = (
    "repeated_line_rate",
    "repeated_ngram_rate",
    "distinct_1",
    "distinct_2",
    "mean_words",
    "nonword_rate",
)
"""The keys of `text_metrics`, in the order reports list them."""

_WORD = re.compile(r"[a-z]+")
_LINE_TOKEN = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    """The words of a text: runs of a-z after lowercasing (digits and punctuation split and drop out)."""
    return _WORD.findall(text.lower())


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """The n-grams of a token list, in order (none when it is shorter than n)."""
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


# ------------------------------------------------------------------------------------------------ one answer


def _line_keys(text: str) -> list[str]:
    """The lines of a text that hold a letter or digit, lowercased, reduced to letters, digits and single spaces."""
    keys = (" ".join(_LINE_TOKEN.findall(line.lower())) for line in text.splitlines())
    return [k for k in keys if k]


def _repeats(line: str, earlier: list[str]) -> bool:
    """True when `line` shares a prefix at least half as long as the longer of the two with an earlier line."""
    return any(2 * len(os.path.commonprefix([line, e])) >= max(len(line), len(e)) for e in earlier)


def repeated_line_rate(text: str) -> float | None:
    """Share of the text's lines that repeat an earlier line (see the module docstring); None without a line."""
    lines = _line_keys(text)
    if not lines:
        return None
    return sum(_repeats(line, lines[:i]) for i, line in enumerate(lines)) / len(lines)


def repeated_ngram_rate(tokens: Sequence[str], n: int = NGRAM) -> float | None:
    """Share of the n-grams that occurred earlier in the same token list (1 - unique/total); None without one."""
    grams = ngrams(tokens, n)
    return 1.0 - len(set(grams)) / len(grams) if grams else None


def nonword_rate(tokens: Sequence[str], vocabulary: Collection[str]) -> float | None:
    """Share of the words not in `vocabulary`; None for no word."""
    return sum(w not in vocabulary for w in tokens) / len(tokens) if tokens else None


def answer_metrics(text: str, vocabulary: Collection[str]) -> dict[str, float | None]:
    """One answer's repeated_line_rate, repeated_ngram_rate, nonword_rate (None: nothing to measure) and words."""
    tokens = words(text)
    return {
        "repeated_line_rate": repeated_line_rate(text),
        "repeated_ngram_rate": repeated_ngram_rate(tokens),
        "nonword_rate": nonword_rate(tokens, vocabulary),
        "words": float(len(tokens)),
    }


# ------------------------------------------------------------------------------------------------ all answers


def distinct(token_lists: Sequence[Sequence[str]], n: int) -> float:
    """Distinct-n (Li et al. 2016): unique n-grams / all n-grams over every token list pooled (0.0 for none)."""
    grams = [g for tokens in token_lists for g in ngrams(tokens, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def _mean(values: list[float | None]) -> float:
    """Mean of the values that are not None (0.0 when none is)."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else 0.0


def text_metrics(answers: Sequence[str], vocabulary: Collection[str]) -> dict[str, float]:
    """The METRIC_KEYS of a model's answers (see the module docstring); every value is a float, 0.0 for none."""
    per = [answer_metrics(a, vocabulary) for a in answers]
    token_lists = [words(a) for a in answers]
    return {
        "repeated_line_rate": _mean([p["repeated_line_rate"] for p in per]),
        "repeated_ngram_rate": _mean([p["repeated_ngram_rate"] for p in per]),
        "distinct_1": distinct(token_lists, 1),
        "distinct_2": distinct(token_lists, 2),
        "mean_words": _mean([p["words"] for p in per]),
        "nonword_rate": _mean([p["nonword_rate"] for p in per]),
    }
