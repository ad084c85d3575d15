"""The builtin corpus: seeded, deterministic children's stories with planted duplicates and junk, plus instruction,
preference and story-cloze sets from the same world. It is scratchlm's embedded default data and the ground truth
its data stages are scored against.

Runbook
    from tasks.sources import builtin
    docs = list(builtin.generate_corpus(12000, seed=1337, exact_dup_rate=0.03, near_dup_rate=0.03, junk_rate=0.05))
    sft = list(builtin.generate_instructions(2000, seed=1337, split="train"))
    pairs = list(builtin.generate_preferences(1000, seed=1337, split="train"))
    builtin.check_constraints(answer, pairs[0]["constraints"])     # -> {"satisfied", "score", "per_constraint"}
    cloze = list(builtin.generate_cloze(500, seed=1337))             # split="test" by default

Corpus (`generate_corpus`)
    Every document is a `BuiltinDoc(id, text, label, of)`. Ids are `builtin-000000`, `builtin-000001`, ... in output
    order. Labels are planted in exact proportions (round(rate * n_docs) of each), shuffled by the seed:
      clean      a story (60-180 words, 1-3 paragraphs); the story at index i depends only on (seed, i)
      exact_dup  a byte-identical copy of an earlier clean story; `of` is that story's id
      near_dup   an earlier clean story with 1-3 small edits (word swap/insert/delete, the name changed in one
                 place, or a sentence dropped); word-3-gram Jaccard with the original >= 0.7; `of` is its id
      junk       `of` is its kind, drawn uniformly from JUNK_KINDS: web junk that one Gopher/C4-style rule
                 rejects (HEURISTIC_JUNK: 8 kinds, 2/3 of the junk), or fluent text those rules keep
                 (FLUENT_JUNK, tasks/sources/fluent.py: off_domain, spam, filler, non_english; 1/3 of the junk,
                 1.7 % of the default corpus) that the filter's classifier and language rules are for
    Copies always come after their originals. Clean stories never contain web boilerplate words, bullets or "..."
    lines and pass the Gopher quality and repetition rules and C4's line rules.

Instructions, preferences, cloze
    Each split ("train", "val", "test") draws from its own seed stream, and (animal, place) pairs are partitioned
    between splits, so test prompts are held-out combinations. Constraints are programmatic (see CONSTRAINT_KINDS and
    `check_constraints`); every answer/chosen satisfies all of its constraints, every rejected breaks exactly one.
"""

from __future__ import annotations

import functools
import random
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from tasks.common import degeneration
from tasks.sources import fluent, world
from tasks.sources.world import Cast, Story, StoryError

LABELS: tuple[str, ...] = ("clean", "exact_dup", "near_dup", "junk")
HEURISTIC_JUNK: tuple[str, ...] = (
    "boilerplate",
    "symbol_soup",
    "repeated_lines",
    "bullets",
    "ellipsis",
    "too_short",
    "non_alpha",
    "lorem_ipsum",
)
"""Junk kinds built to fail one Gopher/C4-style rule each."""
FLUENT_JUNK: tuple[str, ...] = fluent.KINDS
"""Junk kinds the heuristic rules keep (tasks/sources/fluent.py): off_domain, spam, filler (the quality
classifier's), non_english (the language identifier's)."""
JUNK_KINDS: tuple[str, ...] = HEURISTIC_JUNK + FLUENT_JUNK
SPLITS: tuple[str, ...] = ("train", "val", "test")
CONSTRAINT_KINDS: tuple[str, ...] = (
    "name",
    "animal",
    "place",
    "object",
    "feeling",
    "max_sentences",
    "ends_with",
    "title",
    "complete",
)
"""name/animal/place/object/feeling: the answer names that word (whole word, any case, plural allowed);
max_sentences: at most that many sentences (a title line is not one); ends_with: the last word of the answer;
title: True = the first line is a title (see `split_title`: one short line of story-world words, then the story);
complete: True = the answer ends with a finished sentence (. ! or ?, a closing quote allowed)."""
BROKEN_KINDS: dict[str, str] = {  # rejected kind -> the one constraint it breaks
    "wrong_name": "name",
    "off_topic": "animal",
    "missing_place": "place",
    "missing_object": "object",
    "missing_feeling": "feeling",
    "too_long": "max_sentences",
    "wrong_ending": "ends_with",
    "no_title": "title",
    "truncated": "complete",
}
NEAR_DUP_MIN_JACCARD = 0.7
_MAX_TRIES = 50


