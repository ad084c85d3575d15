"""sft — supervised fine-tuning of the pretrained Llama on chat-formatted instructions, loss on the answers only.

Runbook
    dvc repro sft                                  # or: scratchlm stage sft / python -m tasks.sft
    dvc exp run -S ++sft.train.max_steps=200       # a longer run (reruns sft, reward and dpo); `++` adds the key to
                                                   # sft's overrides of the shared `train` section
    dvc exp run -S 'sft.sources=[builtin:instructions,../shared/data/alpaca-en-demo/alpaca_en_demo.json]'
    python -m tasks.sft                            # launcher: checks the params, then execs
        deepspeed --num_gpus <train.ranks> ... --module tasks.sft --worker
    A killed run resumes from checkpoints/sft/<fingerprint>/ (the shared trainer, tasks/common/trainer.py).

Reads   data/pretrain/model/      the pretrained HF Llama folder (model.hf.load): the starting weights
        data/tokenizer/           tokenizer.json with the chat special tokens (tasks/common/chat.py)
        `sft.sources`             builtin:instructions (seeded, constraints a program can check) and/or .json/.jsonl
                                  files: chat messages, Alpaca instruction/input/output, Self-Instruct, GSM8K
                                  question/answer (tasks/sources/instructions.py)
Writes  data/sft/model/           the fine-tuned HF Llama folder with the tokenizer files (model.hf.save; every
                                  stop token in generation_config.json) and its model card (README.md)
        data/sft/quarantine.jsonl every row that could not be used: {location, reason}
        data/sft/samples.jsonl    answers of the base and SFT models to the held-out prompts, with their constraints
        data/sft/history.jsonl    the logged training curve (train/*, val/*)
        metrics/sft.json          val loss on responses, constraint satisfaction of base and SFT answers, counts
Checks  rows in no known format, empty or mistyped messages, conversations not ending with the assistant, and
        conversations whose answer does not fit in the context are quarantined and counted:
        rows_in = train_examples + val_examples + quarantined. Chats render with the tokenizer's chat template;
        the loss covers assistant content and its `<|end|>` only (prompt, template text and padding carry -100).
        Satisfaction is measured on builtin "test" prompts ((animal, place) pairs never seen in training) with a
        fixed sampling seed, by tasks.sources.builtin.check_constraints:
          satisfaction   share of all the prompts' constraints the answers meet (the headline rate)
          all_satisfied  share of answers that meet every constraint of their prompt
Scale   one conversation per row, right-padded, rows of similar length batched together (no cross-document
        attention, little padding); DeepSpeed ranks, ZeRO 0-3 and bf16 through `sft.train`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from model.card import write_card
from model.hf import load, save
from tasks.common import alignment as al
from tasks.common.chat import STOP_TOKENS
from tasks.common.config import as_dict
from tasks.common.distributed import init_distributed
from tasks.common.dvcio import StagePaths, fresh_dir, write_jsonl
from tasks.common.tracking import Tracker
from tasks.common.train_config import AlignmentData, SamplingConfig
from tasks.common.training import print_plan, sharded_means, training_main
from tasks.sources.examples import Loaded, check_answers, held_out_prompts, load_instruction_data


@dataclass(frozen=True)
class SftConfig(AlignmentData):
    sources: list[str] = field(default_factory=lambda: ["builtin:instructions"])
    builtin_train: int = 2000
    builtin_val: int = 64
    val_fraction: float = 0.05
    eval_base: bool = True
    """Also sample the pretrained model on the held-out prompts (the baseline of the satisfaction rate)."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """The stage's overrides of the top-level `sampling` section (held-out prompts of the satisfaction check)."""


Config = SftConfig  # the section class params.yaml loads (tasks/common/config.py)


# ------------------------------------------------------------------------------------------------ data


@dataclass
class Encoded:
    train: list[al.SFTExample]
    val: list[al.SFTExample]
    loaded: Loaded
    truncated: int


