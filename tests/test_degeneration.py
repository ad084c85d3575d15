"""Degeneration metrics of answers (tasks/common/degeneration.py) and the story world's vocabulary: each metric by
its definition on small cases, and the default run's degenerate DPO answers scoring worse than builtin stories on
every one of them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tasks.common import degeneration
from tasks.common.degeneration import (
    METRIC_KEYS,
    distinct,
    nonword_rate,
    repeated_line_rate,
    repeated_ngram_rate,
    text_metrics,
    words,
)
from tasks.sources import builtin, world
from tests.conftest import ROOT

DEGENERATE = [  # the default run's DPO answers to "... Start with a title." prompts: stacked pseudo-titles
    "Tom and the Sr\nTom and the Kov\nTom and theendden",
    "Max and the Cyes\nMax and the How B",
]


@pytest.fixture(scope="module")
def stories() -> list[str]:
    """16 builtin answers to held-out prompts (some with a title line): what a fluent model writes."""
    return [ex["messages"][1]["content"] for ex in builtin.generate_instructions(16, 4242, "test")]


def test_words_are_lowercase_letter_runs():
    assert words("Tom's kite, 2 BIG-red!") == ["tom", "s", "kite", "big", "red"]
    assert words("") == [] and words("123 ...") == []


def test_repeated_lines_count_restarted_lines():
    assert repeated_line_rate("The end.\nThe end.\nThe END!") == pytest.approx(2 / 3)  # exact after normalizing
    assert repeated_line_rate(DEGENERATE[0]) == pytest.approx(2 / 3)  # one line template, new endings
    assert repeated_line_rate(DEGENERATE[1]) == pytest.approx(1 / 2)
    titled = "Tom the Cat\n\nTom the cat was kind and shy. He lived in a small house by the road."
    assert repeated_line_rate(titled) == 0.0  # a title is not repeated by the paragraph that starts like it
    assert repeated_line_rate("Max ran to the park.\nLily sang a song.\n***") == 0.0  # no letters: not a line
    assert repeated_line_rate("") is None and repeated_line_rate("\n --- \n") is None


def test_repeated_ngrams_are_one_minus_unique_over_total():
    assert repeated_ngram_rate("a b c a b c".split()) == pytest.approx(1 / 4)  # abc bca cab abc
    assert repeated_ngram_rate("a b c d".split()) == 0.0
    assert repeated_ngram_rate("a b".split()) is None
    assert repeated_ngram_rate("a b a b a".split(), n=2) == pytest.approx(2 / 4)


def test_distinct_pools_the_answers():
    # Li et al. 2016: unique n-grams / all n-grams over every answer of the model
    assert distinct([["a", "b"], ["a", "b"]], 1) == pytest.approx(2 / 4)
    assert distinct([["a", "b"], ["a", "b"]], 2) == pytest.approx(1 / 2)
    assert distinct([["a", "b", "c"], ["c", "d"]], 2) == pytest.approx(1.0)
    assert distinct([[], ["a"]], 2) == 0.0


def test_nonword_rate_against_a_vocabulary():
    assert nonword_rate(["tom", "and", "the", "sr"], {"tom", "and", "the"}) == pytest.approx(1 / 4)
    assert nonword_rate([], {"tom"}) is None


def test_text_metrics_average_over_answers_with_something_to_measure():
    m = text_metrics(["a b c a b c", "", "x y"], {"a", "b", "c"})
    assert set(m) == set(METRIC_KEYS) and all(isinstance(v, float) for v in m.values())
    assert m["repeated_ngram_rate"] == pytest.approx(1 / 4)  # "x y" has no 3-gram, "" nothing: left out
    assert m["nonword_rate"] == pytest.approx((0 + 1) / 2)  # the empty answer has no word to judge
    assert m["repeated_line_rate"] == 0.0 and m["mean_words"] == pytest.approx(8 / 3)  # the empty one counts as 0
    assert text_metrics([], {"a"}) == dict.fromkeys(METRIC_KEYS, 0.0)


def test_degenerate_answers_score_worse_than_builtin_stories(stories):
    vocab = world.vocabulary()
    fluent = text_metrics(stories, vocab)
    # the same two degenerate answers given to 16 prompts, as a collapsed model would
    bad = text_metrics(DEGENERATE * 8, vocab)
    assert fluent["repeated_line_rate"] == 0.0 and bad["repeated_line_rate"] > 0.5
    assert fluent["repeated_ngram_rate"] < 0.02 < 0.1 < bad["repeated_ngram_rate"]
    assert fluent["nonword_rate"] == 0.0 and bad["nonword_rate"] > 0.2
    assert fluent["distinct_2"] > 0.6 > 0.1 > bad["distinct_2"]
    assert fluent["distinct_1"] > bad["distinct_1"]
    assert fluent["mean_words"] > 50 > 15 > bad["mean_words"]
    # each degenerate answer on its own, too
    for answer in DEGENERATE:
        one = degeneration.answer_metrics(answer, vocab)
        assert one["repeated_line_rate"] >= 0.5 and one["nonword_rate"] > 0.2 and one["repeated_ngram_rate"] > 0.1


def test_vocabulary_covers_everything_the_world_writes():
    vocab = world.vocabulary()
    assert vocab is world.vocabulary()  # built once
    assert {"tom", "cat", "park", "himself", "herself", "toy", "boat", "s"} <= vocab
    assert not {"sr", "kov", "theendden", "cyes", "cookies", "lorem"} & vocab
    texts = [d.text for d in builtin.generate_corpus(300, 5, 0.0, 0.0, 0.0)]
    for split in builtin.SPLITS:
        texts += [ex["messages"][1]["content"] for ex in builtin.generate_instructions(100, 5, split)]
        for pair in builtin.generate_preferences(100, 5, split):
            texts += [pair["chosen"], pair["rejected"]]
    for item in builtin.generate_cloze(100, 5):
        texts += [item["context"], *item["choices"]]
    outside = {w for text in texts for w in words(text)} - vocab
    assert not outside, sorted(outside)


def test_module_is_torch_free():
    code = "import sys, tasks.common.degeneration, tasks.sources.world; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
