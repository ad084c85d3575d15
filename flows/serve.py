"""`scratchlm serve`: an OpenAI-compatible HTTP server for registered models, plus a chat and arena web page.

    scratchlm serve                                   # models:/scratchlm@champion and @challenger on 127.0.0.1:8000
    scratchlm serve --model models:/scratchlm/3 --model data/sft/model --port 8080
    scratchlm serve --host 0.0.0.0 --api-key "$KEY"   # off loopback only with a key (or SCRATCHLM_API_KEY)

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused-on-loopback")
    client.chat.completions.create(model="scratchlm@champion", messages=[{"role": "user", "content": "Hi!"}],
                                   max_tokens=64, temperature=0.8, top_p=0.95, stop=["\\n\\n"], seed=0, stream=True)

Endpoints
    GET  /v1/models                  every served model (`id`: "scratchlm@champion" for models:/scratchlm@champion,
                                     "scratchlm/3" for a version, the path for a folder)
    POST /v1/chat/completions        messages -> the assistant's reply, the prompt rendered with the chat template of
                                     the model's tokenizer (tasks/common/chat.py, the one tokenizer_config.json holds)
    POST /v1/completions             prompt (a string or a list of strings) -> its continuation
    GET  /                           the web page (flows/web/index.html): chat, and the blind arena (flows/arena.py)
    GET  /health                     models and their batching counters (batches, rows, tokens)
Both completion endpoints take model, max_tokens (max_completion_tokens), temperature (0 = greedy), top_p,
stop (up to 4 strings), seed, n (up to 8 choices) and stream (server-sent events, `data: {chunk}` lines ending in
`data: [DONE]`; stream_options.include_usage adds a last chunk with the usage). Usage counts are tokens of the
model's tokenizer: the prompt as the model reads it (a completion's prompt starts with `<|endoftext|>`, as every
pretraining document does), and every generated token but the stop token. finish_reason is "stop" (a stop token
or stop string) or "length" (max_tokens, or the end of the model's context). A malformed request gets HTTP 400 (an
unknown model 404, a missing or wrong key 401) with OpenAI's error JSON: {"error": {"message", "type", "param",
"code"}}, the message naming the field.

Loading and generation are the registered pyfunc's (tasks/common/pyfunc.py: the folder, the tokenizer, prompt ids
and stops of a chat or a prompt, the context budget); a registered model is downloaded as `scratchlm chat` does
(flows/commands.py). Each model has one generation thread (`Engine`): the requests waiting when a batch starts
(up to --max-batch, their prompt + max_tokens within the context) decode together through model.generate's KV
cache, each row with its own sampling settings and seeded generator (model.generate.stream_rows), so a seeded
request gets the same text alone or batched, and the same text as the pyfunc. docs/BENCHMARKS.md, "Serving", has
the measured latency and tokens/s against `mlflow models serve` of the same model (bench/serve.py).
"""

# no `from __future__ import annotations`: FastAPI reads the endpoints' annotations (classes built in create_app)

import asyncio
import contextlib
import hmac
import ipaddress
import json
import queue
import secrets
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

from tasks.common.config import ROOT, ScratchError, check

WEB_PAGE = Path(__file__).resolve().parent / "web" / "index.html"
DEFAULT_MODELS = ("models:/scratchlm@champion", "models:/scratchlm@challenger")
API_KEY_ENV = "SCRATCHLM_API_KEY"


