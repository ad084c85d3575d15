"""A failed run keeps the last good output (issue 16, item 2): a stage builds its outputs in a staging folder and
swaps them in only on success (tasks/common/stage.py: execute, tasks/common/dvcio.py: Staging), and its DVC outs are
`persist: true`, so neither the stage nor DVC deletes data/<stage>/ or metrics/<stage>.json before a run succeeds.

In-process tests drive `execute` with stand-in `run` functions on a tmp root (each failure kind, the swap, the
ranks, the folders of dead runs); the slow ones fail the real ingest stage in a throwaway copy of the project through
`python -m tasks.ingest` and `dvc repro ingest` (a bad source, an unwritable data/, a full disk) and compare hashes.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks.common import dvcio
from tasks.common import stage as stage_mod
from tasks.common.config import ConfigError, ScratchError
from tasks.common.dvcio import STAGING_ENV, Staging, fresh_dir, read_json, write_json
from tasks.common.stage import execute, stage_main
from tasks.ingest import IngestConfig
from tests.conftest import ROOT, copy_project, run_in


def tree_hash(*paths: Path) -> str:
    """sha256 over the relative names and bytes of every file under `paths` (a missing path hashes as absent)."""
    h = hashlib.sha256()
    for top in paths:
        files = sorted(p for p in top.rglob("*") if p.is_file()) if top.is_dir() else [top] if top.exists() else []
        h.update(f"{top.name}:{len(files)}\n".encode())
        for f in files:
            h.update(f"{f.relative_to(top)}\n".encode() + f.read_bytes())
    return h.hexdigest()


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


# ------------------------------------------------------------------------------------------------ in-process


@pytest.fixture
def root(tmp_path, monkeypatch) -> Path:
    """A project root with a previous good ingest output; `execute` writes there (the repository's params)."""
    monkeypatch.setattr(stage_mod, "stage_paths", lambda stage: dvcio.stage_paths(stage, tmp_path))
    monkeypatch.setenv("SCRATCHLM_NO_MLFLOW", "1")
    monkeypatch.delenv(STAGING_ENV, raising=False)
    monkeypatch.delenv("RANK", raising=False)
    (tmp_path / "data" / "ingest").mkdir(parents=True)
    (tmp_path / "data" / "ingest" / "old.txt").write_text("the last good output\n")
    write_json(tmp_path / "metrics" / "ingest.json", {"docs_out": 1})
    return tmp_path


def outputs(root: Path) -> str:
    return tree_hash(root / "data" / "ingest", root / "metrics" / "ingest.json")


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in (root / "data" / ".staging").glob("*"))


def test_success_swaps_the_new_output_in(root):
    seen = {}

    def run(cfg, paths, tracker):
        out = fresh_dir(paths.out)
        seen["out"] = out
        seen["during"] = sorted(p.name for p in (root / "data" / "ingest").iterdir())
        (out / "new.txt").write_text("new\n")
        return {"docs_out": 2}

    metrics = execute("ingest", IngestConfig, run)
    assert seen["during"] == ["old.txt"], "the published output is untouched while the stage runs"
    assert seen["out"].parent.parent == root / "data" / ".staging"
    assert sorted(p.name for p in (root / "data" / "ingest").iterdir()) == ["new.txt"]
    written = read_json(root / "metrics" / "all" / "ingest.json")
    assert written["docs_out"] == 2 and written == {k: v for k, v in metrics.items() if k != "_run_id"}
    assert read_json(root / "metrics" / "ingest.json") == {}, "no HEADLINE given: the headline file is empty"
    assert leftovers(root) == [] and not (root / "data" / ".failed").exists()
    probe = root / "probe"
    probe.mkdir()
    assert stat.S_IMODE((root / "data" / "ingest").stat().st_mode) == stat.S_IMODE(probe.stat().st_mode)


def failing(error: BaseException, write: str = "shard-00000.jsonl.gz"):
    def run(cfg, paths, tracker):
        out = fresh_dir(paths.out)
        (out / write).write_text("half of a new output")
        raise error

    return run


def enospc(filename=None) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)


def wrapped_enospc() -> RuntimeError:
    try:
        raise enospc()
    except OSError as e:
        try:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0") from e
        except RuntimeError as wrapped:
            return wrapped


