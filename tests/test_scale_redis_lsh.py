"""dedup with datasketch's MinHashLSH on Redis storage (`dedup.index: datasketch`, `dedup.lsh_storage: redis`)
against a real `redis-server` on 127.0.0.1: the same clusters as the in-memory MinHashLSH and as the default numpy
index, byte-identical stage outputs, no keys left behind, and a clear error when Redis is not there."""

from __future__ import annotations

import pytest
import yaml

from tests.conftest import copy_project, run_in
from tests.infra_servers import free_port, redis_server, running
from tests.test_scale_dask import DRIVER, untimed
from tests.test_scale_dvc_remote import same_tree

pytestmark = pytest.mark.slow

ENV = {"SCRATCHLM_NO_MLFLOW": "1", "SCRATCHLM_PROGRESS": "off"}
PARAMS = {"data": {"builtin": {"n_docs": 600}, "parallel": {"runner": "local", "workers": 1}}}


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("redis")
    try:
        server = redis_server(log_dir)
    except FileNotFoundError:
        pytest.skip("redis-server is not installed (.ci/run installs it with apt-get)")
    with running(server):
        import redis as redis_client

        client = redis_client.Redis.from_url(server.url)

        def answers() -> bool:
            try:
                return client.ping()
            except redis_client.exceptions.ConnectionError:
                return False

        server.wait_until(answers, timeout=30)
        yield server.url, client


@pytest.fixture(scope="module")
def filtered(tmp_path_factory):
    """A project copy where ingest and filter have run on 600 builtin documents (planted near duplicates)."""
    project = copy_project(tmp_path_factory.mktemp("lsh") / "project", PARAMS)
    (project / "drive_stages.py").write_text(DRIVER)
    proc = run_in(project, "python", "drive_stages.py", "ingest", "filter", env=ENV, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return project


def run_dedup(project, tmp_path, name: str, **dedup) -> tuple:
    """dedup with these params; its outputs moved to tmp_path/name; (folder, untimed metrics, output)."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["dedup"].update(dedup)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = run_in(project, "python", "-m", "tasks.dedup", env=ENV, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / name
    (project / "data" / "dedup").rename(out)
    return out, untimed(project / "metrics" / "all" / "dedup.json"), proc.stdout + proc.stderr


def test_redis_backed_minhashlsh_finds_the_same_clusters_as_in_memory(filtered, redis, tmp_path):
    url, client = redis
    memory, m_metrics, _ = run_dedup(filtered, tmp_path, "memory", index="datasketch", lsh_storage="memory")
    writes_before = client.info("stats")["total_commands_processed"]
    on_redis, r_metrics, _ = run_dedup(
        filtered, tmp_path, "redis", index="datasketch", lsh_storage="redis", redis_url=url + "/0"
    )
    writes = client.info("stats")["total_commands_processed"] - writes_before
    assert writes > m_metrics["kept"], f"the index went through Redis ({writes} commands)"
    numpy_index, n_metrics, _ = run_dedup(filtered, tmp_path, "numpy", index="numpy", lsh_storage="memory")
    assert m_metrics["near_duplicates"] > 0 and m_metrics["candidate_pairs"] > 0, "the corpus has near duplicates"
    assert r_metrics == m_metrics == n_metrics
    assert same_tree(on_redis, memory) and same_tree(memory, numpy_index)  # clusters.jsonl and the kept shards
    assert client.dbsize() == 0, "the run's LSH keys are deleted when the stage ends"


def test_redis_storage_errors_name_the_key(filtered, tmp_path):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    params = yaml.safe_load((filtered / "params.yaml").read_text())
    params["dedup"].update(index="datasketch", lsh_storage="redis", redis_url=dead)
    (filtered / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = run_in(filtered, "python", "-m", "tasks.dedup", env=ENV, timeout=120)
    assert proc.returncode == 2
    assert f"error: dedup: dedup.redis_url: no Redis at {dead}" in proc.stderr

    params["dedup"].update(index="numpy")
    (filtered / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = run_in(filtered, "python", "-m", "tasks.dedup", env=ENV, timeout=120)
    assert proc.returncode == 2
    assert "dedup.lsh_storage: redis storage needs index: datasketch" in proc.stderr
