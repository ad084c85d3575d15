"""The promotion flow on a real (SQLite) MLflow registry: @champion moves to @challenger only when the gates of
params.yaml's `promote:` section pass, and a refusal names the failing gate. Aliases only, never registry stages."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest

from tasks.common import degeneration
from tasks.common.config import ScratchError
from tasks.common.promotion import PromoteConfig, check_gates, degeneration_gates
from tasks.sources import builtin, world
from tests.evaluate_fixtures import FLUENT, evaluation, registered

NAME = "scratchlm"


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """v1 registered by the register stage (passes the gates); the flow and the test share the store."""
    with registered(tmp_path_factory, "promote") as project:
        yield project


def challenger(tags_from: dict, **changes: float) -> str:
    """A new version of the registered model (same artifacts as v1, another evaluation), made @challenger."""
    import mlflow

    client = mlflow.MlflowClient()
    first = client.get_model_version(NAME, "1")
    tags = {k: v for k, v in first.tags.items() if not k.startswith("promotion")}
    tags.update({f"eval.{k}": str(v) for k, v in changes.items()})
    version = client.create_model_version(NAME, first.source, run_id=first.run_id, tags=tags)
    client.set_registered_model_alias(NAME, "challenger", version.version)
    return str(version.version)


def alias(name: str) -> str | None:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return str(mlflow.MlflowClient().get_model_version_by_alias(NAME, name).version)
    except MlflowException:
        return None


def promote(**kwargs):
    from flows.promote import promote as flow

    return flow.fn(**kwargs)  # the flow's body; Prefect's orchestration is exercised by the CLI test below


def test_sequence_of_promotions_and_refusals(registry):
    import mlflow

    # 1. no champion yet: v1 passes every gate and becomes champion
    first = promote()
    assert first["promoted"] and first["challenger"] == 1 and first["champion_before"] is None
    assert alias("champion") == "1" and first["failed"] == []
    assert mlflow.MlflowClient().get_model_version(NAME, "1").tags["promotion"] == "promoted"

    # 2. bits per byte above the gate: refused, the gate named, champion unchanged
    v2 = challenger({}, val_bpb=3.4)
    second = promote()
    assert not second["promoted"] and second["failed"] == ["max_val_bpb"]
    assert alias("champion") == "1"
    detail = {g["name"]: g["detail"] for g in second["gates"]}["max_val_bpb"]
    assert "3.4000 > 3.0" in detail
    assert mlflow.MlflowClient().get_model_version(NAME, v2).tags["promotion"] == "refused: max_val_bpb"

    # 3. a benchmark 0.2 below the champion's (allowed 0.05): refused, naming the benchmark
    challenger({}, **{"bench.cloze.acc": 0.3})
    third = promote()
    assert third["failed"] == ["max_benchmark_drop"] and alias("champion") == "1"
    drop = {g["name"]: g["detail"] for g in third["gates"]}["max_benchmark_drop"]
    assert "cloze acc 0.3000 is 0.2000 below the champion's 0.5000" in drop

    # 4. two gates fail at once: both named
    challenger({}, satisfaction=0.0, val_bpb=9.0)
    assert promote()["failed"] == ["max_val_bpb", "min_satisfaction"]

    # 4b. satisfaction won by stacked pseudo-titles: the degeneration gates refuse it, naming the figures
    challenger({}, satisfaction=0.6, fluency_gap=3.2, repeated_line_rate=0.58, nonword_rate=0.25)
    degenerate = promote()
    assert degenerate["failed"] == ["max_fluency_gap", "max_repeated_line_rate", "max_nonword_rate"]
    assert alias("champion") == "1"
    assert "nonword rate 0.2500 > 0.05" in {g["name"]: g["detail"] for g in degenerate["gates"]}["max_nonword_rate"]

    # 5. dry run of a good challenger: would pass, nothing moves
    v5 = challenger({}, val_bpb=1.2, **{"bench.cloze.acc": 0.52})
    dry = promote(dry_run=True)
    assert dry["failed"] == [] and not dry["promoted"] and alias("champion") == "1"

    # 6. the same challenger for real: promoted, the old champion kept as previous_champion
    fifth = promote()
    assert fifth["promoted"] and alias("champion") == v5 and alias("previous_champion") == "1"

    # 7. again: already champion, nothing to do
    again = promote()
    assert again.get("already_champion") and not again["promoted"] and alias("champion") == v5


def test_missing_challenger_is_a_clear_error(registry):
    with pytest.raises(ScratchError, match=r"models:/nosuchmodel@challenger does not exist.*dvc repro register"):
        promote(model_name="nosuchmodel")


def test_cli_runs_the_prefect_flow_and_exits_1_on_refusal(registry):
    root, _ = registry
    challenger({}, val_bpb=5.0)
    scratchlm = [sys.executable, "-c", "import sys; from flows.cli import main; sys.exit(main())"]  # = the script
    proc = subprocess.run(
        [*scratchlm, "promote"], capture_output=True, text=True, timeout=170, cwd=root, env=_env(root)
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "refused: scratchlm v" in proc.stdout and "failed gate(s) max_val_bpb; @champion stays" in proc.stdout
    logged = proc.stdout + proc.stderr  # the flow's own lines go through Prefect's logger (log_prints)
    assert "FAIL  max_val_bpb            validation bits per byte 5.0000 > 3.0" in logged
    noise = [ln for ln in logged.splitlines() if re.search(r"Traceback|\| ERROR|database is locked|UserWarning", ln)]
    assert not noise, "\n".join(noise)  # a refusal is a verdict, not an error


def _env(root) -> dict:
    import os

    from tests.conftest import ROOT

    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PREFECT_HOME": str(root / ".prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }


def test_gates_pure_logic():
    cfg = PromoteConfig(max_val_bpb=2.0, min_satisfaction=0.2, max_benchmark_drop=0.01, min_win_rate=0.5)
    good = {"val_bpb": 1.0, "satisfaction": 0.3, "bench.cloze.acc": 0.6, "win_rate.dpo_vs_sft": 0.55, **FLUENT}
    assert all(g.passed for g in check_gates(cfg, good, None, "dpo"))
    worse = {**good, "win_rate.dpo_vs_sft": 0.4, "bench.piqa.acc": 0.5}
    verdict = {g.name: g for g in check_gates(cfg, worse, {"bench.cloze.acc": 0.6, "bench.piqa.acc": 0.52}, "dpo")}
    assert not verdict["min_win_rate"].passed and "dpo_vs_sft 0.400 < 0.5" in verdict["min_win_rate"].detail
    assert not verdict["max_benchmark_drop"].passed and "piqa" in verdict["max_benchmark_drop"].detail
    assert verdict["max_val_bpb"].passed and verdict["min_satisfaction"].passed
    missing = check_gates(cfg, {}, None, "dpo")
    assert [g.name for g in missing if not g.passed] == [
        "max_val_bpb",
        "min_satisfaction",
        "min_win_rate",
        *DEGENERATION_GATES,
    ]
    assert "no recorded fluency gap" in {g.name: g.detail for g in missing}["max_fluency_gap"]
    off = PromoteConfig(**{f.name: None for f in dataclasses.fields(PromoteConfig)})
    assert check_gates(off, {}, None) == []


DEGENERATION_GATES = ["max_fluency_gap", "max_repeated_line_rate", "max_nonword_rate", "min_distinct_2"]
DEGENERATE = [  # the default run's DPO answers that won the title constraint by stacking pseudo-titles
    "Tom and the Sr\nTom and the Kov\nTom and theendden",
    "Max and the Cyes\nMax and the How B",
]


def text_gates(answers: list[str], fluency_gap: float) -> dict[str, bool]:
    """The default degeneration gates' verdicts on answers' text metrics (fluency gap given, it needs a model)."""
    figures = {**degeneration.text_metrics(answers, world.vocabulary()), "fluency_gap": fluency_gap}
    return {g.name: g.passed for g in degeneration_gates(PromoteConfig(), figures)}


def test_default_degeneration_gates_pass_stories_and_refuse_stacked_titles():
    stories = [ex["messages"][1]["content"] for ex in builtin.generate_instructions(16, 4242, "test")]
    assert text_gates(stories, fluency_gap=0.3) == dict.fromkeys(DEGENERATION_GATES, True)
    # stacked pseudo-titles in 4 of 16 answers are enough to fail the text gates
    mixed = text_gates(DEGENERATE * 2 + stories[:12], fluency_gap=0.3)
    assert not mixed["max_repeated_line_rate"] and not mixed["max_nonword_rate"] and mixed["min_distinct_2"]
    # one answer for every prompt: distinct-2 collapses
    assert not text_gates([stories[0]] * 16, fluency_gap=0.3)["min_distinct_2"]
    assert not text_gates(stories, fluency_gap=2.4)["max_fluency_gap"]  # 3% of the words made up


def test_promote_section_is_validated():
    from tasks.common.config import build

    with pytest.raises(ScratchError, match="promote.min_satisfaction: must be in"):
        build(PromoteConfig, {"min_satisfaction": 2.0}, "params.yaml: promote")
    with pytest.raises(ScratchError, match="unknown key"):
        build(PromoteConfig, {"max_bpb": 2.0}, "params.yaml: promote")
    with pytest.raises(ScratchError, match="promote.max_nonword_rate: must be in"):
        build(PromoteConfig, {"max_nonword_rate": 5.0}, "params.yaml: promote")
    assert evaluation()["dpo"]["val_bpb"] == 1.5  # the fixture's registered version passes the default gates
