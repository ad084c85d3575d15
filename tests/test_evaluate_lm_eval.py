"""lm-evaluation-harness scores our exported model on the offline tasks of evals/, and its numbers equal our own
log-likelihood computation (our Llama, not transformers') on the same items: per choice within 1e-4, and the
accuracy from our own summed log-probs equals lm-eval's."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer

from model.hf import load
from tasks.common.dvcio import stage_paths
from tasks.evaluate import BENCHMARKS, EvaluateConfig, prepare_benchmarks, quiet_libraries, run_lm_eval
from tests.conftest import SHARED_DATA
from tests.evaluate_fixtures import story_sentences, train_tiny, train_tokenizer

ITEMS = 12


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A briefly trained tiny model, the benchmark files the stage writes, and lm-eval's scores of them."""
    quiet_libraries()
    tmp = tmp_path_factory.mktemp("lmeval")
    tok_dir = train_tokenizer(tmp / "tokenizer")
    folder = train_tiny(tmp / "model", tok_dir, story_sentences(300, 1), steps=40)
    cfg = EvaluateConfig(limit=ITEMS, data_dir=str(SHARED_DATA), benchmarks=["cloze", "hellaswag", "piqa"])
    paths = stage_paths("evaluate", root=tmp)
    skipped: dict[str, str] = {}
    files, counts = prepare_benchmarks(cfg, paths, folder / "tokenizer.json", 512, skipped)
    result = run_lm_eval(folder, files, [], ITEMS, 8, "cpu", 0)
    return folder, files, counts, skipped, result


def own_loglikelihoods(model, tok, context: str, choices: list[str]) -> list[float]:
    """Sum of log p(continuation tokens | context) for each ' ' + choice, the continuation being the tokens of
    context + ' ' + choice after those of context alone (how a causal LM scores a multiple-choice option)."""
    out = []
    ctx = tok.encode(context).ids
    for choice in choices:
        whole = tok.encode(context + " " + choice).ids
        cont = whole[len(ctx) :]
        idx = torch.tensor([whole[:-1]])
        with torch.no_grad():
            logits, _ = model(idx, all_logits=True)  # (1,T-1,V)
        logp = torch.log_softmax(logits[0].double(), dim=-1)
        positions = range(len(whole) - 1 - len(cont), len(whole) - 1)
        out.append(sum(float(logp[p, t]) for p, t in zip(positions, cont)))
    return out


def test_lm_eval_equals_our_loglikelihoods(scored):
    folder, files, counts, skipped, result = scored
    model = load(folder)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert "cloze" in files and counts["cloze"]["items"] == ITEMS
    compared = 0
    for name, path in files.items():
        bench = BENCHMARKS[name]
        docs = [json.loads(line) for line in path.read_text().splitlines()]
        items = result["items"][name]
        assert [i["doc_id"] for i in items] == list(range(len(docs)))
        correct = 0
        for doc, item in zip(docs, items):
            ours = own_loglikelihoods(model, tok, bench.text(doc), bench.choices(doc))
            assert item["target"] == doc["label"]
            assert ours == pytest.approx(item["loglikelihoods"], abs=1e-4), (name, item["doc_id"])
            assert float(max(range(len(ours)), key=ours.__getitem__) == doc["label"]) == item["acc"]
            correct += max(range(len(ours)), key=ours.__getitem__) == doc["label"]
            compared += 1
        assert correct / len(docs) == pytest.approx(result["scores"][name]["acc"], abs=1e-12)
    assert compared >= ITEMS


def test_real_slices_are_scored_or_skipped_with_reason(scored):
    _, files, counts, skipped, result = scored
    for name in ("hellaswag", "piqa"):
        if (SHARED_DATA / name).is_dir():
            assert name in files and counts[name]["items"] == ITEMS, counts
            assert counts[name]["source"].startswith(str((SHARED_DATA / name).resolve()))
            assert 0.0 <= result["scores"][name]["acc"] <= 1.0
        else:
            assert f"no {name} slice" in skipped[f"benchmark:{name}"]


def test_missing_slice_is_skipped_with_reason(scored, tmp_path):
    cfg = EvaluateConfig(limit=3, data_dir=str(tmp_path / "nowhere"), benchmarks=["piqa"])
    skipped: dict[str, str] = {}
    files, counts = prepare_benchmarks(
        cfg, stage_paths("evaluate", root=tmp_path), scored[0] / "tokenizer.json", 512, skipped
    )
    assert files == {} and counts == {}
    assert "no piqa slice" in skipped["benchmark:piqa"] and "nowhere" in skipped["benchmark:piqa"]


def test_items_too_long_for_the_context_are_counted_not_scored(scored, tmp_path):
    folder = scored[0]
    cfg = EvaluateConfig(limit=5, benchmarks=["cloze"])
    skipped: dict[str, str] = {}
    files, counts = prepare_benchmarks(
        cfg, stage_paths("evaluate", root=tmp_path), folder / "tokenizer.json", 48, skipped
    )
    assert counts["cloze"]["too_long_for_context"] > 0
    assert counts["cloze"]["items"] + counts["cloze"]["too_long_for_context"] <= 10
