"""Model-based quality signals for the filter stage: a fastText quality classifier (DCLM-style) and language
identification. Both load once per process (`functools.cache`), so a pool worker pays for a model once, not per
document or shard.

Classifier (floret, fastText's API)
    train(examples, path, hyper) writes a supervised model: `__label__hq` for the positives, `__label__lq` for the
    negatives, on `classifier_text` (lowercased words and punctuation marks, one line per document). score(path,
    text, label) is the model's probability of `label` for the text. A model file of the user's (any fastText or
    floret supervised .bin, e.g. DCLM's `__label__hq` classifier) loads the same way. floret's high-level
    `predict` breaks under numpy 2, so this module calls the low-level `model.f.predict(line, k, 0.0, "strict")`.

Language (py3langid, its model shipped in the package)
    language(text) → (ISO 639-1 code, probability): the most likely of py3langid's 97 languages with the
    probabilities normalised over all of them. The model loads in ~2.5 s (once per process).

Runbook
    from tasks.common import quality
    quality.train([("Once upon a time ...", True), ("Buy cheap ...", False)], Path("m.bin"), quality.Hyper())
    quality.score(Path("m.bin"), "A little fox ...")       # -> P(__label__hq)
    quality.language("Es war einmal ein kleiner Hase.")    # -> ("de", 0.99...)
"""

from __future__ import annotations

import functools
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tasks.common.config import ScratchError

POSITIVE, NEGATIVE = "__label__hq", "__label__lq"
_TOKEN = re.compile(r"[^\W_]+|[^\w\s]")


def classifier_text(text: str) -> str:
    """The one-line form the classifier reads: lowercased letter/digit runs and single punctuation marks,
    separated by spaces (newlines become spaces, so a document is one fastText line)."""
    return " ".join(_TOKEN.findall(text.lower()))


@dataclass(frozen=True)
class Hyper:
    """fastText supervised training settings (`floret.train_supervised` keywords)."""

    dim: int = 16
    epoch: int = 10
    lr: float = 0.5
    word_ngrams: int = 2
    bucket: int = 100_000
    min_count: int = 1
    seed: int = 1


def _floret():
    try:
        import floret
    except ImportError as e:  # a broken install: say what to do
        raise ScratchError(
            f"filter.classifier: cannot import floret ({e}); install the pinned set (make install) "
            "or switch the rule off (filter.classifier.enabled=false)"
        ) from None
    return floret


def train(examples: Iterable[tuple[str, bool]], path: Path, hyper: Hyper) -> dict:
    """Train a supervised model on (text, is_positive) examples and save it to `path`; returns the counts.

    One thread and a fixed seed: the same examples give the same model file."""
    floret = _floret()
    counts = {"positive": 0, "negative": 0}
    with tempfile.TemporaryDirectory() as tmp:
        lines = Path(tmp) / "train.txt"
        with open(lines, "w", encoding="utf-8") as f:
            for text, positive in examples:
                words = classifier_text(text)
                if not words:
                    continue
                counts["positive" if positive else "negative"] += 1
                f.write(f"{POSITIVE if positive else NEGATIVE} {words}\n")
        if not counts["positive"] or not counts["negative"]:
            raise ScratchError(
                f"filter.classifier: training needs positive and negative examples, got {counts['positive']} "
                f"positive and {counts['negative']} negative"
            )
        model = floret.train_supervised(
            input=str(lines),
            dim=hyper.dim,
            epoch=hyper.epoch,
            lr=hyper.lr,
            wordNgrams=hyper.word_ngrams,
            bucket=hyper.bucket,
            minCount=hyper.min_count,
            minn=0,
            maxn=0,
            thread=1,
            seed=hyper.seed,
            verbose=0,
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save_model(str(path))
    return counts


@functools.cache
def _model(path: str, mtime_ns: int):
    """The loaded model at `path` (keyed on its mtime too, so a retrained file in the same place reloads)."""
    floret = _floret()
    try:
        return floret.load_model(path)
    except Exception as e:  # floret raises ValueError for a file that is not a model
        raise ScratchError(
            f"filter.classifier: cannot load the model {path} ({type(e).__name__}: {e}); it must be a fastText/"
            "floret supervised .bin (or switch the rule off: filter.classifier.enabled=false)"
        ) from None


def load(path: Path):
    """The model at `path`, loaded once per process."""
    if not path.is_file():
        raise ScratchError(f"filter.classifier: no model file at {path}")
    return _model(str(path), path.stat().st_mtime_ns)


def labels(path: Path) -> list[str]:
    return list(load(path).labels)


def score(path: Path, text: str, label: str = POSITIVE) -> float:
    """The model's probability of `label` for `text` (0.0 when the text has no word)."""
    model = load(path)
    line = classifier_text(text)
    if not line:
        return 0.0
    probs = {name: p for p, name in model.f.predict(line + "\n", -1, 0.0, "strict")}
    return float(probs.get(label, 0.0))


# ------------------------------------------------------------------------------------------------ language


@functools.cache
def _identifier():
    try:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    except Exception as e:
        raise ScratchError(
            f"filter.language: cannot load py3langid's model ({type(e).__name__}: {e}); install the pinned set "
            "(make install) or switch the rule off (filter.language.enabled=false)"
        ) from None


def language(text: str) -> tuple[str, float]:
    """(most likely language, its probability normalised over py3langid's languages)."""
    lang, prob = _identifier().classify(text)
    return str(lang), float(prob)


def warm() -> None:
    """Load the language model now (e.g. before a timed loop)."""
    _identifier()


__all__ = ["NEGATIVE", "POSITIVE", "Hyper", "classifier_text", "labels", "language", "load", "score", "train"]