@pytest.mark.parametrize(
    "error, message",
    [
        (enospc(), "no space left on device: free some space and rerun"),
        (wrapped_enospc(), "no space left on device: free some space and rerun"),
        (
            RuntimeError("Error while serializing: IoError(No space left on device (os error 28))"),
            "no space left on device: free some space and rerun",
        ),
        (OSError(errno.EACCES, "Permission denied", "/x/y"), "/x/y: permission denied: fix the permissions and rerun"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), "disk quota exceeded: free some space and rerun"),
    ],
)
def test_a_full_disk_or_a_forbidden_write_is_one_user_error_and_changes_nothing(root, error, message):
    before = outputs(root)
    with pytest.raises(ScratchError) as err:
        execute("ingest", IngestConfig, failing(error))
    assert str(err.value) == f"{message} (data/ingest/ and metrics/ingest.json are unchanged)"
    assert outputs(root) == before
    assert leftovers(root) == [] and not (root / "data" / ".failed").exists(), "a full disk keeps nothing"


def test_the_failing_file_is_named_as_the_stage_output(root):
    def run(cfg, paths, tracker):
        raise enospc(str(paths.out / "model" / ".model.safetensors.k2x9_ab1"))

    with pytest.raises(ScratchError, match=r"^no space left on device writing data/ingest/model/model.safetensors: "):
        execute("ingest", IngestConfig, run)


def test_a_user_error_keeps_what_the_run_wrote_in_data_failed(root):
    before = outputs(root)

    def run(cfg, paths, tracker):
        out = fresh_dir(paths.out)
        (out / "quarantine.jsonl").write_text('{"reason": "malformed JSON"}\n')
        raise ConfigError(f"data.sources: no valid documents (see {out / 'quarantine.jsonl'})")

    with pytest.raises(ConfigError) as err:  # the same error, its type kept
        execute("ingest", IngestConfig, run)
    failed = root / "data" / ".failed" / "ingest"
    assert str(err.value) == f"data.sources: no valid documents (see {failed / 'quarantine.jsonl'})"
    assert (failed / "quarantine.jsonl").is_file() and outputs(root) == before and leftovers(root) == []
    with pytest.raises(ScratchError, match="^again$"):
        execute("ingest", IngestConfig, failing(ScratchError("again"), write="x"))
    assert sorted(p.name for p in failed.iterdir()) == ["x"], "the next run replaces the failed output"
    assert execute("ingest", IngestConfig, new_output)["docs_out"] == 2
    assert not failed.exists(), "a success removes it"


@pytest.mark.parametrize("error", [RuntimeError("a bug"), KeyboardInterrupt(), SystemExit(3)])
def test_any_other_failure_propagates_and_changes_nothing(root, error):
    before = outputs(root)
    with pytest.raises(type(error)):
        execute("ingest", IngestConfig, failing(error))
    assert outputs(root) == before and leftovers(root) == [] and not (root / "data" / ".failed").exists()


def test_stage_main_prints_one_error_line_and_exits_2(root, capsys):
    with pytest.raises(SystemExit) as exit_:
        stage_main("ingest", IngestConfig, failing(enospc()))
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: ingest: no space left on device: free some space and rerun "
        "(data/ingest/ and metrics/ingest.json are unchanged)"
    ]


def test_a_failed_swap_puts_the_previous_output_back(root, monkeypatch):
    before, replace = outputs(root), os.replace

    def full_at_the_metrics(src, dst):
        if Path(dst) == root / "metrics" / "ingest.json":
            raise enospc()
        replace(src, dst)

    monkeypatch.setattr(dvcio.os, "replace", full_at_the_metrics)
    with pytest.raises(ScratchError, match="no space left on device"):
        execute("ingest", IngestConfig, new_output)
    assert outputs(root) == before and leftovers(root) == []
    assert sorted(p.name for p in (root / "metrics").rglob("*")) == ["all", "ingest.json", "ingest.json"], (
        "no temporary left beside them"
    )


def test_a_refused_swap_is_one_error_line_naming_the_folder(root, monkeypatch):
    before, rename = outputs(root), os.rename

    def data_not_writable(src, dst):
        if Path(src) == root / "data" / "ingest":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(src), None, str(dst))
        rename(src, dst)

    monkeypatch.setattr(dvcio.os, "rename", data_not_writable)
    with pytest.raises(ScratchError) as err:
        execute("ingest", IngestConfig, new_output)
    assert str(err.value) == (
        "data/ingest: permission denied: fix the permissions and rerun "
        "(data/ingest/ and metrics/ingest.json are unchanged)"
    )
    assert outputs(root) == before and leftovers(root) == []


