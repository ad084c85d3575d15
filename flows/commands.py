"""The CLI commands that drive what the pipeline produced: `scratchlm report`, `scratchlm chat`, `scratchlm promote`.

flows/cli.py imports this module (`load_extra_commands`), and each `command(...)` below adds a subcommand:

    scratchlm report [--regenerate] [--run PARENT_RUN_ID]   where the report card is (rebuilt on request)
    scratchlm chat [--model PATH_OR_URI] [--temperature T] [--max-new-tokens N] [--seed S] [--system TEXT]
                                                             a terminal chat, tokens streamed as they are decoded
                                                             (Ctrl-C stops a reply, the conversation goes on);
                                                             the model: models:/scratchlm@champion by default,
                                                             any models:/ or runs:/ URI, or an HF model folder
    scratchlm promote [--dry-run] [--name NAME]              the promotion flow (exit 1 when a gate refuses)
    scratchlm serve [--model PATH_OR_URI ...] [--port 8000]  an OpenAI-compatible API + chat/arena web page
                                                             (flows/serve.py, flows/arena.py)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from flows.cli import command
from tasks.common.config import ROOT, ScratchError
from tasks.common.registry import download_model

REPORT = ROOT / "reports" / "report.md"


# ------------------------------------------------------------------------------------------------ report


def cmd_report(args: argparse.Namespace) -> int:
    """Print where the report card is; --regenerate rebuilds it from metrics/*.json and MLflow first."""
    if args.regenerate:
        from tasks.common.report import build_report

        build_report(ROOT, parent_run_id=args.run)
    if not REPORT.is_file():
        print(
            f"error: no report card yet at {REPORT}: the evaluate stage writes it "
            f"(scratchlm run, or dvc repro evaluate), or build it from what exists: scratchlm report --regenerate",
            file=sys.stderr,
        )
        return 1
    plots = sorted(p.name for p in REPORT.parent.glob("*.png"))
    print(f"report   {REPORT}")
    print(f"plots    {', '.join(plots) or '(none)'}  in {REPORT.parent}/")
    from tasks.register import ui_command

    print(f"mlflow   artifacts `report/` of the latest `evaluate` run ({ui_command()} → experiment scratchlm)")
    return 0


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--regenerate", action="store_true", help="rebuild reports/ from metrics/*.json and MLflow")
    p.add_argument(
        "--run",
        metavar="PARENT_RUN_ID",
        help="take training curves from this pipeline run's stages (default: the latest run per stage)",
    )


# ------------------------------------------------------------------------------------------------ chat

DEFAULT_MODEL = "models:/scratchlm@champion"


def resolve_model(spec: str | None, workdir: Path) -> tuple[Path, str]:
    """(HF model folder, description) for an HF folder, a models:/ or runs:/ URI, or the default champion;
    a registered model is downloaded into `workdir`."""
    if spec and Path(spec).is_dir():
        if not (Path(spec) / "config.json").is_file():
            raise ScratchError(f"--model {spec}: not an exported model folder (no config.json)")
        return Path(spec), spec
    uri = spec or DEFAULT_MODEL
    if "://" not in uri and ":/" not in uri:
        raise ScratchError(f"--model {uri}: neither a folder nor a models:/ or runs:/ URI")
    try:
        return download_model(uri, workdir), uri
    except ScratchError:
        if spec:
            raise
        fallback = DEFAULT_MODEL.replace("@champion", "@challenger")
        print(f"(no @champion yet, chatting with {fallback}; `scratchlm promote` sets @champion)")
        return download_model(fallback, workdir), fallback


class ChatSession:
    """A conversation with one model: the history, and one streamed reply per user turn."""

    def __init__(
        self, folder: Path, system: str | None, temperature: float, top_p: float, max_new_tokens: int, seed: int
    ) -> None:
        from model.hf import load
        from tasks.common.alignment import load_tokenizer

        self.model, self.tok = load(folder), load_tokenizer(folder)
        self.system = [{"role": "system", "content": system}] if system else []
        self.history: list[dict] = []
        self.temperature, self.top_p, self.max_new_tokens, self.seed = temperature, top_p, max_new_tokens, seed
        self.turn = 0

    def prompt_ids(self) -> list[int]:
        """The conversation's ids ending in the generation prompt, the oldest turns dropped to leave room."""
        from tasks.common.chat import encode_chat

        room = self.model.cfg.max_seq_len - min(self.max_new_tokens, self.model.cfg.max_seq_len // 2)
        while True:
            ids, _ = encode_chat(self.tok.tok, self.system + self.history, add_generation_prompt=True)
            if len(ids) <= room or len(self.history) <= 1:
                return ids[-room:]  # a single over-long message keeps its end: the part being answered
            self.history = self.history[2:]

    def reply(self, text: str, write) -> str:
        """Stream the model's answer to `text` through write(str); returns the whole answer.

        Ctrl-C (KeyboardInterrupt) stops the answer where it is: what was shown stays in the conversation as the
        model's turn, ` [stopped]` marks it, and the chat goes on."""
        from model.generate import stream

        self.history.append({"role": "user", "content": text})
        ids = self.prompt_ids()
        budget = min(self.max_new_tokens, self.model.cfg.max_seq_len - len(ids))
        new: list[int] = []
        shown = ""
        try:
            for token in stream(
                self.model,
                ids,
                budget,
                temperature=self.temperature,
                top_p=self.top_p,
                stop_tokens=self.tok.stop_ids,
                seed=self.seed + self.turn,
            ):
                new.append(token)
                text_so_far = self.tok.decode(new)
                if text_so_far.endswith("\ufffd"):
                    continue  # half of a multi-byte character: wait for the rest
                write(text_so_far[len(shown) :])
                shown = text_so_far
            answer = self.tok.decode(new)
            write(answer[len(shown) :])
        except KeyboardInterrupt:
            answer = shown  # what the user saw (a half character left out)
            write(" [stopped]")
        self.history.append({"role": "assistant", "content": answer})
        self.turn += 1
        return answer


def cmd_chat(args: argparse.Namespace) -> int:
    """Chat with the model in the terminal, its reply streamed token by token (/reset clears, /exit or EOF ends)."""
    with tempfile.TemporaryDirectory(prefix="scratchlm-chat-") as workdir:
        folder, where = resolve_model(args.model, Path(workdir))
        session = ChatSession(folder, args.system, args.temperature, args.top_p, args.max_new_tokens, args.seed)
    return converse(session, where)


def converse(session: ChatSession, where: str) -> int:
    """The read-reply loop on stdin/stdout."""
    print(
        f"scratchlm chat: {where} ({session.model.num_params():,} parameters, context "
        f"{session.model.cfg.max_seq_len} tokens). /reset clears the conversation, /exit ends it, "
        f"Ctrl-C stops a reply.",
        flush=True,
    )

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    while True:
        try:
            write("you> ")
            line = sys.stdin.readline()
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh prompt, the conversation kept
            write("\n(Ctrl-C stops a reply; /exit or Ctrl-D ends the chat)\n")
            continue
        if not line:  # end of input (a script, or ctrl-D)
            write("\n")
            break
        text = line.strip()
        if not sys.stdin.isatty():
            write(text + "\n")  # echo scripted input so the transcript reads like a conversation
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            session.history.clear()
            write("(conversation cleared)\n")
            continue
        if not text:
            continue
        write("model> ")
        session.reply(text, write)
        write("\n")
    print(f"chat ended after {session.turn} replies.")
    return 0


def _chat_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        metavar="PATH_OR_URI",
        help=f"an HF model folder (e.g. data/dpo/model) or a models:/ or runs:/ URI (default: {DEFAULT_MODEL})",
    )
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature, 0 = greedy (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="longest reply in tokens (default 200)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed of the first reply (+1 per turn)")
    p.add_argument("--system", help="a system message that opens the conversation")


# ------------------------------------------------------------------------------------------------ promote


def cmd_promote(args: argparse.Namespace) -> int:
    """Move @champion to @challenger if the gates in params.yaml (promote:) pass; exit 1 when refused."""
    from flows.promote import promote

    outcome = promote(model_name=args.name, dry_run=args.dry_run)
    name, version = outcome["name"], outcome["challenger"]
    if outcome["failed"]:
        print(
            f"\nrefused: {name} v{version} failed gate(s) {', '.join(outcome['failed'])}; "
            f"@champion stays {outcome['champion_before'] or '(none)'}"
        )
        return 1
    if outcome["promoted"]:
        print(f"\npromoted: models:/{name}@champion is v{version}")
    elif outcome.get("already_champion"):
        print(f"\n{name} v{version} is already @champion")
    else:
        print(f"\ndry run: {name} v{version} passes every gate")
        return 0
    from tasks.register import activate_command, serve_command

    if activate := activate_command():
        print(f"first:    {activate}")
    print(f"serve:    {serve_command(f'models:/{name}@champion')}")
    return 0


def _promote_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true", help="check the gates only; move nothing")
    p.add_argument("--name", help="registered model name (default: register.model_name)")


# ------------------------------------------------------------------------------------------------ serve


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve models over an OpenAI-compatible HTTP API, with a chat and arena web page (Ctrl-C stops)."""
    import os

    from flows.serve import API_KEY_ENV, DEFAULT_MODELS, ServeConfig, serve_forever

    cfg = ServeConfig(
        models=tuple(args.model or DEFAULT_MODELS),
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        max_tokens=args.max_tokens,
        feedback_dir=Path(args.feedback),
        arena=tuple(args.arena.split(",")) if args.arena else (),
        dvc=not args.no_dvc,
    )
    return serve_forever(cfg, download_model)


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        action="append",
        metavar="PATH_OR_URI",
        help="a models:/ or runs:/ URI or an HF model folder, repeatable; the first is the default model "
        f"(default: {DEFAULT_MODEL} and @challenger, whichever exist)",
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default loopback; others need a key)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` (default: $SCRATCHLM_API_KEY, or none)")
    p.add_argument("--max-batch", type=int, default=16, help="most requests decoded together (default 16)")
    p.add_argument(
        "--batch-wait-ms",
        type=float,
        default=20.0,
        help="how long a batch smaller than the last one waits for more requests (default 20)",
    )
    p.add_argument("--max-tokens", type=int, default=256, help="new tokens when a request sets none (default 256)")
    p.add_argument("--feedback", default=str(ROOT / "feedback"), help="folder of the arena's preference files")
    p.add_argument("--arena", metavar="A,B", help="the two model ids the arena compares (default: the first two)")
    p.add_argument("--no-dvc", action="store_true", help="do not `dvc add` the arena's files when the server stops")


command("report", _report_args)(cmd_report)
command("chat", _chat_args)(cmd_chat)
command("promote", _promote_args)(cmd_promote)
command("serve", _serve_args)(cmd_serve)
