"""The filter stage: each rule on a document made to fail it, switches, thresholds from params, counts that add up,
the planted junk of the builtin corpus, and real TinyStories kept."""

from __future__ import annotations

import dataclasses
import json
import random
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tasks import filter as quality
from tasks.common.config import ConfigError, load_section
from tasks.common.dvcio import read_docs, read_labels, stage_paths, write_jsonl_gz
from tasks.common.tracking import Tracker
from tasks.sources import builtin
from tests.conftest import ROOT, shared

PARAMS = ROOT / "params.yaml"

CLEAN = (
    "Once upon a time, a little fox named Pip lived near a quiet river. Every morning she walked to the water "
    "and looked at the fish.\nOne day she found a shiny stone under a tall tree. She showed it to her friend, "
    "an old owl, who told her it was a piece of the moon.\nPip laughed and kept the stone in her den. When "
    "winter came, the stone glowed softly at night and kept her warm."
)
VOCAB = (
    "apple banana cherry dragon eagle forest garden harbor island jungle kettle lemon meadow needle orange "
    "pepper quilt rabbit saddle tiger umbrella valley walnut yellow zebra anchor bottle candle donkey engine "
    "feather goblet hammer insect jacket kitten ladder mirror napkin oyster pillow quartz ribbon silver turtle "
    "violin wagon window basket carpet desert falcon glacier helmet"
).split()


def lines(n: int, words: int, start: int = 0) -> list[str]:
    """n distinct lines of distinct vocabulary words."""
    return [
        " ".join(VOCAB[(start + i * words + k) % len(VOCAB)] for k in range(words)) + " today" + str(i)
        for i in range(n)
    ]


def long_words(n: int) -> str:
    rng = random.Random(0)
    return " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(14)) for _ in range(n))


# (expected first failing rule, text, rules to switch off first)
CASES = {
    "word_count": ("Page not found. Back to top.", ()),
    "mean_word_length": (long_words(30), ()),
    "symbol_ratio": (CLEAN + " #tag" * 12, ()),
    "ellipsis_lines": ("\n".join(line + ("..." if i % 2 else ".") for i, line in enumerate(lines(10, 6))), ()),
    "bullet_lines": ("\n".join("- " + line for line in lines(10, 5)), ()),
    "duplicate_lines": ("\n".join(lines(6, 6) + lines(6, 6)[:4]), ()),
    "duplicate_paragraphs": (
        "\n\n".join(["\n".join(lines(3, 5, s)) for s in (0, 15)] * 2 + [CLEAN]),
        ("duplicate_lines",),
    ),
    "top_ngrams": (" ".join(f"the cat {w}." for w in VOCAB[:20]), ()),
    "duplicate_ngrams": (" ".join(VOCAB[:20] + VOCAB[20:40] * 2), ()),
    "alpha_ratio": (" ".join(str(10_000 + 7919 * i) for i in range(30)), ()),
    "boilerplate": (CLEAN + "\nWe use cookies to improve your experience. Read our Privacy Policy.", ()),
}


def without(cfg: quality.FilterConfig, *rules: str) -> quality.FilterConfig:
    return dataclasses.replace(cfg, **{r: dataclasses.replace(getattr(cfg, r), enabled=False) for r in rules})


def test_every_rule_has_a_case_and_a_params_entry():
    assert set(CASES) == set(quality.RULES)  # the model rules have theirs in tests/test_filter_models.py
    params = yaml.safe_load((ROOT / "params.yaml").read_text())["filter"]
    assert set(quality.ALL_RULES) | {"pii"} <= set(params), "every rule has its thresholds in params.yaml"
    assert list(quality.ALL_RULES) == [*quality.RULES, "language", "classifier", "decontam"]


def test_clean_story_passes_every_rule():
    assert quality.failed_rules(CLEAN, quality.FilterConfig()) == {}


@pytest.mark.parametrize("rule", list(CASES))
def test_each_rule_rejects_its_case_and_can_be_switched_off(rule):
    text, off = CASES[rule]
    cfg = without(quality.FilterConfig(), *off)
    failed = quality.failed_rules(text, cfg)
    assert next(iter(failed), None) == rule, failed
    assert failed[rule]  # a readable reason
    assert rule not in quality.failed_rules(text, without(cfg, rule))


def test_thresholds_come_from_the_config():
    text = " ".join(VOCAB[:25])
    assert "word_count" not in quality.failed_rules(text, quality.FilterConfig())
    strict = dataclasses.replace(quality.FilterConfig(), word_count=quality.WordCount(min_words=26))
    assert quality.failed_rules(text, strict)["word_count"] == "25 words < 26"


