"""evaluate — score every model the pipeline produced (base, SFT, DPO) and write the report card.

Runbook
    dvc repro evaluate                           # or: scratchlm stage evaluate / python -m tasks.evaluate
    dvc metrics diff                             # compare experiments on metrics/evaluate.json
    dvc plots show                               # bpb and benchmark plots (metrics/evaluate_plots/)
    dvc exp run -S evaluate.limit=500            # more benchmark items (slower, tighter numbers)
    scratchlm report                             # where the report card is (`--regenerate` to rebuild it)
    lm_eval --model hf --model_args pretrained=data/dpo/model --include_path evals --tasks scratchlm_cloze
                                                 # the same benchmark by hand, from the repository root
    jq -c '{answer, degeneration, fluency_nll}' data/evaluate/answers/dpo.jsonl
                                                 # which answers made a model's degeneration figures
    dvc exp run -S evaluate.judge.backend=endpoint -S evaluate.judge.endpoint.base_url=http://127.0.0.1:8000/v1 \
        -S evaluate.judge.endpoint.model=scratchlm@champion      # judge with any OpenAI-compatible server
    jq -c '{orders, verdict, checker_x, checker_y}' data/evaluate/judge/ppo_vs_sft.jsonl   # the judge's verdicts

Reads   data/<stage>/model/ for each `evaluate.models` entry (label → stage: base → pretrain, sft, dpo): HF
        LlamaForCausalLM folders with their tokenizer; data/reward/model/ (the reward model, for win rates);
        data/pretokenize/val.bin + meta.json + val_docs.jsonl.gz (the held-out split); `evaluate.data_dir`
        (default ../shared/data) for the HellaSwag and PIQA slices; evals/*.yaml (the lm-eval task definitions)
Writes  data/evaluate/benchmarks/<name>.jsonl    the items each benchmark scored (cloze generated from the builtin
                                                 world with held-out seeds; slices capped at `limit`, items too
                                                 long for the model's context counted and left out)
        data/evaluate/lm_eval/<label>.json      lm-eval's results and, per item, the log-likelihood of each choice
        data/evaluate/answers/<label>.jsonl     sampled answers to held-out prompts, constraint checks, rewards,
                                                each answer's `degeneration` figures and `fluency_nll`
        data/evaluate/samples.md                generations for the fixed prompt set, model by model
        data/evaluate/judge/<x>_vs_<y>.jsonl    evaluate.judge's verdicts on a pair's answers (tasks/common/judge.py):
                                                both orders, the combined verdict, margins or replies, checker scores
        feedback/judge_preferences.jsonl        with evaluate.judge.write_preferences: its decisive, order-consistent
                                                verdicts as {prompt, chosen, rejected, source: "judge:<name>"}, judge
                                                feedback (not human) that reward/dpo `sources` can list
        metrics/evaluate.json                   per model: val loss/ppl/bpb, benchmark acc/acc_norm, constraint
                                                satisfaction (share of constraints met) and all_satisfied (share
                                                of answers meeting all); the degeneration of its answers (see
                                                below); win rates; `judge` (per pair: the judge's win rate with
                                                its 95 % interval, ties, position consistency and bias, length
                                                bias, agreement and kappa with the checker); what was skipped and why;
                                                `models` (labels, in report order) and `model_stages` (label →
                                                stage, how the register stage finds its model's evaluation)
        metrics/evaluate_plots/*.json           DVC plots: bpb per model, benchmark accuracy per model
        reports/report.md + reports/*.png       the report card (tasks/common/report.py), logged to MLflow
Degeneration (per model, next to `satisfaction`; the promotion gates read them)
        fluency_nll          its answers read by the base model (the `pretrain` entry of evaluate.models): the mean
                             over answers of each one's nats/token, the answer scored alone as plain text after one
                             <|endoftext|> (the base never saw the chat template, so no prompt around it)
        fluency_gap          fluency_nll minus the base model's val_loss: about 0 for text like the corpus
        repeated_line_rate, repeated_ngram_rate, distinct_1, distinct_2, mean_words, nonword_rate
                             text figures of tasks/common/degeneration.py (nonword = outside world.vocabulary())
        Without a base model entry (or with it skipped) the two fluency keys are absent and `skipped.fluency` says why.
Checks  a listed model that is missing fails the stage (`missing_models: skip` evaluates what exists instead,
        saying what it skipped); a benchmark whose data folder is absent is skipped with the reason; lm-eval runs
        fully offline (HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 unless set otherwise) on local JSON files.
Scale   every cap is a param: `val_max_tokens` (held-out tokens per model), `limit` (items per benchmark),
        `sampling.prompts`. The CPU default takes about two minutes for three small models; on a GPU the same
        code runs on CUDA (lm-eval and our own passes), and `lm_eval_tasks` adds standard lm-eval tasks by name
        (MMLU, ARC, ...) when the network or an HF cache allows.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tokenizers import Tokenizer

from tasks.common import chat, degeneration
from tasks.common.config import ROOT, ScratchError, check, input_path
from tasks.common.dvcio import StagePaths, fresh_dir, read_json, write_json, write_jsonl
from tasks.common.judge import JudgeConfig
from tasks.common.report import DEGENERATION_METRICS, MODEL_METRICS, build_report
from tasks.common.stage import stage_main
from tasks.common.tracking import Tracker
from tasks.common.train_config import SamplingConfig
from tasks.sources import world
from tasks.sources.builtin import generate_cloze
from tasks.sources.examples import check_answers, checker_score, held_out_prompts

EVALS_DIR = ROOT / "evals"
FLUENCY_STAGE = "pretrain"
"""The stage whose model (the base, never tuned on chat) reads every model's answers for `fluency_nll`."""
PLOTS_DIR = "metrics/evaluate_plots"
LN2 = math.log(2)
RESERVED_KEYS = {
    "models",
    "model_stages",
    "win_rate",
    "judge",
    "benchmark_items",
    "skipped",
    "device",
    "seconds_by_model",
    "val_text_bytes",
    "report",
    "seconds",
}
"""Top-level keys of metrics/evaluate.json besides the model labels (a label may not be one of them)."""


