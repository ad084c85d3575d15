"""The Prefect side of scratchlm: the flows (pipeline.py, promote.py) and the `scratchlm` command (cli.py).

Prefect reads its settings from the environment when it is first imported, and every flow module imports it
through this package, so the project's Prefect defaults are set here, once, however a flow is started
(`scratchlm`, `python -m flows.promote`, `make run`, a test): the same ones the Makefile exports. A variable the
user has set wins; an API URL (a Prefect server, docs/SCALE.md) makes the local ones moot.
"""

from __future__ import annotations

import os
from pathlib import Path

PREFECT_DEFAULTS = {
    # Prefect's local state (the ephemeral server's SQLite database) in the project, not in ~/.prefect, where
    # another checkout's or tool's server would share (and lock) the same database
    "PREFECT_HOME": str(Path(__file__).resolve().parents[1] / ".prefect"),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # the ephemeral server's 20 s default start-up budget is too short on a busy 2-core machine
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


def apply_prefect_defaults(environ: dict[str, str] | os._Environ = os.environ) -> dict[str, str]:
    """Set each of PREFECT_DEFAULTS the environment lacks (or has empty); returns the ones it set."""
    added = {k: v for k, v in PREFECT_DEFAULTS.items() if not environ.get(k)}
    environ.update(added)
    return added


apply_prefect_defaults()
