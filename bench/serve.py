"""Benchmark: `scratchlm serve` (OpenAI API, requests batched) vs `mlflow models serve` of the same registered model.

One registered version (models:/scratchlm@champion in a throwaway SQLite store: a `--preset` Llama with random
weights and a tokenizer trained here by the tokenizer stage's own code, or `--folder` an existing HF model folder)
is served by three real server processes on loopback, one after the other:

    mlflow            mlflow models serve -m models:/scratchlm@champion --env-manager local   (one uvicorn worker)
    scratchlm b=1     scratchlm serve --model models:/scratchlm@champion --max-batch 1      (one request at a time)
    scratchlm b=16 no wait   ... --max-batch 16 --batch-wait-ms 0   (a batch takes only the requests already waiting)
    scratchlm b=16    scratchlm serve --model models:/scratchlm@champion --max-batch 16     (the defaults: a batch
                      smaller than the last waits up to 20 ms for the clients that just got their answers)

For each of --clients (1, 4, 16 concurrent clients), the clients share --requests chat requests (each client sends
requests / clients of them in a closed loop: the next when the last is answered): a builtin instruction prompt,
greedy, --new tokens. Greedy on one model means every server must return the same text for a prompt (checked; a
mismatch is reported, not hidden). Latency is one
request's wall time at the client (p50/p95 over all requests of the level), tokens/s the new tokens of the level
(the answers re-encoded by the model's tokenizer, the same count for every server) over its wall time. Every server
process runs with OMP_NUM_THREADS=--threads.

    .venv/bin/python bench/serve.py                       # small preset, 1/4/16 clients, 64 new tokens
    .venv/bin/python bench/serve.py --clients 1 4 --requests 8 --new 32     # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for `python bench/serve.py`

import httpx  # noqa: E402

from bench.train_step import _cpu_name  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="model preset of the random-weight model (default small)")
    p.add_argument("--folder", help="an HF model folder to register instead of a random-weight preset model")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=32, help="requests per level, shared by its clients (default 32)")
    p.add_argument("--new", type=int, default=64, help="new tokens per request (default 64)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the servers (default 1)")
    p.add_argument(
        "--only",
        nargs="+",
        help="contenders to run (mlflow, 'scratchlm b=1', 'scratchlm b=16 no wait', 'scratchlm b=16')",
    )
    p.add_argument("--json", help="write the figures to this file too")
    return p.parse_args()


def model_folder(args: argparse.Namespace, work: Path) -> Path:
    """--folder, or a random-weight --preset Llama with a tokenizer trained on builtin stories (vocab = preset's)."""
    if args.folder:
        return Path(args.folder)
    import torch

    from model.config import ModelConfig
    from model.hf import save
    from model.llama import Llama
    from tasks import tokenizer as tokenizer_stage
    from tasks.sources import builtin

    vocab = ModelConfig.from_preset(args.preset).vocab_size
    texts = [d.text for d in builtin.generate_corpus(2000, 7, 0.0, 0.0, 0.0)]
    texts += [m["content"] for ex in builtin.generate_instructions(300, 7, "train") for m in ex["messages"]]
    tok = tokenizer_stage.train_bpe(iter([texts]), tokenizer_stage.Config(vocab_size=vocab), len(texts))
    (work / "tokenizer").mkdir()
    tokenizer_stage.save_folder(tok, work / "tokenizer")
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(args.preset, vocab_size=tok.get_vocab_size())
    save(Llama(cfg).eval(), work / "model", tokenizer_dir=work / "tokenizer")
    return work / "model"


def register(folder: Path, store: Path) -> str:
    """Log + register `folder` as the register stage does, alias it @champion; returns the tracking URI."""
    import mlflow

    from tasks.register import RegisterConfig, log_and_register

    uri = f"sqlite:///{store / 'mlruns.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("bench-serve")
    with mlflow.start_run() as run:
        version, _, _ = log_and_register(folder, RegisterConfig(), run.info.run_id, {})
    mlflow.MlflowClient().set_registered_model_alias("scratchlm", "champion", version.version)
    return uri


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Contender:
    """One server process: how to start it, ask it, and stop it."""

    def __init__(self, name: str, command: list[str], port: int, chat: bool) -> None:
        self.name, self.command, self.port, self.chat = name, command, port, chat
        self.url = f"http://127.0.0.1:{port}"

    def start(self, env: dict, work: Path) -> None:
        self.log = open(work / f"{self.name.replace(' ', '_')}.log", "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            self.command, env=env, cwd=work, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 300
        probe = "/v1/models" if self.chat else "/ping"
        while True:
            try:
                if httpx.get(self.url + probe, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start: {Path(self.log.name).read_text()[-2000:]}")
            time.sleep(0.5)

    def ask(self, client: httpx.Client, prompt: str, new: int) -> str:
        messages = [{"role": "user", "content": prompt}]
        if self.chat:
            body = {"model": "scratchlm@champion", "messages": messages, "max_tokens": new, "temperature": 0}
            r = client.post(self.url + "/v1/chat/completions", json=body, timeout=600)
            r.raise_for_status()
            return r.json()["choices"][0]["message"]["content"]
        body = {"dataframe_records": [{"messages": messages}], "params": {"max_new_tokens": new, "temperature": 0.0}}
        r = client.post(self.url + "/invocations", json=body, timeout=600)
        r.raise_for_status()
        return r.json()["predictions"][0]["text"]

    def stop(self) -> None:
        import signal

        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


def level(contender: Contender, prompts: list[str], clients: int, requests: int, new: int) -> tuple[dict, dict]:
    """`clients` closed loops of `requests` each: latencies, wall time, and every answer by prompt."""
    latencies: list[float] = []
    answers: dict[str, str] = {}
    errors: list[str] = []

    def loop(c: int) -> None:
        with httpx.Client() as client:
            for r in range(requests):
                prompt = prompts[(c * requests + r) % len(prompts)]
                t0 = time.perf_counter()
                try:
                    answers[prompt] = contender.ask(client, prompt, new)
                except httpx.HTTPError as e:
                    errors.append(str(e))
                    return
                latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=loop, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{contender.name}, {clients} clients: {errors[0]}")
    return {"wall": wall, "latencies": latencies}, answers


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def main() -> None:
    args = parse_args()
    from tokenizers import Tokenizer

    from tasks.sources import builtin

    prompts = [ex["messages"][0]["content"] for ex in builtin.generate_instructions(64, 3, "test")]
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work = Path(tmp)
        folder = model_folder(args, work)
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        uri = register(folder, work)
        from model.hf import load

        cfg = load(folder).cfg
        print(f"machine: {_cpu_name()}; servers with OMP_NUM_THREADS={args.threads}")
        print(
            f"model: {cfg.n_layers} layers, d_model {cfg.d_model}, vocab {cfg.vocab_size}, context {cfg.max_seq_len} "
            f"({sum(p.numel() for p in load(folder).parameters()) / 1e6:.2f}M params); models:/scratchlm@champion"
        )
        print(f"load: {args.requests} greedy chat requests of {args.new} new tokens per level, closed loops\n")
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": str(args.threads),
               "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}  # fmt: skip
        serve = [str(BIN / "python"), "-m", "flows.cli", "serve", "--model", "models:/scratchlm@champion", "--no-dvc"]
        contenders = []
        for name, command, chat in (
            ("mlflow", [str(BIN / "mlflow"), "models", "serve", "-m", "models:/scratchlm@champion",
                        "--env-manager", "local"], False),
            ("scratchlm b=1", [*serve, "--max-batch", "1"], True),
            ("scratchlm b=16 no wait", [*serve, "--max-batch", "16", "--batch-wait-ms", "0"], True),
            ("scratchlm b=16", [*serve, "--max-batch", "16"], True),
        ):  # fmt: skip
            if args.only and name not in args.only:
                continue
            port = free_port()
            contenders.append(Contender(name, [*command, "-p" if not chat else "--port", str(port)], port, chat))
        figures: dict[str, dict] = {}
        reference: dict[str, str] = {}
        mismatches = 0
        for contender in contenders:
            contender.start(env, work)
            try:
                with httpx.Client() as client:  # warm-up
                    contender.ask(client, prompts[0], args.new)
                for clients in args.clients:
                    each = max(1, args.requests // clients)
                    result, answers = level(contender, prompts, clients, each, args.new)
                    tokens = sum(len(tok.encode(answers[p], add_special_tokens=False).ids) for p in answers)
                    per_request = tokens / len(answers)
                    for p, text in answers.items():
                        mismatches += reference.setdefault(p, text) != text
                    lat = result["latencies"]
                    row = {
                        "p50_s": percentile(lat, 50),
                        "p95_s": percentile(lat, 95),
                        "tokens_per_s": per_request * len(lat) / result["wall"],
                        "requests": len(lat),
                    }
                    figures.setdefault(contender.name, {})[clients] = row
                    print(
                        f"{contender.name:<22} {clients:>2} clients: p50 {row['p50_s']:6.2f}s  p95 "
                        f"{row['p95_s']:6.2f}s  {row['tokens_per_s']:7.1f} tokens/s  ({len(lat)} requests)",
                        flush=True,
                    )
            finally:
                contender.stop()
        print(f"\nsame greedy text from every server: {'yes' if mismatches == 0 else f'NO ({mismatches} differ)'}")
        print("\n| server | clients | p50 latency | p95 latency | tokens/s |\n|---|---|---|---|---|")
        for name, rows in figures.items():
            for clients, row in rows.items():
                print(
                    f"| {name} | {clients} | {row['p50_s']:.2f} s | {row['p95_s']:.2f} s | {row['tokens_per_s']:.0f} |"
                )
        if args.json:
            Path(args.json).write_text(json.dumps({"figures": figures, "mismatches": mismatches}, indent=1))


if __name__ == "__main__":
    main()
