"""Two small chat models for the serve tests (tests/test_serve_openai.py, tests/test_serve_web.py), built once per
pytest session under its base temp folder, and a `scratchlm serve` server on them in a background thread.

    world = serve_world(tmp_path_factory)     # world / "tokenizer", world / "champion", world / "challenger"
    with serving(world, tmp_path) as running:  # running.url, running.server (flows.serve.Running)
        ...

The tokenizer is the alignment tests' BPE (the tokenizer stage's trainer, chat special tokens and template); the
models are tiny Llamas trained for a few AdamW steps (tests/evaluate_fixtures.py: train_tiny) on builtin stories and
rendered builtin instruction chats, so they answer a chat in its format and end their reply with `<|end|>` (a
plain-text continuation with `<|endoftext|>`). The champion gets more steps than the challenger: two models that
answer differently, as an arena needs.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Iterator
from pathlib import Path

CHAMPION_STEPS = 120
CHALLENGER_STEPS = 40


def serve_world(tmp_path_factory) -> Path:
    """The shared folder (built on first use in this session): tokenizer/, champion/, challenger/."""
    from tasks.common.chat import render_chat
    from tasks.sources import builtin
    from tests.alignment_fixtures import make_tokenizer
    from tests.evaluate_fixtures import train_tiny

    root = tmp_path_factory.getbasetemp() / "serve-world"
    done = root / "ready"
    if not done.is_file():
        started = time.perf_counter()
        tok = make_tokenizer(root / "tokenizer", docs=1000)
        texts = [d.text for d in builtin.generate_corpus(300, 3, 0.0, 0.0, 0.0)]
        texts += [render_chat(ex["messages"]) for ex in builtin.generate_instructions(300, 3, "train")]
        random.Random(0).shuffle(texts)
        train_tiny(root / "champion", tok, texts, steps=CHAMPION_STEPS, seed=0)
        train_tiny(root / "challenger", tok, texts, steps=CHALLENGER_STEPS, seed=1)
        done.write_text(f"{time.perf_counter() - started:.1f}s\n")
    return root


@contextlib.contextmanager
def serving(world: Path, feedback: Path, **changes) -> Iterator:
    """`scratchlm serve --model <champion> --model <challenger>` on a free loopback port, stopped afterwards."""
    from flows.serve import Engine, ServeConfig, start

    specs = (str(world / "champion"), str(world / "challenger"))
    cfg = ServeConfig(models=specs, port=0, feedback_dir=feedback, **changes)
    engines = {}
    for spec in specs:
        engine = Engine(spec, Path(spec), cfg.max_batch, cfg.batch_wait_ms)
        engines[engine.id] = engine
    running = start(cfg, engines)
    try:
        yield running
    finally:
        running.stop()
