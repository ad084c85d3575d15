"""The pipeline against real servers, started as docs/SCALE.md tells a user to: `prefect server start` and
`mlflow server` (SQLite backend store, proxied artifacts) on 127.0.0.1, `make deploy` (work pools + every deployment
of infra/prefect.yaml), a process worker (`prefect worker start --pool scratchlm-process`), and a deployment run of
the data stages on the tiny builtin corpus that must end Completed with every stage logged on the MLflow server.
Everything runs in a throwaway copy of the project; the servers are always stopped."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import copy_project
from tests.infra_servers import VENV_BIN, Server, http_ok, mlflow_server, prefect_server, running, start, tool_env

pytestmark = pytest.mark.slow

DATA_STAGES = ("ingest", "filter", "dedup")
SMALL = {"data": {"builtin": {"n_docs": 300}}}
PREFECT = str(VENV_BIN / "prefect")


@dataclass
class Stack:
    project: Path
    env: dict
    prefect: Server
    mlflow: Server
    base: Path


def data_stages(project: Path) -> list[str]:
    """ingest, then filter and dedup once dvc.yaml has them."""
    order = list(yaml.safe_load((project / "dvc.yaml").read_text())["stages"])
    return [s for s in order if s in DATA_STAGES]


def api(stack: Stack, path: str, body: dict | None = None) -> list | dict:
    """POST a JSON body (GET when None) to the Prefect server's REST API."""
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        stack.prefect.url + path,
        data=data,
        headers={"Content-Type": "application/json"},
        method="GET" if body is None else "POST",
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    base = tmp_path_factory.mktemp("stack")
    project = copy_project(base / "project", SMALL)
    logs = base / "logs"
    logs.mkdir()
    prefect = prefect_server(base / "prefect-home", logs)
    mlflow = mlflow_server(base / "mlflow", logs)
    with running(prefect, mlflow):
        prefect.wait_until(http_ok(prefect.url + "/health"), timeout=240)
        mlflow.wait_until(http_ok(mlflow.url + "/health"), timeout=180)
        env = tool_env(
            PREFECT_API_URL=prefect.url,
            MLFLOW_TRACKING_URI=mlflow.url,
            PYTHONPATH=str(project),
            PREFECT_HOME=str(base / "client-home"),
            PREFECT_WORKER_QUERY_SECONDS="2",
        )
        yield Stack(project, env, prefect, mlflow, base)


