"""Benchmark: the reward stage vs TRL's RewardTrainer on real held-out preference pairs (issue 17).

The reward model's target: its pair accuracy on Anthropic HH-RLHF harmless-base rows it did not train on
(../shared/data/hh-rlhf-harmless-base, read in place: SOURCE.md there), at least that of TRL's `RewardTrainer` on
the same backbone, pairs, steps and batch within noise, and the tokens/s of the two. (It replaces the retired
"≥ 90 % on builtin single-word-substitution pairs".)

Runbook (from the repository root)
    .venv/bin/pip install -c requirements.lock -e '.[bench]'   # once: trl, a bench-only extra (pyproject.toml)
    .venv/bin/python -m bench.reward_trl              # THE figure: 100 steps x 16 pairs (one epoch), 4-6 minutes
    .venv/bin/python -m bench.reward_trl --seed 7     # another draw of backbone, head and data order
    .venv/bin/python -m bench.reward_trl --steps 6 --warmup 2 --work /tmp/rt-smoke     # a smoke test (~1 minute)
    .venv/bin/python -m bench.reward_trl --backbone data/sft/model            # a trained SFT backbone
    .venv/bin/python -m bench.reward_trl --only ours -v                       # one contender, its output live
    .venv/bin/python -m bench.reward_trl --trl-shuffle                        # TRL's own random order

What it does
  1. A work folder laid out like the checkout: <work>/project is the stage's root (data/sft/model, data/tokenizer,
     checkpoints/) and <work>/shared links to ../shared, so `reward.sources` is the string of the reward stage's
     runbook, ../shared/data/hh-rlhf-harmless-base/harmless-base_test_rows0000-1811.jsonl.gz, the rows get the ids
     the stage gives them in the checkout, and the held-out rows are the ones `dvc exp run -S reward.sources=[...]`
     holds out (tasks/sources/examples.py: a salted hash of the row id, `reward.val_fraction` of them, 10 %).
  2. The backbone: --backbone DIR (an HF Llama folder with tokenizer files, e.g. data/sft/model), by default
     data/sft/model when the checkout has one, else `random`: the `small` preset (4 x 256) at random init (seed =
     train.seed) with a byte-level BPE of 4,096 trained by the tokenizer stage's own code (tasks/tokenizer.py
     train_bpe / save_folder) on the text of the training-split pairs only. It is copied into the work folder, so a
     pipeline rewriting data/ meanwhile does not change it. The run prints which one it used.
  3. ours: `tasks.reward.run` itself, in a subprocess (one rank, no launcher: tasks/common/distributed.py makes a
     world of one): load and split the pairs, encode them with the chat template (tasks/common/chat.py), batch them
     (StepBatches: length-grouped, a function of seed and step), RewardModel (backbone + scalar head at the last real
     token), Bradley-Terry, the shared DeepSpeed Trainer, the final model saved; then the saved model is loaded back
     (RewardModel.load) and scores the held-out pairs (the stage's own accuracy is checked against it).
  4. TRL: `trl.RewardTrainer` with `LlamaForSequenceClassification(num_labels=1)` loaded from the same folder (its
     `score` head is TRL's usual fresh init, seeded with train.seed), in a subprocess of its own. Its dataset is the
     stage's encoded pairs as `chosen_ids` / `rejected_ids` (prompt + reply: the very token ids ours trains on,
     chat-template tokens and truncation to max_len included; no EOS is appended to pre-tokenized rows), laid out
     in the stage's step order and read with `train_sampling_strategy="sequential"`, so step s of TRL is step s of
     ours, pair for pair (checked on the first batches; --trl-shuffle gives TRL its own random sampler instead).
     Same steps, batch, lr, warmup, cosine to lr x min_lr_ratio (HF's cosine_with_min_lr), AdamW betas / eps /
     weight decay, grad clip 1.0, seed and precision (autocast = HF bf16 mixed precision, the same torch.autocast);
     gradient checkpointing off (TRL defaults to on; ours does not checkpoint). Held-out pairs scored by the same
     code as ours' (tasks/common/alignment.py collate_pairs; reward at the last non-pad token).
  5. Reports, per contender: held-out accuracy with its Wilson 95 % interval, mean margin r(chosen) - r(rejected),
     `loss10` (the mean train loss of the last 10 steps; both log every step), optimizer-step seconds, tokens/s,
     wall time and the 1-minute load average before -> after; then ours - TRL on the same pairs with a paired 95 %
     interval and McNemar's exact p, the tokens/s ratio, and each one's lr at step 1 / peak / last.
     <work>/result.json holds everything, every step's loss and lr and every held-out margin included.

Measuring
  tokens = the real (non-pad) tokens of every trained pair, both rows (prompt + chosen, prompt + rejected), the same
  pairs for both contenders; tokens/s = tokens / seconds spent in optimizer steps (ours: the trainer's
  train_seconds, batch collation included; TRL: on_step_begin to on_step_end, collation excluded). tok/cpu-s is
  the same over the process CPU time of those steps (ours: the bench wraps the shared Trainer's per-step method in
  its worker process; TRL: the same callback), which a loaded machine's descheduling does not inflate (threads
  spinning while they wait still count; --threads 1 gives the cleanest per-core figure). Wall = the whole
  training call (ours: tasks.reward.run, with data loading, DeepSpeed start, its own evaluation, final checkpoint and
  save; TRL: RewardTrainer construction and train()). The two run one after the other (ours first), each with
  --threads torch threads (default 1: on the shared 2-core box two OpenMP threads of one process wait on each
  other's descheduled sibling, and a 2-thread step ran 2.5x slower than a 1-thread one at load ~2; --threads 0
  takes every usable core, as the stage does on this host); the load average around each run is printed. A
  shared machine moves wall-clock tokens/s by tens of percent between runs: read the CPU-time ratio first.
  Differences that stay, by design: the heads' init (ours N(0, 1/sqrt(D+1)) with a bias, HF's score N(0, 0.02) and
  no bias), HF's warmup starting at lr 0 (ours at lr / warmup) and ending its cosine one step later, HF's default
  AdamW implementation, and the model code (ours vs transformers' Llama with SDPA).
Noise: 187 held-out pairs give an accuracy interval of about ±7 points; the paired interval of the difference is
  narrower (both models score the same pairs) but covers the draw of held-out pairs only, not the training run's
  own randomness (seed: backbone, head init and data order; even the thread count, through reduction order, moved
  one contender by 4 points): judge "within noise" over seeds (--seed). A tiny model on harmless-base sits near
  50-60 % (docs/BENCHMARKS.md, "Reward model on HH-RLHF vs TRL RewardTrainer").
Machine: CPU only (the reward stage's DeepSpeed on CPU ranks); 2 cores here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.train_step import _cpu_name

ROOT = Path(__file__).resolve().parents[1]
HH_SPEC = "../shared/data/hh-rlhf-harmless-base/harmless-base_test_rows0000-1811.jsonl.gz"
CONTENDERS = ("ours", "trl")
LABELS = {"ours": "ours (tasks.reward)", "trl": "TRL RewardTrainer"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# ------------------------------------------------------------------------------------------------ setup


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.reward_trl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=100, help="optimizer steps of each contender")
    p.add_argument("--batch", type=int, default=None, help="pairs per step (default: params reward.train)")
    p.add_argument("--lr", type=float, default=None, help="peak lr (default: params reward.train.lr)")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default: params reward.train)")
    p.add_argument("--max-len", type=int, default=None, help="tokens a row (default: params reward.max_len)")
    p.add_argument("--val-fraction", type=float, default=None, help="held-out share (default: params reward)")
    p.add_argument("--seed", type=int, default=None, help="train.seed: head init, data order, random backbone")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "autocast"], help="auto as the stage")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each run (1: robust under load)")
    p.add_argument("--backbone", default=None, help="HF Llama folder, or `random` (default: data/sft/model if any)")
    p.add_argument("--preset", default="small", help="ModelConfig preset of the random backbone")
    p.add_argument("--work", type=Path, default=None, help="work folder (default: a new one under /tmp, kept)")
    p.add_argument("--only", choices=CONTENDERS, default=None, help="run one contender")
    p.add_argument("--trl-shuffle", action="store_true", help="TRL's RandomSampler instead of the stage's order")
    p.add_argument("-v", "--verbose", action="store_true", help="the runs' output live instead of in logs/")
    p.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    return p.parse_args()


def reward_config(args: argparse.Namespace):
    """params.yaml's reward section (top-level train merged in) with the bench's sources, budget and overrides."""
    from tasks.common.config import load_section
    from tasks.common.distributed import cpu_has_native_bf16

    cfg = load_section("reward")
    precision = args.precision
    if precision == "auto":
        precision = "autocast" if cpu_has_native_bf16() else "fp32"
    batch = args.batch or cfg.train.batch_size
    train = dataclasses.replace(
        cfg.train,
        **{
            "max_steps": args.steps,
            "max_tokens": 0,
            "batch_size": batch,
            "micro_batch_size": cfg.train.micro_batch_size if batch % cfg.train.micro_batch_size == 0 else batch,
            "lr": cfg.train.lr if args.lr is None else args.lr,
            "warmup_steps": cfg.train.warmup_steps if args.warmup is None else args.warmup,
            "seed": cfg.train.seed if args.seed is None else args.seed,
            "precision": precision,
            "ranks": 1,
            "hostfile": "",
            "zero_stage": 0,
            "compile": False,
            "resume": False,
            "eval_every": 0,
            "checkpoint_every": 0,
            "log_every": 1,  # every step's loss and lr, for both contenders
        },
    )
    return dataclasses.replace(
        cfg,
        sources=[HH_SPEC],
        max_len=cfg.max_len if args.max_len is None else args.max_len,
        val_fraction=cfg.val_fraction if args.val_fraction is None else args.val_fraction,
        train=train,
    )


def fresh_work_folder(work: Path | None) -> Path:
    """<work>/project (the stage's root) and <work>/shared -> ../shared, as the checkout sits beside shared/."""
    work = Path(tempfile.mkdtemp(prefix="reward-trl-")) if work is None else work.resolve()
    if work.exists() and any(work.iterdir()):
        if not (work / "setup.json").is_file():
            sys.exit(f"--work {work}: not empty and not an earlier work folder of this benchmark; pick another")
        shutil.rmtree(work)
    (work / "project" / "data").mkdir(parents=True)
    (work / "shared").symlink_to((ROOT.parent / "shared").resolve(), target_is_directory=True)
    if not (work / "project" / HH_SPEC).is_file():
        sys.exit(f"needs {ROOT.parent / HH_SPEC.removeprefix('../')} (the shared HH-RLHF sample beside the checkout)")
    return work


def default_backbone(arg: str | None) -> str:
    """--backbone, else the checkout's data/sft/model when there is one, else `random`."""
    if arg:
        return arg
    return (
        str(ROOT / "data" / "sft" / "model")
        if (ROOT / "data" / "sft" / "model" / "config.json").is_file()
        else "random"
    )


def place_backbone(arg: str, project: Path, cfg, preset: str) -> str:
    """data/sft/model and data/tokenizer of the work project; a description of the backbone."""
    model_dir, tok_dir = project / "data" / "sft" / "model", project / "data" / "tokenizer"
    if arg == "random":
        return build_random_backbone(project, cfg, preset, model_dir, tok_dir)
    source = Path(arg).resolve()
    if not (source / "config.json").is_file() or not (source / "tokenizer.json").is_file():
        sys.exit(f"--backbone {arg}: not an HF model folder with tokenizer files (config.json, tokenizer.json)")
    shutil.copytree(source, model_dir)
    tok_dir.mkdir(parents=True)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, tok_dir / name)
    from model.hf import load_config

    cfg_ = load_config(model_dir)
    return (
        f"{source} (copied; {cfg_.n_params() / 1e6:.2f}M params, vocab {cfg_.vocab_size:,}, "
        f"model.safetensors sha256 {weights_sha(model_dir)}; its own tokenizer files)"
    )


