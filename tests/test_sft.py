"""The sft stage on the tiny test world: answer-only loss through the real trainer, outputs, counted quarantine,
constraint-satisfaction report, clear upstream errors, and real instruction corpora end to end."""

from __future__ import annotations

import json

import pytest
import torch

from model import load
from tasks import sft
from tasks.common import alignment as al
from tasks.common.config import ScratchError
from tasks.common.dvcio import read_json, stage_paths
from tasks.common.train_config import AlignmentData, SamplingConfig
from tasks.sources import examples
from tests.alignment_fixtures import alignment_world, cached_stage, run_stage, sft_config, smoke_train, stage_root
from tests.conftest import shared
from tests.evaluate_fixtures import pipeline_outputs


def response_loss(model, tok: al.ChatTokenizer, conversations: list[list[dict]], max_len: int) -> float:
    """Mean next-token CE over the answers' tokens of the conversations (what val/loss reports)."""
    examples = [al.encode_sft(tok, c, max_len) for c in conversations]
    x, y = al.collate_sft(examples, tok.pad_id)
    with torch.no_grad():
        _, loss = model(x, y)
    return loss.item()


@pytest.mark.slow
def test_sft_learns_the_answers_and_reports_satisfaction(tmp_path_factory):
    root, m = cached_stage(tmp_path_factory, "sft", sft_config())
    out = root / "data" / "sft"
    model = load(out / "model")
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "model.safetensors"):
        assert (out / "model" / name).is_file()
    tok = al.load_tokenizer(out / "model")

    loaded = examples.load_instruction_data(AlignmentData(["builtin:instructions"], 0, 32, 1337, 0.0), root)
    val = [e["messages"] for e in loaded.val]
    before = response_loss(load(root / "data" / "pretrain" / "model"), tok, val, m["max_len"])
    after = response_loss(model, tok, val, m["max_len"])
    # the stage evaluates in its training precision: bf16 autocast where the CPU has it (measured: rel 1.9e-4 off fp32)
    assert after == pytest.approx(m["val_loss"], rel=1e-3 if m["precision"] == "autocast" else 1e-4)
    assert after < before - 0.3, (before, after)

    assert m["rows_in"] == m["train_examples"] + m["val_examples"] + m["quarantined"] == 432
    assert m["steps"] == 12 and m["eval_prompts"] == 32
    for who in ("base", "sft"):
        assert 0.0 <= m[f"{who}_all_satisfied"] <= m[f"{who}_satisfaction"] <= 1.0
        assert set(m[f"{who}_per_constraint"]) >= {"name", "animal", "place", "complete"}
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["model"] for s in samples] == ["base"] * 32 + ["sft"] * 32
    assert all(s["id"].startswith("builtin-instr-test-") for s in samples)
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history if "train/loss" in r] == [4, 8, 12]
    assert (out / "quarantine.jsonl").read_text() == ""


def test_the_exported_folder_stops_at_every_stop_token_and_has_a_card(tmp_path):
    """Two steps on fixture upstreams: the folder's generation_config.json lists <|end|> and <|endoftext|>, and its
    README.md is the model card with this stage's params and metrics."""
    root = pipeline_outputs(tmp_path, stages=("pretrain",), reward=False)
    cfg = sft_config(builtin_train=8, builtin_val=4, train=smoke_train(max_steps=2), sampling=SamplingConfig(prompts=0))
    run_stage("sft", cfg, root)
    folder = root / "data" / "sft" / "model"
    stops = list(al.load_tokenizer(folder).stop_ids)
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == stops
    assert json.loads((folder / "config.json").read_text())["eos_token_id"] == stops
    card = (folder / "README.md").read_text()
    assert "# scratchlm sft model" in card and "base: the pretrain stage's model (data/pretrain/model)" in card
    assert "| `val_loss` |" in card and "| `sft.builtin_train` | 8 |" in card and "Stop tokens: `<|end|>`" in card


def test_missing_upstream_and_impossible_params_fail_clearly(tmp_path):
    with pytest.raises(ScratchError, match="tokenizer.json: missing"):
        sft.preflight(sft_config(), stage_paths("sft", tmp_path))
    with pytest.raises(ScratchError, match="max_len"):
        sft.Config(max_len=-1)
    with pytest.raises(ScratchError, match="sources"):
        sft.Config(sources=[])


@pytest.mark.slow
def test_sft_runs_on_alpaca_and_gsm8k_with_bad_rows_quarantined(tmp_path, tmp_path_factory):
    alpaca = shared("alpaca-en-demo") / "alpaca_en_demo.json"
    gsm8k = shared("gsm8k") / "train.jsonl"
    world = alignment_world(tmp_path_factory)
    root = stage_root(tmp_path, world)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(
        '{"instruction": "Add.", "input": "1 and 2", "output": "3"}\n'
        '{"instruction": "No answer here"}\n'
        '{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]}\n'
        "not json at all\n"
    )
    cfg = sft_config(
        sources=[str(alpaca), str(gsm8k), str(broken)],
        builtin_train=0,
        builtin_val=0,
        val_fraction=0.05,
        eval_base=False,
        sampling=SamplingConfig(prompts=0),
        train=smoke_train(max_steps=3, lr=1e-3),
    )
    m = run_stage("sft", cfg, root)
    per = m["per_source"]
    n_alpaca, n_gsm8k = len(json.loads(alpaca.read_text())), sum(1 for _ in gsm8k.open())
    assert sum(per[str(alpaca)].values()) == n_alpaca and sum(per[str(gsm8k)].values()) == n_gsm8k
    assert per[str(broken)]["quarantined"] == 3 and per[str(broken)]["train"] + per[str(broken)]["val"] == 1
    assert m["rows_in"] == n_alpaca + n_gsm8k + 4
    assert m["rows_in"] == m["train_examples"] + m["val_examples"] + m["quarantined"]
    assert m["val_examples"] > 0 and m["steps"] == 3 and m["val_loss"] > 0
    quarantine = [json.loads(line) for line in (root / "data" / "sft" / "quarantine.jsonl").read_text().splitlines()]
    assert {q["location"] for q in quarantine if q["source"] == str(broken)} == {
        "broken.jsonl:2",
        "broken.jsonl:3",
        "broken.jsonl:4",
    }
    assert (
        load(root / "data" / "sft" / "model").cfg.vocab_size
        == al.load_tokenizer(root / "data" / "tokenizer").tok.get_vocab_size()
    )
    assert read_json(root / "metrics" / "all" / "sft.json")["steps"] == 3
