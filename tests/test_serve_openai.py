"""`scratchlm serve` as an OpenAI-compatible server, used through the official `openai` client the way a user would:
models.list, chat.completions (plain and streamed), completions; usage counted with the model's tokenizer, stop
strings and stop tokens honoured, seeded sampling reproducible (alone, batched, and equal to the registered pyfunc's
text), malformed requests refused with 4xx JSON, the API key, and the command itself on a registered alias."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from flows.serve import Detokenizer, ServeConfig
from tasks.common.config import ConfigError
from tests.serve_fixtures import serve_world, serving

CHAT = [{"role": "user", "content": "Write a short story about a cat named Tom who goes to the park."}]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return serve_world(tmp_path_factory)


@pytest.fixture(scope="module")
def running(world, tmp_path_factory):
    with serving(world, tmp_path_factory.mktemp("feedback")) as running:
        yield running


@pytest.fixture(scope="module")
def client(running) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{running.url}/v1", api_key="not-needed-on-loopback", max_retries=0)


def champion(running):
    return next(iter(running.server.engines.values()))


def test_stream_rows_draws_each_seeded_row_as_it_would_alone(world):
    from model.generate import Sampling, generate, stream_rows
    from model.hf import load

    model = load(world / "champion")
    prompts = [[0, 10, 11, 12, 13], [0, 20], [0, 30, 31]]
    samplings = [Sampling(1.0, None, 0.9, 7), Sampling(0.0, None, None, None), Sampling(0.7, 5, None, 3)]
    steps = stream_rows(model, prompts, 12, samplings)
    batched = torch.stack(list(steps), dim=1).tolist()  # (B, 12)
    for prompt, s, row in zip(prompts, samplings, batched):
        alone = generate(model, [prompt], 12, s.temperature, s.top_k, s.top_p, seed=s.seed)[0]
        assert row == alone
    with pytest.raises(ValueError, match="2 samplings"):
        stream_rows(model, prompts, 4, samplings[:2])


def test_detokenizer_holds_back_what_may_become_a_stop_string(world):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(world / "tokenizer" / "tokenizer.json"))
    ids = tok.encode("The cat sat. Then it ran home.", add_special_tokens=False).ids
    text = Detokenizer(tok, ["ran"])
    shown, stopped = "", False
    for t in ids:
        delta, stopped = text.push(t)
        shown += delta
        assert not shown.endswith("r") or stopped  # "r" may start "ran": never shown before the next token
        if stopped:
            break
    assert stopped and shown == "The cat sat. Then it "
    plain = Detokenizer(tok, [])
    assert "".join(plain.push(t)[0] for t in ids) + plain.finish() == tok.decode(ids)


def test_models_and_chat_completion_match_the_tokenizer_and_the_pyfunc(running, client):
    from transformers import AutoTokenizer

    engine = champion(running)
    assert [m.id for m in client.models.list()] == list(running.server.engines)
    reply = client.chat.completions.create(model=engine.id, messages=CHAT, max_tokens=40, temperature=0.9, seed=5)
    text = reply.choices[0].message.content
    assert (
        reply.object == "chat.completion" and reply.model == engine.id and reply.choices[0].message.role == "assistant"
    )
    # the prompt is the chat template of the model's own tokenizer (tokenizer_config.json), as transformers renders it
    hf_ids = AutoTokenizer.from_pretrained(engine.folder).apply_chat_template(CHAT, add_generation_prompt=True)
    hf_ids = hf_ids["input_ids"] if hasattr(hf_ids, "keys") else hf_ids
    assert reply.usage.prompt_tokens == len(hf_ids)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    # the served text is the registered pyfunc's for the same settings (same loading, same generation)
    params = {"max_new_tokens": 40, "temperature": 0.9, "top_p": 1.0, "seed": 5}
    assert text == engine.pyfunc.generate_row({"messages": CHAT}, params)
    new_ids = engine.pyfunc.tokenizer.encode(text, add_special_tokens=False).ids
    if reply.choices[0].finish_reason == "length":
        assert reply.usage.completion_tokens == 40
    else:  # ended by <|end|>: the reply re-encodes to (about) the tokens generated
        assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens < 40
        assert abs(len(new_ids) - reply.usage.completion_tokens) <= 2
    again = client.chat.completions.create(model=engine.id, messages=CHAT, max_tokens=40, temperature=0.9, seed=5)
    other = client.chat.completions.create(model=engine.id, messages=CHAT, max_tokens=40, temperature=0.9, seed=6)
    assert again.choices[0].message.content == text and other.choices[0].message.content != text


def test_a_trained_reply_ends_at_its_end_token(running, client):
    kwargs = dict(messages=CHAT, model=champion(running).id, max_tokens=200, temperature=0.8, seed=1)
    replies = client.chat.completions.create(**kwargs, n=8)
    ended = [c for c in replies.choices if c.finish_reason == "stop"]
    assert len(ended) >= 4, [c.finish_reason for c in replies.choices]  # the model learned to close its turn
    assert all("<|end|>" not in c.message.content for c in replies.choices)
    assert replies.usage.completion_tokens < 8 * 200


def test_streamed_chat_is_the_same_reply_chunk_by_chunk(running, client):
    engine = champion(running)
    kwargs = dict(model=engine.id, messages=CHAT, max_tokens=30, temperature=0.8, top_p=0.95, seed=11)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert chunks[0].choices[0].delta.role == "assistant" and len([p for p in pieces if p]) > 3  # token by token
    assert "".join(pieces) == whole.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_stop_strings_end_the_text_before_them(running, client):
    engine = champion(running)
    kwargs = dict(model=engine.id, messages=CHAT, max_tokens=60, temperature=0)
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    words = full.split()
    stop = next(w for w in words[3:] if len(w) > 3)
    cut = full[: full.find(stop)]
    stopped = client.chat.completions.create(**kwargs, stop=[stop, "never-in-a-story"])
    assert stopped.choices[0].message.content == cut and stopped.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(**kwargs, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == cut


def test_completions_of_several_prompts_and_choices(running, client):
    engine = champion(running)
    tok = engine.pyfunc.tokenizer
    prompts = ["Once upon a time", "Mia went to the park."]
    out = client.completions.create(model=engine.id, prompt=prompts, max_tokens=24, temperature=0.8, seed=2, n=2)
    assert [c.index for c in out.choices] == [0, 1, 2, 3] and out.object == "text_completion"
    # a prompt is read as a document: <|endoftext|> first, then its tokens
    assert out.usage.prompt_tokens == sum(1 + len(tok.encode(p, add_special_tokens=False).ids) for p in prompts)
    assert out.choices[0].text != out.choices[1].text  # choice c is seeded seed + c
    single = client.completions.create(model=engine.id, prompt=prompts[1], max_tokens=24, temperature=0.8, seed=3)
    assert single.choices[0].text == out.choices[3].text
    kwargs = dict(model=engine.id, prompt="Once upon a time", max_tokens=200, temperature=0.8, seed=4, n=4)
    sampled = client.completions.create(**kwargs)
    assert "stop" in [c.finish_reason for c in sampled.choices]  # a story ends with <|endoftext|>
    streamed = {i: "" for i in range(4)}
    for chunk in client.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert [streamed[i] for i in range(4)] == [c.text for c in sampled.choices]


def test_concurrent_requests_are_batched_and_get_their_own_text(running, client):
    engine = champion(running)
    seeds = list(range(20, 28))

    def ask(seed: int) -> str:
        r = client.chat.completions.create(model=engine.id, messages=CHAT, max_tokens=24, temperature=1.0, seed=seed)
        return r.choices[0].message.content

    alone = {s: ask(s) for s in seeds}
    before = dict(engine.stats)
    together: dict[int, str] = {}
    threads = [threading.Thread(target=lambda s=s: together.__setitem__(s, ask(s))) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone
    batches, rows = (engine.stats[k] - before[k] for k in ("batches", "rows"))
    assert rows == len(seeds) and batches < len(seeds)  # some of them shared a batch


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"model": "no-such-model", "messages": CHAT}, 404, "not served here"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
        ({"messages": []}, 400, "messages"),
        ({"prompt": "x"}, 400, "messages: Field required"),
        ({"messages": CHAT, "temperature": 3}, 400, "temperature"),
        ({"messages": CHAT, "max_tokens": 0}, 400, "max_tokens"),
        ({"messages": CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4"),
        ({"messages": CHAT, "logprobs": True}, 400, "logprobs: not supported"),
        ({"messages": [{"role": "user", "content": "cat " * 600}]}, 400, "the model's context is 512"),
    ],
)
def test_malformed_chat_requests_get_a_4xx_json_error(running, body, status, says):
    r = httpx.post(f"{running.url}/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert says in error["message"] and error["type"] in ("invalid_request_error", "not_found_error")


def test_broken_json_unknown_routes_and_the_client_errors(running, client):
    r = httpx.post(f"{running.url}/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    assert httpx.get(f"{running.url}/v1/nothing").status_code == 404
    assert httpx.post(f"{running.url}/v1/completions", json={"prompt": "x", "echo": True}).status_code == 400
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=CHAT)
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.completions.create(model=champion(running).id, prompt="x", top_p=0)


def test_an_api_key_is_required_when_set_and_off_loopback(world, tmp_path):
    with pytest.raises(ConfigError, match="api-key"):
        ServeConfig(host="0.0.0.0")
    assert ServeConfig(host="0.0.0.0", api_key="k").host == "0.0.0.0"
    with serving(world, tmp_path, api_key="s3cret") as running:
        wrong = openai.OpenAI(base_url=f"{running.url}/v1", api_key="guess", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        assert httpx.get(f"{running.url}/v1/models").status_code == 401
        right = openai.OpenAI(base_url=f"{running.url}/v1", api_key="s3cret", max_retries=0)
        assert len(right.models.list().data) == 2
        assert httpx.get(f"{running.url}/").status_code == 200  # the page itself; its API calls send the key


@pytest.mark.slow
def test_the_command_serves_the_registered_champion_and_challenger(tmp_path, monkeypatch):
    from flows.promote import promote
    from tests.evaluate_fixtures import registry_project, run_register
    from tests.test_serve import free_port

    root = registry_project(tmp_path, monkeypatch)
    run_register(root)
    assert promote.fn()["promoted"]
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "serve", "--port", str(port), "--feedback", str(tmp_path / "fb")],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        deadline = time.monotonic() + 120
        while True:
            try:
                ids = [m.id for m in client.models.list()]
                break
            except openai.APIConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
                time.sleep(0.5)
        assert ids == ["scratchlm@champion", "scratchlm@challenger"]
        reply = client.chat.completions.create(model="scratchlm@champion", messages=CHAT, max_tokens=5, seed=0)
        assert reply.usage.completion_tokens <= 5 and reply.model == "scratchlm@champion"
        info = httpx.get(f"http://127.0.0.1:{port}/arena/info").json()
        assert info["enabled"] and info["counts"] == {"pairs": 0, "ratings": 0, "by_choice": {}}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