@dataclass(frozen=True)
class Benchmark:
    """A multiple-choice task of evals/: where its items come from and how its prompt reads (for length checks)."""

    task: str  # the lm-eval task name (evals/<task>.yaml)
    folder: str | None  # sub-folder of `data_dir` holding the slice; None = generated here
    text: Callable[[dict], str]  # the prompt, as the YAML's doc_to_text renders it
    choices: Callable[[dict], list[str]]  # the answer options, as the YAML's doc_to_choice gives them


BENCHMARKS: dict[str, Benchmark] = {
    "cloze": Benchmark("scratchlm_cloze", None, lambda d: d["context"], lambda d: d["choices"]),
    "hellaswag": Benchmark("scratchlm_hellaswag", "hellaswag", lambda d: d["query"], lambda d: d["endings"]),
    "piqa": Benchmark(
        "scratchlm_piqa", "piqa", lambda d: f"Question: {d['goal']}\nAnswer:", lambda d: [d["sol1"], d["sol2"]]
    ),
}

DEFAULT_SAMPLE_PROMPTS = [
    "Write a short story about a rabbit named Lily who goes to the beach.",
    "Tell me a story about a dog called Max and a lost ball. Use at most 4 sentences.",
    "Write a story for kids where Tom the cat spends a day at the park. Start with a title.",
]
DEFAULT_SAMPLE_TEXTS = ["Once upon a time, there was a little", "One day, Mia went to the"]


