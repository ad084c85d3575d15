"""The builtin corpus: determinism, planted labels, duplicate geometry, quality-rule separation, instructions,
preferences and cloze. Fast (a few seconds): one shared 20k-document corpus, small samples elsewhere."""

from __future__ import annotations

import collections
import itertools
import random
import re
import time

import pytest

from tasks.filter import Boilerplate
from tasks.sources import builtin, world
from tasks.sources.builtin import check_constraints

N_DOCS, SEED, EXACT, NEAR, JUNK = 20_000, 1337, 0.03, 0.03, 0.05


GENERATION_CPU_SECONDS: list[float] = []


@pytest.fixture(scope="module")
def corpus() -> list[builtin.BuiltinDoc]:
    start = time.process_time()  # CPU time: honest on a shared, loaded machine
    docs = list(builtin.generate_corpus(N_DOCS, SEED, EXACT, NEAR, JUNK))
    GENERATION_CPU_SECONDS.append(time.process_time() - start)
    return docs


@pytest.fixture(scope="module")
def by_id(corpus) -> dict[str, builtin.BuiltinDoc]:
    return {d.id: d for d in corpus}


# ------------------------------------------------------------------------------------------------ reference rules
# A compact Gopher (quality + repetition) and C4 rule set, as the filter stage applies them, to show that clean
# stories pass every rule and each junk kind fails the rule it was built for.

STOP_WORDS = {"the", "be", "to", "of", "and", "that", "have", "with"}
# C4's policy phrases: the filter stage's default blocklist plus C4's bare "javascript" (which also covers the
# blocklist's "enable javascript") and "{" (code)
C4_PHRASES = (*Boilerplate().phrases, "javascript", "{")
WEB_WORDS = ("cookie", "login", "log in", "subscribe", "click here", "copyright")


def _ngram_char_fraction_top(words: list[str], n: int) -> float:
    grams = collections.Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    if not grams:
        return 0.0
    gram, count = grams.most_common(1)[0]
    return count * sum(len(w) for w in gram) / max(1, sum(len(w) for w in words))


def _ngram_char_fraction_dup(words: list[str], n: int) -> float:
    grams = collections.Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    covered = [False] * len(words)
    for i in range(len(words) - n + 1):
        if grams[tuple(words[i : i + n])] > 1:
            covered[i : i + n] = [True] * n
    return sum(len(w) for w, c in zip(words, covered) if c) / max(1, sum(len(w) for w in words))


def quality_failures(text: str) -> set[str]:
    """Names of the Gopher/C4 rules the text fails (empty: it would be kept)."""
    failed = set()
    words = text.split()
    lines = [l for l in text.splitlines() if l.strip()]
    n = len(words)
    if not 50 <= n <= 100_000:
        failed.add("word_count")
    if n and not 3 <= sum(len(w) for w in words) / n <= 10:
        failed.add("mean_word_length")
    if n and (text.count("#") + text.count("...") + text.count("\u2026")) / n > 0.1:
        failed.add("symbol_ratio")
    if lines and sum(l.lstrip().startswith(("-", "\u2022", "*")) for l in lines) / len(lines) > 0.9:
        failed.add("bullet_lines")
    if lines and sum(l.rstrip().endswith(("...", "\u2026")) for l in lines) / len(lines) > 0.3:
        failed.add("ellipsis_lines")
    if n and sum(bool(re.search(r"[A-Za-z]", w)) for w in words) / n < 0.8:
        failed.add("alpha_ratio")
    if sum(w.lower().strip(".,!?\"'") in STOP_WORDS for w in words) < 2:
        failed.add("stop_words")
    if lines and (len(lines) - len(set(lines))) / len(lines) > 0.3:
        failed.add("dup_line_frac")
    paragraphs = [p for p in re.split(r"\n{2,}", text.strip()) if p]
    if paragraphs and (len(paragraphs) - len(set(paragraphs))) / len(paragraphs) > 0.3:
        failed.add("dup_para_frac")
    lowered = [w.lower() for w in words]
    for k, limit in ((2, 0.2), (3, 0.18), (4, 0.16)):
        if _ngram_char_fraction_top(lowered, k) > limit:
            failed.add(f"top_{k}gram")
    for k, limit in ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)):
        if _ngram_char_fraction_dup(lowered, k) > limit:
            failed.add(f"dup_{k}gram")
    if any(p in text.lower() for p in C4_PHRASES):
        failed.add("c4_policy")
    if any(re.search(rf"\b{w}", text, re.IGNORECASE) for w in WEB_WORDS):
        failed.add("web_words")
    c4_lines = [l for l in lines if len(l.split()) >= 3 and l.rstrip().endswith((".", "!", "?", '"'))]
    if len(c4_lines) != len(lines):
        failed.add("c4_line_rules")
    if builtin.count_sentences(" ".join(c4_lines)) < 5:
        failed.add("c4_min_sentences")
    return failed