def weights_sha(model_dir: Path) -> str:
    """The first 12 hex digits of the backbone weights' sha256 (which backbone a figure came from)."""
    from tasks.common.dvcio import file_sha256

    return file_sha256(model_dir / "model.safetensors")[:12]


def build_random_backbone(project: Path, cfg, preset: str, model_dir: Path, tok_dir: Path) -> str:
    """The tokenizer stage's BPE trained on the training-split pairs' text, and a random-init Llama of --preset."""
    import torch

    from model.config import ModelConfig
    from model.hf import save
    from model.llama import Llama
    from tasks.sources.examples import load_preference_data
    from tasks.tokenizer import TokenizerConfig, save_folder, train_bpe

    loaded = load_preference_data(cfg, project)
    texts = [m["content"] for p in loaded.train for m in p["prompt_messages"]]
    texts += [p[side] for p in loaded.train for side in ("chosen", "rejected")]
    tok = train_bpe(iter([texts[i : i + 1000] for i in range(0, len(texts), 1000)]), TokenizerConfig(), len(texts))
    tok_dir.mkdir(parents=True)
    save_folder(tok, tok_dir)
    torch.manual_seed(cfg.train.seed)
    model_cfg = ModelConfig.from_preset(preset, vocab_size=tok.get_vocab_size())
    save(Llama(model_cfg), model_dir, tokenizer_dir=tok_dir)
    return (
        f"random init of preset {preset!r} ({model_cfg.n_params() / 1e6:.2f}M params, seed {cfg.train.seed}), "
        f"BPE {tok.get_vocab_size():,} trained on the {len(loaded.train):,} training pairs' text, "
        f"model.safetensors sha256 {weights_sha(model_dir)}"
    )