@dataclass(frozen=True)
class EvaluateConfig:
    models: dict[str, str] = field(
        default_factory=lambda: {"base": "pretrain", "sft": "sft", "dpo": "dpo", "ppo": "ppo"}
    )
    """Models to evaluate: label → the stage whose data/<stage>/model folder holds it (report columns in order)."""
    missing_models: Literal["error", "skip"] = "error"
    """A listed model (or the reward model) whose folder is absent: `error` (the pipeline makes them all) or
    `skip` it with a logged reason, to evaluate a partial pipeline (e.g. base only)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where models run (lm-eval and our own passes): auto = CUDA when available, else CPU."""
    batch_size: int = 16
    """Sequences per forward pass for validation loss and lm-eval's log-likelihood requests."""
    val_max_tokens: int = 16384
    """Held-out tokens scored per model (whole documents from the start of val.bin; 0 = the whole split)."""
    benchmarks: list[str] = field(default_factory=lambda: ["cloze", "hellaswag", "piqa"])
    """lm-eval tasks of evals/ to run: cloze (builtin story cloze), hellaswag, piqa (slices in data_dir)."""
    lm_eval_tasks: list[str] = field(default_factory=list)
    """Standard lm-eval task names to add (e.g. arc_easy); they need the network or a filled HF datasets cache."""
    limit: int = 32
    """Items per benchmark (the CPU default stays fast; raise it for tighter numbers)."""
    cloze_seed: int = 9001
    """Seed of the held-out story-cloze items (builtin split "test": combinations never trained on)."""
    data_dir: str = "../shared/data"
    """Folder holding hellaswag/ and piqa/ JSONL slices (relative to the repository); absent → those skipped."""
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(prompts=16, batch_size=16))
    """Held-out builtin "test" prompts answered by every model with the same seed: constraint satisfaction
    (check_constraints) and the reward model's win rates are computed on these answers."""
    reward_model: str = "reward"
    """Stage whose data/<stage>/model is the reward model for win rates ("" = no win rates)."""
    win_rates: list[str] = field(default_factory=lambda: ["sft:base", "dpo:sft", "ppo:sft"])
    """Pairs `a:b` of model labels: the share of prompts where the reward model prefers a's answer (ties = 1/2)."""
    sample_prompts: list[str] = field(default_factory=lambda: list(DEFAULT_SAMPLE_PROMPTS))
    """Fixed user prompts every model answers (chat format) for the report's samples."""
    sample_texts: list[str] = field(default_factory=lambda: list(DEFAULT_SAMPLE_TEXTS))
    """Fixed story openings every model continues as plain text."""
    sample_max_new_tokens: int = 64
    """Longest sample generation."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    """LLM-as-judge on the held-out answers (tasks/common/judge.py): verdicts in both orders (pairwise) or a grade per
    answer (pointwise), win rates with 95 % intervals, position and length bias, and its agreement with the
    constraint checker next to them."""
    report: bool = True
    """Write the report card (reports/report.md + plots) at the end of the stage."""

    def __post_init__(self) -> None:
        check(len(self.models) > 0, "models", "list at least one model (label: stage)")
        taken = sorted(set(self.models) & RESERVED_KEYS)
        check(
            not taken,
            "models",
            f"label {taken[0] if taken else ''!r} is a key of metrics/all/evaluate.json itself; rename it",
        )
        unknown = [b for b in self.benchmarks if b not in BENCHMARKS]
        check(
            not unknown,
            "benchmarks",
            f"unknown {unknown} (known: {', '.join(BENCHMARKS)}; standard lm-eval tasks go in lm_eval_tasks)",
        )
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.val_max_tokens >= 0, "val_max_tokens", "must be >= 0 (0 = the whole split)")
        check(self.limit >= 1, "limit", "must be >= 1")
        check(self.sample_max_new_tokens >= 1, "sample_max_new_tokens", "must be >= 1")
        for pair in self.win_rates:
            a, sep, b = pair.partition(":")
            check(
                bool(sep) and a in self.models and b in self.models and a != b,
                "win_rates",
                f"{pair!r} must be `a:b` with two different labels of evaluate.models ({', '.join(self.models)})",
            )
        for pair in self.judge.pairs:
            x, _, y = pair.partition(":")
            check(
                x in self.models and y in self.models,
                "judge.pairs",
                f"{pair!r}: both must be labels of evaluate.models ({', '.join(self.models)})",
            )


Config = EvaluateConfig  # the section class params.yaml loads (tasks/common/config.py)


# ------------------------------------------------------------------------------------------------ models


@dataclass
class Evaluated:
    """One model under evaluation."""

    label: str
    stage: str
    folder: Path


def find_models(cfg: EvaluateConfig, paths: StagePaths, skipped: dict[str, str]) -> list[Evaluated]:
    found = []
    for label, stage in cfg.models.items():
        folder = paths.of(stage) / "model"
        if (folder / "config.json").is_file():
            found.append(Evaluated(label, stage, folder))
            continue
        reason = f"{folder} has no model (run `dvc repro {stage}`)"
        if cfg.missing_models == "error":
            raise ScratchError(f"evaluate.models.{label}: {reason}, or set evaluate.missing_models: skip")
        skipped[f"model:{label}"] = reason
        print(f"evaluate: skipping {label}: {reason}")
    if not found:
        raise ScratchError(f"evaluate.models: none of {dict(cfg.models)} has a model folder; run the training stages")
    return found


def pick_device(wanted: str) -> str:
    import torch

    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ScratchError("evaluate.device: cuda requested but torch sees no CUDA device")
    return wanted


# ------------------------------------------------------------------------------------------------ held-out loss


@dataclass
class HeldOut:
    """The first documents of the validation split: token ids (eot excluded) and UTF-8 bytes of their text."""

    docs: list[np.ndarray]
    text_bytes: int
    eot_id: int


def held_out(pretok: Path, max_tokens: int) -> HeldOut:
    """Whole documents from the start of val.bin until `max_tokens` (0 = all), with their bytes from val_docs."""
    meta_file = pretok / "meta.json"
    if not meta_file.is_file():
        raise ScratchError(f"{meta_file}: missing; run `dvc repro pretokenize`")
    meta = read_json(meta_file)
    tokens = np.memmap(pretok / "val.bin", dtype=meta["dtype"], mode="r")
    eot = int(meta["eot_id"])
    docs: list[np.ndarray] = []
    start, n = 0, 0
    for end in np.flatnonzero(tokens == eot):  # each document ends with one eot
        docs.append(np.asarray(tokens[start:end], dtype=np.int64))
        n += end + 1 - start
        start = end + 1
        if max_tokens and n >= max_tokens:
            break
    if not docs:
        raise ScratchError(f"{pretok / 'val.bin'}: no complete document (no eot id {eot}); rerun pretokenize")
    texts = _first_texts(pretok / meta.get("val_docs", "val_docs.jsonl.gz"), len(docs))
    return HeldOut(docs, sum(len(t.encode("utf-8")) for t in texts), eot)


def _first_texts(path: Path, n: int) -> list[str]:
    texts = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            if len(texts) == n:
                return texts
    raise ScratchError(f"{path}: {len(texts)} documents, but val.bin holds at least {n}; rerun pretokenize")


def held_out_loss(model, data: HeldOut, batch_size: int, device: str) -> dict[str, float]:
    """Loss over every token of the documents and their closing eot, each document read after an eot (as in
    training); documents longer than the context are scored in disjoint windows. bpb = nats / ln 2 / text bytes."""
    T = model.cfg.max_seq_len
    windows = []
    for doc in data.docs:
        seq = [data.eot_id, *doc.tolist(), data.eot_id]
        windows += [seq[s : s + T + 1] for s in range(0, len(seq) - 1, T)]
    scored = row_nats(model, windows, data.eot_id, batch_size, device)
    nats, count = sum(n for n, _ in scored), sum(c for _, c in scored)
    loss = nats / count
    return {
        "val_loss": loss,
        "val_ppl": math.exp(loss),
        "val_bpb": nats / LN2 / data.text_bytes,
        "val_tokens": count,
        "val_docs": len(data.docs),
    }


def row_nats(model, rows: list[list[int]], pad_id: int, batch_size: int, device: str) -> list[tuple[float, int]]:
    """(summed nats, predicted tokens) of each row of ids (each at most the context + 1 long): every token after
    the first is predicted from those before it. Rows are batched by length and right-padded with pad_id, which
    is never predicted (causal attention: the padding after a row cannot change its scores)."""
    import torch

    from model.losses import IGNORE_INDEX, token_logprobs

    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = [i for i in order[start : start + batch_size] if len(rows[i]) > 1]
            if not chunk:
                continue
            width = max(len(rows[i]) for i in chunk) - 1
            x = torch.full((len(chunk), width), pad_id, dtype=torch.long)  # (B,W) right-padded
            y = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
            for b, i in enumerate(chunk):
                x[b, : len(rows[i]) - 1] = torch.tensor(rows[i][:-1])
                y[b, : len(rows[i]) - 1] = torch.tensor(rows[i][1:])
            logits, _ = model(x.to(device), all_logits=True)  # (B,W,V)
            nats = (-token_logprobs(logits, y.to(device)).sum(dim=-1)).tolist()  # (B,) one transfer per batch
            counts = (y != IGNORE_INDEX).sum(dim=-1).tolist()  # (B,)
            for b, i in enumerate(chunk):
                out[i] = (nats[b], counts[b])
    return out


# ------------------------------------------------------------------------------------------------ benchmarks


def prepare_benchmarks(
    cfg: EvaluateConfig, paths: StagePaths, tokenizer_file: Path, max_len: int, skipped: dict[str, str]
) -> tuple[dict[str, Path], dict[str, dict]]:
    """Write each benchmark's items to data/evaluate/benchmarks/<name>.jsonl: (files, item counts)."""
    tok = Tokenizer.from_file(str(tokenizer_file))
    out = paths.out / "benchmarks"
    out.mkdir(parents=True, exist_ok=True)
    files, counts = {}, {}
    for name in cfg.benchmarks:
        bench = BENCHMARKS[name]
        source, rows = benchmark_rows(name, bench, cfg, paths.root)
        if rows is None:
            skipped[f"benchmark:{name}"] = source
            print(f"evaluate: skipping {name}: {source}")
            continue
        kept, too_long = [], 0
        for row in rows:
            if len(kept) == cfg.limit:
                break
            if fits(tok, bench.text(row), bench.choices(row), max_len):
                kept.append(row)
            else:
                too_long += 1
        counts[name] = {"items": len(kept), "too_long_for_context": too_long, "source": source}
        if not kept:  # lm-eval fails on an empty task: say why instead
            skipped[f"benchmark:{name}"] = f"no item fits the model's context of {max_len} tokens ({too_long} too long)"
            print(f"evaluate: skipping {name}: {skipped[f'benchmark:{name}']}")
            continue
        files[name] = write_jsonl(out / f"{name}.jsonl", kept)
    return files, counts


