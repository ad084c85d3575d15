"""Instruction and preference loaders: every supported format, the real shared corpora, counted quarantine."""

from __future__ import annotations

import gzip
import json

import pytest

from tasks.common.config import ScratchError
from tasks.sources.instructions import load_instructions, load_preferences, parse_hh
from tests.conftest import shared


def collect(gen):
    good, bad = [], []
    for ex, rec in gen:
        (good if ex else bad).append(ex or rec)
    return good, bad


def test_real_alpaca_gsm8k_and_seed_tasks(tmp_path):
    alpaca = shared("alpaca-en-demo") / "alpaca_en_demo.json"
    gsm8k = shared("gsm8k") / "train.jsonl"
    seeds = shared("alpaca-seed-tasks") / "seed_tasks.jsonl"
    good, bad = collect(load_instructions([str(alpaca), str(gsm8k), str(seeds)], tmp_path, 0, 0))
    n_instances = sum(len(json.loads(l)["instances"]) for l in seeds.read_text().splitlines() if l.strip())
    assert len(good) + len(bad) == 999 + 7473 + n_instances
    assert len(bad) <= 5, [b.reason for b in bad]
    first = good[0]["messages"]
    assert first[0] == {"role": "user", "content": "Describe a process of making crepes."}
    assert first[1]["content"].startswith("Making crepes is an easy and delicious process!")
    gsm = next(g for g in good if "Natalia sold clips" in g["messages"][0]["content"])
    assert gsm["messages"][1]["content"].endswith("#### 72")


def test_real_hh_rlhf_split_at_last_assistant_turn(tmp_path):
    path = shared("hh-rlhf-harmless-base") / "harmless-base_test_rows0000-1811.jsonl.gz"
    good, bad = collect(load_preferences([str(path)], tmp_path, 0, 0))
    assert len(good) + len(bad) == 1812
    assert len(good) >= 1700, [b.reason for b in bad[:5]]
    pair = good[0]
    assert pair["prompt_messages"][0] == {"role": "user", "content": "what are some pranks with a pen i can do?"}
    assert pair["prompt_messages"][-1]["role"] == "user"
    with gzip.open(path, "rt") as f:
        raw = json.loads(f.readline())
    assert raw["chosen"].rstrip().endswith(pair["chosen"]) and raw["rejected"].rstrip().endswith(pair["rejected"])


def test_builtin_sources_carry_constraints(tmp_path):
    inst, _ = collect(load_instructions(["builtin:instructions"], tmp_path, 5, 3))
    prefs, _ = collect(load_preferences(["builtin:preferences"], tmp_path, 5, 3))
    assert len(inst) == len(prefs) == 5
    assert inst[0]["messages"][-1]["role"] == "assistant" and inst[0]["constraints"]
    assert prefs[0]["prompt_messages"][0]["role"] == "user" and prefs[0]["constraints"]


def test_malformed_rows_are_quarantined_with_location(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "robot", "content": "x"}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"instruction": "Say hi", "input": "", "output": ""},
        {"question": "2+2?", "answer": "4"},
        {"text": "no format"},
        [1, 2],
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    good, bad = collect(load_instructions(["mixed.jsonl"], tmp_path, 0, 0))
    assert [g["id"] for g in good] == ["mixed.jsonl:1", "mixed.jsonl:5"]
    assert [(b.location, b.reason.split(":")[0]) for b in bad] == [
        ("mixed.jsonl:2", "message 0"),
        ("mixed.jsonl:3", "the last message must be from the assistant"),
        ("mixed.jsonl:4", "message 1 (assistant)"),
        ("mixed.jsonl:6", "no known instruction format (messages | instruction/input/output | question/answer)"),
        ("mixed.jsonl:7", "not a JSON object (list)"),
        ("mixed.jsonl:8", "malformed JSON"),
    ]


def test_bad_preference_rows(tmp_path):
    rows = [
        {"prompt": "Tell a story", "chosen": "A good story.", "rejected": "Bad."},
        {"prompt": "Tell a story", "chosen": "Same.", "rejected": "Same."},
        {"prompt": "x", "chosen": 3, "rejected": "y"},
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: DIFFERENT\n\nAssistant: c"},
        {"chosen": "no transcript", "rejected": "at all"},
    ]
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    good, bad = collect(load_preferences(["prefs.jsonl"], tmp_path, 0, 0))
    assert len(good) == 1 and good[0]["prompt_messages"] == [{"role": "user", "content": "Tell a story"}]
    assert [b.reason for b in bad] == [
        "chosen and rejected are identical",
        "chosen and rejected must both be strings",
        "chosen and rejected differ before the last assistant turn",
        "not an HH-RLHF transcript ending in an Assistant turn",
    ]


def test_parse_hh_and_missing_file(tmp_path):
    assert parse_hh("\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: bye") == [
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
    ]
    with pytest.raises(ScratchError, match="no such file"):
        list(load_instructions(["nope.jsonl"], tmp_path, 0, 0))