# ------------------------------------------------------------------------------------------------ shared by both


def stage_pairs(cfg, project: Path):
    """(upstream, loaded, train pairs, held-out pairs, truncated) exactly as tasks.reward.run builds them."""
    from tasks.common import alignment as al
    from tasks.common.dvcio import stage_paths
    from tasks.sources.examples import load_preference_data

    up = al.upstream_of("reward", cfg, stage_paths("reward", project), "sft")
    loaded = load_preference_data(cfg, project)
    train, val, truncated = al.encode_pairs(loaded, up.tok, up.max_len)
    return up, loaded, train, val, truncated


def step_order(train: list, cfg) -> list[list[int]]:
    """The training pairs of each step, as the stage's StepBatches draws them."""
    from tasks.common import alignment as al

    batches, tokens_per_pair = al.pair_batches(train, cfg.train, pad_id=0)  # the pad id does not move the order
    return [batches.indices(s) for s in range(cfg.train.total_steps(tokens_per_pair))]


def token_counts(train: list, steps: list[list[int]]) -> dict[str, int]:
    """Real tokens of the trained pairs (both rows) and the padded tokens of the batches (2B rows x longest)."""
    real = sum(2 * len(train[i].prompt) + len(train[i].chosen) + len(train[i].rejected) for s in steps for i in s)
    longest = [max(len(train[i].prompt) + max(len(train[i].chosen), len(train[i].rejected)) for i in s) for s in steps]
    padded = sum(2 * len(s) * n for s, n in zip(steps, longest))
    return {"tokens": real, "padded_tokens": padded}


