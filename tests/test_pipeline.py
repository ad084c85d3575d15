"""The backbone end to end on a throwaway copy of the project: real DVC, a real Prefect (test harness) server and a
real MLflow SQLite store. Only the ingest stage is exercised here; later stages have their own stage tests."""

from __future__ import annotations

import json
import re
import textwrap

import pytest

from tests.conftest import copy_project, run_in

pytestmark = pytest.mark.slow

SMALL = {"data": {"builtin": {"n_docs": 300}}}

FLOW_SCRIPT = textwrap.dedent("""
    import json, sys
    from prefect.testing.utilities import prefect_test_harness
    from prefect import flow
    from prefect.client.orchestration import get_client
    from flows.pipeline import ROOT, StageFailed, build_llm, publish_artifacts
    out = {}

    @flow
    def publish_at_end(result):
        (ROOT / "reports").mkdir(exist_ok=True)
        (ROOT / "reports" / "report.md").write_text("# scratchlm report card\\n\\nval bpb 1.23\\n")
        (ROOT / "data" / "register").mkdir(parents=True, exist_ok=True)
        record = {"name": "scratchlm", "version": 7, "model_uri": "models:/scratchlm@challenger"}
        (ROOT / "data" / "register" / "registered.json").write_text(json.dumps(record))
        return publish_artifacts({**result, "ran": ["evaluate", "register"]})
    with prefect_test_harness(server_startup_timeout=120):
        out["first"] = build_llm(stages=["ingest"])
        out["again"] = build_llm(stages=["ingest"])
        out["changed"] = build_llm(stages=["ingest"], overrides={"data.builtin.n_docs": 250})
        try:
            build_llm(stages=["ingest"], overrides={"data.sources": ["no/such/dir"]})
        except StageFailed as e:
            out["failure"] = str(e)
        out["published"] = publish_at_end(out["first"])  # as after an evaluate and a register
        with get_client(sync_client=True) as client:
            out["artifacts"] = [
                {"key": a.key, "type": a.type, "data": a.data, "description": a.description}
                for a in client.read_artifacts()
            ]
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return copy_project(tmp_path_factory.mktemp("project"), SMALL)


def test_dvc_repro_runs_once_then_skips(project):
    first = run_in(project, "dvc", "repro", "ingest")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "Running stage 'ingest'" in first.stdout
    assert json.loads((project / "metrics/ingest.json").read_text())["docs_out"] == 300
    again = run_in(project, "dvc", "repro", "ingest")
    assert again.returncode == 0 and "Running stage" not in again.stdout, again.stdout
    status = run_in(project, "dvc", "status", "ingest")
    assert "up to date" in status.stdout, status.stdout


def test_dvc_exp_run_set_param(project):
    exp = run_in(project, "dvc", "exp", "run", "-S", "ingest.docs_per_shard=100", "ingest")
    assert exp.returncode == 0, exp.stdout + exp.stderr
    assert "Running stage 'ingest'" in exp.stdout
    shards = sorted(p.name for p in (project / "data/ingest").glob("shard-*.jsonl.gz"))
    assert len(shards) == 3, shards


def test_flow_logs_parent_and_child_runs_and_lets_dvc_decide(tmp_path_factory, mlflow_uri):
    project = copy_project(tmp_path_factory.mktemp("flowproject"), SMALL)
    (project / "run_flow.py").write_text(FLOW_SCRIPT)
    proc = run_in(project, "python", "run_flow.py", env={"MLFLOW_TRACKING_URI": mlflow_uri})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert out["first"]["ran"] == ["ingest"]
    assert out["again"]["ran"] == [] and out["again"]["skipped"] == ["ingest"]
    assert out["again"]["parent_run_id"] is None, "a rerun that ran nothing leaves no empty parent run"
    assert out["changed"]["ran"] == ["ingest"]
    assert out["failure"].startswith("error: ingest: data.sources: 'no/such/dir': no such file or folder")
    assert re.search(r"\[ingest\]\s+300 records →", proc.stderr + proc.stdout), (
        "stage output streams into the flow logs"
    )
    assert "git add dvc.lock" not in proc.stderr + proc.stdout, "DVC's advice is left out of the flow logs"
    assert out["published"] == ["report-card", "mlflow-run", "registered-model"]
    links = [a for a in out["artifacts"] if a["key"] == "mlflow-run"]
    parents = [out[k]["parent_run_id"] for k in ("first", "changed")]  # the no-op rerun made no run to link
    assert len(links) == 3  # Prefect keeps a link artifact as Markdown: [text](url)
    assert all(any(f"/runs/{p})" in a["data"] for a in links) for p in parents)
    assert all("(http://127.0.0.1:5000/#/experiments/" in a["data"] for a in links)
    assert "mlflow ui --backend-store-uri" in links[0]["description"]
    (card,) = [a for a in out["artifacts"] if a["key"] == "report-card"]
    assert card["type"] == "markdown" and card["data"].startswith("# scratchlm report card\n\nval bpb 1.23")
    (model,) = [a for a in out["artifacts"] if a["key"] == "registered-model"]
    assert model["data"].endswith("(http://127.0.0.1:5000/#/models/scratchlm/versions/7)")

    import mlflow

    parent_id = out["first"]["parent_run_id"]
    child = mlflow.search_runs(
        experiment_names=["scratchlm"],
        output_format="list",
        filter_string=f"tags.scratchlm.parent_run_id = '{parent_id}'",
    )
    assert [r.info.run_name for r in child] == ["ingest"]
    run = child[0]
    assert run.data.tags["mlflow.parentRunId"] == parent_id
    assert len(run.data.tags["git_commit"]) >= 40
    assert run.data.tags["dvc.outs.data/ingest"], "dvc.lock hashes are tagged once DVC locked the stage"
    assert run.data.params["docs_per_shard"] == "5000"
    assert run.data.metrics["ingest/docs_out"] == 300
    parent = mlflow.get_run(parent_id)
    assert parent.info.run_name == "build_llm"
    assert parent.data.metrics["ingest/docs_out"] == 300, "the headline figures are on the parent run too"
    assert "ingest/units" not in run.data.metrics and run.data.params["setup.units"] == "1", "a constant is a param"
    live = mlflow.search_runs(
        experiment_names=["scratchlm"], output_format="list", filter_string="run_name = 'build_llm'"
    )
    assert len(live) == 3, "first, changed and the failed run: the no-op rerun's parent run was deleted"
    artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "metrics")]
    assert artifacts == ["metrics/ingest.json"]


def test_an_edit_to_one_shared_module_makes_only_its_importers_stale(tmp_path_factory):
    """dvc.yaml lists each stage's own shared modules (tests/test_dvc_deps.py): an edit to the MinHash module
    reruns dedup, an edit to the trainer reruns none of the data stages."""
    project = copy_project(tmp_path_factory.mktemp("depsproject"), SMALL)
    first = run_in(project, "dvc", "repro", "dedup")
    assert first.returncode == 0, first.stdout + first.stderr
    with open(project / "tasks/common/trainer.py", "a") as f:
        f.write("\n# an edit no data stage runs\n")
    status = run_in(project, "dvc", "status", "ingest", "filter", "dedup")
    assert "up to date" in status.stdout, status.stdout
    with open(project / "tasks/common/minhash.py", "a") as f:
        f.write("\n# an edit dedup runs\n")
    status = run_in(project, "dvc", "status", "ingest", "filter", "dedup")
    assert "dedup:" in status.stdout and "tasks/common/minhash.py" in status.stdout, status.stdout
    assert "ingest:" not in status.stdout and "filter:" not in status.stdout, status.stdout
