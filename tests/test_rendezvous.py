"""The rendezvous of a one-host training job stays on loopback (issue 16, item 6): with 2 ranks, torch's TCPStore
would otherwise listen on every interface (*:MASTER_PORT). The listening sockets of a running 2-rank job are read
from /proc (Linux), then the killed job resumes on 2 ranks (the checkpoint choice broadcast, ZeRO-2 shards
verified and loaded with weights_only=True)."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import time
from pathlib import Path

import pytest

from tasks.common.distributed import LOOPBACK, WORKER_FLAG, launch_command, loopback_master
from tests.test_pretrain import build_token_data, make_project, run_pretrain, start_pretrain
from tests.test_trainer import train_cfg


def test_one_host_rendezvous_is_loopback_and_a_hostfile_keeps_torchs_default(tmp_path, monkeypatch):
    cmd, _ = launch_command("tasks.pretrain", train_cfg(ranks=2), root=tmp_path)
    assert cmd[cmd.index("--master_addr") + 1] == LOOPBACK and cmd[-1] == WORKER_FLAG
    (tmp_path / "hosts").write_text("node-a slots=2\nnode-b slots=2\n")
    cmd, _ = launch_command("tasks.pretrain", train_cfg(hostfile="hosts", batch_size=16), root=tmp_path)
    assert "--master_addr" not in cmd  # the launcher picks the first host's address, which others must reach
    for address, want in (
        ("127.0.0.1", "127.0.0.1"),
        ("127.0.1.1", "127.0.1.1"),
        ("::1", "::1"),
        ("localhost", "127.0.0.1"),
        ("10.0.0.5", None),
        ("node-a", None),
        ("", None),
    ):
        monkeypatch.setenv("MASTER_ADDR", address)
        assert loopback_master() == want, address


def session_pids(session: int) -> list[int]:
    """Every process of the session `session` (the job's launcher, DeepSpeed's launcher and the ranks)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # ended meanwhile
            if int(fields[3]) == session:
                pids.append(int(entry.name))
    return pids


def listening(pids: list[int]) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every listening TCP socket (IPv4 and IPv6) the processes `pids` hold."""
    owner = {}
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                owner[target[8:-1]] = pid
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in owner:  # 0A: LISTEN
                continue
            hex_address, hex_port = fields[1].split(":")
            raw = b"".join(bytes.fromhex(hex_address[i : i + 8])[::-1] for i in range(0, len(hex_address), 8))
            found.append((str(ipaddress.ip_address(raw)), int(hex_port, 16), owner[fields[9]]))
    return found


def logged_step(project: Path) -> int:
    files = list((project / "checkpoints" / "pretrain").glob("*/history.jsonl"))
    rows = [json.loads(line) for line in files[0].read_text().splitlines()] if files else []
    return max((r["step"] for r in rows), default=0)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/net/tcp").is_file(), reason="reads listening sockets from Linux's /proc")
def test_two_rank_job_listens_on_loopback_only_and_resumes(tmp_path):
    data = build_token_data(tmp_path / "data", n_docs=400)
    train = {"ranks": 2, "zero_stage": 2, "max_steps": 10, "checkpoint_every": 5}
    project = make_project(tmp_path / "job", data, {"train": train})
    proc = start_pretrain(project, SCRATCHLM_NO_MLFLOW="1", SCRATCHLM_TEST_HANG_STEP="6")
    try:
        deadline = time.monotonic() + 240
        while logged_step(project) < 6:  # checkpoint 5 written; rank 0 stops dead after step 6, rank 1 waits on it
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the run never reached step 6"
            time.sleep(0.2)
        pids = session_pids(proc.pid)
        commands = {p: Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0") for p in pids}
        workers = [p for p, c in commands.items() if c[-2:] == [WORKER_FLAG.encode(), b""] and b"--module" not in c]
        assert len(workers) == 2, commands
        environ = dict(
            item.split(b"=", 1)
            for item in Path(f"/proc/{workers[0]}/environ").read_bytes().split(b"\0")
            if b"=" in item
        )
        port = int(environ[b"MASTER_PORT"])
        sockets = listening(pids)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert (LOOPBACK, port) in [(address, p) for address, p, _ in sockets], sockets  # the store, where it should be
    assert all(ipaddress.ip_address(address).is_loopback for address, _, _ in sockets), sockets  # nothing on * or a NIC

    rerun = run_pretrain(project, SCRATCHLM_NO_MLFLOW="1")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "resumed from step 5" in rerun.stdout
    metrics = json.loads((project / "metrics" / "all" / "pretrain.json").read_text())
    assert (metrics["world_size"], metrics["resumed_from_step"], metrics["zero_stage"]) == (2, 5, 2)