def score_pairs(rewards, pairs: list, pad_id: int, batch_size: int) -> list[float]:
    """r(chosen) - r(rejected) of each pair; rewards(PairBatch) -> (chosen (B,), rejected (B,))."""
    import torch

    from tasks.common import alignment as al

    diffs: list[float] = []
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            chosen, rejected = rewards(al.collate_pairs(pairs[start : start + batch_size], pad_id))
            diffs += (chosen.double() - rejected.double()).tolist()
    return diffs


def load_setup(work: Path):
    from tasks.common.config import build
    from tasks.reward import RewardConfig

    setup = json.loads((work / "setup.json").read_text())
    return setup, build(RewardConfig, setup["cfg"], "setup.json")


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------------ contenders


def count_step_cpu_seconds() -> dict[str, float]:
    """Wrap the shared Trainer's per-step method (in this worker process only) to sum the process CPU time of its
    steps: a figure that descheduling on a loaded machine does not inflate. NaN when the method is not there."""
    from tasks.common import trainer as shared

    total = {"cpu_seconds": 0.0 if hasattr(shared.Trainer, "_step") else math.nan}
    if math.isnan(total["cpu_seconds"]):
        return total
    original = shared.Trainer._step

    def timed(self, *args, **kwargs):
        started = time.process_time()
        try:
            return original(self, *args, **kwargs)
        finally:
            total["cpu_seconds"] += time.process_time() - started

    shared.Trainer._step = timed
    return total


