"""Benchmark: how far an LLM judge agrees with the builtin constraint checker, for judges of different quality.

Every judge sees the same pairs: --pairs held-out builtin preference pairs (generate_preferences, split "test": a
story meeting every constraint of its prompt and the same story with exactly one thing broken), the good answer as
model x in 75 % of the pairs (seeded), so the checker's own win rate of x is about 0.75 and a judge's win rate shows
how far it is pulled towards 1/2. Each pair is judged in both orders (tasks/common/judge.py: judge_pairs) and
summarised by the same `summarise` the evaluate stage uses.

Judges (all tiny Llamas of tests/serve_fixtures.py's shape, the tokenizer of tests/alignment_fixtures.py):
    lm-<n>            a language model trained <n> AdamW steps on builtin stories and chats (the serve fixtures'
                      champion and challenger): no judging skill, the "policy judging itself" case
    judge-<n>         lm-<the most steps> fine-tuned <n> steps to answer the judging prompt with the letter of the
                      checker's choice (then <|end|>), on builtin "train" preference pairs in both orders: a judge
                      trained off the default budget, stronger with more steps
    judge-<n> (endpoint)  the strongest judge served by `scratchlm serve` and asked through the openai client
                      (greedy text, parsed): the endpoint backend on the same pairs
    longer answer     picks the longer answer shown (words): a pure length-bias reference
    checker           the constraint checker itself (check_constraints' score): the upper bound (agreement 1)

    .venv/bin/python bench/judge.py                                  # 64 pairs, lm-40/120, judge-100/300/1000
    .venv/bin/python bench/judge.py --pairs 32 --judge-steps 50 200 # a quicker look
    .venv/bin/python bench/judge.py --no-train --folder data/dpo/model --endpoint http://127.0.0.1:8000/v1 m
                                        # your judges (a model folder, a vLLM or hosted model) on the same pairs
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for `python bench/judge.py`

import torch  # noqa: E402

from bench.train_step import _cpu_name  # noqa: E402
from tasks.common.judge import (  # noqa: E402
    Choice,
    EndpointConfig,
    EndpointJudge,
    Judge,
    LocalJudge,
    Pair,
    judge_pairs,
    summarise,
)

LR = 2e-3
"""The judges' fine-tuning learning rate (AdamW, constant)."""
COLUMNS = [
    ("checker_agreement", "agreement"),
    ("checker_kappa", "kappa"),
    ("position_consistency", "consistency"),
    ("position_bias", "first picked"),
    ("length_bias", "longer picked"),
    ("tie_rate", "ties"),
    ("win_rate", "win rate x"),
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=64, help="held-out pairs every judge judges (default 64)")
    p.add_argument("--train-pairs", type=int, default=1000, help="builtin train pairs the judges learn from")
    p.add_argument("--lm-steps", type=int, nargs="+", default=[40, 120], help="language-model judges' steps")
    p.add_argument("--judge-steps", type=int, nargs="+", default=[100, 300, 1000], help="fine-tuned judges' steps")
    p.add_argument("--batch", type=int, default=8, help="judging examples per fine-tuning step (default 8)")
    p.add_argument("--no-endpoint", action="store_true", help="skip the strongest judge through `scratchlm serve`")
    p.add_argument("--folder", action="append", default=[], help="also judge with this HF model folder (repeatable)")
    p.add_argument(
        "--endpoint",
        nargs=2,
        metavar=("BASE_URL", "MODEL"),
        help="also judge with this OpenAI-compatible endpoint (key from $JUDGE_API_KEY when set)",
    )
    p.add_argument(
        "--no-train", action="store_true", help="train no tiny judge (only --folder/--endpoint + references)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args()


# ------------------------------------------------------------------------------------------------ pairs


def checker_pairs(n: int, seed: int, split: str, good_share: float = 0.75) -> list[Pair]:
    """Builtin preference pairs as (x, y) with their checker scores; x is the good answer in `good_share` of them."""
    from tasks.sources import builtin

    rng = random.Random(seed)
    pairs = []
    for p in builtin.generate_preferences(n, seed, split):
        score = {
            a: builtin.check_constraints(a.strip(), p["constraints"])["score"] for a in (p["chosen"], p["rejected"])
        }
        x, y = (p["chosen"], p["rejected"]) if rng.random() < good_share else (p["rejected"], p["chosen"])
        pairs.append(Pair(p["prompt"], x, y, score[x], score[y]))
    return pairs


# ------------------------------------------------------------------------------------------------ judges


class CheckerJudge(Judge):
    """The constraint checker as a judge: the answer meeting more of the instruction's constraints (the reference)."""

    name = "checker"

    def __init__(self, constraints: dict[str, dict]) -> None:
        self.constraints = constraints  # instruction -> its constraints

    def choose(self, items):
        from tasks.sources.builtin import check_constraints

        out = []
        for instruction, a, b in items:
            sa, sb = (check_constraints(t.strip(), self.constraints[instruction])["score"] for t in (a, b))
            out.append(Choice("A" if sa > sb else "B" if sb > sa else "tie"))
        return out


class LongerJudge(Judge):
    """Picks the longer answer shown (words): what a judge with nothing but length bias does."""

    name = "longer answer"

    def choose(self, items):
        return [
            Choice("A" if len(a.split()) > len(b.split()) else "B" if len(b.split()) > len(a.split()) else "tie")
            for _, a, b in items
        ]


def train_judge(
    base: Path, out: Path, tokenizer_dir: Path, pairs: list[Pair], steps: int, seed: int, batch_size: int = 8
) -> Path:
    """`base` fine-tuned to answer the judging prompt with the checker's letter and then <|end|>: the loss is on those
    two tokens only (the judging prompt's own tokens teach nothing about judging). Both orders of every pair."""
    from model.hf import save

    judge = LocalJudge(base, "base")
    model, end = judge.model.train(), judge.tok.end_id
    examples = []  # (ids + [letter], letter) with ids the judging prompt as the local judge encodes it
    for p in pairs:
        good_first = p.checker_x > p.checker_y
        for a, b, letter in ((p.x, p.y, 0 if good_first else 1), (p.y, p.x, 1 if good_first else 0)):
            ids, _ = judge.encode(p.instruction, a, b)
            examples.append((ids, judge.letters[letter]))
    print(f"    {len(examples)} judging examples encoded", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    rng = random.Random(seed)
    losses = []
    for step in range(1, steps + 1):
        batch = rng.sample(examples, batch_size)
        width = max(len(ids) for ids, _ in batch) + 1
        x = torch.full((batch_size, width), judge.tok.pad_id, dtype=torch.long)  # (B,W) right-padded
        y = torch.full((batch_size, width), -100, dtype=torch.long)
        for i, (ids, letter) in enumerate(batch):
            x[i, : len(ids) + 1] = torch.tensor([*ids, letter])
            y[i, len(ids) - 1], y[i, len(ids)] = letter, end  # the letter after the prompt, then <|end|>
        h = model.hidden_states(x)  # (B,W,D)
        keep = y != -100  # (B,W): two positions per row
        loss = torch.nn.functional.cross_entropy(model.lm_head(h[keep]), y[keep])  # logits only where trained
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps:
            print(f"    step {step}: loss {sum(losses[-50:]) / len(losses[-50:]):.3f}", flush=True)
    save(model.eval(), out, tokenizer_dir=tokenizer_dir)
    return out


def build_models(root: Path, args: argparse.Namespace, train: list[Pair]) -> dict[str, Path]:
    """lm-<n> and judge-<n> folders under root, with the seconds each took to train printed."""
    print("training the judges:", flush=True)
    from tasks.common.chat import render_chat
    from tasks.sources import builtin
    from tests.alignment_fixtures import make_tokenizer
    from tests.evaluate_fixtures import train_tiny

    tok = make_tokenizer(root / "tokenizer", docs=1000)
    texts = [d.text for d in builtin.generate_corpus(300, 3, 0.0, 0.0, 0.0)]
    texts += [render_chat(ex["messages"]) for ex in builtin.generate_instructions(300, 3, "train")]
    random.Random(0).shuffle(texts)
    folders = {}
    for steps in args.lm_steps:
        started = time.perf_counter()
        folders[f"lm-{steps}"] = train_tiny(root / f"lm-{steps}", tok, texts, steps=steps, seed=args.seed)
        print(f"  lm-{steps}: {time.perf_counter() - started:.0f} s", flush=True)
    base = folders[f"lm-{max(args.lm_steps)}"]
    for steps in args.judge_steps:
        started = time.perf_counter()
        folders[f"judge-{steps}"] = train_judge(base, root / f"judge-{steps}", tok, train, steps, args.seed, args.batch)
        print(f"  judge-{steps}: {time.perf_counter() - started:.0f} s", flush=True)
    return folders


def endpoint_rows(folder: Path, pairs: list[Pair], feedback: Path) -> list[dict]:
    """The judge in `folder` behind a real `scratchlm serve`, asked through the openai client (greedy)."""
    from flows.serve import Engine, ServeConfig, start
    from tasks.common.judge import EndpointConfig, EndpointJudge

    cfg = ServeConfig(models=(str(folder),), port=0, feedback_dir=feedback, dvc=False)
    engine = Engine(str(folder), folder, cfg.max_batch, cfg.batch_wait_ms)
    running = start(cfg, {engine.id: engine})
    try:
        judge = EndpointJudge(EndpointConfig(base_url=f"{running.url}/v1", model=engine.id, concurrency=16), 4)
        return judge_pairs(judge, pairs)
    finally:
        running.stop()


def stage_cost(root: Path) -> tuple[float, int]:
    """Seconds of the evaluate stage's default judge step on `small`-preset-shaped models (4 layers, d_model 256,
    context 256, a 4,096-token BPE): 3 win_rates pairs x 16 held-out prompts x 2 orders, a `self` judge (a model
    load) per pair, answers of ~170 words (longer than the context holds: every pair is cut to fit). Random
    weights: the cost does not depend on what the judge says. Returns (seconds, pairs cut)."""
    from tasks.sources.examples import held_out_prompts
    from tests.alignment_fixtures import make_tokenizer
    from tests.evaluate_fixtures import tiny_model

    tok = make_tokenizer(root / "tokenizer-4096", vocab=4096, docs=1000)
    shape = dict(max_seq_len=256, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2)
    folders = [tiny_model(root / f"small-{i}", tok, seed=i, **shape) for i in range(3)]
    story = "Tom went to the park with his red ball and he was happy all day long. " * 12
    pairs = [
        Pair(h["prompt_messages"][-1]["content"], story, story[: len(story) // 2], 1.0, 0.5)
        for h in held_out_prompts(16, 4242)
    ]
    started, cut = time.perf_counter(), 0
    for folder in folders:
        cut += sum(r["truncated"] for r in judge_pairs(LocalJudge(folder, folder.name), pairs))
    return time.perf_counter() - started, cut


# ------------------------------------------------------------------------------------------------ main


def fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    pairs = checker_pairs(args.pairs, args.seed, "test")
    train = checker_pairs(args.train_pairs, args.seed, "train", good_share=0.5)
    constraints = {p["prompt"]: p["constraints"] for p in _prefs(args.pairs, args.seed)}
    results: dict[str, tuple[dict, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-judge-") as tmp:
        folders = {} if args.no_train else build_models(Path(tmp), args, train)
        folders.update({folder: Path(folder) for folder in args.folder})
        judges: list[tuple[str, Judge | None]] = [(name, None) for name in folders]
        if args.endpoint:
            endpoint = EndpointConfig(base_url=args.endpoint[0], model=args.endpoint[1], api_key_env=key_env())
            judges.append((f"{args.endpoint[1]} (endpoint)", EndpointJudge(endpoint)))
        judges += [("longer answer", LongerJudge()), ("checker", CheckerJudge(constraints))]
        for name, judge in judges:
            started = time.perf_counter()
            rows = judge_pairs(judge or LocalJudge(folders[name], name), pairs)
            results[name] = (summarise(rows), time.perf_counter() - started)
        if not args.no_endpoint and not args.no_train:
            strongest = f"judge-{max(args.judge_steps)}"
            started = time.perf_counter()
            rows = endpoint_rows(folders[strongest], pairs, Path(tmp) / "feedback")
            figures = {**summarise(rows), "unparsed_share": sum(r["unparsed"] for r in rows) / (2 * len(rows))}
            results[f"{strongest} (endpoint)"] = (figures, time.perf_counter() - started)
        cost = stage_cost(Path(tmp))
    report(results, pairs, args)
    print(
        f"\nevaluate stage's default judge step (small preset shape, 3 pairs x 16 prompts x 2 orders, 3 model "
        f"loads): {cost[0]:.1f} s, {cost[1]} of 48 pairs cut to fit the context"
    )


def key_env() -> str:
    """JUDGE_API_KEY when it is set (the endpoint judge reads the key from the variable it names), else no key."""
    import os

    return "JUDGE_API_KEY" if os.environ.get("JUDGE_API_KEY") else ""


def _prefs(n: int, seed: int) -> list[dict]:
    from tasks.sources import builtin

    return list(builtin.generate_preferences(n, seed, "test"))


def report(results: dict[str, tuple[dict, float]], pairs: list[Pair], args: argparse.Namespace) -> None:
    checker = results["checker"][0]
    print(
        f"\n{len(pairs)} held-out builtin preference pairs, each judged in both orders; "
        f"checker win rate of x {checker['checker_win_rate']:.3f}; "
        f"checker picks the longer answer in {fmt(checker['checker_length_share'])} of them"
    )
    print(f"machine: {_cpu_name()}, torch threads {args.threads}\n")
    header = ["judge", *[name for _, name in COLUMNS], "win rate 95 %", "s/pair"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, (f, seconds) in results.items():
        lo, hi = f["win_rate_ci95_low"], f["win_rate_ci95_high"]
        cells = [name, *[fmt(f[key]) for key, _ in COLUMNS], f"[{lo:.2f}, {hi:.2f}]", f"{seconds / len(pairs):.3f}"]
        print("| " + " | ".join(cells) + " |")
    for name, (f, _) in results.items():
        if "unparsed_share" in f:
            print(f"\n{name}: {f['unparsed_share']:.1%} of its replies named no verdict (judged a tie in that order)")


if __name__ == "__main__":
    main()