JUNK_RULE = {
    "boilerplate": "c4_policy",
    "symbol_soup": "symbol_ratio",
    "repeated_lines": "dup_line_frac",
    "bullets": "bullet_lines",
    "ellipsis": "ellipsis_lines",
    "too_short": "word_count",
    "non_alpha": "alpha_ratio",
    "lorem_ipsum": "c4_policy",
    # fluent junk (tasks/sources/fluent.py): built to pass every rule here; the filter's models reject it
    "off_domain": None,
    "spam": None,
    "filler": None,
    "non_english": "stop_words",  # Gopher's English stop-word rule (the filter uses language ID instead)
}


# ------------------------------------------------------------------------------------------------ corpus


def test_deterministic_and_seed_dependent():
    a = list(builtin.generate_corpus(300, 7, 0.05, 0.05, 0.1))
    b = list(builtin.generate_corpus(300, 7, 0.05, 0.05, 0.1))
    c = list(builtin.generate_corpus(300, 8, 0.05, 0.05, 0.1))
    assert a == b
    assert [d.text for d in a] != [d.text for d in c]
    assert sum(x.text == y.text for x, y in zip(a, c)) < 10


def test_clean_story_depends_only_on_seed_and_index():
    small = list(builtin.generate_corpus(200, 5, 0.0, 0.0, 0.0))
    mixed = list(builtin.generate_corpus(200, 5, 0.1, 0.1, 0.1))
    for doc in mixed:
        if doc.label == "clean":
            assert doc.text == small[int(doc.id.split("-")[1])].text


def test_ids_labels_and_rates(corpus):
    assert [d.id for d in corpus] == [f"builtin-{i:06d}" for i in range(N_DOCS)]
    counts = collections.Counter(d.label for d in corpus)
    assert counts == {
        "exact_dup": round(EXACT * N_DOCS),
        "near_dup": round(NEAR * N_DOCS),
        "junk": round(JUNK * N_DOCS),
        "clean": N_DOCS - round((EXACT + NEAR + JUNK) * N_DOCS),
    }
    assert corpus[0].label == "clean"
    assert set(d.of for d in corpus if d.label == "junk") == set(builtin.JUNK_KINDS)
    fluent = sum(d.of in builtin.FLUENT_JUNK for d in corpus)  # the kinds only the filter's models catch
    assert 0.01 <= fluent / N_DOCS <= 0.025
    assert all(d.of is None for d in corpus if d.label == "clean")


def test_copies_follow_clean_originals(corpus, by_id):
    for doc in corpus:
        if doc.label in ("exact_dup", "near_dup"):
            original = by_id[doc.of]
            assert original.label == "clean" and original.id < doc.id
            assert (doc.text == original.text) == (doc.label == "exact_dup")