@dataclass(frozen=True)
class BuiltinDoc:
    """One corpus document and its ground truth."""

    id: str
    """`builtin-000042`: stable for (seed, index)."""
    text: str
    label: str
    """"clean" | "exact_dup" | "near_dup" | "junk"."""
    of: str | None
    """exact_dup/near_dup: id of the original it copies; junk: the junk kind; clean: None."""


def _rng(*parts: object) -> random.Random:
    """An independent, platform-stable stream for one purpose (string seeds hash with SHA-512)."""
    return random.Random("scratchlm-builtin/" + "/".join(map(str, parts)))


# ------------------------------------------------------------------------------------------------ shingles

_WORD = re.compile(r"[a-z0-9']+")


def word_shingles(text: str, n: int = 3) -> set[str]:
    """Set of word n-grams of the lowercased text, punctuation dropped (what near-duplicate detection compares)."""
    words = _WORD.findall(text.lower())
    if len(words) < n:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    """|a & b| / |a | b| (1.0 for two empty sets)."""
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


# ------------------------------------------------------------------------------------------------ corpus


def generate_corpus(
    n_docs: int, seed: int, exact_dup_rate: float, near_dup_rate: float, junk_rate: float
) -> Iterator[BuiltinDoc]:
    """Yield n_docs labelled documents: clean stories, planted exact/near duplicates of earlier ones, and junk.

    Each rate is a fraction of n_docs (round(rate * n_docs) documents get that label). Deterministic in all
    arguments; documents stream, so memory stays flat however large n_docs is.
    """
    plan = _plan(n_docs, seed, exact_dup_rate, near_dup_rate, junk_rate)
    pick = _rng("originals", seed)
    clean_so_far: list[int] = []
    for index, label in enumerate(plan):
        if label == "clean":
            clean_so_far.append(index)
            yield BuiltinDoc(doc_id(index), clean_story(seed, index).text, label, None)
        elif label == "junk":
            kind, text = junk_document(_rng("junk", seed, index))
            yield BuiltinDoc(doc_id(index), text, label, kind)
        else:
            original = clean_so_far[pick.randrange(len(clean_so_far))]
            story = clean_story(seed, original)
            text = story.text if label == "exact_dup" else near_duplicate(story, _rng("near", seed, index))
            yield BuiltinDoc(doc_id(index), text, label, doc_id(original))


def doc_id(index: int) -> str:
    """The id of the document at position `index` (`builtin-000042`)."""
    return f"builtin-{index:06d}"


def _plan(n_docs: int, seed: int, exact_dup_rate: float, near_dup_rate: float, junk_rate: float) -> list[str]:
    """The label of every position: exact counts from the rates, shuffled, with a clean story first."""
    if not isinstance(n_docs, int) or isinstance(n_docs, bool) or n_docs < 0:
        raise ValueError(f"generate_corpus: n_docs must be an int >= 0, got {n_docs!r}")
    rates = {"exact_dup_rate": exact_dup_rate, "near_dup_rate": near_dup_rate, "junk_rate": junk_rate}
    for key, rate in rates.items():
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"generate_corpus: {key} must be in [0, 1], got {rate!r}")
    n_exact, n_near, n_junk = (round(rate * n_docs) for rate in rates.values())
    n_clean = n_docs - n_exact - n_near - n_junk
    if n_clean < 0 or (n_clean == 0 and n_exact + n_near > 0):
        raise ValueError(
            f"generate_corpus: rates {rates} leave no clean story for the duplicates to copy "
            f"(n_docs={n_docs}); lower them"
        )
    plan = ["clean"] * n_clean + ["exact_dup"] * n_exact + ["near_dup"] * n_near + ["junk"] * n_junk
    _rng("plan", seed).shuffle(plan)
    if plan and n_clean and plan[0] != "clean":
        first = plan.index("clean")
        plan[0], plan[first] = plan[first], plan[0]
    return plan


def clean_story(seed: int, index: int) -> Story:
    """The clean story at position `index` of the corpus with this seed (a pure function of both)."""
    rng = _rng("story", seed, index)
    return world.compose(world.sample_cast(rng), rng, words=(60, 180))


# ------------------------------------------------------------------------------------------------ near duplicates

_SWAPS = {
    "little": "small",
    "small": "little",
    "big": "large",
    "said": "cried",
    "went": "walked",
    "walked": "went",
    "ran": "hurried",
    "very": "really",
    "looked": "peeked",
    "saw": "spotted",
    "soon": "then",
    "tall": "high",
    "began": "started",
    "started": "began",
    "quiet": "silent",
    "pretty": "lovely",
    "good": "nice",
    "nice": "good",
    "day": "time",
    "found": "spotted",
    "all": "both",
    "then": "soon",
    "loved": "liked",
    "liked": "loved",
    "wanted": "hoped",
    "friend": "pal",
    "happy": "glad",
    "glad": "happy",
}
_FILLERS = ("very", "really", "just", "then", "soon", "also", "still", "quite")
_PLAIN_WORD = re.compile(r"^[a-z]+$")


