"""The report card renders from metrics/all/*.json and MLflow: models, benchmarks, every stage's training curves,
the data funnel and tokenizer compression, each with its PNG; it is logged to MLflow; `scratchlm report` says
where it is and rebuilds it on request."""

from __future__ import annotations

import argparse
import json
import re

import pytest

from tasks.common.dvcio import pipeline_stages
from tasks.common.report import build_report, curves
from tasks.common.tracking import Tracker, setup_mlflow
from tests.conftest import ROOT
from tests.evaluate_fixtures import evaluation

STAGE_METRICS = {
    "ingest": {
        "docs_in": 1200,
        "docs_out": 1190,
        "quarantined": 10,
        "quarantined_by_reason": {"malformed JSON": 10},
        "bytes_out": 680000,
    },
    "filter": {
        "docs_in": 1190,
        "kept": 1130,
        "rejected": 60,
        "rejected_by_rule": {"word_count": 20, "symbol_ratio": 40},
    },
    "dedup": {"docs_in": 1130, "kept": 1070, "exact_duplicates": 30, "near_duplicates": 30},
    "tokenizer": {"vocab_size": 4096, "vocab_size_requested": 4096, "val_bytes_per_token": 4.3},
    "pretokenize": {
        "train_documents": 1016,
        "val_documents": 54,
        "train_tokens": 250000,
        "val_tokens": 13000,
        "train_bytes_per_token": 4.31,
        "val_bytes_per_token": 4.29,
    },
}


def log_stage(client, experiment_id: str, stage: str, parent: str | None, curves: dict[str, list[float]]) -> str:
    tags = {
        "scratchlm.stage": stage,
        **({"scratchlm.parent_run_id": parent, "mlflow.parentRunId": parent} if parent else {}),
    }
    run = client.create_run(experiment_id, run_name=stage, tags=tags)
    for key, values in curves.items():
        for step, value in enumerate(values):
            client.log_metric(run.info.run_id, key, value, step=step * 10)
    client.log_metric(run.info.run_id, f"{stage}/seconds", 12.0)  # a single number: no curve
    client.set_terminated(run.info.run_id)
    return run.info.run_id


@pytest.fixture
def project(tmp_path, monkeypatch, mlflow_uri):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SCRATCHLM_PARENT_RUN_ID", raising=False)
    (tmp_path / "metrics" / "all").mkdir(parents=True)
    for stage, m in {**STAGE_METRICS, "evaluate": evaluation()}.items():
        (tmp_path / "metrics" / "all" / f"{stage}.json").write_text(json.dumps(m))
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n"
        + "".join(
            f"  {s}:\n    cmd: python -m tasks.{s}\n"
            for s in ("ingest", "pretrain", "sft", "reward", "dpo", "evaluate")
        )
    )
    (tmp_path / "data/evaluate").mkdir(parents=True)
    (tmp_path / "data/evaluate/samples.md").write_text("# Samples\n\n## User prompt: Hi\n\n**dpo**\n\n> Hello.\n")
    return tmp_path


def make_runs(parent_name: str = "build_llm"):
    import mlflow

    setup_mlflow()
    client = mlflow.MlflowClient()
    exp = mlflow.get_experiment_by_name("scratchlm").experiment_id
    parent = client.create_run(exp, run_name=parent_name).info.run_id
    runs = {
        "pretrain": log_stage(
            client,
            exp,
            "pretrain",
            parent,
            {
                "train/loss": [8.0, 5.0, 3.5, 3.0],
                "val/loss": [7.9, 4.0],
                "val/bpb": [2.6, 1.4],
                "train/lr": [0.0, 1e-3, 1e-3, 5e-4],
            },
        ),
        "sft": log_stage(client, exp, "sft", parent, {"train/loss": [2.0, 1.2, 1.0], "val/loss": [1.9, 1.1]}),
        "dpo": log_stage(client, exp, "dpo", parent, {"train/loss": [0.69, 0.5], "train/margin": [0.0, 0.4]}),
    }
    return client, exp, parent, runs