def test_near_duplicates_stay_close(corpus, by_id):
    scores = [
        builtin.jaccard(builtin.word_shingles(d.text), builtin.word_shingles(by_id[d.of].text))
        for d in corpus
        if d.label == "near_dup"
    ]
    assert min(scores) >= 0.7
    # also under plain whitespace tokens, as a dedup stage that does not strip punctuation would see them
    plain = [_plain_jaccard(d.text, by_id[d.of].text) for d in corpus if d.label == "near_dup"]
    assert min(plain) >= 0.6 and sum(plain) / len(plain) >= 0.8


def _plain_jaccard(a: str, b: str) -> float:
    def grams(t: str) -> set[tuple[str, ...]]:
        w = t.lower().split()
        return {tuple(w[i : i + 3]) for i in range(len(w) - 2)}

    return builtin.jaccard(grams(a), grams(b))


def test_clean_stories_are_not_near_duplicates_of_each_other(corpus):
    clean = [d for d in corpus if d.label == "clean"][:500]
    shingles = [builtin.word_shingles(d.text) for d in clean]
    scores = [builtin.jaccard(a, b) for a, b in itertools.combinations(shingles, 2)]
    assert max(scores) < 0.5
    assert sum(scores) / len(scores) < 0.05


def test_story_shape(corpus):
    clean = [d for d in corpus if d.label == "clean"]
    for doc in clean[:2000]:
        assert 60 <= len(doc.text.split()) <= 180
        assert 1 <= len(doc.text.split("\n\n")) <= 3
        assert builtin.count_sentences(doc.text) >= 5
        assert "\n\n\n" not in doc.text and doc.text == doc.text.strip()
    sentences = {s for d in clean for s in builtin.split_sentences(d.text)}
    assert len(sentences) >= 20_000


def test_clean_and_copies_pass_quality_rules_and_junk_fails_its_rule(corpus):
    for doc in corpus[:3000]:
        failures = quality_failures(doc.text)
        if doc.label == "junk" and JUNK_RULE[doc.of] is not None:
            assert JUNK_RULE[doc.of] in failures, (doc.of, failures, doc.text[:200])
        elif doc.label == "junk":
            assert not failures, (doc.of, failures, doc.text)
        else:
            assert not failures, (doc.label, failures, doc.text)


def test_generation_speed(corpus):
    assert len(corpus) == N_DOCS and GENERATION_CPU_SECONDS[0] < 5.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_docs=-1), "n_docs"),
        (dict(junk_rate=1.5), "junk_rate"),
        (dict(exact_dup_rate=0.6, near_dup_rate=0.4), "no clean story"),
    ],
)
def test_bad_arguments_fail_clearly(kwargs, message):
    args = dict(n_docs=10, seed=0, exact_dup_rate=0.0, near_dup_rate=0.0, junk_rate=0.0) | kwargs
    with pytest.raises(ValueError, match=message):
        list(builtin.generate_corpus(**args))


def test_every_template_renders():
    rng = random.Random(0)
    for plot in world.PLOTS:
        values = world.slots(world.sample_cast(rng, plot=plot.name), rng)
        for group, template in world.all_templates():
            sentence = template.format_map(values)
            assert "{" not in sentence and "  " not in sentence, (group, template)
            if not group.startswith("title"):
                assert builtin.count_sentences(sentence) == 1, (group, sentence)
                assert sentence[0].isupper() and "..." not in sentence, (group, sentence)


def test_world_vocabulary_sizes_and_disjointness():
    assert len(world.NAMES) >= 40 and len(world.ANIMALS) >= 30 and len(world.PLACES) >= 30
    assert len(world.OBJECTS) >= 40
    groups = [
        set(map(str.lower, world.NAMES)),
        set(world.ANIMALS),
        set(world.PLACES),
        set(world.OBJECTS),
        set(world.FEELINGS),
    ]
    for a, b in itertools.combinations(groups, 2):
        assert not a & b


# ------------------------------------------------------------------------------------------------ instructions