def benchmark_rows(name: str, bench: Benchmark, cfg: EvaluateConfig, root: Path) -> tuple[str, Any]:
    """(source description, rows) — rows None when the data is absent (the source then says why)."""
    if bench.folder is None:
        # more than `limit`, so items too long for the context can be left out without running short
        return (
            f"builtin generate_cloze(seed={cfg.cloze_seed}, split=test)",
            generate_cloze(cfg.limit * 2, cfg.cloze_seed, "test"),
        )
    folder = (input_path(cfg.data_dir, root) / bench.folder).resolve()
    found = sorted(folder.glob("*.jsonl")) if folder.is_dir() else []
    if not found:
        return f"no {bench.folder} slice (*.jsonl) in {folder} (evaluate.data_dir)", None
    return str(found[0]), _jsonl(found[0])


def _jsonl(path: Path):
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise ScratchError(f"{path}:{i}: not JSON ({e.msg})") from None


def fits(tok, text: str, choices: list[str], max_len: int) -> bool:
    """True when prompt + the longest choice fit the context (lm-eval would otherwise cut the prompt's start)."""
    prompt = len(tok.encode(text, add_special_tokens=False).ids)
    longest = max(len(tok.encode(" " + c, add_special_tokens=False).ids) for c in choices)
    return prompt + longest + 2 <= max_len  # + 2: a merge across the boundary can shift a token either way