def new_output(cfg, paths, tracker):
    (fresh_dir(paths.out) / "new.txt").write_text("new\n")
    return {"docs_out": 2}


def test_other_ranks_share_rank_0s_folder_and_touch_nothing(root, monkeypatch):
    monkeypatch.setenv(STAGING_ENV, "launcher-123")
    monkeypatch.setenv("RANK", "1")
    seen = {}

    def rank_1(cfg, paths, tracker):
        seen["out"] = paths.out
        return None

    assert execute("ingest", IngestConfig, rank_1) is None
    assert seen["out"] == Staging.of("ingest", dvcio.stage_paths("ingest", root)).paths.out
    assert seen["out"] == root / "data" / ".staging" / "ingest.launcher-123" / "out"
    assert not (root / "data" / ".staging").exists() and outputs(root) != ""


def test_folders_of_dead_runs_are_removed_live_and_other_hosts_kept(root):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host, staging = socket.gethostname(), root / "data" / ".staging"
    names = {
        "dead": f"ingest.{host}-{dead.stdout.strip()}",
        "live": f"ingest.{host}-{os.getppid()}",
        "remote": "ingest.elsewhere-1",
        "other stage": f"filter.{host}-{dead.stdout.strip()}",
    }
    for name in names.values():
        (staging / name / "out").mkdir(parents=True)
    (staging / f"{names['dead']}.previous").mkdir()  # a dead run's swap got as far as moving the old output aside
    execute("ingest", IngestConfig, new_output)
    assert sorted(p.name for p in staging.iterdir()) == sorted(v for k, v in names.items() if k != "dead")


def test_a_run_killed_mid_swap_gets_its_previous_output_back(root):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    aside = root / "data" / ".staging" / f"ingest.{socket.gethostname()}-{dead.stdout.strip()}.previous"
    aside.parent.mkdir(parents=True)
    before = outputs(root)
    os.rename(root / "data" / "ingest", aside)  # killed between the two renames: data/ingest is missing
    with pytest.raises(RuntimeError):
        execute("ingest", IngestConfig, failing(RuntimeError("the next run fails too")))
    assert outputs(root) == before and leftovers(root) == []


# ------------------------------------------------------------------------------------------------ the real stage

SMALL = {"data": {"builtin": {"n_docs": 200}, "parallel": {"runner": "local", "workers": 2, "dask_address": ""}}}
QUIET = {"SCRATCHLM_NO_MLFLOW": "1"}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project copy whose ingest ran once through `dvc repro` (the last good output), plus a source of junk."""
    project = copy_project(tmp_path_factory.mktemp("faults"), SMALL)
    (project / "junk.jsonl").write_text("{not json\n" * 5)
    first = run_in(project, "dvc", "repro", "ingest", env=QUIET)
    assert first.returncode == 0, first.stdout + first.stderr
    return project


def good(project: Path) -> tuple[str, str, str]:
    return (
        tree_hash(project / "data" / "ingest"),
        tree_hash(project / "metrics" / "ingest.json"),
        (project / "dvc.lock").read_text(),
    )


class params_changed:
    """`with params_changed(project, data={"sources": [...]}):` params.yaml merged, restored byte for byte after."""

    def __init__(self, project: Path, **sections: dict) -> None:
        self.file, self.sections = project / "params.yaml", sections

    def __enter__(self) -> None:
        self.original = self.file.read_text()
        params = yaml.safe_load(self.original)
        for name, values in self.sections.items():
            params[name].update(values)
        self.file.write_text(yaml.safe_dump(params, sort_keys=False))

    def __exit__(self, *_) -> None:
        self.file.write_text(self.original)


def assert_one_error(proc: subprocess.CompletedProcess, start: str) -> str:
    text = proc.stdout + proc.stderr
    lines = error_lines(text)
    assert len(lines) == 1 and lines[0].startswith(start), text
    assert "Traceback" not in text, text
    return lines[0]


@pytest.mark.slow
def test_a_bad_source_via_python_m_keeps_the_last_good_output(project):
    before = good(project)
    with params_changed(project, data={"sources": ["junk.jsonl"]}):
        proc = run_in(project, sys.executable, "-m", "tasks.ingest", env=QUIET)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = assert_one_error(proc, "error: ingest: data.sources: no valid documents in ['junk.jsonl']")
    failed = project / "data" / ".failed" / "ingest" / "quarantine.jsonl"
    assert str(failed) in line and failed.is_file(), "the files the error names are there to read"
    assert good(project) == before and list((project / "data" / ".staging").iterdir()) == []


@pytest.mark.slow
def test_a_bad_source_via_dvc_repro_keeps_the_last_good_output(project):
    before = good(project)
    with params_changed(project, data={"sources": ["junk.jsonl"]}):
        proc = run_in(project, "dvc", "repro", "ingest", env=QUIET)
    assert proc.returncode != 0 and "failed to reproduce 'ingest'" in proc.stderr, proc.stdout + proc.stderr
    assert_one_error(proc, "error: ingest: data.sources: no valid documents")
    assert good(project) == before, "DVC must not delete the outs (persist: true) nor lock the failed run"


def unprivileged() -> list[str]:
    """A command prefix under which folder permissions hold: none needed unless root, whom they do not stop."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: permissions cannot be enforced")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]


