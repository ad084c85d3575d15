"""The filter stage's model rules and PII step: language identification, the fastText quality classifier (trained
from the builtin world, from files, or loaded from a user's model), benchmark decontamination (planted overlaps
caught, normalisation, the evaluation sets the evaluate stage reads) and PII scrubbing (planted PII replaced and
counted by kind, look-alikes left alone, the stage's counts)."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import yaml

from tasks import filter as quality
from tasks.common import decontam, pii
from tasks.common import quality as models
from tasks.common.config import ConfigError, RunnerConfig, ScratchError, load_section
from tasks.common.dvcio import read_docs, stage_paths, write_jsonl_gz
from tasks.common.tracking import Tracker
from tasks.sources import builtin, evalsets, fluent
from tests.conftest import ROOT

PARAMS = ROOT / "params.yaml"
CLEAN = (
    "Once upon a time, a little fox named Pip lived near a quiet river. Every morning she walked to the water "
    "and looked at the fish.\nOne day she found a shiny stone under a tall tree. She showed it to her friend, "
    "an old owl, who told her it was a piece of the moon.\nPip laughed and kept the stone in her den. When "
    "winter came, the stone glowed softly at night and kept her warm."
)


def only(cfg: quality.FilterConfig, *rules: str) -> quality.FilterConfig:
    """`cfg` with every rule off except `rules` (text rules and model rules alike), PII off."""
    names = [*quality.RULES, *quality.MODEL_RULES, "pii"]
    return dataclasses.replace(
        cfg, **{r: dataclasses.replace(getattr(cfg, r), enabled=r in rules) for r in names if r not in rules}
    )


def data_section(workers: int = 1):
    return dataclasses.replace(load_section("data", path=PARAMS), parallel=RunnerConfig(workers=workers))


# ------------------------------------------------------------------------------------------------ language


def test_language_rule_rejects_non_english_and_keeps_english():
    cfg = only(quality.FilterConfig(), "language")
    assert quality.failed_rules(CLEAN, cfg) == {}
    for seed in range(12):
        text = fluent.write("non_english", random.Random(seed))
        reason = quality.failed_rules(text, cfg)["language"]
        assert reason.startswith("language ") and "not in ['en']" in reason, reason
    german = "Es war einmal ein kleiner Hase, der Bruno hieß. Er wohnte in einem Haus am Rand des Waldes."
    keep_de = dataclasses.replace(cfg, language=quality.Language(keep=["de"]))
    assert quality.failed_rules(german, keep_de) == {} and "language" in quality.failed_rules(CLEAN, keep_de)
    unsure = "Generate 5 multiplication problems\n\n1. 2 x 3 = ? 2. 8 x 7 = ? 3. 5 x 9 = ?"  # py3langid: la, 0.05
    assert quality.failed_rules(unsure, cfg) == {}, "an unsure identifier keeps the document"
    eager = dataclasses.replace(cfg, language=quality.Language(min_score=0.0))
    assert "not in ['en']" in quality.failed_rules(unsure, eager)["language"]


@pytest.mark.parametrize(
    "section, message",
    [
        ({"language": {"keep": []}}, "filter.language.keep: list at least one language"),
        ({"language": {"keep": ["English"]}}, "filter.language.keep: ISO 639-1 codes"),
        ({"classifier": {"source": "model"}}, "filter.classifier.model_path: source=model needs a model_path"),
        ({"classifier": {"source": "files", "positive": ["a.txt"]}}, "filter.classifier.positive: source=files"),
        ({"classifier": {"source": "web"}}, "filter.classifier.source"),
        ({"decontam": {"benchmarks": ["mmlu"]}}, "filter.decontam.benchmarks: unknown ['mmlu']"),
        ({"decontam": {"n": 3}}, "filter.decontam.n: must be >= 5"),
        ({"pii": {"kinds": ["ssn"]}}, "filter.pii.kinds: unknown ['ssn']"),
    ],
)
def test_bad_model_rule_params_fail_naming_the_key(tmp_path, section, message):
    params = yaml.safe_load(PARAMS.read_text())
    for rule, values in section.items():
        params["filter"][rule].update(values)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError) as err:
        load_section("filter", path=tmp_path / "params.yaml")
    assert message in str(err.value)


# ------------------------------------------------------------------------------------------------ classifier


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict]:
    """A classifier trained as the stage trains it (source builtin), on a smaller world than the default."""
    cfg = dataclasses.replace(quality.Classifier(), builtin_docs=1600)
    folder = tmp_path_factory.mktemp("classifier")
    return quality.prepare_classifier(cfg, folder, data_section(), ROOT)


def test_classifier_rejects_fluent_junk_the_text_rules_keep(trained):
    path, info = trained
    assert info["trained_on"]["positive"] > 600 and info["trained_on"]["negative"] > 600
    assert info["held_out"]["negative_recall"] >= 0.9 and info["held_out"]["positive_false_reject_rate"] <= 0.02
    cfg = quality.FilterConfig()
    text_rules = only(cfg, *quality.RULES)
    with_classifier = only(cfg, *quality.RULES, "classifier")
    m = quality.Models(classifier=path)
    for kind in ("off_domain", "spam", "filler"):  # a seed stream the training world never drew from
        texts = [fluent.write(kind, random.Random(f"test/{kind}/{i}")) for i in range(40)]
        assert not any(quality.failed_rules(t, text_rules, m) for t in texts), kind
        caught = [quality.failed_rules(t, with_classifier, m).get("classifier") for t in texts]
        assert sum(c is not None for c in caught) / len(texts) >= 0.9, kind
        assert all(c.startswith("quality score ") for c in caught if c)
    clean = [d.text for d in builtin.generate_corpus(400, 99, 0.0, 0.0, 0.0)]
    loads = models._model.cache_info().misses
    rejected = sum("classifier" in quality.failed_rules(t, with_classifier, m) for t in clean)
    assert rejected / len(clean) <= 0.01
    assert models._model.cache_info().misses == loads, "the model loads once per process, not per document"


def test_classifier_training_is_deterministic_and_loads_as_a_user_model(trained, tmp_path):
    path, info = trained
    again, _ = quality.prepare_classifier(
        dataclasses.replace(quality.Classifier(), builtin_docs=1600), tmp_path / "again", data_section(), ROOT
    )
    assert again.read_bytes() == path.read_bytes()
    assert json.loads((path.parent / "training.json").read_text())["trained_on"] == info["trained_on"]
    user = quality.Classifier(source="model", model_path=str(path))
    loaded, user_info = quality.prepare_classifier(user, tmp_path / "unused", data_section(), ROOT)
    assert loaded == path and set(user_info["labels"]) == {models.POSITIVE, models.NEGATIVE}
    assert not (tmp_path / "unused").exists(), "a user's model is used where it is, not copied"
    text = fluent.write("spam", random.Random(5))
    assert models.score(loaded, text) == models.score(path, text) < 0.5 < models.score(path, CLEAN)


def test_classifier_bad_model_or_label_fails_clearly(trained, tmp_path):
    path, _ = trained
    wrong_label = quality.Classifier(source="model", model_path=str(path), positive_label="__label__good")
    with pytest.raises(ScratchError, match=r"'__label__good' is not a label of .*__label__hq"):
        quality.prepare_classifier(wrong_label, tmp_path, data_section(), ROOT)
    (tmp_path / "junk.bin").write_bytes(b"not a model at all")
    with pytest.raises(ScratchError, match=r"filter.classifier: cannot load the model .*junk.bin"):
        quality.prepare_classifier(
            quality.Classifier(source="model", model_path=str(tmp_path / "junk.bin")), tmp_path, data_section(), ROOT
        )
    with pytest.raises(ScratchError, match="no model file at"):
        models.load(tmp_path / "absent.bin")


def test_classifier_trains_from_files(tmp_path):
    good = [d.text for d in builtin.generate_corpus(150, 3, 0.0, 0.0, 0.0)]
    bad = [fluent.write(k, random.Random(f"f{i}")) for i in range(50) for k in ("off_domain", "spam", "filler")]
    (tmp_path / "good.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in good) + "{broken\n")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "web.txt").write_text("<|endoftext|>".join(bad) + "<|endoftext|>")
    cfg = quality.Classifier(source="files", positive=["good.jsonl"], negative=["bad"])
    path, info = quality.prepare_classifier(cfg, tmp_path / "out", data_section(), tmp_path)
    trained_on = info["trained_on"]
    assert trained_on["positive"] + info["held_out"]["positive"] == 150
    assert trained_on["negative"] + info["held_out"]["negative"] == 150
    assert info["unreadable"] == {"positive": 1}, "the broken line is counted, not dropped silently"
    assert models.score(path, fluent.write("spam", random.Random(77))) < 0.5 < models.score(path, CLEAN)
    missing = dataclasses.replace(cfg, negative=["nowhere.jsonl"])
    with pytest.raises(ScratchError, match=r"filter.classifier.negative: 'nowhere.jsonl': no such file"):
        quality.prepare_classifier(missing, tmp_path / "out2", data_section(), tmp_path)


# ------------------------------------------------------------------------------------------------ decontam


def test_item_ngrams_follow_datatrove():
    item = decontam.Item("x", "a b c d e f", ("G H, i!",))
    grams = decontam.item_ngrams(item, 5)
    # the target alone is shorter than 5 words; the spans ending in it: 4+1, 3+2, 2+3 words
    assert grams == {"c d e f g", "d e f g h", "e f g h i"}
    assert decontam.item_ngrams(item, 5, context_ngrams=True) == grams | {"a b c d e", "b c d e f"}
    assert decontam.words("The Cat's  sat--on\nthe MAT.") == ["the", "cat", "s", "sat", "on", "the", "mat"]


def write_slices(data_dir: Path) -> tuple[dict, dict]:
    hellaswag = {
        "query": "A man is standing on a ladder next to a house. He",
        "endings": [
            "eats a sandwich.",
            "carefully paints the wooden window frames a bright shade of blue while whistling an old song.",
            "flies away.",
            "sleeps.",
        ],
        "label": "1",
        "ctx": "",
        "ind": 0,
        "activity_label": "Painting",
    }
    piqa = {
        "goal": "How do you keep bread fresh?",
        "sol1": "Put it in the oven.",
        "sol2": "Wrap it tightly in a clean cloth and keep it in a cool dry bread box away from sunlight.",
        "label": 1,
    }
    for name, row in (("hellaswag", hellaswag), ("piqa", piqa)):
        (data_dir / name).mkdir(parents=True)
        (data_dir / name / f"{name}_slice.jsonl").write_text(json.dumps(row) + "\n")
    return hellaswag, piqa


def test_planted_contamination_is_caught_and_near_misses_are_not(tmp_path):
    hellaswag, piqa = write_slices(tmp_path / "evals")
    cfg = dataclasses.replace(
        quality.FilterConfig(), decontam=quality.Decontam(data_dir=str(tmp_path / "evals"), cloze_items=20)
    )
    index_path, info = quality.build_decontam(cfg.decontam, tmp_path, ROOT)
    assert info["benchmarks"]["hellaswag"]["items"] == 1 and info["benchmarks"]["cloze"]["items"] == 20
    assert info["benchmarks"]["piqa"]["ngrams"] > 0 and info["skipped"] == {}
    m = quality.Models(decontam=index_path)
    rule = only(cfg, "decontam")
    gold = hellaswag["endings"][1]
    planted = {
        "hellaswag": f"{CLEAN}\nThen he carefully PAINTS the wooden window-frames, a bright shade of blue; while",
        "piqa": f"{CLEAN} My tip: wrap it tightly in a clean cloth and keep it in a cool dry bread box.",
        "cloze": None,
        "prompts": None,
    }
    cloze = next(builtin.generate_cloze(1, cfg.decontam.cloze_seed, "test"))
    planted["cloze"] = cloze["context"] + " " + cloze["choices"][cloze["label"]]
    prompt = next(builtin.generate_instructions(1, cfg.decontam.prompt_seed, "test"))["messages"][0]["content"]
    planted["prompts"] = f"{CLEAN}\n{prompt}"
    for bench, text in planted.items():
        reason = quality.failed_rules(text, rule, m).get("decontam")
        assert reason and reason.startswith(f"13-gram of {bench}: "), (bench, reason)
    twelve = " ".join(gold.split()[:12])  # 12 words of the gold ending: one short of a 13-gram
    assert quality.failed_rules(f"{CLEAN} {twelve}", rule, m) == {}
    wrong = f"{CLEAN} He " + hellaswag["endings"][0]  # the item's context words are not enough alone
    assert quality.failed_rules(hellaswag["query"] + " " + wrong, rule, m) == {}
    assert quality.failed_rules(CLEAN, rule, m) == {}


def test_absent_slices_are_skipped_with_the_reason(tmp_path):
    items, read, skipped = evalsets.items(["hellaswag", "piqa", "prompts"], tmp_path, 1, 0, 4242, 5)
    assert set(skipped) == {"hellaswag", "piqa"} and "no hellaswag slice (*.jsonl) in" in skipped["hellaswag"]
    assert read["prompts"]["items"] == 5 == len(items)


def test_decontam_covers_what_evaluate_and_the_alignment_stages_score():
    params = yaml.safe_load(PARAMS.read_text())
    d, evaluate = params["filter"]["decontam"], params["evaluate"]
    assert set(evaluate["benchmarks"]) <= set(d["benchmarks"]) and "prompts" in d["benchmarks"]
    assert d["data_dir"] == evaluate["data_dir"] and d["cloze_seed"] == evaluate["cloze_seed"]
    assert d["cloze_items"] >= 2 * evaluate["limit"], "evaluate draws 2 x limit cloze items"
    prompts = [params["sampling"]["prompts"]] + [
        s["sampling"]["prompts"] for s in params.values() if isinstance(s, dict) and "prompts" in s.get("sampling", {})
    ]
    seeds = {params["sampling"]["prompt_seed"]} | {
        s["sampling"]["prompt_seed"]
        for s in params.values()
        if isinstance(s, dict) and "prompt_seed" in s.get("sampling", {})
    }
    assert seeds == {d["prompt_seed"]} and d["prompt_items"] >= max(prompts)
    # the generated sets are prefixes: item i depends on (seed, i) only, so 500 items cover any smaller draw
    few = list(builtin.generate_cloze(3, d["cloze_seed"], "test"))
    assert few == list(builtin.generate_cloze(5, d["cloze_seed"], "test"))[:3]


# ------------------------------------------------------------------------------------------------ PII

PLANTED = {
    "email": ["Jane.Doe@Mail-Server.co.uk", "bob+news@gmail.com", "a_b@sub.domain.org"],
    "ipv4": ["8.8.8.8", "142.250.74.46", "23.45.67.89"],
    "ipv6": ["2606:4700:4700::1111", "2a00:1450:4007:80e::200e"],
    "phone": ["(415) 555-2671", "415-555-2671", "+1 415.555.2671", "+44 20 7946 0958", "1-800-555-0199"],
}
LOOKALIKES = [
    "ann@example.com",  # reserved for documentation
    "192.168.1.20",  # private
    "127.0.0.1",
    "fe80::1",  # link-local
    "version 1.2.3.4.5",
    "999.1.1.1",
    "at 10:30:45",
    "in 2019-2020",
    "12345678901234567890",
    "call 555-0100",
    "room 101",
]


def planted_text(rng: random.Random) -> tuple[str, dict[str, int]]:
    pieces = [(k, v) for k, vs in PLANTED.items() for v in vs]
    rng.shuffle(pieces)
    sentences = [f"Write to me at {v} today." if k == "email" else f"The number is {v}, they said." for k, v in pieces]
    sentences += [f"Also {x} stays." for x in LOOKALIKES]
    rng.shuffle(sentences)
    return " ".join(sentences), {k: len(v) for k, v in PLANTED.items()}


def test_planted_pii_is_replaced_and_counted_and_lookalikes_stay():
    text, expected = planted_text(random.Random(0))
    scrubbed, found = pii.scrub(text, pii.KINDS)
    assert dict(found) == expected
    for values in PLANTED.values():
        assert not any(v in scrubbed for v in values)
    for x in LOOKALIKES:
        assert x in scrubbed, x
    assert scrubbed.count(pii.PLACEHOLDERS["phone"]) == expected["phone"] + 1  # + the look-alike 555-0100
    assert pii.scrub(scrubbed, pii.KINDS)[1] == {}, "placeholders are never found again"
    private, found_all = pii.scrub("hosts 10.0.0.1 and fe80::1", pii.KINDS, public_only=False)
    assert dict(found_all) == {"ipv4": 1, "ipv6": 1} and "10.0.0.1" not in private
    assert pii.scrub(text, ["email"])[1] == {"email": 3}


def test_stage_scrubs_kept_documents_and_counts_by_kind(tmp_path):
    rng = random.Random(1)
    stories = [d.text for d in builtin.generate_corpus(30, 5, 0.0, 0.0, 0.0)]
    rows, expected = [], {k: 0 for k in pii.KINDS}
    for i, story in enumerate(stories):
        text = story
        if i % 3 == 0:
            planted, counts = planted_text(rng)
            text = story + "\n\n" + planted
            expected = {k: expected[k] + counts[k] for k in pii.KINDS}
        rows.append({"id": f"d{i}", "text": text, "source": "t"})
    rows.append({"id": "short", "text": "Mail bob@gmail.com now", "source": "t"})  # rejected: PII not counted
    (tmp_path / "data/ingest").mkdir(parents=True)
    write_jsonl_gz(tmp_path / "data/ingest/shard-00000-0000.jsonl.gz", rows)
    (tmp_path / "data/ingest/labels.jsonl").write_text("")
    cfg = only(quality.FilterConfig(), *quality.RULES, "pii")
    cfg = dataclasses.replace(cfg, duplicate_lines=dataclasses.replace(cfg.duplicate_lines, enabled=False))
    paths = stage_paths("filter", root=tmp_path)
    m = quality.run(cfg, paths, Tracker("filter", None), data_section())
    assert m["docs_in"] == 31 == m["kept"] + m["rejected"] and m["rejected_by_rule"] == {"word_count": 1}
    assert m["pii"] == {"docs_changed": 10, "replaced": expected}
    kept = {d["id"]: d["text"] for d in read_docs(paths.out)}
    assert kept["d1"] == stories[1] and kept["d0"].startswith(stories[0])
    assert not any(v in kept["d0"] for values in PLANTED.values() for v in values)
    assert "PII replaced in 10 kept documents: email 30" in "\n".join(quality.summary(m, paths))