def near_duplicate(story: Story, rng: random.Random) -> str:
    """The story with 1-3 small edits, keeping word-3-gram Jaccard with the original >= NEAR_DUP_MIN_JACCARD."""
    original = story.text
    reference = word_shingles(original)
    for attempt in range(_MAX_TRIES):
        n_edits = 1 if attempt >= _MAX_TRIES // 2 else rng.choice((1, 1, 2, 2, 3))
        sentences, breaks = list(story.sentences), story.breaks
        for _ in range(n_edits):
            edit = rng.choice(("swap", "swap", "insert", "delete", "rename", "drop"))
            sentences, breaks = _EDITS[edit](sentences, breaks, story, rng)
        text = Story(sentences, [], [], story.slots, breaks).text
        if text != original and jaccard(word_shingles(text), reference) >= NEAR_DUP_MIN_JACCARD:
            return text
    raise RuntimeError("near_duplicate: no edit kept the copy close enough; this is a bug in the edit operations")


def _plain_word_positions(sentences: list[str]) -> list[tuple[int, int]]:
    """(sentence, word) positions of lowercase words with no punctuation, first word of a sentence excluded."""
    return [
        (s, w)
        for s, sentence in enumerate(sentences)
        for w, word in enumerate(sentence.split())
        if w > 0 and _PLAIN_WORD.match(word)
    ]


def _edit_word(sentences: list[str], rng: random.Random, change) -> list[str]:
    positions = _plain_word_positions(sentences)
    s, w = positions[rng.randrange(len(positions))]
    words = sentences[s].split()
    words[w : w + 1] = change(words[w], rng)
    return sentences[:s] + [" ".join(words)] + sentences[s + 1 :]


def _swap(sentences, breaks, story, rng):
    return _edit_word(sentences, rng, lambda w, r: [_SWAPS.get(w) or r.choice(("big", "old", "new", "nice"))]), breaks


def _insert(sentences, breaks, story, rng):
    return _edit_word(sentences, rng, lambda w, r: [r.choice(_FILLERS), w]), breaks


def _delete(sentences, breaks, story, rng):
    return _edit_word(sentences, rng, lambda w, r: []), breaks


def _rename(sentences, breaks, story, rng):
    """The hero's name changed in one sentence, as a careless copy-edit would."""
    name = story.slots["name"]
    where = [i for i, s in enumerate(sentences) if world.mentions(s, name)]
    if not where:
        return _swap(sentences, breaks, story, rng)
    i = rng.choice(where)
    new = world.same_gender_name(rng, name, story.slots["friend"])
    sentences = list(sentences)
    sentences[i] = re.sub(rf"\b{re.escape(name)}\b", new, sentences[i])
    return sentences, breaks


def _drop(sentences, breaks, story, rng):
    """One middle sentence dropped, only from long stories so the copy stays close."""
    if len(sentences) < 10:
        return _swap(sentences, breaks, story, rng)
    i = rng.randrange(1, len(sentences) - 1)
    return sentences[:i] + sentences[i + 1 :], tuple(b - 1 if b > i else b for b in breaks)


_EDITS = {"swap": _swap, "insert": _insert, "delete": _delete, "rename": _rename, "drop": _drop}


# ------------------------------------------------------------------------------------------------ junk


def junk_document(rng: random.Random) -> tuple[str, str]:
    """(kind, text) of one junk document of a random kind."""
    kind = rng.choice(JUNK_KINDS)
    return kind, _JUNK[kind](rng)


_SITES = ("Sunny", "Best", "Top", "Daily", "Smart", "Quick", "Mega", "Home", "Deal", "Star")
_BOILERPLATE = (
    "We use cookies to improve your experience on our site.",
    "By continuing to browse, you agree to our use of cookies.",
    "Please read our Terms of Use and Privacy Policy.",
    "Please enable JavaScript in your browser to view this page.",
    "Subscribe to our newsletter for the latest updates!",
    "Log in | Sign up | Forgot your password?",
    "Copyright {year} {site}.com. All rights reserved.",
    "Accept all cookies | Manage preferences",
    "Click here to continue.",
    "Home | About | Contact | Help",
    "This site uses cookies. Learn more.",
    "Sign in with your email address to continue.",
    "Your session has expired. Please log in again.",
    "Share on social media | Print this page",
)
_BLOCKED_LINES = (0, 1, 2, 3, 10)  # lines holding a C4 policy phrase (use cookies, terms of use, ...): one per page


