"""The evaluate stage end to end on tiny models: held-out loss / bpb against a plain per-document computation,
lm-eval benchmarks, constraint satisfaction and reward win rates on shared prompts, samples, DVC plot files and
the report card; missing models fail or are skipped with the reason."""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import os
import shutil

import pytest
import torch

from model.hf import load
from tasks.common import degeneration
from tasks.common.alignment import load_tokenizer
from tasks.common.config import ScratchError
from tasks.common.dvcio import stage_paths
from tasks.common.tracking import Tracker
from tasks.common.train_config import SamplingConfig
from tasks.evaluate import (
    EvaluateConfig,
    Evaluated,
    answer_nll,
    fluency,
    held_out,
    held_out_loss,
    quiet_libraries,
    run,
    summary,
    win_rate,
)
from tests.evaluate_fixtures import VAL_TEXTS, pipeline_outputs, train_tiny

DEGENERATE = [  # the default run's DPO answers to "... Start with a title." prompts: stacked pseudo-titles
    "Tom and the Sr\nTom and the Kov\nTom and theendden",
    "Max and the Cyes\nMax and the How B",
]

SMALL = dict(
    models={"base": "pretrain", "sft": "sft", "dpo": "dpo"},  # the models pipeline_outputs makes
    win_rates=["sft:base", "dpo:sft"],
    limit=6,
    val_max_tokens=0,
    benchmarks=["cloze"],
    batch_size=8,
    sampling=SamplingConfig(prompts=4, prompt_seed=4242, seed=0, max_new_tokens=24, batch_size=4),
    sample_prompts=["Tell me a story about a cat."],
    sample_texts=["Once upon a time"],
    sample_max_new_tokens=12,
)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    quiet_libraries()
    return pipeline_outputs(tmp_path_factory.mktemp("evaluate"))


@pytest.fixture(scope="module")
def evaluated(project):
    os.environ["SCRATCHLM_NO_MLFLOW"] = "1"
    try:
        metrics = run(EvaluateConfig(**SMALL), stage_paths("evaluate", root=project), Tracker("evaluate", None))
    finally:
        del os.environ["SCRATCHLM_NO_MLFLOW"]
    return project, metrics


def test_bits_per_byte_counts_the_texts_utf8_bytes(project):
    data = held_out(project / "data" / "pretokenize", 0)
    texts = data_texts(project)
    assert texts[: len(VAL_TEXTS)] == VAL_TEXTS
    assert data.text_bytes == sum(len(t.encode("utf-8")) for t in texts)
    assert data.text_bytes > sum(len(t) for t in texts)  # the multi-byte characters count as bytes, not chars
    model = load(project / "data" / "pretrain" / "model")
    got = held_out_loss(model, data, batch_size=4, device="cpu")
    # plain reference: each document alone, after an eot, predicting its tokens and the closing eot
    nats, count = 0.0, 0
    for doc in data.docs:
        seq = torch.tensor([[data.eot_id, *doc.tolist(), data.eot_id]])
        with torch.no_grad():
            logits, _ = model(seq[:, :-1], all_logits=True)
        nats += float(torch.nn.functional.cross_entropy(logits[0].double(), seq[0, 1:], reduction="sum"))
        count += seq.shape[1] - 1
    assert got["val_tokens"] == count and got["val_docs"] == len(texts)
    assert got["val_loss"] == pytest.approx(nats / count, rel=1e-5)
    assert got["val_bpb"] == pytest.approx(nats / math.log(2) / data.text_bytes, rel=1e-5)
    assert got["val_ppl"] == pytest.approx(math.exp(nats / count), rel=1e-5)


def data_texts(project) -> list[str]:
    with gzip.open(project / "data" / "pretokenize" / "val_docs.jsonl.gz", "rt") as f:
        return [json.loads(line)["text"] for line in f]


def test_val_max_tokens_takes_whole_documents(project):
    data = held_out(project / "data" / "pretokenize", 5)
    assert len(data.docs) == 1 and data.text_bytes == len(VAL_TEXTS[0].encode("utf-8"))


def test_stage_writes_metrics_for_every_model(evaluated):
    project, m = evaluated
    assert m["models"] == ["base", "sft", "dpo"]
    assert m["model_stages"] == {"base": "pretrain", "sft": "sft", "dpo": "dpo"}  # what register looks its model up in
    for label in m["models"]:
        r = m[label]
        assert r["val_bpb"] > 0 and r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
        assert 0.0 <= r["all_satisfied"] <= r["satisfaction"] <= 1.0  # all met <= share of constraints met
        assert set(r["bench"]["cloze"]) >= {"acc", "acc_norm"}
        saved = json.loads((project / "data/evaluate/lm_eval" / f"{label}.json").read_text())
        assert len(saved["items"]["cloze"]) == 6
    assert set(m["win_rate"]) == {"sft_vs_base", "dpo_vs_sft"}
    assert all(0.0 <= v <= 1.0 for v in m["win_rate"].values())
    assert m["benchmark_items"]["cloze"]["items"] == 6
    json.dumps(m)  # what stage_main writes to metrics/evaluate.json
    said = summary(m, stage_paths("evaluate", root=project))
    assert said[0].split() == ["base", "sft", "dpo"] and said[2].startswith("val bpb")
    assert "win rate dpo_vs_sft: " in "\n".join(said) and said[-1] == "report card: reports/report.md"