@dataclass(frozen=True)
class ServeConfig:
    """What `scratchlm serve` serves and how (its command-line options)."""

    models: tuple[str, ...] = DEFAULT_MODELS
    """Model specs: models:/ or runs:/ URIs (an alias, a version) or HF model folders; the first is the default.
    With the defaults, a model that is not registered (no @champion before `scratchlm promote`) is skipped."""
    host: str = "127.0.0.1"
    """Interface to listen on; anything but loopback needs `api_key`."""
    port: int = 8000
    """TCP port (0: any free port)."""
    api_key: str | None = None
    """Bearer key every /v1 and /arena request must send (`Authorization: Bearer KEY`); None: no key (loopback)."""
    max_batch: int = 16
    """Most requests one batch decodes together (1: one at a time)."""
    batch_wait_ms: float = 20.0
    """How long a new batch waits for more requests while it is smaller than the last batch (clients in a loop send
    their next request just after their answer: without the wait they would miss the batch and decode alone)."""
    max_tokens: int = 256
    """New tokens of a request that sets no max_tokens (always capped by the model's context)."""
    feedback_dir: Path = ROOT / "feedback"
    """Where the arena writes preferences.jsonl ({prompt, chosen, rejected}) and ratings.jsonl (every rating)."""
    arena: tuple[str, ...] = ()
    """The two model ids the arena compares; () means the first two served models (champion vs challenger)."""
    dvc: bool = True
    """When the server stops after ratings, `dvc add` the arena's files (flows/arena.py: version_with_dvc)."""

    def __post_init__(self) -> None:
        check(len(self.models) >= 1, "--model", "serve at least one model")
        check(0 <= self.port <= 65535, "--port", f"must be in [0, 65535], got {self.port}")
        check(self.max_batch >= 1, "--max-batch", f"must be >= 1, got {self.max_batch}")
        check(self.batch_wait_ms >= 0, "--batch-wait-ms", f"must be >= 0, got {self.batch_wait_ms}")
        check(self.max_tokens >= 1, "--max-tokens", f"must be >= 1, got {self.max_tokens}")
        check(len(self.arena) in (0, 2), "--arena", f"names two model ids (A,B), got {list(self.arena)}")
        check(
            is_loopback(self.host) or bool(self.api_key),
            "--host",
            f"{self.host} is reachable from other machines: give an --api-key (or set {API_KEY_ENV})",
        )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def model_id(spec: str) -> str:
    """The id a model is served under: models:/scratchlm@champion -> scratchlm@champion, a folder -> its path."""
    return spec.removeprefix("models:/") if spec.startswith("models:/") else spec


# ------------------------------------------------------------------------------------------------ generation


class ApiError(Exception):
    """A request the server refuses: HTTP `status` with OpenAI's error JSON."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kinds = {401: "authentication_error", 404: "not_found_error", 409: "conflict_error"}
        kind = "server_error" if self.status >= 500 else kinds.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class Job:
    """One choice to generate: prompt ids, when to stop, how to sample, and where its events go.

    emit(event) receives ("delta", text) as text becomes final, then ("done", finish_reason, completion_tokens)
    or ("error", message); it is called from the engine's thread."""

    prompt: list[int]
    stops: list[int]
    stop_texts: list[str]
    max_new: int
    sampling: Any  # model.generate.Sampling
    emit: Callable[[tuple], None]
    cancelled: threading.Event = field(default_factory=threading.Event)