@pytest.fixture(scope="module")
def deployed(stack):
    """`make deploy` in the project copy (its `install` prerequisite is this venv, already installed)."""
    proc = subprocess.run(
        ["make", "-o", "install", "deploy", f"VENV={VENV_BIN.parent}"],
        cwd=stack.project,
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def test_make_deploy_refuses_without_a_server(stack):
    env = {k: v for k, v in stack.env.items() if k != "PREFECT_API_URL"}
    proc = subprocess.run(
        ["make", "-o", "install", "deploy", f"VENV={VENV_BIN.parent}"],
        cwd=stack.project,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "set PREFECT_API_URL" in proc.stderr


def test_make_deploy_creates_pools_and_every_deployment(stack, deployed):
    pools = {p["name"]: p["type"] for p in api(stack, "/work_pools/filter", {})}
    assert {
        "scratchlm-process": "process",
        "scratchlm-docker": "docker",
        "scratchlm-kubernetes": "kubernetes",
    }.items() <= pools.items()

    declared = yaml.safe_load((stack.project / "infra/prefect.yaml").read_text())["deployments"]
    flows = {f["id"]: f["name"] for f in api(stack, "/flows/filter", {})}
    found = {(flows[d["flow_id"]], d["name"]): d for d in api(stack, "/deployments/filter", {})}
    for spec in declared:
        flow_name = "build_llm" if spec["entrypoint"].endswith(":build_llm") else spec["entrypoint"].split(":")[1]
        d = found.get((flow_name, spec["name"]))
        assert d is not None, f"{flow_name}/{spec['name']} not deployed; deployed: {sorted(found)}"
        assert d["work_pool_name"] == spec["work_pool"]["name"]
        assert d["parameters"] == spec.get("parameters", {})
        assert len(d["schedules"]) == len(spec.get("schedules", []))
        assert not any(s["active"] for s in d["schedules"]), "schedules are declared inactive"
    process_run = found[("build_llm", "scratchlm")]
    assert process_run["pull_steps"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(stack.project)}}
    ], "process runs start in the checkout"
    docker_run = found[("build_llm", "scratchlm-docker")]
    assert (
        docker_run["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == "/opt/scratchlm"
    ), "container runs start in the image's checkout (infra/Dockerfile)"


def test_deployment_run_on_a_process_worker_completes_and_logs_to_the_mlflow_server(stack, deployed):
    stages = data_stages(stack.project)
    worker = start(
        "prefect-worker",
        [PREFECT, "worker", "start", "--pool", "scratchlm-process", "--limit", "1"],
        stack.base / "logs",
        cwd=stack.project,
        env=stack.env,
    )
    with running(worker):
        run = subprocess.run(
            [
                PREFECT,
                "deployment",
                "run",
                "build_llm/scratchlm",
                "--params",
                json.dumps({"stages": stages}),
                "--watch",
                "--watch-timeout",
                "420",
            ],
            cwd=stack.project,
            env=stack.env,
            capture_output=True,
            text=True,
            timeout=480,
        )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:] + "\nworker:\n" + worker.tail(60)
    assert "Completed" in run.stdout

    flow_runs = api(stack, "/flow_runs/filter", {"flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}})
    assert any(r["parameters"].get("stages") == stages for r in flow_runs)
    for stage in stages:
        assert (stack.project / "metrics" / f"{stage}.json").is_file(), f"{stage} ran in the deployed checkout"

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=stack.mlflow.url)
    experiment = client.get_experiment_by_name("scratchlm")
    assert experiment.artifact_location.startswith("mlflow-artifacts:"), "artifacts go through the server"
    runs = client.search_runs([experiment.experiment_id])
    parent = [r for r in runs if r.info.run_name == "build_llm"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id}
    assert sorted(children) == sorted(stages)
    assert children["ingest"].data.metrics["ingest/docs_out"] == 300
    for stage, child in children.items():
        local = json.loads((stack.project / "metrics" / "all" / f"{stage}.json").read_text())
        served = json.loads(
            Path(
                client.download_artifacts(child.info.run_id, f"metrics/{stage}.json", str(stack.base / "logs"))
            ).read_text()
        )
        assert served == local
    stored = list((stack.base / "mlflow" / "artifacts").rglob("ingest.json"))
    assert stored, "the artifact lives in the server's artifact store"


REGISTER = """
import json, sys
from pathlib import Path
import pytest
from tests.evaluate_fixtures import registry_project, run_register
root, url = Path(sys.argv[1]), sys.argv[2]
mp = pytest.MonkeyPatch()
registry_project(root, mp)                   # a tiny DPO model + its evaluation, as the upstream stages leave them
mp.setenv("MLFLOW_TRACKING_URI", url)        # ... and the MLflow server instead of the project's SQLite file
print("RECORD " + json.dumps(run_register(root)))
"""


def test_register_stage_registers_the_model_on_the_mlflow_server(stack, tmp_path):
    """The register stage's run() (as stage_main runs it) against the server: the version, its alias and its
    files live on the server and its artifact store, nothing in the project folder."""
    script = tmp_path / "register_on_server.py"
    script.write_text(REGISTER)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "project"), stack.mlflow.url],
        env=tool_env(PYTHONPATH=str(Path(__file__).resolve().parents[1])),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(proc.stdout.split("RECORD ", 1)[1])

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=stack.mlflow.url, registry_uri=stack.mlflow.url)
    version = client.get_model_version_by_alias(record["name"], "challenger")
    assert int(version.version) == record["version"] and version.run_id == record["run_id"]
    assert client.get_run(record["run_id"]).info.run_name == "register"
    stored = {p.name for p in (stack.base / "mlflow" / "artifacts").rglob("*")}
    assert {"model.safetensors", "tokenizer.json", "MLmodel"} <= stored, "the model lives in the server's store"
    assert not (tmp_path / "project" / "mlruns.db").exists() and not (tmp_path / "project" / "mlartifacts").exists()


def test_ingest_on_an_existing_dask_cluster_reports_its_task_runs_to_the_server(stack, tmp_path):
    """`dask scheduler` + `dask worker`, `data.parallel.dask_address` pointing at them, PREFECT_API_URL at the
    server: the same bytes as the local runner, and every input unit is a completed task run on the server."""
    from tests.test_scale_dask import PARAMS, assert_same_outputs, dask_cluster, set_runner, write_extra_sources

    project = copy_project(tmp_path / "project", PARAMS)
    write_extra_sources(project / "extra")
    env = {**stack.env, "SCRATCHLM_NO_MLFLOW": "1", "PYTHONPATH": str(project)}
    local = subprocess.run(
        [sys.executable, "-m", "tasks.ingest"], cwd=project, env=env, capture_output=True, text=True, timeout=120
    )
    assert local.returncode == 0, local.stderr[-3000:]
    snapshot = tmp_path / "local"
    shutil.copytree(project / "data", snapshot / "data")
    shutil.copytree(project / "metrics", snapshot / "metrics")

    with dask_cluster(project, env, tmp_path) as address:
        set_runner(project, runner="dask", dask_address=address)
        proc = subprocess.run(
            [sys.executable, "-m", "tasks.ingest"], cwd=project, env=env, capture_output=True, text=True, timeout=240
        )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert f"Connecting to an existing Dask cluster at {address}" in log
    assert "Starting temporary server" not in log, "the stage reports to the server in PREFECT_API_URL"
    assert_same_outputs(project, snapshot, ["ingest"])

    units = json.loads((project / "metrics/all/ingest.json").read_text())["units"]
    shard_runs = [r for r in api(stack, "/flow_runs/filter", {}) if r["name"] == f"ingest_unit x{units}"]
    assert len(shard_runs) == 1 and shard_runs[0]["state_type"] == "COMPLETED"
    task_runs = api(stack, "/task_runs/filter", {"flow_runs": {"id": {"any_": [shard_runs[0]["id"]]}}})
    assert len(task_runs) == units and all(t["state_type"] == "COMPLETED" for t in task_runs)