def run_lm_eval(
    folder: Path, files: dict[str, Path], extra_tasks: list[str], limit: int, batch_size: int, device: str, seed: int
) -> dict:
    """lm-eval (`hf` model on the exported folder) on our offline tasks (+ standard ones by name).

    Returns {"scores": {name: {acc, acc_norm}}, "items": {name: [{doc_id, target, loglikelihoods, acc}]},
    "results": lm-eval's own results dict}."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    names = {BENCHMARKS[n].task: n for n in files}
    tasks: list[Any] = [*extra_tasks]
    if files:
        # our YAMLs are loaded by name from evals/; the item files are passed as overrides of `data_files`
        members = [
            {"task": BENCHMARKS[n].task, "dataset_kwargs": {"data_files": {"test": str(p)}}} for n, p in files.items()
        ]
        tasks.append({"group": "scratchlm_evaluate", "task": members})
    manager = TaskManager(include_path=str(EVALS_DIR), include_defaults=bool(extra_tasks))
    out = simple_evaluate(
        model="hf",
        model_args={"pretrained": str(folder), "dtype": "float32"},
        tasks=tasks,
        task_manager=manager,
        limit=limit,
        batch_size=batch_size,
        device=device,
        log_samples=True,
        bootstrap_iters=0,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    scores, items = {}, {}
    for task, result in out["results"].items():
        if "acc,none" not in result:
            continue  # the group entry
        name = names.get(task, task)
        scores[name] = {
            k.split(",")[0]: float(v)
            for k, v in result.items()
            if k.endswith(",none") and "stderr" not in k and isinstance(v, (int, float))
        }
        items[name] = [
            {
                "doc_id": s["doc_id"],
                "target": s["target"],
                "loglikelihoods": [float(r[0]) for r in s["filtered_resps"]],
                "acc": float(s["acc"]),
            }
            for s in out["samples"].get(task, [])
        ]
    return {"scores": scores, "items": items, "results": out["results"]}


def quiet_libraries() -> None:
    """lm-eval, transformers and datasets log at INFO with progress bars; the stage prints its own summary."""
    for name in ("lm_eval", "lm-eval", "transformers", "datasets", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    with_offline_defaults()


def with_offline_defaults() -> None:
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(name, "1")
    try:  # datasets reads its offline flag at import: make sure a late import sees it too
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = os.environ["HF_HUB_OFFLINE"] == "1" or datasets.config.HF_HUB_OFFLINE
    except ImportError:
        pass


# ------------------------------------------------------------------------------------------------ generations


def answer_prompts(model, tok, held: list[dict], cfg: SamplingConfig, label: str) -> tuple[dict, list[dict], list]:
    """Sampled answers to the held-out prompts: (constraint scores, rows of answers/<label>.jsonl, the answers)."""
    from tasks.common.alignment import sample_answers

    answers = sample_answers(model, tok, [h["prompt_messages"] for h in held], cfg, desc=f"evaluate: {label} answers")
    scores, rows = check_answers(held, [tok.decode(a.ids) for a in answers], [a.finished for a in answers])
    return scores, rows, answers


def rewards(reward_model, answers: list, tok, batch_size: int, device: str) -> list[float]:
    """The reward model's score of each (prompt, reply) pair, the reply ending in <|end|> when it finished."""
    import torch

    from tasks.common.alignment import rewards_of, sequences_batch

    scores: list[float] = []
    with torch.inference_mode():
        for start in range(0, len(answers), batch_size):
            chunk = answers[start : start + batch_size]
            batch = sequences_batch([a.prompt for a in chunk], [a.reply(tok.end_id) for a in chunk], tok.pad_id)
            scores += rewards_of(reward_model, batch.to(device)).float().tolist()
    return scores


def text_degeneration(rows: list[dict]) -> dict[str, float]:
    """The degeneration metrics of the answers in `rows` (tasks/common/degeneration.py, words checked against the
    builtin world's vocabulary); each row gets its own under `degeneration`."""
    vocabulary = world.vocabulary()
    for row in rows:
        row["degeneration"] = degeneration.answer_metrics(row["answer"], vocabulary)
    return degeneration.text_metrics([row["answer"] for row in rows], vocabulary)


def answer_nll(model, tok, texts: list[str], batch_size: int, device: str) -> list[float | None]:
    """Each text's mean negative log-likelihood (nats/token) under `model`, read as plain text right after one
    <|endoftext|> (the BOS every pretraining document follows), with no chat template around it (the base model
    never saw one) and no closing token (a cut-off answer is not charged for one); None for an empty text. A text
    longer than the context is scored on its first max_seq_len tokens."""
    eot = tok.special[chat.EOT]
    rows = [[eot, *tok.plain(text.strip())][: model.cfg.max_seq_len + 1] for text in texts]
    return [nats / count if count else None for nats, count in row_nats(model, rows, eot, batch_size, device)]


def fluency(cfg: EvaluateConfig, models: list[Evaluated], per_model: dict, tok, device: str, skipped: dict) -> None:
    """Every model's answers read by the base model: each model's `fluency_nll` (the mean over its answers of each
    answer's nats/token) and `fluency_gap` (fluency_nll minus the base model's val_loss: how much harder the base
    finds the answers than held-out corpus text); each answer row gets its `fluency_nll`. Without the base model
    (no evaluate.models entry of stage FLUENCY_STAGE, or it was skipped) the reason goes to `skipped`."""
    if not cfg.sampling.prompts:
        return
    base = next((m for m in models if m.stage == FLUENCY_STAGE), None)
    if base is None:
        listed = [label for label, stage in cfg.models.items() if stage == FLUENCY_STAGE]
        skipped["fluency"] = (
            f"the base model {listed[0]!r} ({FLUENCY_STAGE}) that reads the answers was skipped"
            if listed
            else f"no evaluate.models entry is the {FLUENCY_STAGE} model, the base that reads the answers"
        )
        print(f"evaluate: no fluency: {skipped['fluency']}")
        return
    from tasks.common.alignment import load_model_folder

    model = load_model_folder(base.folder, f"{base.label} model").to(device)
    reference = per_model[base.label].metrics["val_loss"]
    for result in per_model.values():
        values = answer_nll(model, tok, [row["answer"] for row in result.answer_rows], cfg.batch_size, device)
        for row, value in zip(result.answer_rows, values, strict=True):
            row["fluency_nll"] = value
        present = [v for v in values if v is not None]
        if present:
            mean = sum(present) / len(present)
            result.metrics.update({"fluency_nll": mean, "fluency_gap": mean - reference})
    print(
        f"evaluate: fluency (nats/token of the answers read by {base.label}; its val loss {reference:.3f}): "
        + ", ".join(
            f"{label} {r.metrics['fluency_nll']:.3f}" for label, r in per_model.items() if "fluency_nll" in r.metrics
        ),
        flush=True,
    )


def win_rate(a: list[float], b: list[float]) -> float:
    """Share of prompts where reward a > reward b, ties counting one half."""
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b, strict=True)) / max(len(a), 1)


