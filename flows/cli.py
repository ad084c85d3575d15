"""`scratchlm` — the command line. `scratchlm --help` lists every command."""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator

from tasks.common.config import ROOT, ScratchError, params_file


def cmd_run(args: argparse.Namespace) -> int:
    """Run the pipeline flow (all stages, or --stages) and summarise what ran and where it went."""
    from flows.pipeline import StageFailed, build_llm, parse_overrides, project_lock

    started = time.perf_counter()
    # the project is this run's until it ends, taken before params.yaml is touched: a second run is refused at once;
    # build_llm takes it again (re-entrant) for its other callers (python -m flows.pipeline, a Prefect deployment)
    with project_lock(command_line(args)), terminate_as_interrupt():
        overrides = parse_overrides(args.set or [])
        try:
            result = build_llm(
                stages=args.stages.split(",") if args.stages else None, overrides=overrides, force=args.force
            )
        except StageFailed as e:
            print(f"\nerror: {str(e).removeprefix('error: ')}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"\nerror: interrupted; {params_file().name} is as it was before the run", file=sys.stderr)
            return 130
    print_run_summary(result, time.perf_counter() - started)
    return 0


def command_line(args: argparse.Namespace) -> str:
    """The command as the user typed it, for the lock file (`scratchlm run --stages ingest --set ...`)."""
    argv = getattr(args, "argv", None)
    return shlex.join(["scratchlm", *argv]) if argv is not None else shlex.join(["scratchlm", *sys.argv[1:]])


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (`kill <pid>`) ends the block as Ctrl-C does, so the run unwinds: params.yaml restored, lock freed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"terminated by signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def print_run_summary(result: dict, seconds: float) -> None:
    print(f"\n══ scratchlm run finished in {seconds:.0f}s " + "═" * 40)
    print(f"  ran      {', '.join(result['ran']) or '(nothing: every stage was up to date)'}")
    print(f"  skipped  {', '.join(result['skipped']) or '(none)'}  ← DVC found these up to date")
    print(
        f"  outputs  {ROOT / 'data'}/<stage>/   metrics: {ROOT / 'metrics'}/<stage>.json (headline), all/<stage>.json"
    )
    if result["parent_run_id"]:
        print(f"  mlflow   parent run {result['parent_run_id']} in {result['tracking_uri']}")
    else:
        print(
            f"  mlflow   no new run: nothing ran, so nothing was logged (the last runs are in {result['tracking_uri']})"
        )
    if result["tracking_uri"].startswith("sqlite"):
        from tasks.register import ui_command

        print(f"           browse: {ui_command()}")
    for line in next_steps():
        print(f"  {line}")


def next_steps() -> list[str]:
    """Pointers to what the pipeline produced that a user acts on next (report, then chat / serve / promote the
    registered model), each command pasteable into a fresh shell in the project folder."""
    lines = []
    if (ROOT / "reports" / "report.md").is_file():
        lines.append(f"report   {ROOT / 'reports' / 'report.md'}")
    record = registered_record()
    if record:
        from tasks.register import next_command_lines

        lines += next_command_lines(record)
    return lines


def registered_record() -> dict | None:
    """data/register/registered.json (the version the register stage made), or None when absent or unreadable."""
    import json

    try:
        record = json.loads((ROOT / "data" / "register" / "registered.json").read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("model_uri"), str) else None


def cmd_stage(args: argparse.Namespace) -> int:
    """Run one stage through `dvc repro --single-item` (no Prefect), streaming its output."""
    from flows.pipeline import StageFailed, project_lock, run_dvc_stage, select_stages

    with project_lock(command_line(args)):  # a stage run by hand during a `scratchlm run` would mix with it
        stage = select_stages([args.name])[0]
        try:
            result = run_dvc_stage(stage, force=args.force, log=print)
        except StageFailed as e:
            print(f"\nerror: {str(e).removeprefix('error: ')}", file=sys.stderr)
            return 1
    verb = "ran" if result.ran else "skipped (up to date; --force to rerun)"
    print(f"\n{stage}: {verb} in {result.seconds:.1f}s; outputs in data/{stage}/, metrics in metrics/{stage}.json")
    return 0


def cmd_params(args: argparse.Namespace) -> int:
    """Print every params.yaml key with its type, current value (and default where it differs) and documentation;
    --check only validates."""
    from tasks.common.params_check import knobs, load_all

    sections = load_all()
    if args.check:
        print(f"{params_file().name}: valid")
        return 0
    print(f"{params_file()}: the value in force; `(default X)` where it is not the default")
    for name in sections:
        rows = knobs(name, sections)
        values = [f"{r.value} (default {r.default})" if r.changed else r.value for r in rows]
        width, vwidth = min(max(len(r.key) for r in rows), 44), min(max(map(len, values)), 24)
        print(f"\n[{name}]")
        for r, value in zip(rows, values):
            print(f"  {r.key:<{width}} {r.type:<8} {value:<{vwidth}}  {r.doc}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Which stages are stale (`dvc status`)."""
    import subprocess

    return subprocess.call([os.path.join(os.path.dirname(sys.executable), "dvc"), "status"], cwd=ROOT)


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], Callable[[argparse.ArgumentParser], None]]] = {}


def command(name: str, add_args: Callable[[argparse.ArgumentParser], None] = lambda p: None):
    def register(fn):
        COMMANDS[name] = (fn, add_args)
        return fn

    return register


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stages", help="comma-separated subset of stages (default: all, in dvc.yaml order)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a params.yaml key, e.g. --set pretrain.train.max_tokens=1000000 (repeatable)",
    )
    p.add_argument("--force", action="store_true", help="rerun the selected stages even if up to date")


def _stage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="stage name from dvc.yaml")
    p.add_argument("--force", action="store_true", help="rerun even if up to date")


command("run", _run_args)(cmd_run)
command("stage", _stage_args)(cmd_stage)
command("params", lambda p: p.add_argument("--check", action="store_true", help="only validate"))(cmd_params)
command("status")(cmd_status)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scratchlm",
        description="Build a Llama-style LM from raw text: "
        "Prefect flow → dvc repro per stage → MLflow runs and registry.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (fn, add_args) in COMMANDS.items():
        p = sub.add_parser(name, help=(fn.__doc__ or "").strip().splitlines()[0], description=fn.__doc__)
        add_args(p)
        p.set_defaults(fn=fn)
    return parser


def load_extra_commands() -> None:
    """Commands defined next to the code they drive (report, chat, ...) register themselves on import."""
    import importlib

    for module in ("flows.commands",):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    load_extra_commands()
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.fn(args)
    except ScratchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # run through the importable module, so commands registered by flows.commands land in the same registry
    from flows.cli import main as cli_main

    sys.exit(cli_main())