def _boilerplate(rng: random.Random) -> str:
    values = {"year": rng.randint(2005, 2025), "site": rng.choice(_SITES) + rng.choice(_SITES)}
    lines = [_BOILERPLATE[rng.choice(_BLOCKED_LINES)]]
    lines += rng.sample(_BOILERPLATE, rng.randint(3, 7))
    rng.shuffle(lines)
    return "\n".join(dict.fromkeys(line.format(**values) for line in lines))


def _symbol_soup(rng: random.Random) -> str:
    hashes = ("#", "##", "###", "#!", "#$", "...")  # what Gopher's symbol-to-word ratio counts
    symbols = ("@@", "$%", "&&", "{}", "[]", "<>", "~~", "|", "^^", "**", ":::", ";;", "+=")

    def token() -> str:
        roll = rng.random()
        return rng.choice(hashes if roll < 0.4 else symbols if roll < 0.85 else world.OBJECTS).split()[0]

    lines = []
    for _ in range(rng.randint(6, 14)):
        tokens = [token() for _ in range(rng.randint(8, 16))]
        lines.append(" ".join(tokens))
    return "\n".join(lines)


def _repeated_lines(rng: random.Random) -> str:
    cast = world.sample_cast(rng)
    line = world.compose(cast, rng, words=None).sentences[rng.randrange(3)]
    return "\n".join([line] * rng.randint(12, 40))


def _bullets(rng: random.Random) -> str:
    mark = rng.choice(("-", "\u2022"))
    items = []
    for _ in range(rng.randint(8, 20)):
        items.append(
            f"{mark} {rng.choice(world.COLORS)} {rng.choice(world.OBJECTS)}"
            if rng.random() < 0.5
            else f"{mark} {rng.choice(list(world.NAMES))} the {rng.choice(world.ANIMALS)}"
        )
    return "\n".join(items)


def _ellipsis(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(6, 14)):
        words = world.compose(world.sample_cast(rng), rng, words=None).sentences[0].split()
        cut = " ".join(words[: rng.randint(3, max(3, len(words) - 2))]).rstrip(",")
        lines.append(cut + rng.choice(("...", "\u2026")))
    return "\n".join(lines)


def _too_short(rng: random.Random) -> str:
    options = (
        "Read more",
        "Page not found",
        "Click here",
        "Back to top",
        "Next page",
        "No results found",
        "Loading, please wait",
        f"{rng.choice(list(world.NAMES))} {rng.choice(world.ANIMALS)}",
        f"The {rng.choice(list(world.PLACES))}",
    )
    return rng.choice(options)


def _non_alpha(rng: random.Random) -> str:
    def number() -> str:
        form = rng.randrange(5)
        if form == 0:
            return f"{rng.randint(0, 99999)}"
        if form == 1:
            return f"{rng.uniform(-100, 100):.2f}"
        if form == 2:
            return f"{rng.randint(1990, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
        if form == 3:
            return f"{rng.randint(0, 100)}%"
        return f"{rng.randint(1, 999):,}"

    return "\n".join(" ".join(number() for _ in range(rng.randint(6, 12))) for _ in range(rng.randint(6, 15)))


_LOREM = (
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore et dolore "
    "magna aliqua enim ad minim veniam quis nostrud exercitation ullamco laboris nisi aliquip ex ea commodo "
    "consequat duis aute irure in reprehenderit voluptate velit esse cillum fugiat nulla pariatur"
).split()


def _lorem_ipsum(rng: random.Random) -> str:
    sentences = ["Lorem ipsum dolor sit amet, consectetur adipiscing elit."]
    while sum(len(s.split()) for s in sentences) < rng.randint(50, 150):
        words = [rng.choice(_LOREM) for _ in range(rng.randint(6, 14))]
        sentences.append(" ".join(words).capitalize() + ".")
    return " ".join(sentences)


_JUNK = {
    **{kind: functools.partial(fluent.write, kind) for kind in FLUENT_JUNK},
    "boilerplate": _boilerplate,
    "symbol_soup": _symbol_soup,
    "repeated_lines": _repeated_lines,
    "bullets": _bullets,
    "ellipsis": _ellipsis,
    "too_short": _too_short,
    "non_alpha": _non_alpha,
    "lorem_ipsum": _lorem_ipsum,
}


# ------------------------------------------------------------------------------------------------ checker

