"""The training loop every training stage shares (pretrain, sft, reward, dpo): DeepSpeed, schedule, logging,
checkpoints, resume and a NaN guard. A stage brings its model, its batches and its loss; the loop does the rest.

    from tasks.common.trainer import Trainer          # TrainConfig, BatchIndex: tasks/common/train_config.py

    recipe = Recipe(                 # what the stage brings (its own logic)
        batches=batch_fn,            # (BatchIndex) -> batch: any tensors / tuples / dicts; moved to the device for you
        loss_fn=loss_fn,             # (engine, batch) -> (loss, {"name": value}): a scalar to minimise plus extra
                                     #    metrics, averaged over micro batches and ranks and logged as train/<name>
        tokens_per_example=seq_len,  # tokens one example puts through the model (for tokens/s and the token budget)
        flops_per_token=cfg.flops_per_token(seq_len),   # training FLOPs per token, for MFU (0 = do not report MFU)
        eval_fn=eval_fn,             # optional (engine) -> {"loss": ...}: runs on EVERY rank (collectives allowed,
                                     #    e.g. tasks.common.training.sharded_means), in eval mode under no_grad;
                                     #    logged as val/<name>
        sample_fn=sample_fn,         # optional (model, step) -> text: rank 0 only, a plain full-weight module; logged
                                     #    as the MLflow text artifact samples/step_XXXXXXXX.txt at each evaluation
        rollout_fn=None,             # optional (engine, step) -> (experience, {"name": value}): on EVERY rank at the
                                     #    start of each step, in eval mode under no_grad (collectives allowed): the
                                     #    experience batches(index, experience) cuts the step's micro batches from
                                     #    (RL: sampled answers, rewards, advantages); its metrics are logged as train/*
        updates_per_step=1,          # optimizer updates per step over the same experience (PPO's minibatch epochs);
                                     #    BatchIndex.update says which one a micro batch feeds
        state=None)                  # optional object with state_dict() / load_state_dict(d): running state of the
                                     #    recipe (an adaptive KL coefficient) saved in every checkpoint, restored on
                                     #    resume
    trainer = Trainer(
        build_model,                 # () -> nn.Module, seeded by the caller; called again (RNG forked) to hold
                                     #    consolidated weights for samples (ZeRO-3) and the final export
        cfg.train,                   # TrainConfig: ranks, ZeRO stage, precision, batch split, AdamW, schedule, cadence
        recipe,
        name="sft",                  # progress bar, MLflow namespace, messages, checkpoints/<name>/
        info={...},                  # what determines the trained weights (params, upstream hashes): its fingerprint
                                     #    names the checkpoint folder checkpoints/<name>/<fingerprint>/ under `root`,
                                     #    so a resume never mixes configurations; written beside the checkpoints
        root=paths.root,
        tracker=tracker)             # the stage's MLflow tracker (a no-op on ranks other than 0)
    summary, model = trainer.train(paths.out / "history.jsonl")
                                     # fit() (resumes from the newest checkpoint that verifies) then final_model():
                                     #    the run's headline numbers and, on rank 0, a plain fp32 module with the
                                     #    trained weights (ZeRO shards gathered); None on other ranks. Collective:
                                     #    call it on every rank.

What a stage plugs in, e.g.
    pretrain  batches = random windows of the token memmap;  loss = engine(x, y)[1]
    sft       batches = padded chats, -100 off the answers;  loss = engine(x, y)[1]
    reward    batches = (chosen, rejected) pairs;            loss = bradley_terry_loss(engine(c), engine(r))
    dpo       batches = pairs;  loss_fn closes over a frozen reference model: dpo_loss(policy logps, reference logps)
    ppo       rollout_fn samples answers and scores them; batches cut minibatches of that experience; loss = ppo_losses

Batches. A step's global batch is `batch_size` examples, cut into `accum x world` micro batches of
`micro_batch_size`. `BatchIndex.examples` is the range of the step's examples a micro batch holds, the same
whatever the split between ranks and accumulation: a batch function that draws a step's examples from
(seed, step) and takes `examples` makes 2 ranks follow exactly the curve of 1 rank with 2x accumulation, and
makes a resumed run see exactly the data it would have seen (the data cursor is the step).

Loop. Per step: the rollout (when the recipe has one), then `updates_per_step` updates, each: for each micro batch,
loss_fn → engine.backward; the losses are summed over micro batches and ranks (one all-reduce) and a non-finite loss
stops training before the optimizer step (`TrainingDiverged`, the last good checkpoint untouched); then
engine.step(): clipping, torch.optim.AdamW (built here, `build_optimizer`, and wrapped by DeepSpeed), and the LR
schedule `TrainConfig.lr_factor` (linear warmup then cosine to `min_lr_ratio`) as a LambdaLR that DeepSpeed steps.
The logged train/lr is read from the optimizer.
Every `log_every` steps: train/loss, train/lr, train/grad_norm, train/tokens_per_s, train/mfu to MLflow and
history.jsonl, and the progress bar (loss, ETA); every `eval_every` steps and at the end: eval_fn and samples;
every `checkpoint_every` steps and at the end: a DeepSpeed checkpoint (module, optimizer, scheduler, RNG states,
step, the recipe's state), its manifest, and an atomic move of `latest`. Checkpoints fall on step boundaries, so a
resumed run redoes the whole step: a rollout is a function of (weights, seed, step) and comes back the same. Only the
rank-0 process writes logs.

Test hooks: SCRATCHLM_TEST_NAN_STEP=N makes the loss of step N NaN (how the guard is tested);
SCRATCHLM_TEST_HANG_STEP=N makes rank 0 stop dead after step N, so a test can SIGKILL a run that is surely mid-way.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deepspeed
import torch
from torch import Tensor, nn

from tasks.common.checkpoint import Checkpoints, checkpoint_dir, fingerprint, tag_of
from tasks.common.config import ConfigError, ScratchError
from tasks.common.console import progress, progress_write
from tasks.common.distributed import (
    World,
    all_reduce_sum,
    barrier,
    deepspeed_config,
    format_flops,
    init_distributed,
    peak_flops,
    resolve_precision,
)
from tasks.common.tracking import Tracker
from tasks.common.train_config import BatchIndex, TrainConfig

NAN_HOOK = "SCRATCHLM_TEST_NAN_STEP"
HANG_HOOK = "SCRATCHLM_TEST_HANG_STEP"


BatchFn = Callable[[BatchIndex], Any]
LossFn = Callable[[Any, Any], "tuple[Tensor, dict[str, float | Tensor]]"]
EvalFn = Callable[[Any], "dict[str, float]"]
SampleFn = Callable[["nn.Module", int], str]
RolloutFn = Callable[[Any, int], "tuple[Any, dict[str, float]]"]


@dataclass(frozen=True)
class Recipe:
    """What a training stage brings to the loop: its batches, its loss, its evaluation and samples, and what one
    example costs (see the module docstring for each function's contract)."""

    batches: BatchFn
    loss_fn: LossFn
    tokens_per_example: int
    flops_per_token: float = 0.0
    eval_fn: EvalFn | None = None
    sample_fn: SampleFn | None = None
    rollout_fn: RolloutFn | None = None
    updates_per_step: int = 1
    state: Any = None

    def __post_init__(self) -> None:
        if self.updates_per_step < 1:
            raise ValueError(f"Recipe.updates_per_step must be >= 1, got {self.updates_per_step}")


class TrainingDiverged(ScratchError):
    """The loss (or gradient norm) stopped being finite; training stopped without saving."""


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def optim_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: the model's own `optim_groups` when it has one, else decay on tensors with >= 2 dims."""
    if hasattr(model, "optim_groups"):
        return model.optim_groups(weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """The optimizer of every training stage: torch's AdamW over the model's decay groups. DeepSpeed wraps it (ZeRO
    partitions its states over the ranks; bf16 keeps fp32 master weights in it) and steps it."""
    return torch.optim.AdamW(
        optim_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps
    )


class Trainer:
    """DeepSpeed training of one model (see the module docstring for the contract)."""

    def __init__(
        self,
        build_model: Callable[[], nn.Module],
        cfg: TrainConfig,
        recipe: Recipe,
        *,
        name: str,
        info: dict[str, Any],
        root: Path,
        tracker: Tracker | None = None,
    ) -> None:
        folder = checkpoint_dir(name, fingerprint(info), root)  # checkpoints/<stage>/<fingerprint>/
        self.cfg, self.name = cfg, name
        self.build_model, self.batches, self.loss_fn = build_model, recipe.batches, recipe.loss_fn
        self.eval_fn, self.sample_fn = recipe.eval_fn, recipe.sample_fn
        self.rollout_fn, self.updates, self.recipe_state = recipe.rollout_fn, recipe.updates_per_step, recipe.state
        self.tracker = tracker or Tracker(name, None)
        self.world: World = init_distributed()
        self.accum = cfg.grad_accum(self.world.size)
        self.total = cfg.total_steps(recipe.tokens_per_example)
        self.tokens_per_step = cfg.batch_size * recipe.tokens_per_example
        self.flops_per_token = recipe.flops_per_token
        self.precision = resolve_precision(cfg.precision, self.world)
        self.bf16 = self.precision == "bf16"
        self.ckpt = Checkpoints(folder, keep=cfg.keep_checkpoints, rank=self.world.rank)
        self.fingerprint_info = info
        self.history_path = folder / "history.jsonl"
        self.ds_config = deepspeed_config(cfg, self.world, self.precision)

        model = build_model().to(self.world.device)
        if self.bf16:
            # DeepSpeed casts parameters only; a float32 buffer (RoPE tables) would promote activations back
            model = model.to(torch.bfloat16)
        if cfg.compile:
            if self.world.device.type == "cpu":
                check_cpu_compile_toolchain()
            model.compile()  # in place: parameter names, checkpoints and exports stay those of the eager model
        optimizer = build_optimizer(model, cfg)
        # the schedule moves once per step: the updates of one step (one rollout) share its learning rate
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda update: cfg.lr_factor(update // self.updates, self.total)
        )
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config, dist_init_required=False
        )
        self._metric_keys: list[str] | None = None
        self._last_eval: dict[str, float] = {}
        self._last_eval_step = -1
        self._last_ckpt_step = -1

    # ---- the loop ------------------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Train to the budget, resuming from the newest checkpoint of this configuration; the run's summary."""
        start = self._resume()
        low_precision = self.precision != "fp32"
        peak = peak_flops(self.world, low_precision, self.cfg.peak_flops) if self.world.is_main else float("nan")
        self._announce(start, peak)
        bar = progress(None, total=self.total, initial=start, desc=self.name, unit="step")
        train_seconds, window, row = 0.0, [0, 0.0], {}  # window: steps and seconds since the last log row
        for step in range(start, self.total):
            done = step + 1
            t0 = time.perf_counter()
            loss, metrics, grad_norm, lr = self._step(step, want_norm=self._due(done, self.cfg.log_every))
            elapsed = time.perf_counter() - t0
            train_seconds += elapsed
            window = [window[0] + 1, window[1] + elapsed]
            bar.update(1)
            if self._due(done, self.cfg.log_every):
                row = self._train_row(loss, lr, grad_norm, metrics, window, peak)
                self._log(done, row)
                bar.set_postfix(
                    loss=f"{loss:.4f}",
                    lr=f"{row['train/lr']:.2e}",
                    tok_s=f"{row['train/tokens_per_s']:,.0f}",
                    refresh=False,
                )
                window = [0, 0.0]
            if self._due(done, self.cfg.eval_every):
                self._evaluate(done)
            if self._due(done, self.cfg.checkpoint_every):
                self._save(done)
            if self.world.is_main and os.environ.get(HANG_HOOK) == str(done):
                time.sleep(3600)
        bar.close()
        if self._last_eval_step != self.total:
            self._evaluate(self.total)
        if self._last_ckpt_step != self.total:
            self._save(self.total)
        return self._summary(start, train_seconds, row, peak)

    def _train_row(
        self, loss: float, lr: float, grad_norm: float, metrics: dict[str, float], window: list, peak: float
    ) -> dict[str, float]:
        tokens_per_s = window[0] * self.tokens_per_step / max(window[1], 1e-9)
        return {
            "train/loss": loss,
            "train/lr": lr,
            "train/grad_norm": grad_norm,
            "train/tokens_per_s": tokens_per_s,
            "train/mfu": self._mfu(tokens_per_s, peak),
            **{f"train/{k}": v for k, v in metrics.items()},
        }

    def _mfu(self, tokens_per_s: float, peak: float) -> float:
        return self.flops_per_token * tokens_per_s / peak if self.flops_per_token else math.nan

    def _summary(self, start: int, train_seconds: float, last_row: dict[str, float], peak: float) -> dict[str, Any]:
        trained = self.total - start
        tokens_per_s = trained * self.tokens_per_step / train_seconds if train_seconds else math.nan
        return {
            "steps": self.total,
            "steps_this_run": trained,
            "resumed_from_step": start,
            "tokens": self.total * self.tokens_per_step,
            "tokens_per_step": self.tokens_per_step,
            "world_size": self.world.size,
            "grad_accum": self.accum,
            "micro_batch_size": self.cfg.micro_batch_size,
            "zero_stage": self.cfg.zero_stage,
            "precision": self.precision,
            "compiled": self.cfg.compile,
            "train_loss": last_row.get("train/loss", math.nan),
            "train_seconds": round(train_seconds, 2),
            "tokens_per_s": tokens_per_s,
            "peak_flops": peak,
            "mfu": self._mfu(tokens_per_s, peak),
            **{k.replace("/", "_"): v for k, v in self._last_eval.items()},
            "checkpoint": str(self.ckpt.folder / tag_of(self.total)),
            "fingerprint": self.ckpt.folder.name,
        }

    def _due(self, done: int, every: int) -> bool:
        return done == self.total or (every > 0 and done % every == 0)

    def _step(self, step: int, want_norm: bool) -> tuple[float, dict[str, float], float, float]:
        """One step: the rollout (if any), then `updates` optimizer updates; (mean loss, mean extra metrics, the last
        update's grad norm, the lr the step used)."""
        experience, rollout_metrics = None, {}
        if self.rollout_fn is not None:
            self.engine.eval()
            try:
                with torch.no_grad():
                    experience, rollout_metrics = self.rollout_fn(self.engine, step)
            finally:
                self.engine.train()
        lr = self.engine.get_lr()[0]  # what the optimizer holds for this step (the scheduler moves it in engine.step)
        losses, extras, norm = [], [], math.nan
        for update in range(self.updates):
            last = update == self.updates - 1
            loss, extra, norm = self._update(step, update, experience, want_norm and last)
            losses.append(loss)
            extras.append(extra)
        mean_extra = {k: sum(e[k] for e in extras) / len(extras) for k in extras[0]}
        return sum(losses) / len(losses), {**rollout_metrics, **mean_extra}, norm, lr

    def _update(
        self, step: int, update: int, experience: Any, want_norm: bool
    ) -> tuple[float, dict[str, float], float]:
        """One optimizer update over accum micro batches; (mean loss, mean extra metrics, grad norm)."""
        engine, world = self.engine, self.world
        sums: Tensor | None = None
        for micro in range(self.accum):
            index = BatchIndex(step, micro, world.rank, world.size, self.accum, self.cfg.micro_batch_size, update)
            batch = self.batches(index) if self.rollout_fn is None else self.batches(index, experience)
            loss, metrics = self.loss_fn(engine, to_device(batch, world.device))
            if os.environ.get(NAN_HOOK) == str(step + 1):
                loss = loss * float("nan")
            engine.backward(loss)
            values = self._metric_values(loss, metrics)
            sums = values if sums is None else sums + values
            if micro < self.accum - 1:
                engine.step()  # DeepSpeed only counts the micro batch; the update happens at the boundary
        assert sums is not None
        all_reduce_sum(sums)
        n = self.accum * world.size
        mean_loss, bad = sums[0].item() / n, int(sums[1].item())
        if bad:
            self._diverged(step + 1, f"the loss is not finite on {bad} of {n} micro batches (mean {mean_loss})")
        norm = self._grad_norm() if want_norm and not self._norm_from_engine() else math.nan
        engine.step()
        if want_norm and self._norm_from_engine():
            reported = engine.get_global_grad_norm()
            norm = float(reported) if reported is not None else math.nan
        if want_norm and not math.isfinite(norm) and not math.isnan(norm):
            self._diverged(step + 1, f"the gradient norm is {norm}")
        extra = {k: sums[2 + i].item() / n for i, k in enumerate(self._metric_keys or [])}
        return mean_loss, extra, norm

    def _metric_values(self, loss: Tensor, metrics: dict[str, float | Tensor]) -> Tensor:
        """[loss, non-finite flag, *metrics] of one micro batch as one float64 tensor (one all-reduce per step)."""
        keys = sorted(metrics)
        if self._metric_keys is None:
            self._metric_keys = keys
        elif keys != self._metric_keys:
            raise ValueError(
                f"{self.name}: loss_fn returned metrics {keys}, earlier {self._metric_keys}; "
                f"return the same names every call"
            )
        value = loss.detach().double().cpu()
        values = [value, (~torch.isfinite(value)).double()]
        values += [torch.as_tensor(metrics[k]).detach().double().cpu().reshape(()) for k in keys]
        return torch.stack(values).to(self.world.device)

    def _norm_from_engine(self) -> bool:
        # the ZeRO and bf16 optimizers report the pre-clip norm; plain fp32 data parallel does not
        return self.cfg.zero_stage > 0 or self.bf16

    def _grad_norm(self) -> float:
        grads = [p.grad.detach().float().norm() for p in self.engine.module.parameters() if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack(grads)).item() if grads else math.nan

    def _diverged(self, done: int, what: str) -> None:
        latest = self.ckpt.latest_tag()
        kept = (
            f"The last good checkpoint {self.ckpt.folder / latest} is kept and a rerun resumes from it"
            if latest
            else f"no checkpoint was written yet (checkpoint_every={self.cfg.checkpoint_every})"
        )
        raise TrainingDiverged(
            f"step {done}: {what}; training stopped before the optimizer step. {kept}; "
            f"lower train.lr or raise train.warmup_steps to get past it"
        )

    # ---- evaluation and samples ----------------------------------------------------------------------------

    def _evaluate(self, done: int) -> None:
        self._last_eval_step = done
        if self.eval_fn is not None:
            self.engine.eval()
            try:
                with torch.no_grad():
                    metrics = self.eval_fn(self.engine)
            finally:
                self.engine.train()
            self._last_eval = {(k if "/" in k else f"val/{k}"): float(v) for k, v in metrics.items()}
            self._log(done, self._last_eval)
            if self.world.is_main:
                shown = "  ".join(f"{k} {v:.4f}" for k, v in self._last_eval.items())
                progress_write(f"{self.name} step {done}/{self.total}: {shown}")
        if self.sample_fn is not None:
            model = self._sampling_model()
            if self.world.is_main:
                with torch.compiler.set_stance("force_eager"):  # prompts of every length: no recompiles
                    text = self.sample_fn(model, done)
                self.tracker.log_text(text, f"samples/step_{done:08d}.txt")

    def _sampling_model(self) -> nn.Module | None:
        """Rank 0: a full-weight module to sample from (the live one, or a gathered copy under ZeRO-3)."""
        if self.cfg.zero_stage < 3:
            return self.engine.module if self.world.is_main else None
        state = self.engine._zero3_consolidated_16bit_state_dict()  # collective; the full state on rank 0 only
        return self._plain_model(state) if self.world.is_main else None

    def _plain_model(self, state: dict[str, Tensor]) -> nn.Module:
        with torch.random.fork_rng(devices=[]):  # building a model must not move the training RNG
            model = self.build_model().float()
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        return model.to(self.world.device)

    # ---- checkpoints, resume, logs -------------------------------------------------------------------------

    def _resume(self) -> int:
        """Load the newest checkpoint that verifies against its manifest when resuming is on (tasks/common/
        checkpoint.py: a damaged or planted one is skipped with one line); the number of steps already done."""
        if self.world.is_main and not self.cfg.resume and self.ckpt.folder.exists():
            shutil.rmtree(self.ckpt.folder)
        barrier()
        self.ckpt.prepare(self.fingerprint_info)
        barrier()
        state = self.ckpt.load(self.engine) if self.cfg.resume else None
        start = int(state["step"]) if state else 0
        if state and self.recipe_state is not None:
            self.recipe_state.load_state_dict(state["recipe"])
        if start > self.total:
            raise ScratchError(
                f"{self.ckpt.folder}: the checkpoint is at step {start}, past this budget's "
                f"{self.total} steps; delete the folder to start over"
            )
        if self.world.is_main:
            self._restore_history(start)
        self._last_ckpt_step = start if state else -1
        return start

    def _restore_history(self, start: int) -> None:
        """Keep the logged rows up to the resumed step, and replay them into this run's MLflow run."""
        rows = []
        if start and self.history_path.is_file():
            rows = [json.loads(line) for line in self.history_path.read_text().splitlines() if line.strip()]
            rows = [r for r in rows if r["step"] <= start]
        self.history_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.history_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        for r in rows:
            self.tracker.log_metrics({k: v for k, v in r.items() if "/" in k}, step=r["step"])

    def _save(self, done: int) -> None:
        state = {
            "step": done,
            "tokens": done * self.tokens_per_step,
            "seed": self.cfg.seed,
            "world_size": self.world.size,
            "total_steps": self.total,
            "fingerprint": self.ckpt.folder.name,
        }
        if self.recipe_state is not None:
            state["recipe"] = self.recipe_state.state_dict()
        self.ckpt.save(self.engine, done, state)
        self._last_ckpt_step = done

    def _log(self, done: int, metrics: dict[str, float]) -> None:
        if not self.world.is_main:
            return
        finite = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        self.tracker.log_metrics(finite, step=done)
        with open(self.history_path, "a") as f:
            f.write(json.dumps({"step": done, "tokens": done * self.tokens_per_step, **metrics}) + "\n")

    def _announce(self, start: int, peak: float) -> None:
        if not self.world.is_main:
            return
        c = self.cfg
        resumed = f"resumed from step {start} ({self.ckpt.folder / tag_of(start)})" if start else "from scratch"
        progress_write(
            f"{self.name}: {self.total} steps x {self.tokens_per_step:,} tokens = {self.total * self.tokens_per_step:,}"
            f" tokens, {resumed}\n"
            f"  batch {c.batch_size} = micro {c.micro_batch_size} x accumulation {self.accum} x ranks "
            f"{self.world.size}; ZeRO {c.zero_stage}, {self.precision}{', compiled' if c.compile else ''}, "
            f"{self.world.backend} on {self.world.device.type}; peak {format_flops(peak)}\n"
            f"  checkpoints {self.ckpt.folder}"
        )

    # ---- the trained weights -------------------------------------------------------------------------------

    def train(self, history_to: Path) -> tuple[dict[str, Any], nn.Module | None]:
        """fit(), then the trained weights: (the run's summary, a plain fp32 module on rank 0 / None elsewhere); rank 0
        also copies the logged curve to `history_to` (the stage's output folder). Collective: call it on every rank."""
        summary = self.fit()
        model = self.final_model()
        if model is not None:
            shutil.copy2(self.history_path, history_to)
        return summary, model

    def final_model(self) -> nn.Module | None:
        """Rank 0: a plain fp32 module holding the trained weights; None elsewhere. Call on every rank."""
        tag = tag_of(self.total)
        barrier()
        model = None
        if self.world.is_main:
            if self.cfg.zero_stage >= 1:
                state = self.ckpt.fp32_state_dict(tag)  # fp32 master weights, every ZeRO partition gathered
            else:
                state = {k: v.detach() for k, v in self.engine.module.state_dict().items()}
            model = self._plain_model(state).cpu().eval()
        barrier()
        return model


def check_cpu_compile_toolchain() -> None:
    """torch.compile on CPU builds C++ kernels that include Python.h: fail up front, naming what is missing, instead
    of deep inside the first training step."""
    from torch._inductor.cpp_builder import get_cpp_compiler
    from torch._inductor.exc import InvalidCxxCompiler

    try:
        get_cpp_compiler()  # inductor's own search (config.cpp.cxx: $CXX, then g++ / clang++ on PATH)
    except InvalidCxxCompiler as e:
        raise ConfigError(
            f"train.compile: torch.compile on CPU needs a C++ compiler ({e}); install g++ (e.g. "
            f"apt-get install g++) or set compile: false"
        ) from None
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not headers.is_file():
        raise ConfigError(
            f"train.compile: torch.compile on CPU needs the Python headers ({headers} not found); "
            f"install them (e.g. apt-get install python3-dev) or set compile: false"
        )
