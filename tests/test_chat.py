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


SLOW_CHAT = """
import importlib, sys, time
generate = importlib.import_module("model.generate")  # the module (model/__init__ exports a function of that name)
real = generate.stream
def slow(*args, **kwargs):  # the same tokens, 0.1 s apart: time for a Ctrl-C to land mid-reply
    for token in real(*args, **kwargs):
        time.sleep(0.1)
        yield token
generate.stream = slow
from flows.cli import main
sys.exit(main())
"""


def read_until(proc: subprocess.Popen, marker: bytes, seen: bytearray, timeout: float = 60) -> None:
    """Read proc's stdout into `seen` until `marker` appears in it (after what `seen` already held)."""
    import select
    import time

    start, deadline = len(seen), time.monotonic() + timeout
    while marker not in seen[start:]:
        assert time.monotonic() < deadline, f"no {marker!r} in {bytes(seen)!r}"
        if select.select([proc.stdout], [], [], 1)[0]:
            chunk = os.read(proc.stdout.fileno(), 4096)
            assert chunk, f"chat ended early: {bytes(seen)!r}"
            seen += chunk


def test_ctrl_c_stops_the_reply_and_the_chat_goes_on(folder, tmp_path):
    """A real SIGINT during a streamed reply, then at the prompt: no traceback, the conversation kept."""
    import signal

    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONIOENCODING": "utf-8"}
    args = ["chat", "--model", str(folder), "--max-new-tokens", "60"]
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_CHAT, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
        env=env,
    )
    seen = bytearray()
    try:
        read_until(proc, b"you> ", seen)
        proc.stdin.write(b"Tell me a long story.\n")
        proc.stdin.flush()
        read_until(proc, b"model> ", seen)
        while len(seen.split(b"model> ", 1)[1]) < 3:  # a few characters of the reply shown
            time_step(proc, seen)
        proc.send_signal(signal.SIGINT)
        read_until(proc, b"you> ", seen)
        proc.send_signal(signal.SIGINT)  # at the prompt: a fresh prompt, not an exit
        read_until(proc, b"you> ", seen)
        out, err = proc.communicate(b"And then?\n/exit\n", timeout=120)
    finally:
        proc.kill()
    text = (bytes(seen) + out).decode("utf-8")
    assert proc.returncode == 0 and "Traceback" not in err.decode(), err.decode()
    assert "(Ctrl-C stops a reply; /exit or Ctrl-D ends the chat)" in text
    assert text.rstrip().endswith("chat ended after 2 replies.")
    partial = text.split("model> ", 1)[1].split(" [stopped]", 1)[0]
    full = expected_reply(folder, [{"role": "user", "content": "Tell me a long story."}], seed=0, max_new_tokens=60)
    assert partial and full.startswith(partial) and len(partial) < len(full)  # stopped part way
    history = [
        {"role": "user", "content": "Tell me a long story."},
        {"role": "assistant", "content": partial},
        {"role": "user", "content": "And then?"},
    ]
    second = expected_reply(folder, history, seed=1, max_new_tokens=60)  # the stopped turn is in the conversation
    assert f"model> {second}\n" in text


def time_step(proc: subprocess.Popen, seen: bytearray) -> None:
    """Read whatever proc printed within 1 s into `seen`."""
    import select

    if select.select([proc.stdout], [], [], 1)[0]:
        seen += os.read(proc.stdout.fileno(), 4096)


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