_SENTENCE_END = re.compile(r"[.!?]+[\"'\u201d\u2019)]*(?=\s|$)")
_COMPLETE = re.compile(r"[.!?][\"'\u201d\u2019)]*$")
_TITLE_PREFIX = re.compile(r"^(?:#+\s*|title\s*:\s*)", re.IGNORECASE)
_LETTERS = re.compile(r"[A-Za-z]")
_TITLE_WORD = re.compile(r"[A-Za-z]+(?:['-][A-Za-z]+)*")
TITLE_MAX_WORDS = 8
"""A title is at most this many words (the world's longest title, "Max and the Golden Toy Robot", has 6)."""


def _heading(line: str) -> str:
    """A line without its heading marks: `# `, `Title:`, and `*`/`_` emphasis around it."""
    return _TITLE_PREFIX.sub("", line.strip()).strip("*_ \t")


def title_like(line: str) -> bool:
    """A line that reads as a heading: 1-12 words, a letter, no final punctuation (a story paragraph has one)."""
    text = _heading(line)
    return 0 < len(text.split()) <= 12 and _LETTERS.search(text) is not None and text[-1] not in ".!?,;:"


def is_title(line: str) -> bool:
    """A heading of 1-TITLE_MAX_WORDS words, each a word of the story world (`world.vocabulary()`), quotes and
    trailing commas around a word allowed: "Tom and the Red Kite" is one, "Tom and the Sr" is not."""
    tokens = [t.strip("\"'\u201c\u201d\u2018\u2019(),") for t in _heading(line).split()]
    return (
        title_like(line)
        and len(tokens) <= TITLE_MAX_WORDS
        and all(_TITLE_WORD.fullmatch(t) for t in tokens)
        and set(degeneration.words(" ".join(tokens))) <= world.vocabulary()
    )


def split_title(answer: str) -> tuple[str | None, str]:
    """(title, body): the first line is a title when it `is_title` and a story follows: the body has a sentence
    end and does not open with another heading line (pseudo-titles stacked above a story are not a title)."""
    lines = answer.strip().splitlines()
    if len(lines) < 2:
        return None, answer.strip()
    body = "\n".join(lines[1:]).strip()
    titled = (
        is_title(lines[0])
        and not title_like(body.splitlines()[0] if body else "")
        and _SENTENCE_END.search(body) is not None
    )
    return (_heading(lines[0]), body) if titled else (None, answer.strip())


def count_sentences(text: str) -> int:
    """Sentences = runs of . ! ? (a closing quote allowed) before a space or the end, plus an unfinished tail."""
    ends = list(_SENTENCE_END.finditer(text))
    tail = text[ends[-1].end() :] if ends else text
    return len(ends) + (1 if _LETTERS.search(tail) else 0)


def split_sentences(text: str) -> list[str]:
    """The sentences of a text, split the way `count_sentences` counts them (an unfinished tail included)."""
    sentences, start = [], 0
    for end in _SENTENCE_END.finditer(text):
        sentences.append(text[start : end.end()].strip())
        start = end.end()
    if _LETTERS.search(text[start:]):
        sentences.append(text[start:].strip())
    return sentences


def last_word(text: str) -> str:
    """The last word of a text, lowercased, punctuation and quotes dropped ("" when there is none)."""
    words = re.findall(r"[A-Za-z][A-Za-z']*", text)
    return words[-1].strip("'").lower() if words else ""


def check_constraints(answer: str, constraints: dict) -> dict:
    """Check an answer against its constraints (keys from CONSTRAINT_KINDS).

    Returns {"satisfied": all met, "score": fraction met, "per_constraint": {name: bool}}; an unknown constraint or
    a value of the wrong type raises ValueError naming it.
    """
    if not isinstance(answer, str):
        raise ValueError(f"check_constraints: answer must be a str, got {type(answer).__name__}")
    title, body = split_title(answer)
    per: dict[str, bool] = {}
    for key, value in constraints.items():
        if key not in _CHECKS:
            raise ValueError(f"check_constraints: unknown constraint {key!r} (known: {', '.join(CONSTRAINT_KINDS)})")
        expected = _CHECK_TYPES[key]
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ValueError(f"check_constraints: constraint {key!r} needs a {expected.__name__}, got {value!r}")
        per[key] = bool(_CHECKS[key](answer, title, body, value))
    score = sum(per.values()) / len(per) if per else 1.0
    return {"satisfied": all(per.values()), "score": score, "per_constraint": per}


def _mentioned(answer, title, body, word):
    return world.mentions(answer, word)