def test_every_model_gets_fluency_and_text_degeneration(evaluated):
    project, m = evaluated
    for label in m["models"]:
        r = m[label]
        assert set(degeneration.METRIC_KEYS) <= set(r) and 0.0 <= r["nonword_rate"] <= 1.0
        assert 0.0 <= r["repeated_line_rate"] <= 1.0 and 0.0 < r["distinct_2"] <= 1.0 and r["mean_words"] > 0
        # random tiny models: their answers cost the base model far more than its held-out text
        assert r["fluency_nll"] > 0 and r["fluency_gap"] == pytest.approx(r["fluency_nll"] - m["base"]["val_loss"])
        rows = [json.loads(x) for x in (project / "data/evaluate/answers" / f"{label}.jsonl").read_text().splitlines()]
        scored = [row["fluency_nll"] for row in rows if row["fluency_nll"] is not None]
        assert r["fluency_nll"] == pytest.approx(sum(scored) / len(scored))
        assert set(rows[0]["degeneration"]) == {"repeated_line_rate", "repeated_ngram_rate", "nonword_rate", "words"}
    assert "fluency" not in m["skipped"]
    said = summary(m, stage_paths("evaluate", root=project))
    lines = [line for line in said if line.startswith("degeneration ")]
    assert [line.split(":")[0] for line in lines] == [f"degeneration {label}" for label in m["models"]]
    assert "fluency " in lines[0] and "nonwords " in lines[0] and "distinct-2 " in lines[0]
    report = (project / "reports/report.md").read_text()
    assert "## Degeneration" in report and "| repeated lines (share of an answer's lines) |" in report


def test_answer_nll_reads_the_answer_as_plain_text_after_bos(project):
    model = load(project / "data" / "pretrain" / "model")
    tok = load_tokenizer(project / "data" / "tokenizer")
    texts = ["Mia went to the park.", "", "  Tom found a red ball and smiled. The ball was red.\n"]
    got = answer_nll(model, tok, texts, batch_size=2, device="cpu")
    assert got[1] is None
    for text, value in zip(texts, got):
        if not text:
            continue
        seq = torch.tensor([[tok.special["<|endoftext|>"], *tok.plain(text.strip())]])
        with torch.no_grad():
            logits, _ = model(seq[:, :-1], all_logits=True)
        reference = float(torch.nn.functional.cross_entropy(logits[0].double(), seq[0, 1:]))
        assert value == pytest.approx(reference, rel=1e-5)


def test_a_base_trained_on_stories_finds_stacked_titles_far_less_fluent(project, tmp_path):
    from tasks.sources import builtin

    stories = [d.text for d in builtin.generate_corpus(200, 3, 0.0, 0.0, 0.0)]
    folder = train_tiny(tmp_path / "base", project / "data" / "tokenizer", stories, steps=80)
    model, tok = load(folder), load_tokenizer(folder)
    answers = [ex["messages"][1]["content"] for ex in builtin.generate_instructions(8, 4242, "test")]
    fluent = answer_nll(model, tok, answers, batch_size=8, device="cpu")
    degenerate = answer_nll(model, tok, DEGENERATE, batch_size=8, device="cpu")
    assert max(fluent) + 0.5 < min(degenerate), (fluent, degenerate)  # 80 steps: about 3.7 vs 4.6+


def test_fluency_without_the_base_model_is_skipped_with_the_reason(project):
    tok = load_tokenizer(project / "data" / "tokenizer")
    only = [Evaluated("ppo", "ppo", project / "data" / "ppo" / "model")]
    skipped: dict[str, str] = {}
    fluency(EvaluateConfig(models={"ppo": "ppo"}, win_rates=[]), only, {}, tok, "cpu", skipped)
    assert "no evaluate.models entry is the pretrain model" in skipped["fluency"]
    skipped = {}
    listed = EvaluateConfig(models={"base": "pretrain", "ppo": "ppo"}, win_rates=[])
    fluency(listed, only, {}, tok, "cpu", skipped)
    assert "'base' (pretrain) that reads the answers was skipped" in skipped["fluency"]


def test_answers_carry_constraints_and_rewards(evaluated):
    project, m = evaluated
    for label in m["models"]:
        rows = [json.loads(x) for x in (project / "data/evaluate/answers" / f"{label}.jsonl").read_text().splitlines()]
        assert len(rows) == 4 and all(isinstance(r["reward"], float) and r["constraints"] for r in rows)
    prompts = {
        label: [
            json.loads(x)["prompt"]
            for x in (project / "data/evaluate/answers" / f"{label}.jsonl").read_text().splitlines()
        ]
        for label in m["models"]
    }
    assert prompts["base"] == prompts["sft"] == prompts["dpo"]  # the same held-out prompts for every model