class Detokenizer:
    """The text of a row's tokens as it becomes final: a half-decoded character, or an ending that may still turn
    into a stop string, is held back; a stop string ends the text before it."""

    def __init__(self, tokenizer: Any, stop_texts: list[str]) -> None:
        self.tokenizer, self.stop_texts = tokenizer, stop_texts
        self.ids: list[int] = []
        self.shown = ""

    def push(self, token: int) -> tuple[str, bool]:
        """(newly final text, whether a stop string ended the row)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        cuts = [i for i in (text.find(s) for s in self.stop_texts) if i >= 0]
        if cuts:
            return self._show(text[: min(cuts)]), True
        if text.endswith("\ufffd"):
            return "", False  # half of a multi-byte character: wait for the rest
        return self._show(text[: len(text) - self._held(text)]), False

    def finish(self) -> str:
        """The rest of the text at the end of the row (what was held back for a stop string that never came)."""
        return self._show(self.tokenizer.decode(self.ids, skip_special_tokens=False))

    def _held(self, text: str) -> int:
        """Length of the longest ending of `text` that starts a stop string."""
        return max((k for s in self.stop_texts for k in range(1, len(s)) if text.endswith(s[:k])), default=0)

    def _show(self, text: str) -> str:
        if not text.startswith(self.shown):
            return ""  # never unsay text (a later token changed how earlier bytes decode)
        new, self.shown = text[len(self.shown) :], text
        return new


class Engine:
    """One served model and its generation thread: waiting jobs decode together, a batch at a time."""

    def __init__(self, spec: str, folder: Path, max_batch: int, batch_wait_ms: float = 20.0) -> None:
        from tasks.common.pyfunc import ScratchLMModel

        self.spec, self.id, self.folder = spec, model_id(spec), folder
        self.pyfunc = ScratchLMModel().load_folder(folder)  # model, tokenizer, stops, row_ids, budget
        self.max_batch, self.batch_wait = max_batch, batch_wait_ms / 1000
        self._last_size = 1
        self.created = int(time.time())
        self.stats = {"batches": 0, "rows": 0, "tokens": 0, "largest_batch": 0}
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._carry: deque[Job] = deque()  # a job that did not fit the last batch starts the next
        self._thread = threading.Thread(target=self._loop, name=f"engine {self.id}", daemon=True)
        self._thread.start()

    @property
    def context(self) -> int:
        return self.pyfunc.model.cfg.max_seq_len

    def submit(self, job: Job) -> None:
        self._queue.put(job)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            self._run(jobs)

    def _take(self) -> list[Job] | None:
        """The next batch: the oldest job (waiting for one), then every job that fits with it, waiting up to
        batch_wait for more while the batch is smaller than the last one."""
        first = self._carry.popleft() if self._carry else self._queue.get()
        if first is None:
            return None
        batch = [first]
        deadline = time.monotonic() + self.batch_wait
        while len(batch) < self.max_batch and not self._carry:
            wait = deadline - time.monotonic() if len(batch) < self._last_size else 0.0
            try:
                job = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._queue.put(None)  # stop after this batch
                break
            if self._fits([*batch, job]):
                batch.append(job)
            else:
                self._carry.append(job)
        self._last_size = len(batch)
        return batch

    def _fits(self, jobs: list[Job]) -> bool:
        return max(len(j.prompt) for j in jobs) + max(j.max_new for j in jobs) <= self.context

    def _run(self, jobs: list[Job]) -> None:
        from model.generate import stream_rows

        rows = [Row(j, Detokenizer(self.pyfunc.tokenizer, j.stop_texts)) for j in jobs if not j.cancelled.is_set()]
        if not rows:
            return
        self.stats["batches"] += 1
        self.stats["rows"] += len(rows)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(rows))
        prompts, samplings = [r.job.prompt for r in rows], [r.job.sampling for r in rows]
        try:
            steps = stream_rows(self.pyfunc.model, prompts, max(r.job.max_new for r in rows), samplings)
            try:
                for tokens in steps:  # (B,) one token per row
                    for row, token in zip(rows, tokens.tolist()):
                        row.step(token)
                    if all(r.done for r in rows):
                        break
            finally:
                steps.close()
            for row in rows:
                row.finish("length")
        except Exception as e:  # a generation fault ends this batch's requests with an error, not the server
            for row in rows:
                row.fail(f"generation failed: {type(e).__name__}: {e}")
        self.stats["tokens"] += sum(r.count for r in rows)


@dataclass
class Row:
    """A job being decoded in a batch: its text so far, its token count, whether it is done."""

    job: Job
    text: Detokenizer
    count: int = 0
    done: bool = False

    def step(self, token: int) -> None:
        if self.done:
            return
        if self.job.cancelled.is_set():  # the client went away
            self.done = True
            return
        if token in self.job.stops:
            self.finish("stop")
            return
        self.count += 1
        delta, stopped = self.text.push(token)
        if delta:
            self.job.emit(("delta", delta))
        if stopped:
            self.finish("stop", release=False)
        elif self.count >= self.job.max_new:
            self.finish("length")

    def finish(self, reason: str, release: bool = True) -> None:
        """End the row (once): the text held back for a stop string that never came, then ("done", ...)."""
        if self.done:
            return
        self.done = True
        rest = self.text.finish() if release else ""
        if rest:
            self.job.emit(("delta", rest))
        self.job.emit(("done", reason, self.count))

    def fail(self, message: str) -> None:
        if not self.done:
            self.done = True
            self.job.emit(("error", message))


# ------------------------------------------------------------------------------------------------ requests

MAX_CHOICES = 8
MAX_STOPS = 4


def request_models():
    """The pydantic request bodies (imported when the app is built: pydantic is the server's, not the CLI's)."""
    from pydantic import BaseModel, ConfigDict, Field

    class TextPart(BaseModel):
        type: Literal["text"]
        text: str

    class Message(BaseModel):
        model_config = ConfigDict(extra="ignore")
        role: Literal["system", "developer", "user", "assistant"]
        content: str | list[TextPart]

        def plain(self) -> dict[str, str]:
            text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
            return {"role": "system" if self.role == "developer" else self.role, "content": text}

    class StreamOptions(BaseModel):
        include_usage: bool = False

    class Common(BaseModel):
        model_config = ConfigDict(extra="ignore")
        model: str | None = None
        max_tokens: int | None = Field(None, ge=1)
        temperature: float = Field(1.0, ge=0.0, le=2.0)
        top_p: float = Field(1.0, gt=0.0, le=1.0)
        stop: str | list[str] | None = None
        seed: int | None = None
        n: int = Field(1, ge=1, le=MAX_CHOICES)
        stream: bool = False
        stream_options: StreamOptions | None = None
        logprobs: Any = None

    class ChatRequest(Common):
        messages: list[Message] = Field(min_length=1)
        max_completion_tokens: int | None = Field(None, ge=1)

    class CompletionRequest(Common):
        prompt: str | list[str]
        echo: bool = False
        suffix: str | None = None
        best_of: int | None = None

    return ChatRequest, CompletionRequest


def stop_texts(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOPS:
        raise ApiError(400, f"stop: at most {MAX_STOPS} sequences, got {len(stops)}", "stop")
    if any(not s for s in stops):
        raise ApiError(400, "stop: an empty string would stop before the first token", "stop")
    return stops


def unsupported(req: Any) -> None:
    """Refuse what the request asks for that this server does not do, rather than silently ignore it."""
    asked = {
        "logprobs": req.logprobs not in (None, False, 0),
        "echo": bool(getattr(req, "echo", False)),
        "suffix": getattr(req, "suffix", None) is not None,
        "best_of": getattr(req, "best_of", None) not in (None, 1),
    }
    for name, wanted in asked.items():
        if wanted:
            raise ApiError(400, f"{name}: not supported by this server", name)


class Server:
    """The served engines, the request → jobs → response logic, and the arena."""

    def __init__(self, cfg: ServeConfig, engines: dict[str, Engine], descriptions: dict[str, str]) -> None:
        from flows.arena import Arena

        self.cfg, self.engines, self.descriptions = cfg, engines, descriptions
        ids = list(cfg.arena) or list(engines)[:2]
        unknown = [i for i in ids if i not in engines]
        if unknown:
            raise ScratchError(
                f"--arena {','.join(ids)}: not served: {', '.join(unknown)} (served: {', '.join(engines)})"
            )
        self.arena = Arena(ids if len(ids) == 2 else [], cfg.feedback_dir, self.answer)

    def engine(self, name: str | None) -> Engine:
        if name is None:
            return next(iter(self.engines.values()))
        for engine in self.engines.values():
            if name in (engine.id, engine.spec):
                return engine
        raise ApiError(
            404, f"model {name!r} is not served here (served: {', '.join(self.engines)})", "model", "model_not_found"
        )

    def jobs_for(
        self,
        engine: Engine,
        req: Any,
        prompts: list[tuple[list[int], list[int]]],
        max_tokens: int | None,
        events: Callable[[int], Callable[[tuple], None]],
    ) -> list[Job]:
        """One Job per (prompt, choice): choice c of prompt p is index p * n + c, seeded seed + c."""
        from model.generate import Sampling

        stops = stop_texts(req.stop)
        jobs = []
        for p, (ids, stop_ids) in enumerate(prompts):
            room = engine.pyfunc.budget(ids, p)
            for c in range(req.n):
                seed = None if req.seed is None else req.seed + c
                sampling = Sampling(req.temperature, None, req.top_p if req.top_p < 1.0 else None, seed)
                wanted = max_tokens or self.cfg.max_tokens
                jobs.append(Job(ids, stop_ids, stops, min(wanted, room), sampling, events(p * req.n + c)))
        return jobs

    async def answer(self, model: str, prompt: str, settings: dict) -> str:
        """One model's reply to a one-turn chat, as /v1/chat/completions would give it (the arena's answers)."""
        engine = self.engine(model)
        ids, stops = engine.pyfunc.row_ids({"messages": [{"role": "user", "content": prompt}]}, 0)
        req = SimpleNamespace(stop=None, n=1, **{k: v for k, v in settings.items() if k != "max_tokens"})

        def jobs(sink):
            return self.jobs_for(engine, req, [(ids, stops)], settings["max_tokens"], sink)

        texts, _, _ = await collect(self.run(engine, jobs), 1)
        return texts[0]

    async def run(self, engine: Engine, jobs_of: Callable) -> AsyncIterator[tuple[int, tuple]]:
        """Submit the jobs and yield (choice index, event) until every job is done; cancel them if abandoned."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def sink(index: int) -> Callable[[tuple], None]:
            return lambda event: loop.call_soon_threadsafe(events.put_nowait, (index, event))

        jobs = jobs_of(sink)
        for job in jobs:
            engine.submit(job)
        open_jobs = len(jobs)
        try:
            while open_jobs:
                index, event = await events.get()
                if event[0] in ("done", "error"):
                    open_jobs -= 1
                yield index, event
        finally:
            for job in jobs:
                job.cancelled.set()


