"""sft — supervised fine-tuning of the pretrained Llama on chat-formatted instructions, loss on the answers only.

Runbook
    dvc repro sft                                  # or: scratchlm stage sft / python -m tasks.sft
    dvc exp run -S sft.train.max_steps=200         # a longer run (reruns sft, reward and dpo)
    dvc exp run -S 'sft.sources=[builtin:instructions,../shared/data/alpaca-en-demo/alpaca_en_demo.json]'
    python -m tasks.sft                            # launcher: checks the params, then execs
        deepspeed --num_gpus <train.ranks> ... --module tasks.sft --worker
    A killed run resumes from checkpoints/sft/<fingerprint>/ (the shared trainer, tasks/common/trainer.py).

Reads   data/pretrain/model/      the pretrained HF Llama folder (model.hf.load): the starting weights
        data/tokenizer/           tokenizer.json with the chat special tokens (tasks/common/chat.py)
        `sft.sources`             builtin:instructions (seeded, constraints a program can check) and/or .json/.jsonl
                                  files: chat messages, Alpaca instruction/input/output, Self-Instruct, GSM8K
                                  question/answer (tasks/sources/instructions.py)
Writes  data/sft/model/           the fine-tuned HF Llama folder with the tokenizer files (model.hf.save)
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

import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tasks.common import alignment as al
from tasks.common.checkpoint import checkpoint_dir, fingerprint
from tasks.common.config import ScratchError, as_dict, check
from tasks.common.distributed import WORKER_FLAG, launch_main, planned_world_size
from tasks.common.dvcio import StagePaths, fresh_dir, stage_paths
from tasks.common.stage import stage_main
from tasks.common.tracking import Tracker
from tasks.common.trainer import TrainConfig


@dataclass(frozen=True)
class Config:
    sources: list[str] = field(default_factory=lambda: ["builtin:instructions"])
    """Instruction data, in order: builtin:instructions and/or .json/.jsonl/.jsonl.gz files (relative paths are
    relative to the repository) in chat, Alpaca, Self-Instruct or GSM8K format."""
    builtin_train: int = 2000
    """Examples drawn from the builtin generator's "train" split."""
    builtin_val: int = 64
    """Examples drawn from the builtin generator's "val" split (validation loss on responses)."""
    data_seed: int = 1337
    """Seed of the builtin instruction generator."""
    val_fraction: float = 0.05
    """Share of file rows held out for validation, chosen by a hash of the row's location (0 = none)."""
    max_len: int = 0
    """Longest conversation in tokens (longer ones are cut at the end); 0 = the model's max_seq_len."""
    eval_base: bool = True
    """Also sample the pretrained model on the held-out prompts (the baseline of the satisfaction rate)."""
    sampling: al.SamplingConfig = field(default_factory=al.SamplingConfig)
    """Held-out prompts and sampling settings of the constraint-satisfaction evaluation."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=60, batch_size=16, micro_batch_size=16, lr=5e-4, warmup_steps=5, weight_decay=0.0,
        eval_every=0, checkpoint_every=0))
    """The shared training loop: ranks, ZeRO stage, precision, batch split, AdamW, schedule, budget, cadence."""

    def __post_init__(self) -> None:
        check(len(self.sources) > 0, "sources", "list at least one source (e.g. builtin:instructions)")
        check(self.builtin_train >= 0 and self.builtin_val >= 0, "builtin_train", "counts must be >= 0")
        check(0.0 <= self.val_fraction < 1.0, "val_fraction", "must be in [0, 1)")
        check(self.max_len >= 0, "max_len", "must be >= 0 (0 = the model's max_seq_len)")


# ------------------------------------------------------------------------------------------------ data

@dataclass
class Encoded:
    train: list[al.SFTExample]
    val: list[al.SFTExample]
    loaded: al.Loaded
    truncated: int


def encode_all(loaded: al.Loaded, tok: al.ChatTokenizer, max_len: int) -> Encoded:
    """Token ids and masks of every example; one whose answer starts past max_len is quarantined (counted)."""
    out = Encoded([], [], loaded, 0)
    for split in ("train", "val"):
        encoded = {}

        def fits(example: dict) -> str | None:
            encoded[example["id"]] = al.encode_sft(tok, example["messages"], max_len)
            return None if encoded[example["id"]] else f"no answer token within max_len={max_len} tokens"

        kept = [encoded[e["id"]] for e in loaded.keep_only(split, fits)]
        out.truncated += sum(e.truncated for e in kept)
        setattr(out, split, kept)
    return out


def max_len_of(cfg: Config, model_max: int) -> int:
    if cfg.max_len > model_max:
        raise ScratchError(f"sft.max_len: {cfg.max_len} is longer than the model's max_seq_len ({model_max})")
    return cfg.max_len or model_max


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
        import torch

        from tasks.common.distributed import all_reduce_sum
        device = al.device_of(engine.module)
        totals = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of nats, answer tokens]
        for share in al.rank_share(len(self.examples), self.micro):
            x, y = al.collate_sft([self.examples[i] for i in (share or [0])], self.pad_id)
            if share is None:
                y = torch.full_like(y, al.IGNORE_INDEX)  # a padding pass that counts nothing
            _, loss = engine(x.to(device), y.to(device))
            count = (y != al.IGNORE_INDEX).sum().to(device)
            totals += torch.stack([loss.double() * count, count.double()])
        all_reduce_sum(totals)
        return {"loss": (totals[0] / totals[1].clamp(min=1)).item()}


class HeldOutSamples:
    """A couple of answers to held-out prompts at each evaluation (MLflow text artifacts)."""

    def __init__(self, tok: al.ChatTokenizer, sampling: al.SamplingConfig, n: int = 2) -> None:
        self.tok, self.sampling = tok, sampling
        self.held_out = al.held_out_prompts(n, sampling.prompt_seed)

    def __call__(self, model, step: int) -> str:
        answers = al.sample_answers(model, self.tok, [h["prompt_messages"] for h in self.held_out], self.sampling,
                                    desc="samples")
        parts = [f"step {step}"]
        for h, a in zip(self.held_out, answers):
            parts.append(f"--- {h['prompt_messages'][-1]['content']}\n{self.tok.decode(a.ids)}")
        return "\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------------------ stage

def preflight(cfg: Config, root: Path | None = None) -> TrainConfig:
    """Launcher-side checks before any rank starts: upstream folders, context, batch arithmetic."""
    from model.hf import load_config
    paths = stage_paths("sft", root) if root else stage_paths("sft")
    al.load_tokenizer(paths.of("tokenizer"))
    pretrained = paths.of("pretrain") / "model"
    if not (pretrained / "config.json").is_file():
        raise ScratchError(f"{pretrained}: no pretrained model; run the pretrain stage first (dvc repro pretrain)")
    max_len = max_len_of(cfg, load_config(pretrained).max_seq_len)
    world = planned_world_size(cfg.train, paths.root)
    accum = cfg.train.grad_accum(world)
    steps = cfg.train.total_steps(max_len)
    print(f"sft: {steps:,} steps x {cfg.train.batch_size} conversations (≤ {max_len} tokens) from {pretrained}\n"
          f"  batch {cfg.train.batch_size} = micro {cfg.train.micro_batch_size} x accumulation {accum} x ranks "
          f"{world}; sources {', '.join(cfg.sources)}", flush=True)
    return cfg.train


def run(cfg: Config, paths: StagePaths, tracker: Tracker) -> dict | None:
    """One rank's fine-tuning; rank 0 also writes the model, samples, quarantine and returns the metrics."""
    import torch

    from model.hf import load, load_config, save
    from tasks.common.distributed import init_distributed
    from tasks.common.trainer import Trainer

    world = init_distributed()
    tokenizer_dir, pretrained = paths.of("tokenizer"), paths.of("pretrain") / "model"
    tok = al.load_tokenizer(tokenizer_dir)
    model_cfg = load_config(pretrained)
    max_len = max_len_of(cfg, model_cfg.max_seq_len)
    loaded = al.load_instruction_data(cfg.sources, paths.root, cfg.builtin_train, cfg.builtin_val, cfg.data_seed,
                                      cfg.val_fraction)
    data = encode_all(loaded, tok, max_len)
    if world.is_main:
        fresh_dir(paths.out)
        al.write_quarantine(paths.out / "quarantine.jsonl", loaded.quarantine)

    info = {"sft": {k: v for k, v in as_dict(cfg).items() if k not in ("sampling", "eval_base", "train")},
            "train": cfg.train.fingerprint_dict(), "upstream": al.upstream_fingerprint(
                {"pretrain": pretrained, "tokenizer": tokenizer_dir})}
    folder = checkpoint_dir("sft", fingerprint(info), paths.root)

    def build_model():
        torch.manual_seed(cfg.train.seed)
        return load(pretrained).train()

    lengths = [len(e.ids) for e in data.train]
    mean_len = round(sum(lengths) / max(len(lengths), 1))
    trainer = Trainer(
        build_model, cfg.train, name="sft", checkpoint_dir=folder, fingerprint_info=info, tracker=tracker,
        batches=al.StepBatches(data.train, lengths, cfg.train.batch_size, cfg.train.seed,
                               lambda exs: al.collate_sft(exs, tok.pad_id), "training conversations"),
        loss_fn=response_loss,
        eval_fn=ResponseLoss(data.val, cfg.train.micro_batch_size, tok.pad_id) if data.val else None,
        # samples at intermediate evaluations only: the end report samples every held-out prompt anyway
        sample_fn=HeldOutSamples(tok, cfg.sampling) if cfg.sampling.prompts and cfg.train.eval_every else None,
        tokens_per_example=mean_len, flops_per_token=model_cfg.flops_per_token(mean_len))
    summary = trainer.fit()
    model = trainer.final_model()
    if not world.is_main:
        return None

    save(model, paths.out / "model", tokenizer_dir=tokenizer_dir)
    shutil.copy2(trainer.history_path, paths.out / "history.jsonl")
    metrics = {**summary, **loaded.counts(), "truncated": data.truncated, "max_len": max_len,
               "mean_train_tokens": mean_len, "fingerprint": folder.name}
    if cfg.sampling.prompts:
        base = load(pretrained) if cfg.eval_base else None
        metrics.update(satisfaction_report(model, base, tok, cfg.sampling, paths.out / "samples.jsonl"))
        tracker.log_artifact(paths.out / "samples.jsonl", "sft")
    tracker.log_artifact(paths.out / "quarantine.jsonl", "sft")
    print_summary(metrics, paths)
    return metrics