def test_report_renders_every_section_with_its_plots(project):
    client, _, parent, runs = make_runs()
    report = build_report(project, parent_run_id=parent)
    text = report.read_text()
    for heading in (
        "# scratchlm report card",
        "## Models",
        "## Degeneration",
        "## Benchmarks",
        "## Training curves (MLflow)",
        "### pretrain",
        "### sft",
        "### dpo",
        "## Data funnel",
        "## Tokenizer",
        "## Samples",
    ):
        assert heading in text, heading
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert set(links) == {
        "bpb.png",
        "benchmarks.png",
        "curves_pretrain.png",
        "curves_sft.png",
        "curves_dpo.png",
        "funnel.png",
        "tokenizer.png",
    }
    for name in links:
        png = project / "reports" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000, name
    assert f"children of pipeline run {parent}" in text and runs["pretrain"] in text
    assert "| bits per byte | 1.6000 | 1.5500 | 1.5000 |" in text  # base / sft / dpo columns
    assert "| cloze | - | 0.2500 | 0.400 (0.350) | 0.500 (0.450) | 0.500 (0.450) |" in text
    assert "| dpo vs sft | 0.6000 |" in text
    assert "| repeated lines (share of an answer's lines) | 0.0000 | 0.0000 | 0.0000 |" in text
    assert "| answer length (mean words) | 98.0000 | 98.0000 | 98.0000 |" in text and "distinct-2 = unique word" in text
    assert "| unique (dedup) | 1,070 |" in text and "| symbol_ratio | 40 |" in text
    assert "train split 4.310, val split 4.290" in text and "Quarantined at ingest: malformed JSON 10" in text
    assert "### User prompt: Hi" in text and "> Hello." in text


def test_curves_skip_schedule_metrics_and_single_points(project):
    import mlflow

    _, _, _, runs = make_runs()
    series = curves(mlflow.MlflowClient().get_run(runs["pretrain"]))
    assert set(series) == {"loss", "bpb"} and set(series["loss"]) == {"train", "val"}
    assert series["loss"]["val"] == [(0, 7.9), (10, 4.0)]


def test_latest_run_per_stage_without_a_parent(project):
    make_runs("first")
    _, _, _, newer = make_runs("second")
    text = build_report(project).read_text()
    assert "latest run of each stage in the experiment" in text and newer["sft"] in text


def test_stages_a_pipeline_run_skipped_come_from_their_latest_run(project):
    client, exp, _, first = make_runs("first")
    parent = client.create_run(exp, run_name="build_llm").info.run_id  # DVC reran only sft this time
    sft = log_stage(client, exp, "sft", parent, {"train/loss": [1.5, 1.0]})
    text = build_report(project, parent_run_id=parent).read_text()
    assert f"children of pipeline run {parent}; stages it skipped as up to date (pretrain, dpo)" in text
    assert sft in text and first["pretrain"] in text and first["sft"] not in text


def test_pipeline_stages_are_dvc_yamls_in_order(tmp_path):
    stages = pipeline_stages(ROOT)
    assert stages[:3] == ["ingest", "filter", "dedup"] and stages.index("evaluate") < stages.index("register")
    assert pipeline_stages(tmp_path) == []


def test_report_is_logged_to_mlflow_and_renders_without_inputs(tmp_path, monkeypatch, mlflow_uri):
    import mlflow

    monkeypatch.chdir(tmp_path)
    setup_mlflow()
    run = mlflow.MlflowClient().create_run(mlflow.get_experiment_by_name("scratchlm").experiment_id)
    report = build_report(tmp_path, tracker=Tracker("evaluate", run.info.run_id))
    text = report.read_text()
    assert "metrics/all/evaluate.json is missing" in text and "No data stage has run yet" in text
    logged = {f.path for f in mlflow.MlflowClient().list_artifacts(run.info.run_id, "report")}
    assert "report/report.md" in logged


def test_scratchlm_report_command(project, monkeypatch, capsys):
    import flows.commands as commands

    monkeypatch.setattr(commands, "ROOT", project)
    monkeypatch.setattr(commands, "REPORT", project / "reports" / "report.md")
    assert commands.cmd_report(argparse.Namespace(regenerate=False, run=None)) == 1
    assert "no report card yet" in capsys.readouterr().err
    make_runs()
    assert commands.cmd_report(argparse.Namespace(regenerate=True, run=None)) == 0
    out = capsys.readouterr().out
    assert f"report   {project / 'reports' / 'report.md'}" in out and "bpb.png" in out