@pytest.mark.slow
def test_an_unwritable_data_folder_is_one_error_line(project):
    before, data = good(project), project / "data"
    prefix = unprivileged()
    mode = data.stat().st_mode
    data.chmod(0o555)
    try:
        proc = run_in(project, *prefix, sys.executable, "-m", "tasks.ingest", env=QUIET)
    finally:
        data.chmod(mode)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    # data/.staging exists already (earlier runs made it): the staged run succeeds, the swap's rename is refused
    line = assert_one_error(proc, "error: ingest: data/")
    assert line.endswith(
        ": permission denied: fix the permissions and rerun (data/ingest/ and metrics/ingest.json are unchanged)"
    ), line
    assert good(project) == before


def tiny_disk(folder: Path) -> list[str]:
    """A command prefix that runs with a 16 KiB tmpfs mounted on `folder` (a private mount namespace), or skip."""
    unshare = shutil.which("unshare")
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    mount = ["sh", "-c", f'mount -t tmpfs -o size=16k tmpfs "{folder}" && exec "$@"', "sh"]
    if not unshare or subprocess.run([unshare, *user, "--mount", *mount, "true"], capture_output=True).returncode:
        pytest.skip("no private mount namespace here: a full disk cannot be simulated")
    return [unshare, *user, "--mount", *mount]


@pytest.mark.slow
def test_a_full_disk_is_one_error_line_and_keeps_the_last_good_output(project):
    before = good(project)
    staging = project / "data" / ".staging"
    staging.mkdir(exist_ok=True)
    proc = run_in(project, *tiny_disk(staging), sys.executable, "-m", "tasks.ingest", env=QUIET)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = assert_one_error(proc, "error: ingest: no space left on device")
    assert line.endswith(": free some space and rerun (data/ingest/ and metrics/ingest.json are unchanged)"), line
    assert good(project) == before


@pytest.mark.slow
def test_after_the_failures_a_good_run_publishes_the_same_output(project):
    before = good(project)
    proc = run_in(project, sys.executable, "-m", "tasks.ingest", env=QUIET)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert good(project)[0] == before[0], "the same bytes, and nothing of the staging or failed folders inside"
    assert (
        list((project / "data" / ".staging").iterdir()) == [] and not (project / "data" / ".failed" / "ingest").exists()
    )
    status = run_in(project, "dvc", "status", "ingest", env=QUIET)
    # DVC agrees the data is the locked one (the metrics differ: `seconds`)
    assert status.returncode == 0 and "data/ingest" not in status.stdout, status.stdout + status.stderr


def test_every_dvc_out_is_persistent():
    """Without `persist: true` DVC deletes a stage's outs (metrics and plots too) before running its command."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, entry in stages.items():
        for kind in ("outs", "metrics", "plots"):
            for out in entry.get(kind, []):
                path, options = next(iter(out.items())) if isinstance(out, dict) else (out, {})
                assert (options or {}).get("persist") is True, f"{name}: {kind} {path} is not persist: true"
