"""One end-to-end run of the whole flow on the tiny preset: every stage through Prefect → DVC → MLflow, ending with
a registered model (@challenger), a report card, a rerun that executes nothing, and a changed pretrain param that
reruns pretrain and what follows it only."""

from __future__ import annotations

import json
import textwrap

import pytest

from tests.conftest import copy_project, run_in

pytestmark = pytest.mark.slow

TRAIN = {
    "ranks": 1,
    "max_steps": 0,
    "max_tokens": 0,
    "batch_size": 8,
    "micro_batch_size": 8,
    "warmup_steps": 2,
    "log_every": 5,
    "eval_every": 0,
    "checkpoint_every": 0,
}
SAMPLING = {"prompts": 4, "max_new_tokens": 24, "batch_size": 4}
TINY = {
    "data": {"builtin": {"n_docs": 600}, "parallel": {"workers": 1}},
    "model": {"preset": "tiny", "overrides": {"max_seq_len": 320}},
    "tokenizer": {"vocab_size": 600},
    "pretrain": {
        "seq_len": 128,
        "val_windows": 8,
        "samples": {"max_new_tokens": 16},
        "train": {**TRAIN, "max_steps": 30, "eval_every": 15, "checkpoint_every": 15, "lr": 0.003},
    },
    "sft": {"builtin_train": 64, "builtin_val": 8, "sampling": SAMPLING, "train": {**TRAIN, "max_steps": 4}},
    "reward": {"builtin_train": 64, "builtin_val": 16, "train": {**TRAIN, "max_steps": 4}},
    "dpo": {"builtin_train": 32, "builtin_val": 8, "sampling": SAMPLING, "train": {**TRAIN, "max_steps": 3}},
    "ppo": {
        "builtin_train": 16,
        "builtin_val": 4,
        "max_new_tokens": 24,
        "group_size": 2,
        "sampling": SAMPLING,
        "train": {**TRAIN, "batch_size": 4, "micro_batch_size": 4, "max_steps": 2, "warmup_steps": 0},
    },
    "evaluate": {"limit": 4, "val_max_tokens": 1024, "sampling": SAMPLING, "sample_max_new_tokens": 8},
}

SCRIPT = textwrap.dedent("""
    import json
    from prefect.testing.utilities import prefect_test_harness
    from flows.pipeline import build_llm
    with prefect_test_harness(server_startup_timeout=120):
        first = build_llm()
        again = build_llm()
        changed = build_llm(overrides={"dpo.train.lr": 0.002})
    print("RESULT " + json.dumps({"first": first, "again": again, "changed": changed}))
""")


def test_whole_pipeline_tiny(tmp_path, mlflow_uri):
    project = copy_project(tmp_path / "project", TINY)
    (project / "run_all.py").write_text(SCRIPT)
    proc = run_in(project, "python", "run_all.py", env={"MLFLOW_TRACKING_URI": mlflow_uri}, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = json.loads(proc.stdout.split("RESULT ", 1)[1])
    stages = [
        "ingest",
        "filter",
        "dedup",
        "tokenizer",
        "pretokenize",
        "pretrain",
        "sft",
        "reward",
        "dpo",
        "ppo",
        "evaluate",
        "register",
    ]
    assert out["first"]["ran"] == stages
    assert out["again"]["ran"] == [] and out["again"]["skipped"] == stages
    # a changed dpo param reruns dpo and what reads it only (ppo starts from the sft policy: ppo.init)
    assert out["changed"]["ran"] == ["dpo", "evaluate", "register"], out["changed"]
    assert out["changed"]["skipped"] == [s for s in stages if s not in out["changed"]["ran"]]

    registered = json.loads((project / "data/register/registered.json").read_text())
    import mlflow

    client = mlflow.MlflowClient(mlflow_uri)
    version = client.get_model_version_by_alias(registered["name"], "challenger")
    assert str(version.version) == str(registered["version"]) == "2"  # the changed run registered a second version
    assert version.tags["pipeline_run_id"] == out["changed"]["parent_run_id"]
    assert version.tags["git_commit"] and registered["version"]
    assert (project / "reports/report.md").is_file()
    children = mlflow.search_runs(
        experiment_names=["scratchlm"],
        output_format="list",
        filter_string=f"tags.scratchlm.parent_run_id = '{out['first']['parent_run_id']}'",
    )
    assert sorted(r.info.run_name for r in children) == sorted(stages)
    evaluation = json.loads((project / "metrics/all/evaluate.json").read_text())
    assert {"base", "sft", "dpo", "ppo"} <= set(evaluation)
