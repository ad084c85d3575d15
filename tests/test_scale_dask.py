"""The data stages on Dask (`data.parallel.runner: dask`, Prefect task mapping through prefect-dask) write the same
bytes as on the default local process pool. The corpus has several input units and shards of different sizes, and
quarantined records in several of them, so results must come back in input order.

Here: a local cluster and a temporary Prefect server (what `dvc repro` gets with no server configured), the three
stages driven from one process as one flow run would, which keeps this file inside its time budget. An existing
cluster (`dask scheduler` / `dask worker`) under `python -m tasks.ingest`, reporting to a Prefect server, is tested
in test_infra_servers.py with `dask_cluster` below."""

from __future__ import annotations

import contextlib
import json
import shutil
import textwrap
from collections.abc import Iterator

import pytest
import yaml

from tests.conftest import copy_project, run_in
from tests.infra_servers import VENV_BIN, free_port, port_open, running, start, tool_env
from tests.test_scale_dvc_remote import same_tree

pytestmark = pytest.mark.slow

ENV = {"SCRATCHLM_NO_MLFLOW": "1", "SCRATCHLM_PROGRESS": "off", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
PARAMS = {
    "data": {
        "sources": ["builtin:stories", "extra"],
        "builtin": {"n_docs": 400},
        "parallel": {"runner": "local", "workers": 2, "dask_address": ""},
    },
    "ingest": {"docs_per_shard": 150},
}

MAPPED = {"ingest": ["ingest_unit"], "filter": ["filter_shard"], "dedup": ["sketch_shard", "copy_unique"]}
"""The functions each stage maps over its units/shards (each map is one `data-shards` flow run)."""

DRIVER = textwrap.dedent("""
    import importlib
    import sys

    from tasks.common.config import section_class
    from tasks.common.stage import execute

    if __name__ == "__main__":  # Dask's worker processes are spawned: they import this file again
        for stage in sys.argv[1:]:
            execute(stage, section_class(stage), importlib.import_module(f"tasks.{stage}").run)
""")


def write_extra_sources(folder) -> None:
    """Three .jsonl files of different sizes, each with one malformed line (quarantined, in unit order)."""
    folder.mkdir()
    for i, n in enumerate([90, 15, 45]):
        with open(folder / f"part{i}.jsonl", "w") as f:
            for j in range(n):
                words = " ".join(f"w{(i * 7 + j * k) % 97}" for k in range(12 + j % 9))
                f.write(json.dumps({"text": f"Note {i}-{j}. The fox met {j} friends by the river. {words}."}) + "\n")
            f.write("{this line is not json\n")


def set_runner(project, **parallel) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["parallel"].update(parallel)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def untimed(metrics_file) -> dict:
    """A stage's metrics without its wall-clock figures, at any depth (the filter's classifier and decontam index
    time themselves)."""
    return without_times(json.loads(metrics_file.read_text()))


def without_times(record: dict) -> dict:
    return {
        k: without_times(v) if isinstance(v, dict) else v
        for k, v in record.items()
        if not (k.startswith("seconds") or k.endswith(("seconds", "_per_s")))
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The project copy after the data stages ran on the default local runner; a snapshot of what they wrote."""
    base = tmp_path_factory.mktemp("dask")
    project = copy_project(base / "project", PARAMS)
    env = {**ENV, "PREFECT_HOME": str(base / "prefect-home")}  # the temporary Prefect server's database
    write_extra_sources(project / "extra")
    stages = [
        s for s in yaml.safe_load((project / "dvc.yaml").read_text())["stages"] if s in ("ingest", "filter", "dedup")
    ]
    (project / "drive_stages.py").write_text(DRIVER)
    proc = run_in(project, "python", "drive_stages.py", *stages, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    snapshot = base / "local"
    shutil.copytree(project / "data", snapshot / "data")
    shutil.copytree(project / "metrics", snapshot / "metrics")
    assert json.loads((snapshot / "metrics/all/ingest.json").read_text())["quarantined"] == 3
    return project, snapshot, stages, env


def assert_same_outputs(project, snapshot, stages) -> None:
    for stage in stages:
        assert same_tree(project / "data" / stage, snapshot / "data" / stage), f"data/{stage} differs"
        assert untimed(project / "metrics" / "all" / f"{stage}.json") == untimed(
            snapshot / "metrics" / "all" / f"{stage}.json"
        )


def test_data_stages_on_a_local_dask_cluster_write_the_same_bytes(reference):
    project, snapshot, stages, env = reference
    set_runner(project, runner="dask", workers=2, dask_address="")
    shutil.rmtree(project / "data")
    proc = run_in(project, "python", "drive_stages.py", *stages, env=env, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert "Creating a new Dask cluster" not in log and "Connecting to an existing Dask cluster" in log, (
        "one local cluster, started once and reused by every map"
    )
    for stage in stages:
        for unit in MAPPED[stage]:
            assert f"Flow run '{unit} x" in log, f"{stage}: {unit} did not run as Prefect task runs on Dask"
    assert log.count("Starting temporary server") == 1, "flow and workers share one Prefect API"
    assert_same_outputs(project, snapshot, stages)


@contextlib.contextmanager
def dask_cluster(project, env: dict, log_dir) -> Iterator[str]:
    """`dask scheduler` and `dask worker` (one process, two threads) on 127.0.0.1, started in the project's
    checkout as docs/SCALE.md tells; yields the scheduler address, stops both afterwards."""
    port = free_port()
    cluster_env = tool_env(**{**env, "PYTHONPATH": str(project)})
    dask = str(VENV_BIN / "dask")
    scheduler = start(
        "dask-scheduler",
        [dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--dashboard-address", "127.0.0.1:0"],
        log_dir,
        cwd=project,
        env=cluster_env,
    )
    workers = start(
        "dask-worker",
        [
            dask,
            "worker",
            f"tcp://127.0.0.1:{port}",
            "--nworkers",
            "1",
            "--nthreads",
            "2",
            "--host",
            "127.0.0.1",
            "--no-dashboard",
        ],
        log_dir,
        cwd=project,
        env=cluster_env,
    )
    with running(scheduler, workers):
        scheduler.wait_until(port_open(port), timeout=90)
        workers.wait_until(lambda: "Registered to:" in workers.log.read_text(), timeout=120)
        yield f"tcp://127.0.0.1:{port}"