def satisfaction_report(model, base, tok: al.ChatTokenizer, sampling: al.SamplingConfig, samples_file: Path) -> dict:
    """Constraint satisfaction of the SFT (and base) model's answers to the held-out prompts; writes the answers."""
    held_out = al.held_out_prompts(sampling.prompts, sampling.prompt_seed)
    metrics, rows = {"eval_prompts": len(held_out)}, []
    for name, m in (("base", base), ("sft", model)):
        if m is None:
            continue
        scores, answers, _ = al.evaluate_answers(m, tok, held_out, sampling, desc=f"sft: {name} answers")
        metrics.update({f"{name}_satisfaction": scores["constraint_rate"],
                        f"{name}_all_satisfied": scores["satisfied"],
                        f"{name}_per_constraint": scores["per_constraint"]})
        rows += [{"model": name, **row} for row in answers]
    al.write_jsonl(samples_file, rows)
    return metrics


def print_summary(m: dict, paths: StagePaths) -> None:
    print(f"\nsft: {m['steps']:,} steps on {m['train_examples']:,} conversations ({m['val_examples']:,} validation, "
          f"{m['quarantined']:,} quarantined, {m['truncated']:,} cut at {m['max_len']} tokens)")
    for reason, n in m["quarantined_by_reason"].items():
        print(f"  quarantined {n:>6,}  {reason}")
    print(f"  train loss {m['train_loss']:.4f}   val loss on responses {m.get('val_loss', float('nan')):.4f}   "
          f"{m['tokens_per_s']:,.0f} tokens/s")
    if "sft_satisfaction" in m:
        base = (f"base {m['base_satisfaction']:.1%} (all {m['base_all_satisfied']:.1%}) → "
                if "base_satisfaction" in m else "")
        print(f"  held-out constraint satisfaction ({m['eval_prompts']} prompts): {base}"
              f"SFT {m['sft_satisfaction']:.1%} (all {m['sft_all_satisfied']:.1%})")
        print("  per constraint (SFT): " + "  ".join(f"{k} {v:.0%}" for k, v in m["sft_per_constraint"].items()))
    print(f"  model        {paths.out / 'model'}")
    print(f"  samples      {paths.out / 'samples.jsonl'}")
    print(f"  quarantine   {paths.out / 'quarantine.jsonl'}")


def main() -> None:
    if WORKER_FLAG in sys.argv[1:]:
        stage_main("sft", Config, run)
    else:
        launch_main("sft", Config, preflight)


if __name__ == "__main__":
    main()
