"""`dvc exp run` as DVC users run it: an experiment in a temporary copy (`--temp`) tracks into the project's MLflow
store and reads the user's relative input paths from the project root, and `dvc exp show` / `dvc metrics show`
list each stage's few headline figures, with no machine paths."""

from __future__ import annotations

import json

import pytest

from tasks.common.config import input_path, project_root
from tasks.common.stage import pick
from tests.conftest import copy_project, run_in

# ------------------------------------------------------------------------------------------------ input paths


@pytest.fixture
def exp_copy(tmp_path, monkeypatch):
    """A project, an experiment copy inside it as `dvc exp run --temp` makes one, and a data folder beside both."""
    project = tmp_path / "project"
    copy = project / ".dvc" / "tmp" / "exps" / "standalone" / "tmpabc"
    for folder in (copy, tmp_path / "shared" / "data"):
        folder.mkdir(parents=True)
    for root in (project, copy):
        (root / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "shared" / "data" / "a.jsonl").write_text("{}\n")
    monkeypatch.setenv("DVC_ROOT", str(project))
    return project, copy


def test_a_relative_input_resolves_from_the_project_when_the_copy_lacks_it(exp_copy):
    project, copy = exp_copy
    assert project_root() == project.resolve()
    assert input_path("../shared/data/a.jsonl", copy) == project / "../shared/data/a.jsonl"
    assert input_path("../shared/data/*.jsonl", copy) == project / "../shared/data/*.jsonl", "globs too"
    assert input_path("../shared/data", copy).resolve() == (project.parent / "shared" / "data").resolve()


def test_a_file_the_copy_has_is_the_copys_and_absolute_paths_stay(exp_copy):
    project, copy = exp_copy
    (copy / "mine.jsonl").write_text("{}\n")
    (project / "mine.jsonl").write_text("{}\n")
    assert input_path("mine.jsonl", copy) == copy / "mine.jsonl", "the experiment's version of a tracked file"
    assert input_path("nowhere.jsonl", copy) == copy / "nowhere.jsonl", "missing everywhere: the error names the copy"
    assert input_path(str(copy / "x"), project) == copy / "x"


def test_without_dvc_root_the_project_is_this_checkout(monkeypatch, tmp_path):
    from tasks.common.config import ROOT

    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert project_root() == ROOT
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))  # not a DVC project: ignored
    assert project_root() == ROOT


def test_pick_keeps_the_named_numbers_nested():
    metrics = {
        "sft": {"val_bpb": 1.2, "bench": {"piqa": {"acc_norm": 0.5, "acc": 0.4}}, "name": "x"},
        "dpo": {"val_bpb": 1.1},
        "checkpoint": "/abs/path",
        "hacked": False,
        "steps": 3,
    }
    assert pick(metrics, ("*.val_bpb", "*.bench.*.acc_norm", "checkpoint", "hacked", "missing.key")) == {
        "sft": {"val_bpb": 1.2, "bench": {"piqa": {"acc_norm": 0.5}}},
        "dpo": {"val_bpb": 1.1},
        "hacked": False,
    }


# ------------------------------------------------------------------------------------------------ a real experiment


@pytest.mark.slow
def test_dvc_exp_run_temp_tracks_into_the_project_store_and_reads_project_paths(tmp_path):
    """The issue's case: `dvc exp run --temp` used a temporary mlruns.db that DVC deleted, and `../shared/data`
    resolved against the temporary folder."""
    import mlflow

    project = copy_project(tmp_path / "project", {"data": {"builtin": {"n_docs": 200}}})
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "docs.jsonl").write_text(
        "".join(
            json.dumps({"text": f"Document {i} tells a short story about a cat and a dog."}) + "\n" for i in range(7)
        )
    )
    env = {"MLFLOW_TRACKING_URI": "", "SCRATCHLM_EXPERIMENT": "scratchlm"}
    exp = run_in(
        project, "dvc", "exp", "run", "--temp", "-n", "extra-docs",
        "-S", "data.sources=[builtin:stories,../extra/docs.jsonl]", "ingest", env=env,
    )  # fmt: skip
    assert exp.returncode == 0, exp.stdout + exp.stderr
    assert not list(project.glob(".dvc/tmp/exps/**/mlruns.db")), "nothing tracked inside the experiment's copy"

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlruns.db'}")
    try:
        runs = mlflow.search_runs(experiment_names=["scratchlm"], output_format="list")
        experiment = mlflow.get_experiment_by_name("scratchlm")
    finally:
        mlflow.set_tracking_uri(None)
    ingest = [r for r in runs if r.info.run_name == "ingest"]
    assert len(ingest) == 1 and ingest[0].data.tags["dvc.experiment"] == "extra-docs"
    assert ingest[0].data.metrics["ingest/docs_out"] == 207, "the 7 documents beside the project were read"
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "ingest/units" not in ingest[0].data.metrics and ingest[0].data.params["setup.units"] == "2"

    shown = run_in(project, "dvc", "exp", "show", "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    assert "extra-docs" in shown.stdout and '"docs_out": 207' in shown.stdout.replace(": 207.0", ": 207")
    assert str(tmp_path) not in shown.stdout, "no machine path among the experiment's metrics"