def test_ngram_fractions():
    s = quality.TextStats.of("A b, c. a B c!")
    assert s.norm_words == ["a", "b", "c", "a", "b", "c"]
    assert s.ngram_ids(2).tolist() == [0, 1, 2, 0, 1] and s.ngram_ids(6).tolist() == [0]
    assert len(s.ngram_ids(7)) == 0
    assert quality.top_ngram_char_fraction(s, 2) == pytest.approx(4 / 6)  # "a b" twice
    assert quality.duplicate_ngram_char_fraction(s, 3) == pytest.approx(3 / 6)  # the second "a b c"
    assert quality.duplicate_ngram_char_fraction(s, 2) == pytest.approx(3 / 6)  # "a b", "b c" again: 3 words
    long = quality.TextStats.of("xx yy zz xx yy q xx yyy")
    assert quality.top_ngram_char_fraction(long, 1) == pytest.approx(3 * 2 / 16)  # xx three times
    assert quality.duplicate_ngram_char_fraction(quality.TextStats.of("a b c d"), 2) == 0.0
    assert quality.repeated_fractions(["x", "yy", "x"]) == (pytest.approx(1 / 3), pytest.approx(1 / 4))


@pytest.mark.parametrize(
    "section, message",
    [
        (
            {"top_ngrams": {"n": [2, 3], "max_char_fraction": [0.2]}},
            "filter.top_ngrams.max_char_fraction: needs one value per entry of n",
        ),
        ({"word_count": {"min_words": 50, "max_words": 10}}, "filter.word_count.min_words: must satisfy"),
        (
            {"alpha_ratio": {"min_ration": 0.5}},
            "filter.alpha_ratio.min_ration: unknown key (did you mean 'min_ratio'?)",
        ),
        ({"boilerplate": {"phrases": ["cookie policy", " "]}}, "filter.boilerplate.phrases: must not contain empty"),
    ],
)
def test_bad_thresholds_fail_naming_the_key(tmp_path, section, message):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for rule, values in section.items():
        params["filter"][rule].update(values)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError) as err:
        load_section("filter", path=tmp_path / "params.yaml")
    assert message in str(err.value)


# ------------------------------------------------------------------------------------------------ builtin corpus


@pytest.fixture(scope="module")
def corpus() -> list[builtin.BuiltinDoc]:
    return list(builtin.generate_corpus(3000, seed=11, exact_dup_rate=0.03, near_dup_rate=0.03, junk_rate=0.05))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> quality.Models:
    """The classifier and n-gram index the stage prepares with the default params (trained once per module)."""
    cfg = load_section("filter", quality.FilterConfig, path=PARAMS)
    found, _ = quality.prepare_models(cfg, tmp_path_factory.mktemp("models"), load_section("data", path=PARAMS), ROOT)
    return found


def test_builtin_planted_junk_is_rejected_and_clean_stories_kept(corpus, models):
    cfg = load_section("filter", quality.FilterConfig, path=PARAMS)  # the default params
    failed = {d.id: quality.failed_rules(d.text, cfg, models) for d in corpus}
    rejected = {i for i, f in failed.items() if f}
    junk = [d for d in corpus if d.label == "junk"]
    clean = [d for d in corpus if d.label == "clean"]
    assert len(junk) == 150 and len(clean) > 2500
    assert sum(d.id in rejected for d in junk) / len(junk) >= 0.95
    assert sum(d.id in rejected for d in clean) / len(clean) <= 0.02
    for kind in builtin.JUNK_KINDS:
        of_kind = [d for d in junk if d.of == kind]
        assert of_kind and sum(d.id in rejected for d in of_kind) / len(of_kind) >= 0.9, kind
    # the fluent kinds are what the text rules keep: only the model rules reject them
    for d in junk:
        if d.of in builtin.FLUENT_JUNK and d.id in rejected:
            assert set(failed[d.id]) <= set(quality.MODEL_RULES), (d.of, failed[d.id])
        if d.of == "non_english":
            assert next(iter(failed[d.id])) == "language", failed[d.id]


def write_shards(root: Path, stage: str, docs: list[builtin.BuiltinDoc], per_shard: int) -> None:
    """data/<stage>/ as a data stage leaves it: shards of `per_shard` documents and the labels of all of them."""
    folder = root / "data" / stage
    folder.mkdir(parents=True)
    for n, start in enumerate(range(0, len(docs), per_shard)):
        rows = [{"id": d.id, "text": d.text, "source": "builtin:stories"} for d in docs[start : start + per_shard]]
        write_jsonl_gz(folder / f"shard-00000-{n:04d}.jsonl.gz", rows)
    (folder / "labels.jsonl").write_text(
        "".join(json.dumps({"id": d.id, "label": d.label, "of": d.of}) + "\n" for d in docs)
    )