def encode_all(loaded: Loaded, tok: al.ChatTokenizer, max_len: int) -> Encoded:
    """Token ids and masks of every example; one whose answer starts past max_len is quarantined (counted)."""
    why_not = f"no answer token within max_len={max_len} tokens"
    train, val = (
        loaded.keep_encoded(split, lambda e: al.encode_sft(tok, e["messages"], max_len), why_not)
        for split in ("train", "val")
    )
    return Encoded(train, val, loaded, sum(e.truncated for e in train + val))


# ------------------------------------------------------------------------------------------------ loss, eval


def response_loss(engine, batch):
    x, y = batch  # (B,T-1) inputs, (B,T-1) next tokens with -100 off the answers
    _, loss = engine(x, y)
    return loss, {}


class ResponseLoss:
    """val/loss: mean next-token cross-entropy over the validation answers' tokens (nats/token), split over ranks."""

    def __init__(self, examples: list[al.SFTExample], micro_batch_size: int, pad_id: int) -> None:
        self.examples, self.micro, self.pad_id = examples, micro_batch_size, pad_id

    def __call__(self, engine) -> dict[str, float]:
        return sharded_means(engine, len(self.examples), self.micro, ["loss"], lambda ids: self.sums(engine, ids))

    def sums(self, engine, indices: list[int]) -> torch.Tensor:
        """[answer tokens, sum of their nats] over some validation examples."""
        x, y = al.collate_sft([self.examples[i] for i in indices], self.pad_id)
        device = al.device_of(engine.module)
        _, loss = engine(x.to(device), y.to(device))
        count = (y != al.IGNORE_INDEX).sum().to(device)
        return torch.stack([count.double(), loss.double() * count])


class HeldOutSamples:
    """A couple of answers to held-out prompts at each evaluation (MLflow text artifacts)."""

    def __init__(self, tok: al.ChatTokenizer, sampling: SamplingConfig, n: int = 2) -> None:
        self.tok, self.sampling = tok, sampling
        self.held_out = held_out_prompts(n, sampling.prompt_seed)

    def __call__(self, model, step: int) -> str:
        answers = al.sample_answers(
            model, self.tok, [h["prompt_messages"] for h in self.held_out], self.sampling, desc="samples"
        )
        parts = [f"step {step}"]
        for h, a in zip(self.held_out, answers):
            parts.append(f"--- {h['prompt_messages'][-1]['content']}\n{self.tok.decode(a.ids)}")
        return "\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------------------ stage


def preflight(cfg: SftConfig, paths: StagePaths) -> None:
    """Launcher-side checks before any rank starts: upstream folders, context, batch arithmetic."""
    up = al.upstream_of("sft", cfg, paths, "pretrain")
    what = f"{cfg.train.batch_size} conversations (≤ {up.max_len} tokens) from {up.model_dir}"
    print_plan("sft", cfg.train, paths, up.max_len, f"{what}; sources {', '.join(cfg.sources)}")


