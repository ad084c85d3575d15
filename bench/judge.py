"""Benchmark: how far an LLM judge agrees with the builtin constraint checker, for judges of different quality.

Every judge sees the same pairs: --pairs held-out builtin preference pairs (generate_preferences, split "test": a
story meeting every constraint of its prompt and the same story with exactly one thing broken), the good answer as
model x in 75 % of the pairs (seeded), so the checker's own win rate of x is about 0.75 and a judge's win rate shows
how far it is pulled towards 1/2. Each pair is judged in both orders (tasks/common/judge.py: judge_pairs) and
summarised by the same `summarise` the evaluate stage uses; a second table gives the agreement by what the bad
answer breaks (`broken`: wrong name or animal, a missing place, object or feeling, too long, wrong last word, no
title, cut off). Judges learn only from "train" pairs (other animal/place combinations than "test").

Judges (by default tiny Llamas of tests/serve_fixtures.py's shape, the tokenizer of tests/alignment_fixtures.py):
    lm-<n>            a language model trained <n> AdamW steps on builtin stories and chats (the serve fixtures'
                      champion and challenger): no judging skill, the "policy judging itself" case
    judge-<n>         lm-<the most steps> (or --base) fine-tuned <n> steps to judge like the checker, on builtin
                      "train" pairs, in --mode: pairwise (the letter of the checker's choice, then <|end|>, both
                      orders) or pointwise (Y for the good answer, N for the bad one, plus a Bradley-Terry loss on
                      the two grades). One run, saved after each <n> (the first n steps of a longer run are the
                      n-step run); judge-0 is the base itself
    judge-<n> (endpoint)  the strongest pairwise judge served by `scratchlm serve` and asked through the openai
                      client (greedy text, parsed): the endpoint backend on the same pairs
    longer answer     picks the longer answer shown (words): a pure length-bias reference
    checker           the constraint checker itself (check_constraints' score): the upper bound (agreement 1)

    .venv/bin/python bench/judge.py                                  # 64 pairs, lm-40/120, judge-100/300/1000
    .venv/bin/python bench/judge.py --pairs 32 --judge-steps 50 200 # a quicker look
    OMP_NUM_THREADS=1 .venv/bin/python bench/judge.py --base data/sft/model --mode pointwise --context 320 \
        --lr 5e-4 --batch 4 --judge-steps 0 500 2000 --pairs 256 --train-pairs 4000 --threads 1 --no-stage-cost
                                        # the pipeline's SFT model as a pointwise judge (docs/BENCHMARKS.md, Judge)
    .venv/bin/python bench/judge.py --no-train --folder data/dpo/model --endpoint http://127.0.0.1:8000/v1 m
                                        # your judges (a model folder, a vLLM or hosted model) on the same pairs
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import tempfile
import time
from dataclasses import dataclass
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
    PointwiseJudge,
    checker_preference,
    judge_pairs,
    local_judge,
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
    p.add_argument("--lr", type=float, default=LR, help=f"fine-tuning learning rate (AdamW, constant; {LR})")
    p.add_argument("--mode", choices=["pairwise", "pointwise"], default="pairwise", help="how every LLM judge judges")
    p.add_argument("--base", help="fine-tune the judges from this HF folder (no lm-<n>); judge-0 is the folder itself")
    p.add_argument("--context", type=int, default=0, help="the judges' context when fine-tuned (0 = the base's)")
    p.add_argument("--no-stage-cost", action="store_true", help="skip timing the evaluate stage's default judge step")
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


def train_judges(
    base: Path, out: Path, tokenizer_dir: Path, pairs: list[Pair], steps: list[int], args: argparse.Namespace
) -> dict[str, tuple[Path, float]]:
    """`base` fine-tuned to judge like the checker, saved as judge-<n> after each n of `steps` (one run: the first n
    steps of a longer run are the n-step run, so the longer judges cost only their extra steps; judge-0 is `base`
    itself at the judges' context). Returns {name: (folder, seconds of fine-tuning it took)}."""
    from model.hf import save

    judge = local_judge(base, "base", args.mode)
    model = judge.model.train()
    if args.context:  # RoPE is relative: a longer context is the same weights with longer tables, then fine-tuned
        model.cfg = dataclasses.replace(model.cfg, max_seq_len=args.context)
        model.init_rope_tables()
    examples = judge_examples(judge, pairs)
    print(f"    {len(examples)} {args.mode} judging examples encoded (context {model.cfg.max_seq_len})", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    rng, losses, folders, seconds = random.Random(args.seed), [], {}, 0.0
    for step in range(max(steps) + 1):
        if step in steps:
            folders[f"judge-{step}"] = (save(model.eval(), out / f"judge-{step}", tokenizer_dir=tokenizer_dir), seconds)
            model.train()
        if step == max(steps):
            break
        started = time.perf_counter()
        loss = judge_loss(judge, rng.sample(examples, args.batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
        seconds += time.perf_counter() - started
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            print(f"    step {step + 1}: loss {sum(losses[-50:]) / len(losses[-50:]):.3f}", flush=True)
    return folders


def judge_examples(judge: LocalJudge, pairs: list[Pair]) -> list[tuple[list[int], ...]]:
    """Pairwise: (judging prompt ids, the checker's letter) in both orders of every pair. Pointwise: (the good
    answer's prompt ids, the bad one's) per pair, each answer graded alone."""
    if isinstance(judge, PointwiseJudge):
        return [
            tuple(
                judge.encode_answer(p.instruction, a)[0]
                for a in ((p.x, p.y) if p.checker_x > p.checker_y else (p.y, p.x))
            )
            for p in pairs
        ]
    examples, limit = [], judge.model.cfg.max_seq_len - 1  # room for the letter as the input predicting <|end|>
    for p in pairs:
        good_first = p.checker_x > p.checker_y
        for a, b, letter in ((p.x, p.y, 0 if good_first else 1), (p.y, p.x, 1 if good_first else 0)):
            ids = judge.encode(p.instruction, a, b)[0]
            if ids is not None and len(ids) <= limit:
                examples.append((ids, [judge.letters[letter], judge.tok.end_id]))
    return examples


def judge_loss(judge: LocalJudge, batch: list[tuple[list[int], ...]]) -> torch.Tensor:
    """Pairwise: cross-entropy of the letter and then <|end|> after the judging prompt (the prompt's own tokens teach
    nothing about judging). Pointwise: Y for the good answer and N for the bad one (cross-entropy), plus the
    Bradley-Terry loss -log sigmoid(grade(good) - grade(bad)) on the pair, the ranking the verdict reads."""
    if isinstance(judge, PointwiseJudge):
        prompts = [good for good, _ in batch] + [bad for _, bad in batch]
        logp = next_token_logp(judge, prompts, [[] for _ in prompts])[:, 0]  # (2B,V)
        labels = torch.tensor([judge.grades[0]] * len(batch) + [judge.grades[1]] * len(batch))
        grade = logp[:, judge.grades[0]] - logp[:, judge.grades[1]]  # (2B,)
        rank = -torch.nn.functional.logsigmoid(grade[: len(batch)] - grade[len(batch) :]).mean()
        return torch.nn.functional.nll_loss(logp, labels) + rank
    logp = next_token_logp(judge, [ids for ids, _ in batch], [target for _, target in batch])  # (B,2,V)
    targets = torch.tensor([target for _, target in batch])  # (B,2)
    return torch.nn.functional.nll_loss(logp.flatten(0, 1), targets.flatten())


def next_token_logp(judge: LocalJudge, prompts: list[list[int]], targets: list[list[int]]) -> torch.Tensor:
    """(B, max(1, len(target)), V) log-probabilities at the last prompt position and after each target token but
    the last (teacher forcing on prompt + target, right-padded; the targets of a batch have one length)."""
    rows = [[*ids, *target[:-1]] for ids, target in zip(prompts, targets, strict=True)]  # the last is only predicted
    x = torch.full((len(rows), max(map(len, rows))), judge.tok.pad_id, dtype=torch.long)  # (B,W)
    for i, row in enumerate(rows):
        x[i, : len(row)] = torch.tensor(row)
    h = judge.model.hidden_states(x)  # (B,W,D)
    positions = torch.tensor([[len(ids) - 1 + k for k in range(len(targets[0]) or 1)] for ids in prompts])  # (B,K)
    picked = h[torch.arange(len(rows))[:, None], positions]  # (B,K,D): logits only where trained
    return torch.log_softmax(judge.model.lm_head(picked).float(), dim=-1)  # (B,K,V)


def build_models(root: Path, args: argparse.Namespace, train: list[Pair]) -> dict[str, tuple[Path, float]]:
    """lm-<n> (without --base) and judge-<n> folders under root, each with the seconds its training took."""
    print("training the judges:", flush=True)
    if args.base:
        folders: dict[str, tuple[Path, float]] = {}
        base = tokenizer_dir = Path(args.base)
    else:
        tokenizer_dir = tiny_tokenizer(root)
        folders = tiny_lms(root, tokenizer_dir, args)
        base = folders[f"lm-{max(args.lm_steps)}"][0]
    judges = train_judges(base, root, tokenizer_dir, train, args.judge_steps, args)
    for name, (_, seconds) in judges.items():
        print(f"  {name}: {seconds:.0f} s of fine-tuning", flush=True)
    return {**folders, **judges}


def tiny_tokenizer(root: Path) -> Path:
    from tests.alignment_fixtures import make_tokenizer

    return make_tokenizer(root / "tokenizer", docs=1000)


def tiny_lms(root: Path, tokenizer_dir: Path, args: argparse.Namespace) -> dict[str, tuple[Path, float]]:
    """lm-<n>: tiny Llamas trained n steps on builtin stories and rendered chats (the serve fixtures' models)."""
    from tasks.common.chat import render_chat
    from tasks.sources import builtin
    from tests.evaluate_fixtures import train_tiny

    texts = [d.text for d in builtin.generate_corpus(300, 3, 0.0, 0.0, 0.0)]
    texts += [render_chat(ex["messages"]) for ex in builtin.generate_instructions(300, 3, "train")]
    random.Random(0).shuffle(texts)
    folders = {}
    for steps in args.lm_steps:
        started = time.perf_counter()
        folder = train_tiny(root / f"lm-{steps}", tokenizer_dir, texts, steps=steps, seed=args.seed)
        folders[f"lm-{steps}"] = (folder, time.perf_counter() - started)
        print(f"  lm-{steps}: {folders[f'lm-{steps}'][1]:.0f} s", flush=True)
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
    prefs = _prefs(args.pairs, args.seed)
    constraints = {p["prompt"]: p["constraints"] for p in prefs}
    results: dict[str, Result] = {}
    with tempfile.TemporaryDirectory(prefix="bench-judge-") as tmp:
        folders = {} if args.no_train else build_models(Path(tmp), args, train)
        folders.update({folder: (Path(folder), 0.0) for folder in args.folder})
        judges: list[tuple[str, Judge | None]] = [(name, None) for name in folders]
        if args.endpoint:
            endpoint = EndpointConfig(base_url=args.endpoint[0], model=args.endpoint[1], api_key_env=key_env())
            judges.append((f"{args.endpoint[1]} (endpoint)", EndpointJudge(endpoint)))
        judges += [("longer answer", LongerJudge()), ("checker", CheckerJudge(constraints))]
        for name, judge in judges:
            folder, trained = folders.get(name, (None, 0.0))
            started = time.perf_counter()
            rows = judge_pairs(judge or local_judge(folder, name, args.mode), pairs)
            results[name] = Result(summarise(rows), time.perf_counter() - started, rows, trained)
        if not args.no_endpoint and not args.no_train and args.mode == "pairwise":  # the endpoint has no grades
            strongest = f"judge-{max(args.judge_steps)}"
            started = time.perf_counter()
            rows = endpoint_rows(folders[strongest][0], pairs, Path(tmp) / "feedback")
            figures = {**summarise(rows), "unparsed_share": sum(r["unparsed"] for r in rows) / (2 * len(rows))}
            results[f"{strongest} (endpoint)"] = Result(figures, time.perf_counter() - started, rows, 0.0)
        cost = None if args.no_stage_cost else stage_cost(Path(tmp))
    report(results, pairs, args)
    report_kinds(results, [p["broken"] for p in prefs])
    if cost:
        print(
            f"\nevaluate stage's default judge step (small preset shape, 3 pairs x 16 prompts x 2 orders, 3 model "
            f"loads): {cost[0]:.1f} s, {cost[1]} of 48 pairs cut to fit the context"
        )


@dataclass
class Result:
    """One judge's figures, the seconds it took to judge the pairs, its rows, and the seconds it trained."""

    figures: dict
    seconds: float
    rows: list[dict]
    trained_s: float


def key_env() -> str:
    """JUDGE_API_KEY when it is set (the endpoint judge reads the key from the variable it names), else no key."""
    import os

    return "JUDGE_API_KEY" if os.environ.get("JUDGE_API_KEY") else ""


def _prefs(n: int, seed: int) -> list[dict]:
    from tasks.sources import builtin

    return list(builtin.generate_preferences(n, seed, "test"))


def report(results: dict[str, Result], pairs: list[Pair], args: argparse.Namespace) -> None:
    checker = results["checker"].figures
    print(
        f"\n{len(pairs)} held-out builtin preference pairs, each judged in both orders ({args.mode}); "
        f"checker win rate of x {checker['checker_win_rate']:.3f}; "
        f"checker picks the longer answer in {fmt(checker['checker_length_share'])} of them"
    )
    print(f"machine: {_cpu_name()}, torch threads {args.threads}\n")
    header = ["judge", *[name for _, name in COLUMNS], "win rate 95 %", "s/pair", "trained s"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, r in results.items():
        f = r.figures
        lo, hi = f["win_rate_ci95_low"], f["win_rate_ci95_high"]
        cells = [name, *[fmt(f[key]) for key, _ in COLUMNS], f"[{lo:.2f}, {hi:.2f}]"]
        cells += [f"{r.seconds / len(pairs):.3f}", f"{r.trained_s:.0f}"]
        print("| " + " | ".join(cells) + " |")
    for name, r in results.items():
        if "unparsed_share" in r.figures:
            print(f"\n{name}: {r.figures['unparsed_share']:.1%} of its replies named no verdict (a tie in that order)")


def report_kinds(results: dict[str, Result], kinds: list[str]) -> None:
    """Checker agreement by what the bad answer of the pair breaks (pairs of that kind in the header)."""
    names = sorted(set(kinds))
    count = {k: kinds.count(k) for k in names}
    print("\nchecker agreement by broken kind (a tie is no agreement)\n")
    print("| judge | " + " | ".join(f"{k} ({count[k]})" for k in names) + " |")
    print("|" + "---|" * (len(names) + 1))
    for name, r in results.items():
        agreed = dict.fromkeys(names, 0)
        for row, kind in zip(r.rows, kinds, strict=True):
            agreed[kind] += row["verdict"] == checker_preference(row)
        print(f"| {name} | " + " | ".join(f"{agreed[k] / count[k]:.2f}" for k in names) + " |")


if __name__ == "__main__":
    main()