def test_stage_counts_add_up_and_outputs_agree(tmp_path, corpus):
    docs = corpus[:1200]
    write_shards(tmp_path, "ingest", docs, per_shard=500)
    cfg = dataclasses.replace(load_section("filter", quality.FilterConfig, path=PARAMS), reject_samples=2)
    cfg = dataclasses.replace(cfg, classifier=dataclasses.replace(cfg.classifier, builtin_docs=1600))  # quicker
    paths = stage_paths("filter", root=tmp_path)
    m = quality.run(cfg, paths, Tracker("filter", None), load_section("data", path=PARAMS))
    stage_models = quality.Models(paths.out / "classifier/model.bin", decontam=paths.out / "decontam_ngrams.tsv.gz")

    kept = list(read_docs(paths.out))
    assert sorted(p.name for p in paths.out.glob("shard-*")) == [f"shard-00000-000{i}.jsonl.gz" for i in range(3)]
    assert m["docs_in"] == len(docs) == m["kept"] + m["rejected"]
    assert m["kept"] == len(kept) and m["rejected"] == sum(m["rejected_by_rule"].values())
    assert all(m["failed_by_rule"][r] >= n for r, n in m["rejected_by_rule"].items())
    kept_ids = {d["id"] for d in kept}
    rejected = {d.id: d for d in docs if d.id not in kept_ids}
    assert len(rejected) == m["rejected"]
    assert [d["id"] for d in kept] == [d.id for d in docs if d.id in kept_ids], "order is kept"

    samples = [json.loads(line) for line in (paths.out / "rejects.jsonl").read_text().splitlines()]
    per_rule = Counter(s["rule"] for s in samples)
    assert per_rule == {r: min(2, n) for r, n in m["rejected_by_rule"].items()}
    for s in samples:
        assert s["id"] in rejected and s["failed"][0] == s["rule"] and s["detail"]
        assert list(quality.failed_rules(rejected[s["id"]].text, cfg, stage_models)) == s["failed"]

    labels = [json.loads(line) for line in (paths.out / "labels.jsonl").read_text().splitlines()]
    assert [row["id"] for row in labels] == [d["id"] for d in kept]
    g = m["labelled"]
    assert g["junk_recall"] >= 0.95 and g["clean_false_reject_rate"] <= 0.02
    assert set(g["junk_recall_by_kind"]) == set(builtin.JUNK_KINDS)
    assert m["rejected_by_rule"]["classifier"] > 0 and m["rejected_by_rule"]["language"] > 0
    off = g["without"]["classifier"]  # the same run, scored as if the classifier were off
    fluent = [k for k in ("off_domain", "spam", "filler") if k in g["junk_recall_by_kind"]]
    assert fluent and all(off["junk_recall_by_kind"][k] == 0.0 for k in fluent), "the text rules keep them"
    assert all(g["junk_recall_by_kind"][k] >= 0.8 for k in fluent) and off["junk_recall"] < g["junk_recall"]
    assert m["classifier"]["model_bytes"] == (paths.out / "classifier" / "model.bin").stat().st_size
    assert (paths.out / "decontam_ngrams.tsv.gz").is_file() and m["decontam"]["ngrams"] > 0
    said = "\n".join(quality.summary(m, paths))
    assert f"of 1,200 documents ({m['kept_fraction']:.1%})" in said and "junk recall" in said
    assert "data/filter/rejects.jsonl" in said


def test_stage_without_labels_reports_no_scores(tmp_path, corpus):
    write_shards(tmp_path, "ingest", corpus[:50], per_shard=50)
    (tmp_path / "data/ingest/labels.jsonl").write_text("")
    paths = stage_paths("filter", root=tmp_path)
    small = quality.Decontam(cloze_items=10, prompt_items=10)  # the defaults, on smaller model inputs
    cfg = dataclasses.replace(quality.FilterConfig(), classifier=quality.Classifier(builtin_docs=400), decontam=small)
    m = quality.run(cfg, paths, Tracker("filter", None), load_section("data", path=PARAMS))
    assert "labelled" not in m and m["docs_in"] == 50
    assert (paths.out / "labels.jsonl").read_text() == "" and "ground truth" not in " ".join(quality.summary(m, paths))


def test_bad_labels_row_names_file_and_line(tmp_path):
    path = tmp_path / "labels.jsonl"
    path.write_text('{"id": "a", "label": "clean", "of": null}\n{"id": "b"}\n')
    with pytest.raises(Exception, match=r"labels.jsonl:2: not a label row"):
        read_labels(path)


# ------------------------------------------------------------------------------------------------ real data


def test_default_thresholds_keep_real_tinystories(models):
    folder = shared("tinystories")
    pieces = (folder / "TinyStories-train_first2MiB.txt").read_text(encoding="utf-8").split("<|endoftext|>")[:-1]
    stories = [p.strip() for p in pieces]
    assert len(stories) == 2316
    cfg = load_section("filter", quality.FilterConfig, path=PARAMS)
    failed = [quality.failed_rules(s, cfg, models) for s in stories]  # every rule, the model rules included
    kept = sum(not f for f in failed) / len(stories)
    assert kept >= 0.995, Counter(next(iter(f)) for f in failed if f)