def test_judge_verdicts_sit_beside_the_reward_win_rates(evaluated):
    """evaluate.judge's default: each evaluate.win_rates pair judged by its first model (`self`) on the same answers,
    verdicts in data/evaluate/judge/, figures in the record, the summary and the report card."""
    project, m = evaluated
    judged = m["judge"]
    assert set(judged["pairs"]) == set(m["win_rate"]) == {"sft_vs_base", "dpo_vs_sft"}
    assert judged["judges"] == {"sft_vs_base": "self:sft", "dpo_vs_sft": "self:dpo"}
    assert (judged["backend"], judged["mode"]) == ("local", "pairwise")  # the record says how it judged
    for key, figures in judged["pairs"].items():
        rows = (project / "data/evaluate/judge" / f"{key}.jsonl").read_text().splitlines()
        assert figures["pairs"] == len(rows) == 4 and 0.0 <= figures["win_rate"] <= 1.0
    assert any(line.startswith("judge self:dpo on dpo_vs_sft (4 pairs): win rate") for line in summary(m, None))
    assert "## Judge (LLM-as-judge, pairwise, calibrated on the checker)" in (project / "reports/report.md").read_text()
    from tasks.common.stage import pick
    from tasks.evaluate import HEADLINE

    headline = pick(m, HEADLINE)["judge"]["pairs"]  # metrics/evaluate.json: win rate and checker agreement only
    assert set(headline["dpo_vs_sft"]) <= {"win_rate", "checker_agreement"} and "win_rate" in headline["dpo_vs_sft"]


def test_win_rate_counts_ties_as_half():
    assert win_rate([1.0, 2.0, 3.0, 0.0], [0.0, 2.0, 4.0, -1.0]) == pytest.approx(2.5 / 4)


def test_plots_samples_and_report(evaluated):
    project, m = evaluated
    bpb = json.loads((project / "metrics/evaluate_plots/bpb.json").read_text())
    assert [r["model"] for r in bpb] == ["base", "sft", "dpo"] and bpb[0]["val_bpb"] == m["base"]["val_bpb"]
    bench = json.loads((project / "metrics/evaluate_plots/benchmarks.json").read_text())
    assert {(r["model"], r["benchmark"]) for r in bench} == {(x, "cloze") for x in ("base", "sft", "dpo")}
    samples = (project / "data/evaluate/samples.md").read_text()
    assert "Tell me a story about a cat." in samples and "**dpo**" in samples
    report = (project / "reports/report.md").read_text()
    assert "![bits per byte per model](bpb.png)" in report and (project / "reports/bpb.png").stat().st_size > 1000
    assert "![benchmark accuracy](benchmarks.png)" in report and (project / "reports/benchmarks.png").is_file()
    assert "| bits per byte |" in report and "MLflow is off" in report


def test_missing_model_fails_or_is_skipped(tmp_path, project, monkeypatch):
    monkeypatch.setenv("SCRATCHLM_NO_MLFLOW", "1")
    for part in ("tokenizer", "pretokenize", "pretrain", "reward"):
        shutil.copytree(project / "data" / part, tmp_path / "data" / part)
    paths = stage_paths("evaluate", root=tmp_path)
    with pytest.raises(ScratchError, match=r"evaluate.models.sft: .*data/sft/model has no model .*dvc repro sft"):
        run(EvaluateConfig(**SMALL), paths, Tracker("evaluate", None))
    cfg = EvaluateConfig(
        **{**SMALL, "missing_models": "skip", "report": False, "sample_prompts": [], "sample_texts": []}
    )
    m = run(cfg, paths, Tracker("evaluate", None))
    assert m["models"] == ["base"] and "data/sft/model" in m["skipped"]["model:sft"]
    assert m["model_stages"] == {"base": "pretrain"} and "report" not in m
    assert m["win_rate"] == {} and set(m["skipped"]) >= {"win_rate:sft_vs_base", "win_rate:dpo_vs_sft"}

    # no benchmark asked for: the stage runs without lm-eval instead of ending in its traceback
    m = run(dataclasses.replace(cfg, benchmarks=[]), paths, Tracker("evaluate", None))
    assert m["base"]["bench"] == {}


def test_config_rejects_unknown_benchmark_and_bad_pairs():
    with pytest.raises(ScratchError, match="benchmarks: unknown"):
        EvaluateConfig(benchmarks=["mmlu"])
    with pytest.raises(ScratchError, match="win_rates"):
        EvaluateConfig(win_rates=["dpo:nope"])
    with pytest.raises(ScratchError, match="models: label 'report' is a key of metrics/all/evaluate.json"):
        EvaluateConfig(models={"base": "pretrain", "report": "dpo"}, win_rates=[])