def chat_prompt(engine: Engine, req: Any) -> tuple[list[int], list[int]]:
    """(ids, stop ids) of a chat request: the pyfunc's rendering with the tokenizer's chat template."""
    from mlflow.exceptions import MlflowException

    try:
        return engine.pyfunc.row_ids({"messages": [m.plain() for m in req.messages]}, 0)
    except MlflowException as e:
        raise ApiError(400, e.message.replace("input row 0: ", ""), "messages") from None


def completion_prompts(engine: Engine, req: Any) -> list[tuple[list[int], list[int]]]:
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if not prompts:
        raise ApiError(400, "prompt: give a string or a non-empty list of strings", "prompt")
    return [
        engine.pyfunc.row_ids({"prompt": p}, i) if p else ([engine.pyfunc.text_stops[0]], engine.pyfunc.text_stops)
        for i, p in enumerate(prompts)
    ]


# ------------------------------------------------------------------------------------------------ the app


def usage_chunk(base: dict, prompt_tokens: int, req: Any) -> Callable[[list[int]], bytes] | None:
    """The closing usage chunk of a stream, when the request asked for it (`stream_options.include_usage`)."""
    if not (req.stream_options and req.stream_options.include_usage):
        return None
    return lambda counts: sse({**base, "choices": [], "usage": usage(prompt_tokens, counts)})


