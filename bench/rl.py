"""Benchmark: base → SFT → DPO → PPO on the reward model → GRPO on the checker, judged on the same held-out prompts
with the same sampling (issue 17), and GRPO on GSM8K's final answers.

Runbook (from the repository root, after `make run` or `dvc repro dpo`: it reads data/{tokenizer,pretrain,sft,dpo,
reward})
    .venv/bin/python -m bench.rl                        # both RL variants at params.yaml's ppo budget, 64 prompts
    .venv/bin/python -m bench.rl --steps 60 --prompts 128
    .venv/bin/python -m bench.rl --variants grpo-checker --set kl_coef=0.1 --set train.lr=5e-5   # other ppo params
    .venv/bin/python -m bench.rl --variants grpo-checker --work /tmp/rl-smoke --steps 4 --prompts 16
    .venv/bin/python -m bench.rl --variants grpo-gsm8k  # GSM8K train questions, accuracy on 200 held-out ones

What it does
  1. For each variant, runs the real ppo stage (`tasks.ppo.run`, one rank, in this process) on params.yaml's ppo
     section with the variant's changes, into <work>/<variant>/ whose data/ links to the project's upstream folders;
     nothing in the project's data/ or metrics/ changes.
        ppo-rm        algorithm ppo, reward rm: a value head, GAE, the KL in the reward (classic RLHF)
        grpo-checker  algorithm grpo, reward checker: the share of the prompt's constraints met
        grpo-gsm8k    algorithm grpo, reward checker on ../shared/data/gsm8k/train.jsonl (a correct final number),
                      200 rows held out by id hash (val_fraction), reported as the held-out accuracy before/after
  2. Answers the same builtin "test" prompts (sampling params.yaml's `sampling` with --prompts) with every model:
     base (data/pretrain), sft, dpo and each builtin variant's policy; scores constraint satisfaction (the checker),
     the reward model's mean score, and degeneration (tasks/common/degeneration.py, fluency NLL under the base model).
  3. Prints one table and writes <work>/result.json.

Reading it: the goal is GRPO on the checker >= 20 points of satisfaction above SFT with no rise in degeneration, and
PPO on the RM at least DPO's satisfaction, or the measured reason it is not (the RM's reward rising while the checker
falls is reward hacking, and the table shows it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UPSTREAM = ("tokenizer", "pretrain", "sft", "dpo", "reward")
VARIANTS: dict[str, dict] = {
    "ppo-rm": {
        "algorithm": "ppo",
        "reward": "rm",
        "group_size": 1,
        "train": {"batch_size": 32, "micro_batch_size": 32},
    },
    "grpo-checker": {"algorithm": "grpo", "reward": "checker"},
    "grpo-gsm8k": {
        "algorithm": "grpo",
        "reward": "checker",
        "sources": ["../shared/data/gsm8k/train.jsonl"],
        "builtin_train": 0,
        "builtin_val": 0,
        "val_fraction": 0.027,  # ~200 of 7,473 questions held out
        "max_new_tokens": 96,
    },
}


def link_upstream(work: Path) -> Path:
    (work / "data").mkdir(parents=True, exist_ok=True)
    for stage in UPSTREAM:
        src, link = ROOT / "data" / stage, work / "data" / stage
        if not (src / "config.json").is_file() and stage != "tokenizer" and not (src / "model").is_dir():
            raise SystemExit(f"{src}: missing; run `make run` (or `dvc repro dpo`) first")
        if not link.exists():
            os.symlink(src, link)
    return work


def nested(flat: dict) -> dict:
    """{"kl_coef": 0.05, "train.lr": 5e-5} → {"kl_coef": 0.05, "train": {"lr": 5e-5}}: `--set` as ppo changes."""
    out: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def ppo_config(changes: dict, steps: int | None):
    from tasks.common.config import load_section

    cfg = load_section("ppo")
    train = dataclasses.replace(cfg.train, **changes.get("train", {}), **({"max_steps": steps} if steps else {}))
    rest = {k: v for k, v in changes.items() if k not in ("train", "sampling")}
    rest["sampling"] = dataclasses.replace(cfg.sampling, **changes.get("sampling", {}))
    if "sources" in rest:
        rest["sources"] = [str((ROOT / s).resolve()) for s in rest["sources"]]
    return dataclasses.replace(cfg, **rest, train=train)


def run_variant(name: str, work: Path, steps: int | None, changes: dict) -> dict:
    """The ppo stage with the variant's params (and `--set`'s), in <work>/<name>; its metrics."""
    from flows.sandbox import deep_merge
    from tasks import ppo
    from tasks.common.dvcio import stage_paths, write_json
    from tasks.common.tracking import Tracker

    root = link_upstream(work / name)
    cfg = ppo_config(deep_merge(VARIANTS[name], changes), steps)
    started = time.perf_counter()
    metrics = ppo.run(cfg, stage_paths("ppo", root), Tracker("ppo", None))
    metrics["wall_seconds"] = round(time.perf_counter() - started, 1)
    write_json(stage_paths("ppo", root).details, metrics)  # the whole record, where the report card reads it
    return metrics


def judge(models: dict[str, Path], prompts: int) -> dict[str, dict]:
    """Every model's answers to the same held-out prompts: satisfaction, RM reward, degeneration, fluency."""
    import torch

    from model.heads import RewardModel
    from tasks.common import degeneration
    from tasks.common.alignment import load_model_folder, load_tokenizer
    from tasks.common.config import load_section
    from tasks.evaluate import answer_nll, answer_prompts, rewards
    from tasks.sources import world
    from tasks.sources.examples import held_out_prompts

    sampling = dataclasses.replace(load_section("sampling"), prompts=prompts)
    tok = load_tokenizer(ROOT / "data" / "tokenizer")
    held = held_out_prompts(sampling.prompts, sampling.prompt_seed)
    base = load_model_folder(models["base"], "base").eval()
    reward_model = RewardModel.load(ROOT / "data" / "reward" / "model")
    out = {}
    for label, folder in models.items():
        model = load_model_folder(folder, label).eval()
        with torch.no_grad():
            scores, rows, answers = answer_prompts(model, tok, held, sampling, label)
            texts = [r["answer"] for r in rows]
            nll = [x for x in answer_nll(base, tok, texts, sampling.batch_size, "cpu") if x is not None]
            rm = rewards(reward_model, answers, tok, sampling.batch_size, "cpu")
        out[label] = {
            "satisfaction": scores["constraint_rate"],
            "all_satisfied": scores["satisfied"],
            "rm_reward": sum(rm) / max(len(rm), 1),
            "fluency_nll": sum(nll) / max(len(nll), 1),
            **degeneration.text_metrics(texts, world.vocabulary()),
        }
    return out