def run_ours(work: Path) -> dict:
    """tasks.reward.run on the work project, then its saved model scored on the held-out pairs."""
    from model.heads import RewardModel
    from tasks import reward
    from tasks.common.dvcio import stage_paths
    from tasks.common.tracking import Tracker

    setup, cfg = load_setup(work)
    project = Path(setup["project"])
    cpu = count_step_cpu_seconds()
    load_before = os.getloadavg()
    started = time.perf_counter()
    metrics = reward.run(cfg, stage_paths("reward", project), Tracker("reward", None))
    wall = time.perf_counter() - started
    load_after = os.getloadavg()
    up, _, train, val, _ = stage_pairs(cfg, project)
    model = RewardModel.load(project / "data" / "reward" / "model")
    diffs = score_pairs(lambda b: reward.pair_rewards(model, b), val, up.tok.pad_id, cfg.train.micro_batch_size)
    rows = [json.loads(line) for line in (project / "data" / "reward" / "history.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "train/loss" in r]
    return {
        "diffs": diffs,
        "train_seconds": metrics["train_seconds"],
        "train_cpu_seconds": cpu["cpu_seconds"],
        "losses": [r["train/loss"] for r in rows],
        "lrs": [r["train/lr"] for r in rows],
        "wall_seconds": wall,
        "steps": metrics["steps"],
        "stage_accuracy": metrics.get("accuracy"),
        "stage_tokens_per_s": metrics["tokens_per_s"],
        "precision": metrics["precision"],
        "threads": _torch_threads(),
        "loadavg": [load_before, load_after],
        **token_counts(train, step_order(train, cfg)),
        "data": {k: metrics[k] for k in ("train_examples", "val_examples", "quarantined", "truncated", "max_len")},
    }


def make_step_timer():
    """A TrainerCallback summing the wall and process CPU seconds from on_step_begin to on_step_end (forward,
    backward, clip, optimizer step)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.seconds, self.cpu_seconds, self.steps, self._t0 = 0.0, 0.0, 0, (0.0, 0.0)

        def on_step_begin(self, args, state, control, **kwargs):
            self._t0 = (time.perf_counter(), time.process_time())

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds += time.perf_counter() - self._t0[0]
            self.cpu_seconds += time.process_time() - self._t0[1]
            self.steps += 1

    return StepTimer()


def trl_args(cfg, out: Path, shuffle: bool, verbose: bool):
    """trl.RewardConfig matching the stage's TrainConfig."""
    from trl import RewardConfig as TRLRewardConfig

    t = cfg.train
    return TRLRewardConfig(
        output_dir=str(out),
        max_steps=t.max_steps,
        per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.batch_size // t.micro_batch_size,
        learning_rate=t.lr,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": t.min_lr_ratio},
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        adam_beta1=t.beta1,
        adam_beta2=t.beta2,
        adam_epsilon=t.eps,
        max_grad_norm=t.grad_clip,
        seed=t.seed,
        data_seed=t.seed,
        bf16=t.precision == "autocast",
        fp16=False,
        gradient_checkpointing=False,
        max_length=None,  # rows are already cut to max_len by the stage's encoding; TRL would drop, not cut
        train_sampling_strategy="random" if shuffle else "sequential",
        use_cpu=True,
        logging_steps=t.log_every,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        disable_tqdm=not verbose,
    )


def check_same_batches(trainer, train: list, steps: list[list[int]], pad_id: int, n: int = 2) -> None:
    """TRL's first n batches hold the stage's first n steps' pairs, token for token."""
    import torch

    from tasks.common import alignment as al

    for k, batch in zip(range(n), trainer.get_train_dataloader()):
        want = al.collate_pairs([train[i] for i in steps[k]], pad_id)
        if not torch.equal(batch["input_ids"].cpu(), want.ids) or not torch.equal(
            batch["attention_mask"].cpu(), want.attention_mask
        ):
            raise SystemExit(f"TRL's batch {k} differs from the stage's step {k}: the comparison would not be fair")


def run_trl(work: Path) -> dict:
    """trl.RewardTrainer on the stage's pairs and order, then its model scored on the held-out pairs."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaForSequenceClassification, set_seed
    from trl import RewardTrainer

    setup, cfg = load_setup(work)
    set_threads(setup["threads"])
    up, _, train, val, _ = stage_pairs(cfg, Path(setup["project"]))
    steps = step_order(train, cfg)
    order = [i for s in steps for i in s]
    dataset = Dataset.from_dict(
        {
            "chosen_ids": [train[i].prompt + train[i].chosen for i in order],
            "rejected_ids": [train[i].prompt + train[i].rejected for i in order],
        }
    )
    load_before = os.getloadavg()
    started = time.perf_counter()
    set_seed(cfg.train.seed)  # the fresh score head
    model = LlamaForSequenceClassification.from_pretrained(str(up.model_dir), num_labels=1, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(up.tokenizer_dir))
    timer = make_step_timer()
    trainer = RewardTrainer(
        model=model,
        args=trl_args(cfg, work / "trl", setup["trl_shuffle"], setup["verbose"]),
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[timer],
    )
    if len(trainer.train_dataset) != len(order) or tokenizer.pad_token_id != up.tok.pad_id:
        raise SystemExit("TRL dropped rows or pads with another id: the comparison would not be fair")
    if not setup["trl_shuffle"]:
        check_same_batches(trainer, train, steps, up.tok.pad_id)
    trainer.train()
    wall = time.perf_counter() - started
    load_after = os.getloadavg()
    model.eval()

    def rewards(batch):
        r = model(input_ids=batch.ids, attention_mask=batch.attention_mask).logits.squeeze(-1)
        return r[: batch.pairs], r[batch.pairs :]

    diffs = score_pairs(rewards, val, up.tok.pad_id, cfg.train.micro_batch_size)
    rows = [row for row in trainer.state.log_history if "loss" in row]  # one row a step (logging_steps 1)
    return {
        "diffs": diffs,
        "train_seconds": timer.seconds,
        "train_cpu_seconds": timer.cpu_seconds,
        "losses": [float(r["loss"]) for r in rows],
        "lrs": [float(r["learning_rate"]) for r in rows],
        "wall_seconds": wall,
        "steps": timer.steps,
        "trl_counted_tokens": trainer._total_train_tokens,
        "precision": "autocast (HF bf16)" if cfg.train.precision == "autocast" else "fp32",
        "threads": _torch_threads(),
        "loadavg": [load_before, load_after],
        **token_counts(train, steps),
    }


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


WORKERS = {"ours": run_ours, "trl": run_trl}


def worker_main(name: str, work: Path) -> None:
    result = WORKERS[name](work)
    (work / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")


def launch(name: str, work: Path, threads: int, verbose: bool) -> dict:
    """One contender in a fresh process (its own threads, allocator and process group); its result."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": str(threads),
        "DS_ACCELERATOR": "cpu",
        "HF_HOME": str(work / "hf_home"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "SCRATCHLM_PROGRESS": "on" if verbose else "off",
    }
    log = work / "logs" / f"{name}.log"
    log.parent.mkdir(exist_ok=True)
    print(f"[{time.strftime('%H:%M:%S')}] {LABELS[name]}: training   (log: {log})", flush=True)
    cmd = [sys.executable, "-m", "bench.reward_trl", "--worker", name, "--work", str(work)]
    with open(log, "w") as f:
        out = None if verbose else f
        done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=None if verbose else subprocess.STDOUT)
    if done.returncode:
        tail = "" if verbose else "\n".join(log.read_text().splitlines()[-40:])
        raise SystemExit(f"{name}: the run failed (exit {done.returncode})\n{tail}")
    return json.loads((work / f"{name}.json").read_text())


# ------------------------------------------------------------------------------------------------ statistics


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score 95 % interval of a binomial proportion k / n."""
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (centre - half, centre + half)


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: b and c discordant pairs under Binomial(b + c, 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_difference(ours: list[bool], theirs: list[bool], z: float = 1.96) -> dict:
    """Accuracy difference ours - theirs on the same pairs, its Wald 95 % interval for paired proportions, McNemar."""
    n = len(ours)
    b = sum(o and not t for o, t in zip(ours, theirs))  # ours right, theirs wrong
    c = sum(t and not o for o, t in zip(ours, theirs))
    diff = (b - c) / n
    se = math.sqrt(max(b + c - (b - c) ** 2 / n, 0.0)) / n
    return {"diff": diff, "ci": (diff - z * se, diff + z * se), "ours_only": b, "theirs_only": c, "p": mcnemar_p(b, c)}


def summarise(result: dict) -> dict:
    """Accuracy, interval, margin and tokens/s of one contender's result."""
    diffs = result["diffs"]
    k, n = sum(d > 0 for d in diffs), len(diffs)
    return {
        "accuracy": k / n,
        "ci": wilson(k, n),
        "correct": k,
        "n": n,
        "margin": sum(diffs) / n,
        "tokens_per_s": result["tokens"] / result["train_seconds"],
        "tokens_per_cpu_s": result["tokens"] / result["train_cpu_seconds"],
        "final_loss": tail_mean(result["losses"]),
    }


def tail_mean(values: list[float], n: int = 10) -> float:
    """Mean of the last n values (the train loss of the last n steps)."""
    tail = values[-n:]
    return sum(tail) / len(tail) if tail else math.nan


# ------------------------------------------------------------------------------------------------ report


def print_summary(out: dict) -> None:
    s = out["setup"]
    cfg = s["cfg"]
    t = cfg["train"]
    print(f"\nbackbone: {s['backbone']}")
    print(
        f"data: {HH_SPEC}: {s['data']['train_examples']:,} training / {s['data']['val_examples']:,} held-out pairs "
        f"(val_fraction {cfg['val_fraction']}, by id hash), {s['data']['quarantined']} quarantined, "
        f"{s['data']['truncated']:,} cut to max_len {s['data']['max_len']}"
    )
    print(
        f"both: {t['max_steps']} steps x {t['batch_size']} pairs, lr {t['lr']:g} (warmup {t['warmup_steps']}, cosine "
        f"to x{t['min_lr_ratio']}), AdamW ({t['beta1']}, {t['beta2']}), clip {t['grad_clip']}, seed {t['seed']}, "
        f"{t['precision']}, {s['threads']} thread(s) each; "
        f"TRL order: {'its own shuffle' if s['trl_shuffle'] else 'the stage'}"
    )
    print(f"machine: {s['machine']}, torch {s['torch']}, transformers {s['transformers']}, trl {s['trl']}\n")
    header = f"{'contender':<22}{'held-out acc':>13}{'95 % CI':>17}{'margin':>9}{'loss10':>8}"
    print(header + f"{'steps':>7}{'step s':>9}{'tokens/s':>10}{'tok/cpu-s':>11}{'wall s':>8}{'load':>11}")
    for name, r in out["results"].items():
        m = out["summary"][name]
        load = f"{r['loadavg'][0][0]:.1f}->{r['loadavg'][1][0]:.1f}"
        print(
            f"{LABELS[name]:<22}{m['accuracy']:>12.1%} [{m['ci'][0]:>6.1%}, {m['ci'][1]:>6.1%}]{m['margin']:>9.3f}"
            f"{m['final_loss']:>8.4f}{r['steps']:>7}{r['train_seconds']:>9.1f}{m['tokens_per_s']:>10,.0f}"
            f"{m['tokens_per_cpu_s']:>11,.0f}{r['wall_seconds']:>8.0f}{load:>11}"
        )
    if "paired" in out:
        d = out["paired"]
        print(
            f"\nours - TRL on the same {out['summary']['ours']['n']} pairs: {d['diff'] * 100:+.1f} points "
            f"[{d['ci'][0] * 100:+.1f}, {d['ci'][1] * 100:+.1f}] (paired 95 %), discordant {d['ours_only']} vs "
            f"{d['theirs_only']}, McNemar p = {d['p']:.2f}"
        )
        print(
            f"tokens/s ours / TRL: {out['tokens_per_s_ratio']:.2f}x (wall clock), "
            f"{out['tokens_per_cpu_s_ratio']:.2f}x (process CPU time)"
        )
        print(f"goal (ours >= TRL within noise: the paired interval reaches 0 or above): {out['verdict']}")
    for line in out["notes"]:
        print(f"note: {line}")
    print(f"\nresult: {out['result_file']}")


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "trl"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def compare(results: dict) -> tuple[dict, list[str]]:
    """The paired comparison, the tokens/s ratio and the verdict, plus consistency notes."""
    notes = []
    ours, trl = results.get("ours"), results.get("trl")
    if ours and ours["stage_accuracy"] is not None:
        rescored = sum(d > 0 for d in ours["diffs"]) / len(ours["diffs"])
        if abs(rescored - ours["stage_accuracy"]) > 1e-9:
            notes.append(f"the stage reported {ours['stage_accuracy']:.1%}, its saved model scores {rescored:.1%}")
    if ours:
        notes.append(f"the stage's own tokens/s (nominal, padded pair length): {ours['stage_tokens_per_s']:,.0f}")
    for name, r in results.items():
        lrs = r["lrs"]
        notes.append(f"{name} lr at step 1 / peak / last: {lrs[0]:.2e} / {max(lrs):.2e} / {lrs[-1]:.2e}")
    if trl and trl["trl_counted_tokens"] != trl["tokens"]:
        notes.append(f"TRL counted {trl['trl_counted_tokens']:,} tokens, the bench {trl['tokens']:,}")
    if not (ours and trl):
        return {}, notes
    if ours["tokens"] != trl["tokens"]:
        notes.append(f"the contenders trained on different tokens: {ours['tokens']:,} vs {trl['tokens']:,}")
    paired = paired_difference([d > 0 for d in ours["diffs"]], [d > 0 for d in trl["diffs"]])
    ratio = (ours["tokens"] / ours["train_seconds"]) / (trl["tokens"] / trl["train_seconds"])
    cpu_ratio = (ours["tokens"] / ours["train_cpu_seconds"]) / (trl["tokens"] / trl["train_cpu_seconds"])
    verdict = "met" if paired["ci"][1] >= 0 else "NOT met"
    return {
        "paired": paired,
        "tokens_per_s_ratio": ratio,
        "tokens_per_cpu_s_ratio": cpu_ratio,
        "verdict": verdict,
    }, notes


def main() -> None:
    args = parse_args()
    if args.worker:
        worker_main(args.worker, args.work)
        return
    from tasks.common.distributed import usable_cores

    cfg = reward_config(args)
    work = fresh_work_folder(args.work)
    project = work / "project"
    print(f"work folder: {work}", flush=True)
    backbone = place_backbone(default_backbone(args.backbone), project, cfg, args.preset)
    print(f"backbone: {backbone}", flush=True)
    up, loaded, train, val, truncated = stage_pairs(cfg, project)
    threads = args.threads or usable_cores()  # 0: every usable core, as the stage would take on this host
    setup = {
        "project": str(project),
        "backbone": backbone,
        "cfg": dataclasses.asdict(cfg),
        "threads": threads,
        "trl_shuffle": args.trl_shuffle,
        "verbose": args.verbose,
        "machine": _cpu_name(),
        "data": {
            "train_examples": len(train),
            "val_examples": len(val),
            "quarantined": len(loaded.quarantine),
            "truncated": truncated,
            "max_len": up.max_len,
        },
        **versions(),
    }
    (work / "setup.json").write_text(json.dumps(setup, indent=2) + "\n")
    names = [args.only] if args.only else list(CONTENDERS)
    results = {name: launch(name, work, threads, args.verbose) for name in names}
    comparison, notes = compare(results)
    out = {
        "setup": setup,
        "results": results,
        "summary": {name: summarise(r) for name, r in results.items()},
        **comparison,
        "notes": notes,
        "result_file": str(work / "result.json"),
    }
    (work / "result.json").write_text(json.dumps(out, indent=2) + "\n")
    print_summary(out)


if __name__ == "__main__":
    main()