_CHECKS = {
    "name": _mentioned,
    "animal": _mentioned,
    "place": _mentioned,
    "object": _mentioned,
    "feeling": _mentioned,
    "max_sentences": lambda answer, title, body, k: count_sentences(body) <= k,
    "ends_with": lambda answer, title, body, word: last_word(answer) == word.lower(),
    "title": lambda answer, title, body, wanted: (title is not None) == wanted,
    "complete": lambda answer, title, body, wanted: (_COMPLETE.search(body) is not None) == wanted,
}
_CHECK_TYPES = {
    "name": str,
    "animal": str,
    "place": str,
    "object": str,
    "feeling": str,
    "max_sentences": int,
    "ends_with": str,
    "title": bool,
    "complete": bool,
}


# ------------------------------------------------------------------------------------------------ instructions


def split_of(animal: str, place: str) -> str:
    """The split that owns an (animal, place) pair: about 10% test, 10% val, 80% train, fixed by a hash."""
    bucket = zlib.crc32(f"{animal}|{place}".encode()) % 10
    return "test" if bucket == 0 else "val" if bucket == 1 else "train"


_COMBOS: dict[str, list[tuple[str, str]]] = {
    split: [(a, p) for a in world.ANIMALS for p in world.PLACES if split_of(a, p) == split] for split in SPLITS
}

_PROMPTS = (
    "Write a story about {a_animal} named {name} who goes to the {place}.",
    "Write a short story about {name}, {a_animal} who visits the {place}.",
    "Tell me a story about {a_animal} called {name} and a trip to the {place}.",
    "Can you write a children's story about {a_animal} named {name}? It should take place {at_place}.",
    "Please write a simple story. The main character is {a_animal} named {name}, and the story happens {at_place}.",
    "I would like a bedtime story about {name} the {animal} and a day {at_place}.",
    "Write a story for kids where {name} the {animal} spends a day {at_place}.",
    "Make up a story about {a_animal} whose name is {name}. Set it {at_place}.",
    "Tell a short tale about {a_place} visit by {name}, who is {a_animal}.",
)
_RULES = {
    "object": (
        "The story must mention {a_object}.",
        "Include {a_object} in the story.",
        "Make sure {a_object} appears in the story.",
        "Somewhere in the story, there should be {a_object}.",
    ),
    "feeling": (
        "Show that {name} feels {feeling} at some point.",
        "Use the word '{feeling}'.",
        "The story should include the feeling '{feeling}'.",
        "At some point, {name} should feel {feeling}.",
    ),
    "max_sentences": (
        "Use at most {max_sentences} sentences.",
        "Keep it to {max_sentences} sentences or fewer.",
        "The story must not be longer than {max_sentences} sentences.",
        "Write no more than {max_sentences} sentences.",
    ),
    "ends_with": (
        "End the story with the word '{ends_with}'.",
        "The last word of the story must be '{ends_with}'.",
        "Finish the story with the word '{ends_with}'.",
    ),
    "title": (
        "Give the story a title on its own line.",
        "Start with a title.",
        "Begin with a short title line.",
        "Put a title on the first line.",
    ),
}
_EXTRAS = tuple(_RULES)


@dataclass
class _Case:
    """One instruction: its cast and story seed (to retell it with one thing broken), constraints, prompt, answer."""

    cast: Cast
    story_seed: int
    constraints: dict
    prompt: str
    story: Story
    title: str | None

    @property
    def answer(self) -> str:
        return _answer(self.story, self.title)


def _answer(story: Story, title: str | None) -> str:
    return f"{title}\n\n{story.text}" if title else story.text


def _check_split(split: str, fn: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"{fn}: split must be one of {SPLITS}, got {split!r}")


def _instruction_case(rng: random.Random, split: str) -> _Case:
    """Draw a prompt whose (animal, place) belongs to `split`, with 2-4 extra constraints and a story meeting all."""
    for _ in range(_MAX_TRIES):
        animal, place = rng.choice(_COMBOS[split])
        cast = world.sample_cast(rng, animal=animal, place=place)
        if cast.ending in (cast.neg, cast.pos):
            cast = world.recast(cast, ending=world.other(rng, list(world.ENDINGS), cast.neg, cast.pos))
        extras = rng.sample(_EXTRAS, rng.randint(2, 4))
        story_seed = rng.getrandbits(64)
        story = world.compose(cast, random.Random(story_seed), words=None, richness=0.35)
        constraints: dict = {"name": cast.hero.name, "animal": animal, "place": place}
        for extra in _EXTRAS:  # fixed order keeps constraint dicts comparable
            if extra not in extras:
                continue
            constraints[extra] = {
                "object": cast.obj,
                "feeling": rng.choice((cast.neg, cast.pos)),
                "max_sentences": len(story.sentences) + rng.randint(0, 2),
                "ends_with": cast.ending,
                "title": True,
            }[extra]
        constraints["complete"] = True
        title = world.title_for(cast, random.Random(story_seed + 1)) if "title" in constraints else None
        case = _Case(cast, story_seed, constraints, _prompt(rng, cast, constraints), story, title)
        if check_constraints(case.answer, constraints)["satisfied"]:
            return case
    raise RuntimeError(f"could not draw a {split} instruction; this is a bug in the story world")