def run(cfg: SftConfig, paths: StagePaths, tracker: Tracker) -> dict | None:
    """One rank's fine-tuning; rank 0 also writes the model, samples, quarantine and returns the metrics."""
    from tasks.common.trainer import Recipe, Trainer  # DeepSpeed: loaded by the ranks, not by `scratchlm params`

    world = init_distributed()
    up = al.upstream_of("sft", cfg, paths, "pretrain")
    loaded = load_instruction_data(cfg, paths.root)
    data = encode_all(loaded, up.tok, up.max_len)
    if world.is_main:
        write_jsonl(fresh_dir(paths.out) / "quarantine.jsonl", loaded.quarantine)
    info = {
        "sft": {k: v for k, v in as_dict(cfg).items() if k not in ("sampling", "eval_base", "train")},
        "train": cfg.train.fingerprint_dict(),
        "upstream": up.fingerprint(),
    }

    def build_model():
        torch.manual_seed(cfg.train.seed)
        return load(up.model_dir).train()

    lengths = [len(e.ids) for e in data.train]
    mean_len = round(sum(lengths) / max(len(lengths), 1))
    batches = al.StepBatches(
        data.train,
        lengths,
        cfg.train.batch_size,
        cfg.train.seed,
        lambda exs: al.collate_sft(exs, up.tok.pad_id),
        "training conversations",
    )
    evaluation = ResponseLoss(data.val, cfg.train.micro_batch_size, up.tok.pad_id) if data.val else None
    # samples at intermediate evaluations only: the end report samples every held-out prompt anyway
    samples = HeldOutSamples(up.tok, cfg.sampling) if cfg.sampling.prompts and cfg.train.eval_every else None
    recipe = Recipe(
        batches, response_loss, mean_len, up.model_cfg.flops_per_token(mean_len), eval_fn=evaluation, sample_fn=samples
    )
    trainer = Trainer(build_model, cfg.train, recipe, name="sft", info=info, root=paths.root, tracker=tracker)
    summary, model = trainer.train(paths.out / "history.jsonl")
    if model is None:  # ranks other than 0
        return None

    folder = save(model, paths.out / "model", tokenizer_dir=up.tokenizer_dir, stop_tokens=STOP_TOKENS)
    metrics = {**summary, **al.data_metrics(loaded, data.truncated, up.max_len), "mean_train_tokens": mean_len}
    if cfg.sampling.prompts:
        base = load(up.model_dir) if cfg.eval_base else None
        metrics.update(satisfaction_report(model, base, up.tok, cfg.sampling, paths.out / "samples.jsonl"))
        tracker.log_artifact(paths.out / "samples.jsonl", "sft")
    tracker.log_artifact(paths.out / "quarantine.jsonl", "sft")
    write_card(
        folder,
        stage="sft",
        training="supervised fine-tuning on chat conversations (the loss on the assistant's tokens and `<|end|>`)",
        base=f"the {up.model_stage} stage's model (data/{up.model_stage}/model)",
        params=info,
        metrics=metrics,
    )
    return metrics


def satisfaction_report(model, base, tok: al.ChatTokenizer, sampling: SamplingConfig, samples_file: Path) -> dict:
    """Constraint satisfaction of the SFT (and base) model's answers to the held-out prompts; writes the answers."""
    held_out = held_out_prompts(sampling.prompts, sampling.prompt_seed)
    metrics, rows = {"eval_prompts": len(held_out)}, []
    for name, m in (("base", base), ("sft", model)):
        if m is None:
            continue
        answers = al.sample_answers(m, tok, [h["prompt_messages"] for h in held_out], sampling, f"sft: {name} answers")
        scores, answer_rows = check_answers(
            held_out, [tok.decode(a.ids) for a in answers], [a.finished for a in answers]
        )
        metrics.update(
            {
                f"{name}_satisfaction": scores["constraint_rate"],
                f"{name}_all_satisfied": scores["satisfied"],
                f"{name}_per_constraint": scores["per_constraint"],
            }
        )
        rows += [{"model": name, **row} for row in answer_rows]
    write_jsonl(samples_file, rows)
    return metrics


def summary(m: dict, paths: StagePaths) -> list[str]:
    lines = al.data_summary(m, "conversations", "validation")
    lines.append(f"val loss on responses {m.get('val_loss', float('nan')):.4f}")
    if "sft_satisfaction" in m:
        base = (
            f"base {m['base_satisfaction']:.1%} (all {m['base_all_satisfied']:.1%}) → "
            if "base_satisfaction" in m
            else ""
        )
        lines.append(
            f"held-out constraint satisfaction ({m['eval_prompts']} prompts): {base}"
            f"SFT {m['sft_satisfaction']:.1%} (all {m['sft_all_satisfied']:.1%})"
        )
        lines.append("per constraint (SFT): " + "  ".join(f"{k} {v:.0%}" for k, v in m["sft_per_constraint"].items()))
    return lines + [f"model, samples.jsonl, quarantine.jsonl in {paths.out}"]


HEADLINE = (
    "val_loss",
    "base_satisfaction",
    "sft_satisfaction",
    "quarantined",
)
"""What metrics/sft.json keeps (`dvc metrics diff`); every figure is in data/sft/metrics.json."""


if __name__ == "__main__":
    training_main("sft", SftConfig, run, preflight, summary, HEADLINE)
