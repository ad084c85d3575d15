"""Benchmark decontamination by word n-gram overlap (the GPT-3 recipe, as datatrove's `NGramsDecontFilter` and
lm-eval's janitor apply it): a training document that shares one n-gram (n = 13) of normalised words with an
evaluation item is contaminated.

Normalised words: the text lowercased, split into runs of letters and digits (punctuation, case and spacing
never hide an overlap: "The Cat, sat." and "the cat sat" are the same three words).

Which n-grams of an item count (datatrove's defaults): every n-gram of each target (the gold answer; for a
held-out prompt, the prompt itself), every n-gram spanning the end of the context and the start of a target,
and, with `context_ngrams`, every n-gram of the context alone. An item shorter than n words has no n-gram.

The index is a text file of `benchmark<TAB>n-gram` lines (gzip), written once by the stage and read once per
worker process into a dict.

Runbook
    from tasks.common import decontam
    index = decontam.build([decontam.Item("piqa", "Question: ...", ("the gold answer",))], n=13)
    decontam.first_overlap("a training document ...", index, 13)    # -> (n-gram, benchmark) or None
"""

from __future__ import annotations

import functools
import gzip
import io
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tasks.common.config import ScratchError

_WORD = re.compile(r"[^\W_]+")


def words(text: str) -> list[str]:
    """The normalised words of `text`: lowercased runs of letters and digits."""
    return _WORD.findall(text.lower())


@dataclass(frozen=True)
class Item:
    """One evaluation item: what the model reads (`context`) and what it must not have seen in training."""

    benchmark: str
    context: str
    targets: tuple[str, ...]


def item_ngrams(item: Item, n: int, context_ngrams: bool = False) -> set[str]:
    """The n-grams (space-joined normalised words) that mark a training document as contaminated by `item`."""
    context = words(item.context)
    found = {" ".join(context[i : i + n]) for i in range(len(context) - n + 1)} if context_ngrams else set()
    for target in item.targets:
        w = words(target)
        found.update(" ".join(w[i : i + n]) for i in range(len(w) - n + 1))
        for k in range(1, min(n - 1, len(w)) + 1):  # the last n-k context words + the first k target words
            if len(context) >= n - k:
                found.add(" ".join(context[len(context) - (n - k) :] + w[:k]))
    return found


def build(items: Iterable[Item], n: int, context_ngrams: bool = False) -> dict[str, str]:
    """n-gram → the first benchmark it came from, over all items."""
    index: dict[str, str] = {}
    for item in items:
        for gram in item_ngrams(item, n, context_ngrams):
            index.setdefault(gram, item.benchmark)
    return index


def write(path: Path, index: dict[str, str]) -> Path:
    """`benchmark<TAB>n-gram` lines, sorted; no time or name in the gzip header: the same index gives the same
    bytes, so DVC sees an unchanged output."""
    with (
        open(path, "wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0, filename="") as gz,
        io.TextIOWrapper(gz, encoding="utf-8", newline="\n") as f,
    ):
        for gram, bench in sorted(index.items()):
            f.write(f"{bench}\t{gram}\n")
    return path


@functools.cache
def _read(path: str, mtime_ns: int) -> dict[str, str]:
    index = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            bench, tab, gram = line.rstrip("\n").partition("\t")
            if not tab:
                raise ScratchError(f"{path}:{line_no}: not a `benchmark<TAB>n-gram` line")
            index[gram] = bench
    return index


def load(path: Path) -> dict[str, str]:
    """The index written by `write`, read once per process."""
    if not path.is_file():
        raise ScratchError(f"filter.decontam: no n-gram index at {path}")
    return _read(str(path), path.stat().st_mtime_ns)


def first_overlap(text: str, index: dict[str, str], n: int) -> tuple[str, str] | None:
    """(the first n-gram of `text` found in `index`, its benchmark), or None for a clean text."""
    if not index:
        return None
    w = words(text)
    for i in range(len(w) - n + 1):
        gram = " ".join(w[i : i + n])
        bench = index.get(gram)
        if bench is not None:
            return gram, bench
    return None


__all__ = ["Item", "build", "first_overlap", "item_ngrams", "load", "words", "write"]