async def relay(
    events: AsyncIterator[tuple[int, tuple]],
    total: int,
    delta: Callable[[int, str], bytes],
    end: Callable[[int, str], bytes],
    closing: Callable[[list[int]], bytes] | None,
) -> AsyncIterator[bytes]:
    """The server-sent events of one streamed request over `total` choices: `delta(index, text)` per piece of text,
    `end(index, finish_reason)` when a choice finishes, an error event (and the end) when generation fails, then
    `closing(completion tokens per choice)` when given, and `[DONE]`. Chat and completions differ only in chunks."""
    counts = [0] * total
    async with contextlib.aclosing(events) as stream:
        async for index, event in stream:
            if event[0] == "error":
                yield sse(ApiError(500, event[1]).body())
                return
            if event[0] == "delta":
                yield delta(index, event[1])
            else:
                counts[index] = event[2]
                yield end(index, event[1])
    if closing is not None:
        yield closing(counts)
    yield sse("[DONE]")


def sse(payload: dict | str) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()


def create_app(server: Server):
    """The FastAPI app: OpenAI's routes, the web page and the arena's."""
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from mlflow.exceptions import MlflowException
    from starlette.exceptions import HTTPException

    ChatRequest, CompletionRequest = request_models()
    app = FastAPI(title="scratchlm", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(MlflowException)
    async def pyfunc_error(request: Request, e: MlflowException):  # the pyfunc's bad_request (context, messages)
        return JSONResponse(ApiError(400, e.message).body(), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
        return JSONResponse(ApiError(400, message, where or None).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return JSONResponse(
            ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}").body(),
            status_code=e.status_code,
        )

    def authorised(request: Request) -> None:
        key = server.cfg.api_key
        if not key:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise ApiError(401, "missing or wrong API key: send `Authorization: Bearer <key>`", None, "invalid_api_key")

    auth = [Depends(authorised)]

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(WEB_PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": {e.id: e.stats for e in server.engines.values()}}

    @app.get("/v1/models", dependencies=auth)
    async def models():
        data = [
            {
                "id": e.id,
                "object": "model",
                "created": e.created,
                "owned_by": "scratchlm",
                "context_length": e.context,
                "source": server.descriptions[e.id],
            }
            for e in server.engines.values()
        ]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(req: ChatRequest):
        unsupported(req)
        engine = server.engine(req.model)
        prompt = chat_prompt(engine, req)
        max_tokens = req.max_completion_tokens or req.max_tokens

        def jobs(sink):
            return server.jobs_for(engine, req, [prompt], max_tokens, sink)

        jobs(lambda i: lambda e: None)  # validate (stop, context) before anything starts
        meta = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": engine.id}
        if req.stream:
            return StreamingResponse(
                chat_stream(engine, jobs, meta, len(prompt[0]), req), media_type="text/event-stream"
            )
        texts, reasons, counts = await collect(server.run(engine, jobs), req.n)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": texts[i]},
                "finish_reason": reasons[i],
                "logprobs": None,
            }
            for i in range(req.n)
        ]
        return {**meta, "object": "chat.completion", "choices": choices, "usage": usage(len(prompt[0]), counts)}

    async def chat_stream(engine, jobs, meta, prompt_tokens, req) -> AsyncIterator[bytes]:
        base = {**meta, "object": "chat.completion.chunk"}

        def chunk(index: int, delta: dict, reason: str | None) -> bytes:
            return sse(
                {**base, "choices": [{"index": index, "delta": delta, "finish_reason": reason, "logprobs": None}]}
            )

        for i in range(req.n):
            yield chunk(i, {"role": "assistant", "content": ""}, None)
        events = server.run(engine, jobs)
        async for data in relay(
            events,
            req.n,
            lambda i, text: chunk(i, {"content": text}, None),
            lambda i, why: chunk(i, {}, why),
            usage_chunk(base, prompt_tokens, req),
        ):
            yield data

    @app.post("/v1/completions", dependencies=auth)
    async def completions(req: CompletionRequest):
        unsupported(req)
        engine = server.engine(req.model)
        prompts = completion_prompts(engine, req)

        def jobs(sink):
            return server.jobs_for(engine, req, prompts, req.max_tokens, sink)

        jobs(lambda i: lambda e: None)
        meta = {"id": f"cmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": engine.id}
        prompt_tokens = sum(len(ids) for ids, _ in prompts)
        total = len(prompts) * req.n
        if req.stream:
            return StreamingResponse(
                completion_stream(engine, jobs, meta, prompt_tokens, total, req), media_type="text/event-stream"
            )
        texts, reasons, counts = await collect(server.run(engine, jobs), total)
        choices = [{"index": i, "text": texts[i], "finish_reason": reasons[i], "logprobs": None} for i in range(total)]
        return {**meta, "object": "text_completion", "choices": choices, "usage": usage(prompt_tokens, counts)}

    async def completion_stream(engine, jobs, meta, prompt_tokens, total, req) -> AsyncIterator[bytes]:
        base = {**meta, "object": "text_completion"}

        def chunk(index: int, text: str, reason: str | None) -> bytes:
            return sse({**base, "choices": [{"index": index, "text": text, "finish_reason": reason, "logprobs": None}]})

        events = server.run(engine, jobs)
        async for data in relay(
            events,
            total,
            lambda i, text: chunk(i, text, None),
            lambda i, why: chunk(i, "", why),
            usage_chunk(base, prompt_tokens, req),
        ):
            yield data

    arena_routes(app, server.arena, auth)
    return app


def arena_routes(app: Any, arena: Any, auth: list) -> None:
    """/arena/info, /arena/battle and /arena/vote (flows/arena.py); an ArenaError is OpenAI's error JSON."""
    from fastapi import Request
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, Field

    from flows.arena import SETTINGS, ArenaError

    class BattleRequest(BaseModel):
        prompt: str
        max_tokens: int = Field(SETTINGS["max_tokens"], ge=1)
        temperature: float = Field(SETTINGS["temperature"], ge=0.0, le=2.0)
        top_p: float = Field(SETTINGS["top_p"], gt=0.0, le=1.0)
        seed: int | None = SETTINGS["seed"]

    class VoteRequest(BaseModel):
        battle: str
        choice: str

    @app.exception_handler(ArenaError)
    async def arena_error(request: Request, e: ArenaError):
        return JSONResponse(ApiError(e.status, e.message, e.param).body(), status_code=e.status)

    @app.get("/arena/info", dependencies=auth)
    async def arena_info():
        return arena.info()

    @app.post("/arena/battle", dependencies=auth)
    async def arena_battle(req: BattleRequest):
        return await arena.battle(req.prompt, req.max_tokens, req.temperature, req.top_p, req.seed)

    @app.post("/arena/vote", dependencies=auth)
    async def arena_vote(req: VoteRequest):
        return arena.vote(req.battle, req.choice)


async def collect(events: AsyncIterator[tuple[int, tuple]], total: int) -> tuple[list[str], list[str], list[int]]:
    """(texts, finish reasons, completion tokens) per choice from the engine's events."""
    texts, reasons, counts = [""] * total, ["length"] * total, [0] * total
    async with contextlib.aclosing(events):
        async for index, event in events:
            if event[0] == "error":
                raise ApiError(500, event[1])
            if event[0] == "delta":
                texts[index] += event[1]
            else:
                reasons[index], counts[index] = event[1], event[2]
    return texts, reasons, counts


def usage(prompt_tokens: int, counts: list[int]) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": sum(counts),
        "total_tokens": prompt_tokens + sum(counts),
    }