def _prompt(rng: random.Random, cast: Cast, constraints: dict) -> str:
    values = {
        "name": cast.hero.name,
        "animal": cast.hero.animal,
        "a_animal": world.article(cast.hero.animal),
        "place": cast.place,
        "a_place": world.article(cast.place),
        "at_place": f"{world.PLACES[cast.place][0]} the {cast.place}",
        "a_object": world.article(cast.obj),
        **{k: v for k, v in constraints.items() if isinstance(v, str | int)},
    }
    head = rng.choice(_PROMPTS).format_map(values)
    rules = [rng.choice(_RULES[k]).format_map(values) for k in _EXTRAS if k in constraints]
    rng.shuffle(rules)
    if rng.random() < 0.3:
        return head + "\nRequirements:\n" + "\n".join(f"- {r}" for r in rules)
    return " ".join([head, *rules])


def generate_instructions(n: int, seed: int, split: str) -> Iterator[dict]:
    """Yield n instruction examples {"id", "messages": [user prompt, assistant story], "constraints"}.

    Each answer satisfies every constraint (`check_constraints`); splits use disjoint seed streams and disjoint
    (animal, place) pairs.
    """
    _check_split(split, "generate_instructions")
    for i in range(n):
        case = _instruction_case(_rng("instructions", split, seed, i), split)
        yield {
            "id": f"builtin-instr-{split}-{i:06d}",
            "messages": [{"role": "user", "content": case.prompt}, {"role": "assistant", "content": case.answer}],
            "constraints": dict(case.constraints),
        }


# ------------------------------------------------------------------------------------------------ preferences


def generate_preferences(n: int, seed: int, split: str) -> Iterator[dict]:
    """Yield n preference pairs {"id", "prompt", "chosen", "rejected", "constraints", "broken"}.

    chosen satisfies every constraint; rejected is the same story told with exactly one thing broken (`broken` is a
    key of BROKEN_KINDS, which names the constraint it fails), so the pair differs in what the prompt asked for.
    """
    _check_split(split, "generate_preferences")
    for i in range(n):
        rng = _rng("preferences", split, seed, i)
        for _ in range(_MAX_TRIES):
            case = _instruction_case(rng, split)
            kinds = [
                k
                for k, c in BROKEN_KINDS.items()
                if c in case.constraints and not (k == "truncated" and "ends_with" in case.constraints)
            ]
            broken = rng.choice(kinds)
            rejected = _reject(case, broken, rng)
            if rejected is None:
                continue
            failed = [k for k, ok in check_constraints(rejected, case.constraints)["per_constraint"].items() if not ok]
            if failed == [BROKEN_KINDS[broken]]:
                yield {
                    "id": f"builtin-pref-{split}-{i:06d}",
                    "prompt": case.prompt,
                    "chosen": case.answer,
                    "rejected": rejected,
                    "constraints": dict(case.constraints),
                    "broken": broken,
                }
                break
        else:
            raise RuntimeError(f"generate_preferences: could not break pair {i} cleanly; a bug in the story world")


def _retell(case: _Case, forbid: tuple[str, ...], **changes: str) -> str | None:
    """The case's story told from the same seed with the cast changed and `forbid` words avoided (None: impossible)."""
    cast = world.recast(case.cast, **changes)
    try:
        story = world.compose(cast, random.Random(case.story_seed), words=None, richness=0.35, forbid=forbid)
    except StoryError:
        return None
    title = world.title_for(cast, random.Random(case.story_seed + 1)) if case.title else None
    return _answer(story, title)


