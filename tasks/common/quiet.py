"""What a run's output leaves out: messages known to be harmless, each named below with why. Everything else stays.

    keep = HarmlessLines()
    for line in stage_output:
        if (shown := keep(line)) is not None:
            log(shown)

The flow streams every stage's output into its log line by line (flows/pipeline.py: run_dvc_stage, so `make run`,
`scratchlm run` and `scratchlm stage`) and drops what `HARMLESS` recognises:
- DVC's advice after each stage ("To track the changes with git, run: git add dvc.lock", "To enable auto staging,
  run: dvc config core.autostage true", "Use `dvc push` to send your updates to remote storage."): dvc.lock is
  committed when the user chooses to, and there is no DVC remote by default; 5 lines a stage, 55 a run;
- DeepSpeed's launcher on one machine: "Unable to find hostfile, will proceed with training with local resources
  only" (once per training stage): a multi-node run names its hostfile (docs/SCALE.md), a local one needs none;
- MLflow's nudge "Add type hints to the `predict` method to enable data validation ..." (a UserWarning and the
  source line Python prints under it, from the register stage): the registered model's signature validates its
  inputs (tasks/register.py), and type hints on predict would be read as a second, narrower schema.
ANSI colour codes are stripped from the lines that stay: the log is Prefect's, a file or CI's, not a terminal.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Harmless:
    """A message known to be harmless: its name (for the count), the line's pattern, and the pattern of a line
    under it that belongs to it (a warning's source line), if any."""

    name: str
    line: re.Pattern[str]
    then: re.Pattern[str] | None = None


HARMLESS: tuple[Harmless, ...] = (
    Harmless(
        "dvc: git add advice", re.compile(r"^To track the changes with git, run:$"), then=re.compile(r"^\s*git add ")
    ),
    Harmless(
        "dvc: autostage advice",
        re.compile(r"^To enable auto staging, run:$"),
        then=re.compile(r"^\s*dvc config core\.autostage true$"),
    ),
    Harmless("dvc: push advice", re.compile(r"^Use `dvc push` to send your updates to remote storage\.$")),
    Harmless(
        "deepspeed: no hostfile on one machine",
        re.compile(r"\[WARNING\].*fetch_hostfile\] Unable to find hostfile, will proceed with training with local"),
    ),
    Harmless(
        "mlflow: type hints on predict",
        re.compile(r"UserWarning: .*Add type hints to the `predict` method"),
        then=re.compile(r"^\s+color_warning\($"),
    ),
)

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@dataclass
class HarmlessLines:
    """A line filter: returns the line without colour codes, or None for a harmless one; counts what it drops."""

    rules: tuple[Harmless, ...] = HARMLESS
    dropped: Counter[str] = field(default_factory=Counter)
    _pending: Harmless | None = None  # the rule whose follow-up line may come next

    def __call__(self, line: str) -> str | None:
        line = ANSI.sub("", line)
        if not line.strip() and self._pending is not None:
            return None  # the blank line between a message and its follow-up
        pending, self._pending = self._pending, None
        if pending is not None and pending.then is not None and pending.then.search(line):
            return None
        for rule in self.rules:
            if rule.line.search(line):
                self.dropped[rule.name] += 1
                self._pending = rule
                return None
        return line