# ------------------------------------------------------------------------------------------------ loading


def load_engines(
    cfg: ServeConfig, workdir: Path, download: Callable[[str, Path], Path]
) -> tuple[dict[str, Engine], dict[str, str]]:
    """Every model of cfg.models, a registered one through download(uri, folder) (flows/commands.py:
    download_model) into workdir; with the default models, an alias that does not exist is skipped."""
    engines, descriptions, skipped = {}, {}, []
    for spec in cfg.models:
        if Path(spec).is_dir():
            if not (Path(spec) / "config.json").is_file():
                raise ScratchError(f"--model {spec}: not an exported model folder (no config.json)")
            folder = Path(spec)
        elif ":/" in spec:
            try:
                folder = download(spec, workdir / f"m{len(engines)}")
            except ScratchError as e:
                if cfg.models != DEFAULT_MODELS:
                    raise
                skipped.append(f"{spec} ({str(e).split(' (')[0]})")
                continue
        else:
            raise ScratchError(f"--model {spec}: neither a folder nor a models:/ or runs:/ URI")
        engine = Engine(spec, folder, cfg.max_batch, cfg.batch_wait_ms)
        engines[engine.id], descriptions[engine.id] = engine, spec
    for line in skipped:
        print(f"(skipped {line})")
    if not engines:
        raise ScratchError(
            f"no model to serve: {', '.join(cfg.models)} not found; run the pipeline (scratchlm run) or give "
            "--model PATH_OR_URI"
        )
    return engines, descriptions