def _reject(case: _Case, broken: str, rng: random.Random) -> str | None:
    """The case's answer with exactly one constraint broken, or None when this story cannot be broken that way."""
    cast, c = case.cast, case.constraints
    if broken == "wrong_name":
        name = world.same_gender_name(rng, cast.hero.name, cast.friend.name)
        return _retell(case, (cast.hero.name,), name=name)
    if broken == "off_topic":
        animal = world.other(rng, world.ANIMALS, cast.hero.animal, cast.friend.animal)
        return _retell(case, (cast.hero.animal,), animal=animal)
    if broken == "missing_place":
        return _retell(case, (cast.place,), place=world.other(rng, list(world.PLACES), cast.place))
    if broken == "missing_object":
        return _retell(case, (cast.obj,), obj=world.other(rng, world.OBJECTS, cast.obj))
    if broken == "missing_feeling":
        which, pool = ("neg", world.NEGATIVE_FEELINGS) if c["feeling"] == cast.neg else ("pos", world.POSITIVE_FEELINGS)
        return _retell(case, (c["feeling"],), **{which: world.other(rng, pool, c["feeling"], cast.ending)})
    if broken == "wrong_ending":
        return _retell(case, (), ending=world.other(rng, list(world.ENDINGS), cast.ending, cast.neg, cast.pos))
    if broken == "too_long":
        k = c["max_sentences"] - len(case.story.sentences) + rng.randint(1, 3)
        return _answer(world.extra_sentences(case.story, rng, k), case.title)
    if broken == "no_title":
        return case.story.text
    if broken == "truncated":
        return _answer(_truncate(case.story, rng), case.title)
    raise ValueError(f"unknown broken kind {broken!r}")


def _truncate(story: Story, rng: random.Random) -> Story:
    """The story cut off mid-sentence somewhere in its second half."""
    n = len(story.sentences)
    candidates = [i for i in range(n // 2, n) if len(story.sentences[i].split()) >= 4]
    i = rng.choice(candidates)
    words = story.sentences[i].split()
    cut = " ".join(words[: rng.randint(2, len(words) - 2)]).rstrip(',;:"')
    return Story(story.sentences[:i] + [cut], [], [], story.slots, tuple(b for b in story.breaks if b <= i))


# ------------------------------------------------------------------------------------------------ cloze


def generate_cloze(n: int, seed: int, split: str = "test") -> Iterator[dict]:
    """Yield n story-cloze items {"id", "context", "choices", "label"}.

    context is a story without its last sentence; choices are 4 endings built from one template: the right one
    names the story's own character, animal, object and place, and each distractor swaps one of them for one the
    story never mentions. label (the index of the right ending) is uniform over 0-3.
    """
    _check_split(split, "generate_cloze")
    for i in range(n):
        rng = _rng("cloze", split, seed, i)
        for _ in range(_MAX_TRIES):
            item = _cloze_item(rng)
            if item is not None:
                context, choices, label = item
                yield {"id": f"builtin-cloze-{split}-{i:06d}", "context": context, "choices": choices, "label": label}
                break
        else:
            raise RuntimeError(f"generate_cloze: could not build item {i}; a bug in the story world")


def _cloze_item(rng: random.Random) -> tuple[str, list[str], int] | None:
    """(context, choices, label), or None when this draw cannot make four clean choices (the caller redraws)."""
    cast = world.sample_cast(rng)
    story = world.compose(cast, rng, words=(60, 180))
    context = Story(
        story.sentences[:-1], [], [], story.slots, tuple(b for b in story.breaks if b < len(story.sentences) - 1)
    ).text
    template = rng.choice(world.CLOZE_ENDINGS)
    kinds = list(world.CLOZE_SLOTS[template])
    values = story.slots
    entity = {"name": cast.hero.name, "animal": cast.hero.animal, "obj": cast.obj, "place": cast.place}
    if not all(world.mentions(context, entity[k]) for k in kinds):
        return None
    right = template.format_map(values)
    distractors = []
    for kind in rng.sample(kinds, 3):
        swapped = dict(values)
        if kind == "name":
            swapped["name"] = _unmentioned(rng, [n for n, g in world.NAMES.items() if g == cast.hero.pronoun], context)
        elif kind == "animal":
            swapped["animal"] = _unmentioned(rng, world.ANIMALS, context)
        elif kind == "obj":
            swapped["obj"] = _unmentioned(rng, world.OBJECTS, context)
        else:
            swapped["the_place"] = "the " + _unmentioned(rng, list(world.PLACES), context)
        distractors.append(template.format_map(swapped))
    if len({right, *distractors}) != 4:
        return None
    label = rng.randrange(4)
    return context, distractors[:label] + [right] + distractors[label:], label


def _unmentioned(rng: random.Random, pool, context: str) -> str:
    return rng.choice([x for x in pool if not world.mentions(context, x)])


__all__ = [
    "BROKEN_KINDS",
    "CONSTRAINT_KINDS",
    "FLUENT_JUNK",
    "HEURISTIC_JUNK",
    "JUNK_KINDS",
    "LABELS",
    "SPLITS",
    "BuiltinDoc",
    "check_constraints",
    "clean_story",
    "count_sentences",
    "generate_cloze",
    "generate_corpus",
    "generate_instructions",
    "generate_preferences",
    "is_title",
    "jaccard",
    "near_duplicate",
    "split_of",
    "split_sentences",
    "split_title",
    "title_like",
    "word_shingles",
]