def fixed_samples(model, tok, cfg: EvaluateConfig) -> list[dict]:
    """Generations for the fixed prompt set: chat replies to sample_prompts, continuations of sample_texts
    (each set decoded as one left-padded batch with the sampling seed)."""
    from model import generate

    s = cfg.sampling
    eot = tok.special[chat.EOT]
    sets = [
        (
            "chat",
            cfg.sample_prompts,
            tok.stop_ids,
            lambda p: chat.encode_chat(tok.tok, [{"role": "user", "content": p}], add_generation_prompt=True)[0],
        ),
        ("text", cfg.sample_texts, (eot,), lambda p: [eot, *tok.plain(p)]),
    ]
    rows = []
    for kind, prompts, stops, encode in sets:
        if not prompts:
            continue
        ids = [encode(p) for p in prompts]
        budget = min(cfg.sample_max_new_tokens, model.cfg.max_seq_len - max(len(i) for i in ids))
        new = generate(model, ids, budget, temperature=s.temperature, top_p=s.top_p, stop_tokens=stops, seed=s.seed)
        rows += [{"kind": kind, "prompt": p, "text": tok.decode(n)} for p, n in zip(prompts, new)]
    return rows


def samples_markdown(samples: dict[str, list[dict]]) -> str:
    lines = ["# Samples", ""]
    labels = list(samples)
    if not labels:
        return "\n".join(lines)
    for i, row in enumerate(samples[labels[0]]):
        kind = "User prompt" if row["kind"] == "chat" else "Story opening"
        lines += [f"## {kind}: {row['prompt']}", ""]
        for label in labels:
            text = samples[label][i]["text"].strip() or "(empty)"
            lines += [f"**{label}**", "", *("> " + line for line in text.splitlines()), ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ stage


@dataclass
class ModelResult:
    """Everything measured on one model."""

    metrics: dict[str, Any]
    answers: list  # tasks.common.alignment.Answer per held-out prompt (for the reward model)
    answer_rows: list[dict]  # the same answers as rows of answers/<label>.jsonl
    samples: list[dict]  # the fixed-prompt generations
    seconds: dict[str, float]


def evaluate_model(
    m: Evaluated,
    cfg: EvaluateConfig,
    data: HeldOut,
    held: list[dict],
    tok,
    files: dict[str, Path],
    device: str,
    out: Path,
) -> ModelResult:
    """Held-out loss, answers to the held-out prompts, fixed samples (our model), then lm-eval (its HF loader)."""
    from tasks.common.alignment import load_model_folder

    seconds: dict[str, float] = {}
    started = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal started
        seconds[name] = round(time.perf_counter() - started, 1)
        started = time.perf_counter()

    model = load_model_folder(m.folder, f"{m.label} model").to(device)
    metrics: dict[str, Any] = held_out_loss(model, data, cfg.batch_size, device)
    lap("held_out")
    answers, rows = [], []
    if held:
        scores, rows, answers = answer_prompts(model, tok, held, cfg.sampling, m.label)
        # named as the dpo stage names them: satisfaction = share of constraints met, all_satisfied = share of
        # answers meeting every constraint of their prompt
        metrics.update(
            {
                "satisfaction": scores["constraint_rate"],
                "all_satisfied": scores["satisfied"],
                "per_constraint": scores["per_constraint"],
                **text_degeneration(rows),
            }
        )
        lap("answers")
    samples = fixed_samples(model, tok, cfg)
    lap("samples")
    del model
    bench = {"scores": {}, "results": {}, "items": {}}  # no benchmark to run (none asked for, or none fits)
    if files or cfg.lm_eval_tasks:
        bench = run_lm_eval(m.folder, files, cfg.lm_eval_tasks, cfg.limit, cfg.batch_size, device, cfg.sampling.seed)
    metrics["bench"] = bench["scores"]
    write_json(out / "lm_eval" / f"{m.label}.json", {"results": bench["results"], "items": bench["items"]})
    lap("lm_eval")
    print(
        f"evaluate: {m.label} ({m.stage}) in {sum(seconds.values()):.0f}s "
        f"({', '.join(f'{k} {v:.0f}s' for k, v in seconds.items())}): bpb {metrics['val_bpb']:.3f}"
        + "".join(f", {n} {sc['acc']:.3f}" for n, sc in bench["scores"].items())
        + (
            f", satisfaction {metrics['satisfaction']:.2f}, repeated lines {metrics['repeated_line_rate']:.2f}, "
            f"nonwords {metrics['nonword_rate']:.2f}"
            if held
            else ""
        ),
        flush=True,
    )
    return ModelResult(metrics, answers, rows, samples, seconds)


def run(cfg: EvaluateConfig, paths: StagePaths, tracker: Tracker) -> dict:
    from tasks.common.alignment import load_tokenizer

    quiet_libraries()
    device = pick_device(cfg.device)
    skipped: dict[str, str] = {}
    models = find_models(cfg, paths, skipped)
    reward_folder = find_reward_model(cfg, paths, skipped)
    out = fresh_dir(paths.out)
    tok = load_tokenizer(models[0].folder)
    max_len = min(json.loads((m.folder / "config.json").read_text())["max_position_embeddings"] for m in models)
    files, items = prepare_benchmarks(cfg, paths, models[0].folder / "tokenizer.json", max_len, skipped)
    data = held_out(paths.of("pretokenize"), cfg.val_max_tokens)
    held = held_out_prompts(cfg.sampling.prompts, cfg.sampling.prompt_seed) if cfg.sampling.prompts else []

    # `models` orders the report's columns; `model_stages` says which stage made each (what register reads)
    metrics: dict[str, Any] = {"models": [m.label for m in models], "model_stages": {m.label: m.stage for m in models}}
    per_model = {m.label: evaluate_model(m, cfg, data, held, tok, files, device, out) for m in models}
    fluency(cfg, models, per_model, tok, device, skipped)
    answers = {label: r.answers for label, r in per_model.items() if held}
    answer_rows = {label: r.answer_rows for label, r in per_model.items() if held}
    samples = {label: r.samples for label, r in per_model.items()}
    timings = {label: r.seconds for label, r in per_model.items()}
    metrics.update({label: r.metrics for label, r in per_model.items()})

    metrics["win_rate"] = compare_with_rewards(cfg, reward_folder, answers, answer_rows, tok, device, skipped)
    metrics["judge"] = judge_answers(cfg, models, answer_rows, paths, device, out, tracker, skipped)
    for label, rows in answer_rows.items():
        write_jsonl(out / "answers" / f"{label}.jsonl", rows)
    (out / "samples.md").write_text(samples_markdown(samples), encoding="utf-8")
    metrics.update(
        {
            "benchmark_items": items,
            "skipped": skipped,
            "device": device,
            "seconds_by_model": timings,
            "val_text_bytes": data.text_bytes,
        }
    )
    write_plots(paths.root, metrics)
    tracker.log_artifact(out / "samples.md", "evaluate")
    tracker.log_artifact(out / "lm_eval", "evaluate/lm_eval")
    if cfg.report:
        report = build_report(paths.root, evaluation=metrics, tracker=tracker, evaluate_out=out)
        metrics["report"] = str(report.relative_to(paths.root))
    return metrics


def find_reward_model(cfg: EvaluateConfig, paths: StagePaths, skipped: dict[str, str]) -> Path | None:
    if not cfg.reward_model or not cfg.win_rates or not cfg.sampling.prompts:
        return None
    folder = paths.of(cfg.reward_model) / "model"
    if (folder / "reward_head.safetensors").is_file():
        return folder
    reason = f"{folder} has no reward model (run `dvc repro {cfg.reward_model}`)"
    if cfg.missing_models == "error":
        raise ScratchError(f"evaluate.reward_model: {reason}, or set evaluate.missing_models: skip")
    skipped["win_rates"] = reason
    print(f"evaluate: no win rates: {reason}")
    return None


def compare_with_rewards(
    cfg: EvaluateConfig,
    reward_folder: Path | None,
    answers: dict[str, list],
    answer_rows: dict[str, list[dict]],
    tok,
    device: str,
    skipped: dict[str, str],
) -> dict[str, float]:
    """Win rates `a_vs_b` on the shared prompts; each answer row gets its reward."""
    if reward_folder is None:
        return {}
    from model.heads import RewardModel

    reward_model = RewardModel.load(reward_folder, device=device)
    scored = {label: rewards(reward_model, answers[label], tok, cfg.batch_size, device) for label in answers}
    for label, values in scored.items():
        for row, value in zip(answer_rows[label], values):
            row["reward"] = value
    rates = {}
    for pair in cfg.win_rates:
        a, _, b = pair.partition(":")
        if a in scored and b in scored:
            rates[f"{a}_vs_{b}"] = win_rate(scored[a], scored[b])
        else:
            skipped[f"win_rate:{a}_vs_{b}"] = "a model of the pair was skipped"
    return rates


def judge_answers(
    cfg: EvaluateConfig,
    models: list[Evaluated],
    answer_rows: dict[str, list[dict]],
    paths: StagePaths,
    device: str,
    out: Path,
    tracker: Tracker,
    skipped: dict[str, str],
) -> dict[str, Any]:
    """The judge's verdicts on each evaluate.judge.pairs entry, on the held-out answers both models gave, with its
    calibration against the checker (tasks/common/judge.py); verdicts to data/evaluate/judge/<x>_vs_<y>.jsonl."""
    j = cfg.judge
    if not j.enabled or not answer_rows:
        if j.enabled:
            skipped["judge"] = "no held-out answers to judge (evaluate.sampling.prompts is 0)"
        return {}
    import tempfile

    from tasks.common import judge as judging
    from tasks.common.stage import flat_numbers

    started = time.perf_counter()
    folders = {m.label: m.folder for m in models}
    figures, names, preferences = {}, {}, []
    with tempfile.TemporaryDirectory(prefix="scratchlm-judge-") as workdir:
        judge_for = judging.open_judges(j, folders, Path(workdir), paths.root, device)
        for pair in j.pairs or cfg.win_rates:
            x, _, y = pair.partition(":")
            key = f"{x}_vs_{y}"
            if x not in answer_rows or y not in answer_rows:
                skipped[f"judge:{key}"] = "a model of the pair was skipped"
                continue
            judge = judge_for(x)
            rows = judging.judge_pairs(
                judge, judge_inputs(answer_rows[x], answer_rows[y], j.prompts), j.max_answer_chars
            )
            write_jsonl(out / "judge" / f"{key}.jsonl", rows)
            figures[key], names[key] = judging.summarise(rows), judge.name
            preferences += judging.preference_rows(rows, judge.name) if j.write_preferences else []
            print(f"evaluate: {judge_line(key, names[key], figures[key])}", flush=True)
    result: dict[str, Any] = {"backend": j.backend, "mode": j.mode, "judges": names, "pairs": figures}
    if j.write_preferences:
        file = write_jsonl(paths.root / "feedback" / "judge_preferences.jsonl", preferences)
        result["preferences"] = {"file": str(file.relative_to(paths.root)), "pairs": len(preferences)}
        print(f"evaluate: {len(preferences)} judge preference pairs (judge feedback, not human) -> {file}")
    result["seconds"] = round(time.perf_counter() - started, 1)
    tracker.log_metrics(flat_numbers({"judge": figures}))
    tracker.log_artifact(out / "judge", "evaluate/judge")
    return result


def judge_inputs(rows_x: list[dict], rows_y: list[dict], limit: int) -> list:
    """The judge's pairs: both models' answers to the same held-out prompts (the first `limit`; 0 = all), with the
    checker's score of each answer (the share of its prompt's constraints it meets)."""
    from tasks.common.judge import Pair

    pairs = []
    for rx, ry in list(zip(rows_x, rows_y, strict=True))[: limit or None]:
        assert rx["id"] == ry["id"], "both models answer the same held-out prompts in the same order"
        pairs.append(
            Pair(
                rx["prompt"],
                rx["answer"],
                ry["answer"],
                checker_score(rx, rx["answer"]),
                checker_score(ry, ry["answer"]),
            )
        )
    return pairs


def judge_line(key: str, name: str, f: dict) -> str:
    """`judge <name> on x_vs_y: win rate 0.56 [0.36, 0.74], ties 0.25, ...` (None figures shown as -)."""

    def num(v: Any) -> str:
        return "-" if v is None else f"{v:.2f}"

    lo, hi = f["win_rate_ci95_low"], f["win_rate_ci95_high"]
    return (
        f"judge {name} on {key} ({f['pairs']} pairs): win rate {num(f['win_rate'])} [{lo:.2f}, {hi:.2f}], "
        f"ties {num(f['tie_rate'])}, position consistency {num(f['position_consistency'])}, first-position "
        f"picks {num(f['position_bias'])}, longer picked {num(f['length_bias'])} "
        f"(checker {num(f['checker_length_share'])}), "
        f"checker agreement {num(f['checker_agreement'])} on {f['checker_pairs']} (kappa {num(f['checker_kappa'])})"
    )


def write_plots(root: Path, metrics: dict) -> None:
    """DVC plot data: bpb per model, and accuracy per (model, benchmark)."""
    labels = metrics["models"]
    write_json(root / PLOTS_DIR / "bpb.json", [{"model": m, "val_bpb": metrics[m]["val_bpb"]} for m in labels])
    write_json(
        root / PLOTS_DIR / "benchmarks.json",
        [
            {"name": f"{b} · {m}", "model": m, "benchmark": b, "acc": s["acc"]}
            for b in sorted({b for m in labels for b in metrics[m]["bench"]})
            for m in labels
            if (s := metrics[m]["bench"].get(b))
        ],
    )


def degeneration_lines(m: dict) -> list[str]:
    """One line per model with its degeneration figures (those it has), e.g. `degeneration dpo: fluency 2.310, ...`."""
    lines = []
    for label in m["models"]:
        figures = [
            f"{short} {m[label][key]:.1f}" if key == "mean_words" else f"{short} {m[label][key]:.3f}"
            for key, _, short in DEGENERATION_METRICS
            if short and key in m[label]
        ]
        if figures:
            lines.append(f"degeneration {label}: {', '.join(figures)}")
    return lines


def summary(m: dict, paths: StagePaths) -> list[str]:
    """A table of the models side by side (loss, bpb, satisfaction, benchmark accuracy), a degeneration line per
    model, win rates, what was skipped, and where the report card is."""
    labels = m["models"]
    lines = [f"{'':<16}" + "".join(f"{label:>10}" for label in labels)]
    lines += [
        f"{name:<16}" + "".join(f"{m[label][key]:>10.3f}" for label in labels)
        for key, _, name in MODEL_METRICS
        if name and all(key in m[label] for label in labels)
    ]
    for bench in sorted({b for label in labels for b in m[label]["bench"]}):
        lines.append(
            f"{bench + ' acc':<16}"
            + "".join(
                f"{m[label]['bench'][bench]['acc']:>10.3f}" if bench in m[label]["bench"] else f"{'-':>10}"
                for label in labels
            )
        )
    lines += degeneration_lines(m)
    lines += [f"win rate {pair}: {rate:.3f}" for pair, rate in m["win_rate"].items()]
    judged = m.get("judge", {})
    lines += [judge_line(key, judged["judges"][key], f) for key, f in judged.get("pairs", {}).items()]
    lines += [f"skipped {what}: {why}" for what, why in m["skipped"].items()]
    if "report" in m:
        lines.append(f"report card: {m['report']}")
    return lines


HEADLINE = (
    "*.val_bpb",
    "*.satisfaction",
    "*.fluency_gap",
    "*.repeated_line_rate",
    "*.bench.*.acc_norm",
    "win_rate.*",
    "judge.pairs.*.win_rate",
    "judge.pairs.*.checker_agreement",
)
"""What metrics/evaluate.json keeps (`dvc metrics diff`); every figure is in metrics/all/evaluate.json."""


if __name__ == "__main__":
    stage_main("evaluate", EvaluateConfig, run, summary, HEADLINE)
