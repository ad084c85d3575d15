"""A run's output holds what the user needs: the known-harmless messages are dropped (tasks/common/quiet.py), real
ones stay, and the project's Prefect settings apply however a flow is started (flows/__init__.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from flows import PREFECT_DEFAULTS, apply_prefect_defaults
from tasks.common.config import ROOT
from tasks.common.quiet import HarmlessLines
from tests.conftest import copy_project, run_in

# verbatim from a `make run` log (the stage lines the flow streams)
DEEPSPEED_HOSTFILE = (
    "[2026-12-02 14:20:14,028] [WARNING] [runner.py:214:fetch_hostfile] Unable to find hostfile, will proceed with "
    "training with local resources only."
)
MLFLOW_NUDGE = (
    "/work/main/.venv/lib/python3.11/site-packages/mlflow/pyfunc/utils/data_validation.py:187: UserWarning: "
    "\x1b[33mAdd type hints to the `predict` method to enable data validation and automatic signature inference "
    "during model logging. Check https://mlflow.org/docs/latest/model/python_model.html#type-hint-usage-in-"
    "pythonmodel for more details.\x1b[0m"
)
DVC_ADVICE = [
    "Updating lock file 'dvc.lock'",
    "",
    "To track the changes with git, run:",
    "",
    "\tgit add dvc.lock",
    "",
    "To enable auto staging, run:",
    "",
    "\tdvc config core.autostage true",
    "Use `dvc push` to send your updates to remote storage.",
]


def shown(lines: list[str]) -> list[str]:
    keep = HarmlessLines()
    return [out for line in lines if (out := keep(line)) is not None and out.strip()]


def test_harmless_messages_are_dropped_and_real_ones_kept():
    real = [
        "[2026-12-02 14:20:14,028] [WARNING] [engine.py:99:step] gradient overflow, skipping step",
        "/x/y.py:3: UserWarning: \x1b[31msomething that matters\x1b[0m",
        "  warnings.warn(",
        "git add is what you do next",  # not under DVC's advice: a stage's own line
        "error: pretrain: data/pretokenize is missing; run the pretokenize stage first",
    ]
    lines = [*DVC_ADVICE, DEEPSPEED_HOSTFILE, MLFLOW_NUDGE, "  color_warning(", *real]
    assert (
        shown(lines)
        == [
            "Updating lock file 'dvc.lock'",
            real[0],
            "/x/y.py:3: UserWarning: something that matters",  # kept, without the raw colour codes
            *real[2:],
        ]
    )


def test_a_warning_source_line_goes_only_with_its_warning():
    assert shown(["  color_warning(", "done"]) == ["  color_warning(", "done"]
    keep = HarmlessLines()
    assert keep(MLFLOW_NUDGE) is None and keep("next line") == "next line"
    assert keep.dropped == {"mlflow: type hints on predict": 1}


def test_the_mlflow_nudge_is_what_importing_the_pyfunc_prints():
    """The real warning, reproduced: it is what the filter drops, and nothing else is printed."""
    proc = subprocess.run(
        [sys.executable, "-c", "import tasks.common.pyfunc"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    if "Add type hints to the `predict` method" not in proc.stderr:
        pytest.skip("this MLflow does not print the type-hint nudge (nothing to drop)")
    assert shown(proc.stderr.splitlines()) == [], proc.stderr


def test_stage_output_in_the_flow_has_no_dvc_advice(tmp_path):
    """A real `dvc repro` (of a one-line stage, for speed): DVC prints its git/push advice, the flow's stream of the
    same stage (run_dvc_stage, what `scratchlm run` and `scratchlm stage` show) does not."""
    project = copy_project(tmp_path / "project")
    (project / "dvc.yaml").write_text(
        "stages:\n  hello:\n    cmd: echo hello from the stage > out.txt && cat out.txt\n    outs:\n      - out.txt\n"
    )
    script = "from flows.pipeline import run_dvc_stage; run_dvc_stage('hello', log=print)"
    streamed = run_in(project, sys.executable, "-c", script)
    assert streamed.returncode == 0, streamed.stdout + streamed.stderr
    out = streamed.stdout
    assert "[hello] Running stage 'hello'" in out and "[hello] hello from the stage" in out
    (project / "dvc.lock").unlink()  # the same first run, straight from DVC
    raw = run_in(project, "dvc", "repro", "hello")
    assert raw.returncode == 0, raw.stdout + raw.stderr
    assert "git add dvc.lock" in raw.stdout and "dvc push" in raw.stdout  # what there is to drop
    for advice in ("git add", "autostage", "dvc push", "To track the changes"):
        assert advice not in out, out


PREFECT_PROBE = textwrap.dedent("""
    import json, flows.promote
    from prefect.settings import get_current_settings
    s = get_current_settings()
    print(json.dumps([str(s.home), s.server.analytics_enabled, s.server.ephemeral.startup_timeout_seconds]))
""")


def prefect_settings(env: dict[str, str]) -> list:
    proc = subprocess.run(
        [sys.executable, "-c", PREFECT_PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_prefect_settings_apply_outside_make(tmp_path):
    """`python -m flows.promote` (no Makefile exports): state in the project's .prefect, not ~/.prefect."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["HOME"] = str(tmp_path)
    assert prefect_settings(env) == [str(ROOT / ".prefect"), False, 120]
    user = {**env, "PREFECT_HOME": str(tmp_path / "mine"), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "30"}
    assert prefect_settings(user) == [str(tmp_path / "mine"), False, 30]  # what the user set wins


def test_prefect_defaults_match_the_makefile():
    make = (ROOT / "Makefile").read_text()
    for key, value in PREFECT_DEFAULTS.items():
        expected = "$(CURDIR)/.prefect" if key == "PREFECT_HOME" else value
        assert f"export {key} ?= {expected}" in make, key
    environ = {"PREFECT_HOME": "/somewhere", "PREFECT_SERVER_ANALYTICS_ENABLED": ""}
    added = apply_prefect_defaults(environ)
    assert environ["PREFECT_HOME"] == "/somewhere" and set(added) == set(PREFECT_DEFAULTS) - {"PREFECT_HOME"}