def table(judged: dict[str, dict], runs: dict[str, dict]) -> str:
    cols = [
        "satisfaction",
        "all_satisfied",
        "rm_reward",
        "fluency_nll",
        "repeated_line_rate",
        "repeated_ngram_rate",
        "distinct_2",
        "nonword_rate",
        "mean_words",
    ]
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for label, m in judged.items():
        lines.append(f"| {label} | " + " | ".join(f"{m.get(c, float('nan')):.3f}" for c in cols) + " |")
    lines += [
        "",
        "| run | steps | s/step | rollout tok/s | reward first → last | checker first → last | KL last |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in runs.items():
        lines.append(
            f"| {name} | {m['steps']} | {m['seconds_per_step']:.1f} | {m.get('rollout_tokens_per_s', 0):,.0f} | "
            f"{m.get('rollout_reward_first', 0):.3f} → {m.get('rollout_reward_last', 0):.3f} | "
            f"{m.get('rollout_checker_first', 0):.3f} → {m.get('rollout_checker_last', 0):.3f} | "
            f"{m.get('rollout_kl_last', 0):.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="ppo-rm,grpo-checker", help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=None, help="ppo steps per variant (default: params.yaml's)")
    p.add_argument("--prompts", type=int, default=64, help="builtin held-out prompts every model answers")
    p.add_argument("--work", type=Path, default=Path("/tmp/scratchlm-bench-rl"))
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a ppo param for every variant (repeatable), e.g. kl_coef=0.05 or train.lr=5e-5",
    )
    args = p.parse_args()
    os.environ.setdefault("SCRATCHLM_NO_MLFLOW", "1")
    from flows.pipeline import parse_overrides
    from tasks.common.config import ScratchError

    try:
        changes = nested(parse_overrides(args.set))
    except ScratchError as e:
        p.error(str(e))
    runs = {name: run_variant(name, args.work, args.steps, changes) for name in args.variants.split(",")}
    models = {"base": ROOT / "data/pretrain/model", "sft": ROOT / "data/sft/model", "dpo": ROOT / "data/dpo/model"}
    models.update({n: args.work / n / "data/ppo/model" for n in runs if n != "grpo-gsm8k"})
    judged = judge(models, args.prompts)
    result = {"judged": judged, "runs": runs, "prompts": args.prompts, "set": changes, "steps": args.steps}
    (args.work / "result.json").write_text(json.dumps(result, indent=1, default=str))
    print(table(judged, runs))
    if "grpo-gsm8k" in runs:
        m = runs["grpo-gsm8k"]
        print(f"\nGSM8K: held-out accuracy {m.get('val_checker', float('nan')):.3f} on {m['val_examples']} questions")
    print(f"\nresult: {args.work / 'result.json'}")


if __name__ == "__main__":
    main()
