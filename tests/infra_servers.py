"""Real servers for the infra/scale tests, started the way docs/SCALE.md tells a user to start them.

Every server binds 127.0.0.1 on a free port, is waited for with a bounded wait, and is always stopped (its whole
process group, SIGTERM then SIGKILL) when the `running(...)` block ends; a server that fails to come up raises with
the tail of its log, so a broken start-up reads as the server's own error message.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port nobody listens on right now, on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tool_env(**extra: str) -> dict[str, str]:
    """The environment for the project's command line tools: this venv first on PATH, no stray Prefect/MLflow
    server from the caller's shell, no progress bars."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_", "MLFLOW_TRACKING_"))}
    env.update(
        {
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
            "SCRATCHLM_PROGRESS": "off",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


def http_ok(url: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    return check


def port_open(port: int) -> Callable[[], bool]:
    def check() -> bool:
        with socket.socket() as s:
            s.settimeout(1)
            return s.connect_ex(("127.0.0.1", port)) == 0

    return check


@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    log: Path
    url: str = ""

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_until(self, ready: Callable[[], bool], timeout: float) -> None:
        """Poll `ready` until it holds; raise with the log tail if the process dies or time runs out."""
        deadline = time.monotonic() + timeout
        while not ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} not ready after {timeout:.0f}s:\n{self.tail()}")
            time.sleep(0.3)

    def stop(self) -> None:
        """SIGTERM to the whole process group (servers fork workers), SIGKILL after 3 s."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        else:  # the leader is gone; its children may not be
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)


def start(
    name: str, cmd: list[str], log_dir: Path, cwd: Path | None = None, env: dict | None = None, url: str = ""
) -> Server:
    """Start `cmd` in its own process group, output to `<log_dir>/<name>.log`."""
    log = log_dir / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env or tool_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return Server(name, proc, log, url)


@contextlib.contextmanager
def running(*servers: Server) -> Iterator[tuple[Server, ...]]:
    """Stop every server on leaving the block, whatever happened inside it."""
    try:
        yield servers
    finally:
        for server in reversed(servers):
            server.stop()


# ------------------------------------------------------------------------------------------------ the servers


def prefect_server(home: Path, log_dir: Path) -> Server:
    """`prefect server start` on 127.0.0.1 with its own PREFECT_HOME (database); wait with `.wait_until(...)`."""
    port = free_port()
    env = tool_env(PREFECT_HOME=str(home), PREFECT_SERVER_LOGGING_LEVEL="WARNING")
    server = start(
        "prefect-server",
        [str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
        log_dir,
        env=env,
        url=f"http://127.0.0.1:{port}/api",
    )
    return server


def mlflow_server(store: Path, log_dir: Path) -> Server:
    """`mlflow server` on 127.0.0.1 with a SQLite backend store (tracking and registry) and proxied artifacts."""
    port = free_port()
    store.mkdir(parents=True, exist_ok=True)
    cmd = [
        str(VENV_BIN / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{store / 'mlflow.db'}",
        "--artifacts-destination",
        str(store / "artifacts"),
    ]
    return start("mlflow-server", cmd, log_dir, cwd=store, url=f"http://127.0.0.1:{port}")


def redis_server(log_dir: Path) -> Server:
    """A throwaway `redis-server` on 127.0.0.1: no persistence, no protected-mode surprises."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise FileNotFoundError("redis-server")
    port = free_port()
    cmd = [
        binary,
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(log_dir),
    ]
    return start("redis-server", cmd, log_dir, url=f"redis://127.0.0.1:{port}")
