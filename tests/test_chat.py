"""`scratchlm chat`: a scripted terminal session (stdin) against a model folder and against the registry, replies
streamed token by token and equal to what generate() gives for the same conversation and seed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.evaluate_fixtures import registry_project, run_register, tiny_model, train_tokenizer

SCRATCHLM = [sys.executable, "-c", "import sys; from flows.cli import main; sys.exit(main())"]


def chat(args: list[str], stdin: str, cwd, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `scratchlm chat` on a script; stdout/stderr decoded as UTF-8 without newline translation (a random
    model's reply may hold a bare \r, which text mode would turn into \n)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONIOENCODING": "utf-8", **(env or {})}
    proc = subprocess.run(
        [*SCRATCHLM, "chat", *args], input=stdin.encode(), capture_output=True, timeout=120, cwd=cwd, env=full_env
    )
    return subprocess.CompletedProcess(
        proc.args, proc.returncode, proc.stdout.decode("utf-8"), proc.stderr.decode("utf-8")
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chat")
    return tiny_model(tmp / "model", train_tokenizer(tmp / "tokenizer"), seed=11)


def expected_reply(folder, history: list[dict], seed: int, max_new_tokens: int) -> str:
    from model.generate import generate
    from model.hf import load
    from tasks.common.alignment import load_tokenizer
    from tasks.common.chat import encode_chat

    model, tok = load(folder), load_tokenizer(folder)
    ids = encode_chat(tok.tok, history, add_generation_prompt=True)[0]
    return tok.decode(
        generate(model, [ids], max_new_tokens, temperature=0.7, top_p=0.95, stop_tokens=tok.stop_ids, seed=seed)[0]
    )


def test_scripted_session_with_a_folder(folder, tmp_path):
    script = "Hello there!\n\nTell me a story.\n/reset\nHi again.\n/exit\nnever read\n"
    proc = chat(["--model", str(folder), "--max-new-tokens", "16"], script, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert out.startswith(f"scratchlm chat: {folder} (") and "/reset clears the conversation" in out
    assert "you> Hello there!\nmodel> " in out and "(conversation cleared)" in out
    assert "never read" not in out and out.rstrip().endswith("chat ended after 3 replies.")
    first = expected_reply(folder, [{"role": "user", "content": "Hello there!"}], seed=0, max_new_tokens=16)
    assert f"model> {first}\n" in out
    second = expected_reply(
        folder,
        [
            {"role": "user", "content": "Hello there!"},
            {"role": "assistant", "content": first},
            {"role": "user", "content": "Tell me a story."},
        ],
        seed=1,
        max_new_tokens=16,
    )
    assert f"model> {second}\n" in out
    after_reset = expected_reply(folder, [{"role": "user", "content": "Hi again."}], seed=2, max_new_tokens=16)
    assert f"you> Hi again.\nmodel> {after_reset}\n" in out


def test_streamed_pieces_add_up_and_history_is_trimmed(folder):
    from flows.commands import ChatSession

    session = ChatSession(folder, "Be brief.", temperature=0.7, top_p=0.95, max_new_tokens=300, seed=0)
    pieces: list[str] = []
    answer = session.reply("Hi!", pieces.append)
    assert "".join(pieces) == answer and len(pieces) >= 1
    for _ in range(40):  # a long conversation: the oldest turns go, the system message stays
        session.history += [{"role": "user", "content": "word " * 20}, {"role": "assistant", "content": "ok " * 20}]
    ids = session.prompt_ids()
    assert len(ids) <= session.model.cfg.max_seq_len - 256  # room for min(300, context/2) new tokens
    assert session.history[-1]["content"].startswith("ok") and len(session.history) < 81


def test_end_of_input_ends_the_chat(folder, tmp_path):
    proc = chat(["--model", str(folder), "--max-new-tokens", "4"], "One question\n", tmp_path)
    assert proc.returncode == 0 and "chat ended after 1 replies." in proc.stdout


def test_chat_with_the_registry_falls_back_to_the_challenger(tmp_path, monkeypatch):
    root = registry_project(tmp_path, monkeypatch)
    run_register(root)
    env = {"MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"]}
    proc = chat(["--max-new-tokens", "8"], "Hello!\n", tmp_path, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "(no @champion yet, chatting with models:/scratchlm@challenger" in proc.stdout
    assert "scratchlm chat: models:/scratchlm@challenger" in proc.stdout and "you> Hello!\nmodel> " in proc.stdout
    expected = expected_reply(root / "data/dpo/model", [{"role": "user", "content": "Hello!"}], 0, 8)
    assert f"model> {expected}\n" in proc.stdout
    missing = chat(["--model", "models:/nosuch@champion"], "", tmp_path, env)
    assert missing.returncode == 2 and "error: models:/nosuch@champion: cannot be loaded" in missing.stderr
