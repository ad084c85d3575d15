"""The deployment files hold together without any server: infra/compose.yaml validates with the Compose tool that
is installed (`docker compose`, else Debian's `docker-compose`) and publishes ports on loopback only, with no
credential written in it; infra/prefect.yaml's deployments point at flows, stages and pools that exist; the
Dockerfile installs the pinned torch/deepspeed; the DeepSpeed hostfile example parses as the training stages parse
a hostfile. Names shared between files (pool, network, volume) agree."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess

import pytest
import yaml

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

INFRA = ROOT / "infra"
COMPOSE = INFRA / "compose.yaml"
CREDENTIALS = {"POSTGRES_PASSWORD": "pg-secret", "MINIO_ROOT_USER": "minio-user", "MINIO_ROOT_PASSWORD": "minio-secret"}
SERVICES = {"postgres", "minio", "minio-bucket", "mlflow", "prefect-server", "prefect-worker"}


def compose_tool() -> list[str] | None:
    """`docker compose` (v2 plugin) when it answers, else `docker-compose` (v1), else None."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def compose_config(env: dict[str, str]) -> subprocess.CompletedProcess:
    tool = compose_tool()
    if tool is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed (.ci/run installs docker-compose)")
    # a clean environment: only PATH and what the test passes, so nothing from the caller's shell leaks in
    return subprocess.run(
        [*tool, "-f", str(COMPOSE), "config"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", **env},
    )


def published(service: dict) -> list[tuple[str, str]]:
    """(host ip, host port) of every published port, from v1 strings or v2 long syntax."""
    out = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            out.append((port.get("host_ip", ""), str(port.get("published", ""))))
        else:
            parts = str(port).split(":")
            out.append((parts[0] if len(parts) == 3 else "", parts[-2] if len(parts) >= 2 else ""))
    return out


def raw_compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def prefect_spec() -> dict:
    return yaml.safe_load((INFRA / "prefect.yaml").read_text())


# ------------------------------------------------------------------------------------------------ compose


def test_compose_config_validates_and_binds_every_port_to_loopback():
    proc = compose_config(CREDENTIALS)
    assert proc.returncode == 0, proc.stderr
    rendered = yaml.safe_load(proc.stdout)
    assert set(rendered["services"]) == SERVICES
    ports = {name: published(svc) for name, svc in rendered["services"].items() if svc.get("ports")}
    assert set(ports) == {"minio", "mlflow", "prefect-server"}, "postgres stays unpublished"
    assert all(ip == "127.0.0.1" for p in ports.values() for ip, _ in p), ports
    assert ("127.0.0.1", "5000") in ports["mlflow"] and ("127.0.0.1", "4200") in ports["prefect-server"]
    mlflow_cmd = " ".join(rendered["services"]["mlflow"]["command"])
    assert "postgresql+psycopg2://scratchlm:pg-secret@postgres:5432/mlflow" in mlflow_cmd
    assert "--artifacts-destination=s3://mlflow/" in mlflow_cmd


def test_compose_binds_elsewhere_only_when_asked():
    proc = compose_config({**CREDENTIALS, "SCRATCHLM_BIND": "0.0.0.0", "MLFLOW_PORT": "15000"})
    assert proc.returncode == 0, proc.stderr
    mlflow = published(yaml.safe_load(proc.stdout)["services"]["mlflow"])
    assert mlflow == [("0.0.0.0", "15000")]


@pytest.mark.parametrize("missing", sorted(CREDENTIALS))
def test_compose_refuses_to_render_without_each_credential(missing):
    proc = compose_config({k: v for k, v in CREDENTIALS.items() if k != missing})
    assert proc.returncode != 0
    assert f"set {missing} in infra/.env" in proc.stderr + proc.stdout


def test_compose_file_has_no_literal_secrets_and_only_existing_mounts():
    text = COMPOSE.read_text()
    for var in CREDENTIALS:
        uses = re.findall(r"\$\{" + var + r"([^}]*)\}", text)
        assert uses and all(u.startswith(":?") for u in uses), f"{var} must be required, never defaulted: {uses}"
    spec = raw_compose()
    for name, svc in spec["services"].items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (INFRA / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in spec["volumes"], f"{name} mounts undeclared volume {source}"
        for dep in svc.get("depends_on", {}):
            assert dep in spec["services"], f"{name} depends on unknown {dep}"
    example = (INFRA / ".env.example").read_text()
    secrets = [var for var in CREDENTIALS if var.endswith("PASSWORD")]
    assert all(re.search(rf"^{var}=$", example, re.M) for var in secrets), ".env.example leaves passwords blank"


def test_compose_and_prefect_yaml_agree_on_pool_network_and_cache_volume():
    compose, pools = raw_compose(), prefect_spec()["definitions"]["work_pools"]
    worker_cmd = compose["services"]["prefect-worker"]["command"]
    assert worker_cmd[worker_cmd.index("--pool") + 1] == pools["process"]["name"]
    assert pools["docker"]["job_variables"]["networks"] == [compose["networks"]["scratchlm"]["name"]]
    cache = compose["volumes"]["dvc-cache"]["name"]
    assert f"{cache}:/opt/scratchlm/.dvc/cache" in pools["docker"]["job_variables"]["volumes"]
    assert pools["docker"]["job_variables"]["env"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert "--port=5000" in compose["services"]["mlflow"]["command"]


# ------------------------------------------------------------------------------------------------ prefect.yaml


def flow_signature(entrypoint: str) -> list[str] | None:
    """Parameter names of the flow function an entrypoint names, read from the source (None: file missing)."""
    path, func = entrypoint.split(":")
    source = ROOT / path
    if not source.is_file():
        return None
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == func:
            assert any("flow" in ast.unparse(d) for d in node.decorator_list), f"{entrypoint} is not a @flow"
            return [a.arg for a in node.args.args + node.args.kwonlyargs]
    raise AssertionError(f"{entrypoint}: no function {func}")


def test_prefect_deployments_name_real_flows_parameters_stages_and_pools():
    stages = list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    makefile = (ROOT / "Makefile").read_text()
    pool_types = re.search(r"^PREFECT_POOLS \?= (.+)$", makefile, re.M).group(1).split()
    created = {f"scratchlm-{t}" for t in pool_types}
    names = set()
    for d in prefect_spec()["deployments"]:
        signature = flow_signature(d["entrypoint"])
        if signature is None:
            assert d["entrypoint"] == "flows/promote.py:promote", f"{d['entrypoint']}: file missing"
            continue  # promote is being written alongside; test_infra_servers deploys it once it exists
        assert set(d.get("parameters", {})) <= set(signature), f"{d['name']}: unknown parameters"
        assert set(d.get("parameters", {}).get("stages") or []) <= set(stages), f"{d['name']}: unknown stage"
        assert d["work_pool"]["name"] in created, f"{d['name']}: pool {d['work_pool']['name']} is not created"
        names.add((d["entrypoint"], d["name"]))
    assert ("flows/pipeline.py:build_llm", "scratchlm") in names


# ------------------------------------------------------------------------------------------------ image, hostfile


def locked(package: str) -> str:
    match = re.search(rf"^{package}==([^\s+]+)", (ROOT / "requirements.lock").read_text(), re.M)
    return match.group(1)


def test_dockerfile_installs_the_locked_torch_and_deepspeed():
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert f'"torch=={locked("torch")}+${{TORCH_VARIANT}}"' in dockerfile
    assert f'"deepspeed=={locked("deepspeed")}"' in dockerfile
    ignored = (INFRA / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", "data", ".dvc/cache", "infra/.env"} <= set(ignored)


def test_hostfile_example_parses_like_the_training_stages_read_it():
    distributed = pytest.importorskip("tasks.common.distributed")
    slots = distributed.hostfile_slots(INFRA / "deepspeed" / "hostfile.example")
    assert slots == {"gpu-node-1": 8, "gpu-node-2": 8}