def test_instructions_meet_their_constraints():
    items = list(builtin.generate_instructions(300, SEED, "train"))
    assert items == list(builtin.generate_instructions(300, SEED, "train"))
    assert len({it["messages"][0]["content"] for it in items}) == len(items)
    extras = collections.Counter()
    for it in items:
        user, assistant = it["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        c = it["constraints"]
        assert {"name", "animal", "place", "complete"} <= set(c) and 2 <= len(c) - 4 <= 4
        result = check_constraints(assistant["content"], c)
        assert result["satisfied"] and result["score"] == 1.0, (c, assistant["content"])
        assert c["name"] in user["content"] and c["animal"] in user["content"]
        extras.update(set(c) - {"name", "animal", "place", "complete"})
    assert set(extras) == {"object", "feeling", "max_sentences", "ends_with", "title"}


def test_splits_are_disjoint_and_test_combinations_are_held_out():
    pairs = {}
    for split in builtin.SPLITS:
        items = list(builtin.generate_instructions(200, SEED, split))
        pairs[split] = {(it["constraints"]["animal"], it["constraints"]["place"]) for it in items}
        assert all(builtin.split_of(*p) == split for p in pairs[split])
    assert not pairs["test"] & (pairs["train"] | pairs["val"])
    assert not pairs["val"] & pairs["train"]
    with pytest.raises(ValueError, match="split"):
        list(builtin.generate_instructions(1, SEED, "dev"))


def test_checker_is_robust():
    c = {
        "name": "Max",
        "animal": "fox",
        "place": "toy shop",
        "object": "kite",
        "feeling": "happy",
        "max_sentences": 3,
        "ends_with": "home",
        "title": True,
        "complete": True,
    }
    good = "# Max and the Kite\n\nMAX the Fox went to the Toy  Shop. He flew two kites and felt happy. He went HOME!"
    assert check_constraints(good, c) == {"satisfied": True, "score": 1.0, "per_constraint": {k: True for k in c}}
    bad = "Maxine the foxglove went to the shop. She was unhappy about her kiteboard and never went home"
    result = check_constraints(bad, c)
    assert not result["satisfied"]
    assert result["per_constraint"] == {
        "name": False,
        "animal": False,
        "place": False,
        "object": False,
        "feeling": False,
        "max_sentences": True,
        "ends_with": True,
        "title": False,
        "complete": False,
    }
    assert result["score"] == pytest.approx(2 / 9)
    assert builtin.count_sentences('Max said, "Hi!" Then he ran. And then') == 3
    with pytest.raises(ValueError, match="unknown constraint 'colour'"):
        check_constraints("x", {"colour": "red"})
    with pytest.raises(ValueError, match="max_sentences"):
        check_constraints("x", {"max_sentences": "5"})


DEGENERATE_TITLES = [  # the default run's DPO answers that used to count as titled: stacked pseudo-title lines
    "Tom and the Sr\nTom and the Kov\nTom and theendden",
    "Max and the Cyes\nMax and the How B",
]


@pytest.mark.parametrize(
    "answer",
    [
        *DEGENERATE_TITLES,
        *(a + "." for a in DEGENERATE_TITLES),  # a final period gives the "body" a sentence end
        *(a + "\n\nTom the cat went to the park. He was happy." for a in DEGENERATE_TITLES),  # a story below
        "Tom and the Red Kite\nTom and the Big Ball\n\nTom the cat went to the park. He was happy.",  # stacked
        "Tom and the Red Kite and the Big Ball at the Park\n\nTom the cat went to the park. He was happy.",  # 11
        "Tom & the Kite\n\nTom the cat went to the park. He was happy.",  # "&" is no word
    ],
)
def test_degenerate_titles_fail_the_title_constraint(answer):
    assert builtin.split_title(answer)[0] is None
    assert check_constraints(answer, {"title": True})["per_constraint"]["title"] is False


def test_a_short_title_of_world_words_above_a_story_passes():
    story = "Tom the cat went to the park. He was happy."
    for title in ("Tom and the Red Kite", "# A Day at the Park", "**Tom's Big Day**", "Title: Tom Goes to the Park"):
        assert builtin.split_title(f"{title}\n\n{story}")[1] == story, title
        assert check_constraints(f"{title}\n{story}", {"title": True, "max_sentences": 2})["satisfied"], title
    assert builtin.is_title("Max and the Golden Toy Robot") and not builtin.is_title("Max and the Golden Toy Sr")


def test_every_builtin_title_meets_the_stricter_rule():
    titles = {
        world.title_for(world.sample_cast(random.Random(i), plot=plot.name), random.Random(i))
        for plot in world.PLOTS
        for i in range(100)
    }
    assert len(titles) > 200 and all(builtin.is_title(t) for t in titles), [
        t for t in titles if not builtin.is_title(t)
    ]


def test_builtin_data_still_meets_its_constraints_and_rejected_replies_break_theirs():
    from tasks.sources.examples import broken_constraint

    for split in builtin.SPLITS:
        for ex in builtin.generate_instructions(200, SEED + 1, split):
            assert check_constraints(ex["messages"][1]["content"], ex["constraints"])["satisfied"], ex["id"]
        pairs = list(builtin.generate_preferences(200, SEED + 1, split))
        for p in pairs:
            assert check_constraints(p["chosen"], p["constraints"])["satisfied"], p["id"]
            assert broken_constraint(p) == builtin.BROKEN_KINDS[p["broken"]], p["id"]
        titled = [p for p in pairs if p["constraints"].get("title")]
        assert titled and all(builtin.split_title(p["chosen"])[0] for p in titled)


# ------------------------------------------------------------------------------------------------ preferences


def test_preferences_break_exactly_one_constraint():
    pairs = list(builtin.generate_preferences(500, SEED, "train"))
    assert pairs[:20] == list(builtin.generate_preferences(20, SEED, "train"))
    broken = collections.Counter()
    for p in pairs:
        chosen = check_constraints(p["chosen"], p["constraints"])
        rejected = check_constraints(p["rejected"], p["constraints"])
        assert chosen["satisfied"]
        assert not rejected["satisfied"]
        failed = [k for k, ok in rejected["per_constraint"].items() if not ok]
        assert failed == [builtin.BROKEN_KINDS[p["broken"]]]
        assert p["chosen"] != p["rejected"]
        broken[p["broken"]] += 1
    assert set(broken) == set(builtin.BROKEN_KINDS)
    assert min(broken.values()) >= 20


def test_preference_splits_differ():
    train = list(builtin.generate_preferences(30, SEED, "train"))
    test = list(builtin.generate_preferences(30, SEED, "test"))
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in test}


# ------------------------------------------------------------------------------------------------ cloze


def test_cloze_items_are_valid_and_consistent():
    items = list(builtin.generate_cloze(300, SEED))
    assert items == list(builtin.generate_cloze(300, SEED, "test"))
    assert items[0]["context"] != next(builtin.generate_cloze(1, SEED, "train"))["context"]
    labels = collections.Counter(it["label"] for it in items)
    assert set(labels) == {0, 1, 2, 3} and min(labels.values()) >= 50
    for it in items:
        choices, right = it["choices"], it["choices"][it["label"]]
        assert len(choices) == 4 and len(set(choices)) == 4
        opening = builtin.split_sentences(it["context"])[0]
        name = next(n for n in world.NAMES if world.mentions(opening, n))
        assert world.mentions(right, name)
        for wrong in choices[: it["label"]] + choices[it["label"] + 1 :]:
            # the distractor names something the story never did
            new_words = set(re.findall(r"\w+", wrong.lower())) - set(re.findall(r"\w+", right.lower()))
            assert new_words and not any(world.mentions(it["context"], w) for w in new_words), (wrong, right)
