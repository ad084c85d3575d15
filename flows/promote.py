"""promote — the Prefect flow that moves `@champion` to the `@challenger` only when the gates pass.

Runbook
    scratchlm promote                         # check the gates, move @champion if they all pass (exit 1 if not)
    scratchlm promote --dry-run               # only say what would happen
    python -m flows.promote                   # the same flow without the CLI
    prefect deployment run promote/...        # from a deployment, e.g. after build_llm

What happens
    1. the challenger (`models:/<name>@challenger`, set by the register stage) and the current champion are read
       from the MLflow model registry by alias (aliases only: the deprecated registry stages are never used);
    2. the gates in params.yaml (`promote:` section, tasks/common/promotion.py) are checked against the versions'
       `eval.*` tags: bits per byte at most X, constraint satisfaction at least Y, no benchmark worse than the
       champion's by more than Z (and, if set, reward-model win rates), and the degeneration of the answers to the
       held-out prompts: fluency under the base model, repeated lines, made-up words, distinct-2;
    3. all pass → `@champion` moves to the challenger (the old champion keeps `@previous_champion` for a roll
       back); any fails → nothing moves and the flow says which gate failed and why. Either way the verdict is
       tagged on the challenger version (`promotion`, `promotion.<gate>`).
Serving follows the alias: `MLFLOW_TRACKING_URI=sqlite:///mlruns.db mlflow models serve -m
models:/scratchlm@champion --env-manager local -p 5001` (`scratchlm promote` prints it for this project's store).
"""

from __future__ import annotations

import datetime as dt
import sys
from dataclasses import asdict

from prefect import flow

from tasks.common.config import ScratchError, load_section
from tasks.common.promotion import Gate, PromoteConfig, check_gates

CHALLENGER, CHAMPION, PREVIOUS = "challenger", "champion", "previous_champion"


def version_by_alias(client, name: str, alias: str):
    """The version holding `alias`, or None when no version has it."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def eval_metrics(version) -> dict[str, float]:
    """The `eval.*` tags the register stage put on a version, as numbers (prefix dropped)."""
    out = {}
    for key, value in (version.tags or {}).items():
        if key.startswith("eval."):
            try:
                out[key.removeprefix("eval.")] = float(value)
            except ValueError:
                continue
    return out


def print_verdict(name: str, challenger, champion, gates: list[Gate], promoted: bool, dry_run: bool) -> None:
    print(
        f"promote: {name} v{challenger.version} (@{CHALLENGER}) vs "
        + (f"v{champion.version} (@{CHAMPION})" if champion else "no champion yet")
    )
    for g in gates:
        print(f"  {'pass' if g.passed else 'FAIL'}  {g.name:<22} {g.detail}")
    failed = [g.name for g in gates if not g.passed]
    if failed:
        print(f"  refused: gate{'s' if len(failed) > 1 else ''} {', '.join(failed)} failed; @{CHAMPION} unchanged")
    elif dry_run:
        print(f"  dry run: every gate passes; @{CHAMPION} would move to v{challenger.version}")
    elif promoted:
        print(
            f"  promoted: models:/{name}@{CHAMPION} is now v{challenger.version}"
            + (f" (v{champion.version} is @{PREVIOUS})" if champion else "")
        )
    sys.stdout.flush()


@flow(name="promote", log_prints=True)
def promote(model_name: str | None = None, dry_run: bool = False) -> dict:
    """Move @champion to @challenger when every gate of params.yaml's `promote:` section passes.

    model_name: registered model (default: register.model_name); dry_run: check the gates, move nothing.
    Returns {promoted, name, challenger, champion_before, gates: [{name, passed, detail}], failed: [gate names]}.
    """
    from tasks.common.tracking import setup_mlflow

    cfg = load_section("promote", PromoteConfig)
    name = model_name or load_section("register").model_name
    client = setup_mlflow().MlflowClient()
    challenger = version_by_alias(client, name, CHALLENGER)
    if challenger is None:
        raise ScratchError(
            f"models:/{name}@{CHALLENGER} does not exist; run the register stage first (dvc repro register)"
        )
    champion = version_by_alias(client, name, CHAMPION)
    result = {
        "name": name,
        "challenger": int(challenger.version),
        "champion_before": int(champion.version) if champion else None,
    }
    if champion is not None and champion.version == challenger.version:
        print(f"promote: {name} v{challenger.version} is already @{CHAMPION}; nothing to do")
        return {**result, "promoted": False, "gates": [], "failed": [], "already_champion": True}
    label = challenger.tags.get("eval_label", "")
    gates = check_gates(cfg, eval_metrics(challenger), eval_metrics(champion) if champion else None, label)
    failed = [g.name for g in gates if not g.passed]
    promoted = not failed and not dry_run
    if promoted:
        if champion is not None:
            client.set_registered_model_alias(name, PREVIOUS, champion.version)
        client.set_registered_model_alias(name, CHAMPION, challenger.version)
    if not dry_run:
        tag_verdict(client, name, challenger.version, gates, failed)
    print_verdict(name, challenger, champion, gates, promoted, dry_run)
    return {**result, "promoted": promoted, "gates": [asdict(g) for g in gates], "failed": failed}


def tag_verdict(client, name: str, version: str, gates: list[Gate], failed: list[str]) -> None:
    verdict = "promoted" if not failed else f"refused: {', '.join(failed)}"
    client.set_model_version_tag(name, version, "promotion", verdict)
    client.set_model_version_tag(name, version, "promotion.checked_at", dt.datetime.now(dt.UTC).isoformat())
    for g in gates:
        verdict = ("pass: " if g.passed else "FAIL: ") + g.detail
        client.set_model_version_tag(name, version, f"promotion.{g.name}", verdict)


if __name__ == "__main__":
    outcome = promote()
    sys.exit(0 if outcome["promoted"] or outcome.get("already_champion") else 1)