@dataclass
class Running:
    """A server started in a background thread (tests, bench): its URL, its Server, and stop()."""

    url: str
    server: Server
    uvicorn: Any
    thread: threading.Thread

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout=30)
        for engine in self.server.engines.values():
            engine.close()


def start(cfg: ServeConfig, engines: dict[str, Engine], descriptions: dict[str, str] | None = None) -> Running:
    """Serve `engines` on cfg.host:cfg.port from a background thread; returns once it accepts connections."""
    import uvicorn

    server = Server(cfg, engines, descriptions or {i: e.spec for i, e in engines.items()})
    config = uvicorn.Config(create_app(server), host=cfg.host, port=cfg.port, log_level="warning", lifespan="off")
    web = uvicorn.Server(config)
    thread = threading.Thread(target=web.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not web.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise ScratchError(f"the server did not start on {cfg.host}:{cfg.port}")
        time.sleep(0.02)
    port = web.servers[0].sockets[0].getsockname()[1]
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    return Running(f"http://{host}:{port}", server, web, thread)


# ------------------------------------------------------------------------------------------------ the command


def serve_forever(cfg: ServeConfig, download: Callable[[str, Path], Path]) -> int:
    """`scratchlm serve` (flows/commands.py parses its options): load, serve until Ctrl-C, version the ratings."""
    import tempfile

    import uvicorn

    with tempfile.TemporaryDirectory(prefix="scratchlm-serve-") as workdir:
        engines, descriptions = load_engines(cfg, Path(workdir), download)
        server = Server(cfg, engines, descriptions)
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        print("scratchlm serve: " + ", ".join(i if i == d else f"{i} ({d})" for i, d in descriptions.items()))
        print(f"  web page   http://{host}:{cfg.port}/")
        print(f"  OpenAI API http://{host}:{cfg.port}/v1" + ("  (Bearer key required)" if cfg.api_key else ""))
        print(f"  arena      {' vs '.join(server.arena.ids) or '(needs two models)'}; ratings in {cfg.feedback_dir}/")
        uvicorn.run(create_app(server), host=cfg.host, port=cfg.port, log_level="warning")
        for engine in engines.values():
            engine.close()
    for line in server.arena.closing_lines(cfg.dvc):
        print(line)
    return 0
