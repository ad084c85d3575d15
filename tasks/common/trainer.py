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
        state=None,                  # optional object with state_dict() / load_state_dict(d): running state of the
                                     #    recipe (an adaptive KL coefficient) saved in every checkpoint, restored on
                                     #    resume
        fixed_shapes=False)          # True when every micro batch has the same shape (pretrain's windows): what
                                     #    `compile: auto` needs, since each new shape compiles again
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
        tracker=tracker,             # the stage's MLflow tracker (a no-op on ranks other than 0)
        fresh_init=False)            # True when build_model draws fresh random weights (pretrain): under ZeRO-3 it
                                     #    then runs inside deepspeed.zero.Init, so no rank ever holds the whole model
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
every `checkpoint_every` steps, at a new best evaluation and at the end: a DeepSpeed checkpoint (module, optimizer,
scheduler, RNG states, step, the recipe's state, the selection), its manifest, and an atomic move of `latest`.
Checkpoints fall on step boundaries, so a resumed run redoes the whole step: a rollout is a function of (weights,
seed, step) and comes back the same. Only the rank-0 process writes logs.

Selection (`Selection`). More steps on a small corpus can overfit, so the weights exported are those of the best
evaluation (`train.keep_best`; `train.best_metric`, auto = val/loss, or the checker score of an RL stage), not the
last step's: an evaluation that improves on the best saves a checkpoint (pinned against pruning), final_model
reads it back (checked against its manifest first), and the summary says which step (`exported_step`) and why
(`exported_because`); val_* are the exported weights' figures, last_val_* the last evaluation's. After
`train.early_stop_patience` evaluations in a row without a new best, training stops (a checkpoint at that step
records it, so a rerun resumes to the same end instead of training on). The best, and the evaluations since, are
in every checkpoint's trainer state: a resumed run selects and stops exactly as the uninterrupted one.

Memory (`build_for_training`): under ZeRO-3 a fresh model is built inside deepspeed.zero.Init, each layer partitioned
as soon as it exists and its init replayed one gathered tensor at a time (the same weights as an unsharded build);
on a GPU a fresh model is built on the device itself. `train.activation_checkpointing` sets the model's
`gradient_checkpointing` (every N-th block), `train.offload` moves ZeRO's optimizer partitions (and at ZeRO-3 the
parameters) to host memory, stepped by DeepSpeedCPUAdam where its C++ op builds (`offload_optimizer`).
Compile (`decide_compile`): `train.compile: auto` compiles where the toolchain exists and the run is long enough to
repay it; the stage's first lines say which and why.

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
from tasks.common.curves import write_curves
from tasks.common.distributed import (
    World,
    all_reduce_sum,
    barrier,
    broadcast_object,
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
    fixed_shapes: bool = False

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
    """AdamW groups: the model's own `optim_groups` when it has one, else decay on tensors with >= 2 dims. A model
    built inside deepspeed.zero.Init holds 1-D partitions whose data is freed: its split reads each parameter's whole
    shape (ds_shape) by the same >= 2 dims rule (Llama.optim_groups' own)."""
    params = [p for p in model.parameters() if p.requires_grad]
    sharded = any(hasattr(p, "ds_shape") for p in params)
    if hasattr(model, "optim_groups") and not sharded:
        return model.optim_groups(weight_decay)
    ndim = {id(p): len(p.ds_shape) if hasattr(p, "ds_shape") else p.ndim for p in params}
    return [
        {"params": [p for p in params if ndim[id(p)] >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if ndim[id(p)] < 2], "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """The optimizer of every training stage: torch's AdamW over the model's decay groups. DeepSpeed wraps it (ZeRO
    partitions its states over the ranks; bf16 keeps fp32 master weights in it) and steps it."""
    return torch.optim.AdamW(
        optim_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps
    )


# ------------------------------------------------------------------------------------------------ the model's memory


def build_for_training(
    build_model: Callable[[], nn.Module],
    cfg: TrainConfig,
    world: World,
    ds_config: dict[str, Any],
    bf16: bool,
    fresh_init: bool,
) -> nn.Module:
    """The module deepspeed.initialize gets, on the rank's device, built so that no rank holds more than it must.

    ZeRO-3 and fresh weights: built inside deepspeed.zero.Init (every layer partitioned as soon as it exists).
    Fresh weights on a GPU: built on the device (no host copy). Otherwise (loaded weights, CPU): built, then moved.
    A loaded model holds its whole state per rank until deepspeed.initialize partitions it.
    """
    if fresh_init and cfg.zero_stage == 3:
        model = build_zero3(build_model, ds_config)
    elif fresh_init and not world.on_cpu:
        with torch.device(world.device):
            model = build_model()
    else:
        model = build_model().to(world.device)
    if bf16:
        # DeepSpeed casts parameters only; a float32 buffer (RoPE tables) would promote activations back
        model = (
            model.to(torch.bfloat16) if cfg.zero_stage < 3 or not fresh_init else cast_buffers(model, torch.bfloat16)
        )
    set_activation_checkpointing(model, cfg.activation_checkpointing)
    return model


def build_zero3(build_model: Callable[[], nn.Module], ds_config: dict[str, Any]) -> nn.Module:
    """build_model() under deepspeed.zero.Init: each rank keeps 1/world of every parameter from the start (and, with
    offload: all, keeps it in host memory). zero.Init partitions a layer's tensors as soon as its module is built, so
    the model's own init (`reset_parameters`, run at the end of its __init__) meets empty partitions; it is replayed
    here with one parameter gathered at a time, from the RNG state it would have started from: the same weights as
    an unsharded build of the same seed."""
    with deepspeed.zero.Init(config_dict_or_path=ds_config, mem_efficient_linear=False):
        model = build_model()
    if not hasattr(model, "reset_parameters"):
        raise TypeError(f"{type(model).__name__}: a fresh ZeRO-3 build replays model.reset_parameters(); it has none")
    with parameters_gathered_one_at_a_time(model):
        model.reset_parameters()
    return move_buffers(model, torch.device(deepspeed.get_accelerator().current_device_name()))


class parameters_gathered_one_at_a_time:  # noqa: N801 (a context manager, named for what holds inside it)
    """Inside: `model.named_parameters()` (what Llama.reset_parameters walks) yields each ZeRO-3 parameter whole on
    every rank, for as long as the caller's loop body runs on it; rank 0's values are then kept and re-partitioned."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        real = self.model.named_parameters

        def gathered(*args, **kwargs):
            for name, param in real(*args, **kwargs):
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                    yield name, param

        self.model.named_parameters = gathered  # an instance attribute: shadows the method until __exit__

    def __exit__(self, *exc) -> None:
        del self.model.named_parameters


def move_buffers(model: nn.Module, device: torch.device, dtype: torch.dtype | None = None) -> nn.Module:
    """Buffers (RoPE tables) to `device` (floating ones to `dtype` too), parameters untouched (ZeRO-3 owns them)."""
    for name, buffer in list(model.named_buffers()):
        owner, _, leaf = name.rpartition(".")
        cast = dtype if dtype is not None and buffer.is_floating_point() else buffer.dtype
        setattr(model.get_submodule(owner) if owner else model, leaf, buffer.to(device=device, dtype=cast))
    return model


def cast_buffers(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    device = next(model.buffers()).device if any(True for _ in model.buffers()) else torch.device("cpu")
    return move_buffers(model, device, dtype)


def set_activation_checkpointing(model: nn.Module, every: int) -> None:
    """Recompute every `every`-th block in the backward (0 = off): the `gradient_checkpointing` flag of each module
    that has one (Llama, also inside RewardModel and PolicyWithValue)."""
    flagged = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    if every and not flagged:
        raise ConfigError(
            f"train.activation_checkpointing: {type(model).__name__} has no gradient_checkpointing flag to set"
        )
    for module in flagged:
        module.gradient_checkpointing = every


def offload_optimizer(model: nn.Module, cfg: TrainConfig) -> tuple[torch.optim.Optimizer | None, str]:
    """The optimizer of an offloaded run: DeepSpeedCPUAdam (AdamW mode, the same groups and hyperparameters), which
    steps the host-side fp32 partitions with AVX kernels, when its C++ op builds here (JIT, once per environment:
    docs/BENCHMARKS.md, "Memory"); else (None, why) and the caller keeps torch AdamW, which DeepSpeed also steps on
    the host partitions, several times slower."""
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(
            optim_groups(model, cfg.weight_decay),
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.eps,
            adamw_mode=True,
        )
    except Exception as e:  # noqa: BLE001 (a failed C++ build raises anything from RuntimeError to CalledProcessError)
        reason = str(e).strip().splitlines()[-1][:120] if str(e).strip() else type(e).__name__
        return None, f"torch AdamW: DeepSpeedCPUAdam did not build ({reason})"
    return optimizer, "DeepSpeedCPUAdam"


# ------------------------------------------------------------------------------------------------ compile: auto

# Measured (docs/BENCHMARKS.md, "Compile"): what compiling costs and gains per device type. CPU: the pretrain stage,
# `small`, 2 ranks x 1 thread, autocast. CUDA: not measured yet (bench/gpu_check.py prints both rates); these are
# deliberately cautious guesses until it has run.
COMPILE_SECONDS = {"cpu": 20.0, "cuda": 60.0}
COMPILE_SPEEDUP = {"cpu": 1.35, "cuda": 1.25}
# eager MFU assumed for the time estimate: the CPU pretrain stage's measured figure (11,710 tok/s x 24.4 MFLOP/token
# over 1.40 TFLOP/s = 0.20); for GPUs a typical eager figure of small Llamas
EAGER_MFU = {"cpu": 0.20, "cuda": 0.30}
# compile when it is estimated to save at least this many times what it costs (the estimate is rough)
COMPILE_MARGIN = 2.0


def decide_compile(
    cfg: TrainConfig, world: World, recipe: Recipe, total_steps: int, precision: str
) -> tuple[bool, str]:
    """(compile?, the line the stage prints saying which and why). compile: true/false are obeyed (true checks the
    CPU toolchain up front); auto compiles when the toolchain exists, ZeRO <= 2, every batch has one shape, and the
    eager run's estimated seconds (FLOPs / (peak x EAGER_MFU)) times (1 - 1/speedup) is at least COMPILE_MARGIN
    x the compile time. Every rank gets rank 0's answer (the peak is measured there)."""
    if cfg.compile is True:
        if world.on_cpu:
            check_cpu_compile_toolchain()
        return True, "compile: on (train.compile: true)"
    if cfg.compile is False:
        return False, "compile: off (train.compile: false)"
    decision = compile_pays(cfg, world, recipe, total_steps, precision) if world.is_main else None
    on, why = broadcast_object(decision)
    return on, f"compile: {'on' if on else 'off'} (auto: {why})"


def compile_pays(cfg: TrainConfig, world: World, recipe: Recipe, total_steps: int, precision: str) -> tuple[bool, str]:
    kind = world.device.type
    if cfg.zero_stage == 3:
        return False, "ZeRO-3 gathers parameters in hooks inside the forward"
    if not recipe.fixed_shapes:
        return False, "the batches change shape, and each new shape compiles again"
    missing = compile_toolchain_missing(kind)
    if missing:
        return False, missing
    if not recipe.flops_per_token:
        return False, "no FLOP count to estimate the run's length from"
    peak = peak_flops(world, precision != "fp32", cfg.peak_flops)
    if not math.isfinite(peak):
        return False, "unknown device peak to estimate the run's length from"
    tokens = total_steps * cfg.batch_size * recipe.tokens_per_example
    eager = tokens * recipe.flops_per_token / (peak * EAGER_MFU[kind])
    saved, cost = eager * (1 - 1 / COMPILE_SPEEDUP[kind]), COMPILE_SECONDS[kind]
    sums = f"~{eager:.0f} s eager estimated, saving ~{saved:.0f} s for ~{cost:.0f} s of compiling"
    if saved < COMPILE_MARGIN * cost:
        return False, f"a short run: {sums}; pays from ~{COMPILE_MARGIN * cost / (1 - 1 / COMPILE_SPEEDUP[kind]):.0f} s"
    return True, sums


def compile_toolchain_missing(kind: str) -> str:
    """Why torch.compile cannot run here ('' when it can): CPU needs a C++ compiler and the Python headers, CUDA
    needs Triton."""
    if kind == "cpu":
        try:
            check_cpu_compile_toolchain()
        except ConfigError as e:
            return str(e).split("(", 1)[0].replace("train.compile: ", "").strip() + " here"
        return ""
    from torch.utils._triton import has_triton

    return "" if has_triton() else "torch.compile on a GPU needs Triton, which this torch lacks"


MAXIMISED_BY_DEFAULT = ("checker", "satisfaction", "accuracy")  # best_metric auto without a loss: higher is better


@dataclass
class Selection:
    """Which evaluation's weights a run exports (train.keep_best) and when it stops early
    (train.early_stop_patience): the best value of one metric so far, at which step, and the evaluations since.
    Saved in every checkpoint's trainer state, so a resumed run selects and stops as the uninterrupted one."""

    wanted: str  # train.best_metric
    metric: str = ""  # resolved on the first evaluation: "val/loss"; "" = no such metric, nothing selected
    maximise: bool = False
    step: int = -1  # the best evaluation's step (-1: none yet)
    value: float = math.nan
    evaluation: dict[str, float] | None = None  # the whole best evaluation (the exported weights' metrics)
    since: int = 0  # evaluations since the best one

    def resolve(self, metrics: dict[str, float]) -> None:
        if self.metric:
            return
        name, self.maximise = self.wanted.removeprefix("max:"), self.wanted.startswith("max:")
        if self.wanted == "auto":
            reported = [k.split("/", 1)[-1] for k in metrics]
            name = "loss" if "loss" in reported else next((m for m in MAXIMISED_BY_DEFAULT if m in reported), "")
            self.maximise = name != "loss"
        key = name if "/" in name else f"val/{name}"
        self.metric = key if key in metrics else ""

    def update(self, step: int, metrics: dict[str, float]) -> bool:
        """Count evaluation `step`; whether it is the new best."""
        self.resolve(metrics)
        value = metrics.get(self.metric, math.nan) if self.metric else math.nan
        if not math.isfinite(value):
            return False
        better = self.step < 0 or (value > self.value if self.maximise else value < self.value)
        if better:
            self.step, self.value, self.evaluation, self.since = step, value, dict(metrics), 0
        else:
            self.since += 1
        return better

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("metric", "maximise", "step", "value", "evaluation", "since")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


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
        fresh_init: bool = False,
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

        model = build_for_training(build_model, cfg, self.world, self.ds_config, self.bf16, fresh_init)
        self.compiled, self.compile_reason = decide_compile(cfg, self.world, recipe, self.total, self.precision)
        if self.compiled:
            model.compile()  # in place: parameter names, checkpoints and exports stay those of the eager model
        optimizer, self.optimizer_name = offload_optimizer(model, cfg) if cfg.offload != "none" else (None, "")
        optimizer = optimizer or build_optimizer(model, cfg)
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
        self.end = start if self._stopped_early() else self.total  # the step training ends at
        low_precision = self.precision != "fp32"
        peak = peak_flops(self.world, low_precision, self.cfg.peak_flops) if self.world.is_main else float("nan")
        self._announce(start, peak)
        bar = progress(None, total=self.total, initial=start, desc=self.name, unit="step")
        train_seconds, window, row = 0.0, [0, 0.0], {}  # window: steps and seconds since the last log row
        for step in range(start, self.end):
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
            best = self._evaluate(done) if self._due(done, self.cfg.eval_every) else False
            if self._stopped_early():
                self.end = done
            if self._due(done, self.cfg.checkpoint_every) or best or self.end == done:
                self._save(done)
            if self.world.is_main and os.environ.get(HANG_HOOK) == str(done):
                time.sleep(3600)
            if self.end == done:
                break
        bar.close()
        if self._last_eval_step != self.end:
            self._evaluate(self.end)
        if self._last_ckpt_step != self.end:
            self._save(self.end)
        return self._summary(start, train_seconds, row, peak)

    def _stopped_early(self) -> bool:
        """Whether early stopping ends training here: `early_stop_patience` evaluations in a row without a new best
        (the stage's last step is never "early")."""
        patience, s = self.cfg.early_stop_patience, self.selection
        stop = bool(patience and s.metric and s.step >= 0 and s.since >= patience and self._last_eval_step < self.total)
        if stop and self.world.is_main and self._last_eval_step > 0:
            progress_write(
                f"{self.name} step {self._last_eval_step}/{self.total}: {s.metric} has not improved on step "
                f"{s.step}'s {s.value:.4f} for {s.since} evaluations; stopping early (train.early_stop_patience "
                f"{patience})"
            )
        return stop

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
        trained = self.end - start
        tokens_per_s = trained * self.tokens_per_step / train_seconds if train_seconds else math.nan
        exported = self._exported_step()
        evaluation = self.selection.evaluation if exported != self.end and self.selection.evaluation else None
        return {
            "steps": self.end,
            "steps_this_run": trained,
            "resumed_from_step": start,
            "planned_steps": self.total,
            "stopped_early": self.end < self.total,
            "exported_step": exported,
            "exported_because": self._export_reason(exported),
            "tokens": self.end * self.tokens_per_step,
            "tokens_per_step": self.tokens_per_step,
            "world_size": self.world.size,
            "grad_accum": self.accum,
            "micro_batch_size": self.cfg.micro_batch_size,
            "zero_stage": self.cfg.zero_stage,
            "precision": self.precision,
            "compiled": self.compiled,
            "train_loss": last_row.get("train/loss", math.nan),
            "train_seconds": round(train_seconds, 2),
            "tokens_per_s": tokens_per_s,
            "peak_flops": peak,
            "mfu": self._mfu(tokens_per_s, peak),
            **{k.replace("/", "_"): v for k, v in (evaluation or self._last_eval).items()},
            **{f"last_{k.replace('/', '_')}": v for k, v in self._last_eval.items()},
            "checkpoint": str(self.ckpt.folder / tag_of(self.end)),
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

    def _evaluate(self, done: int) -> bool:
        """Evaluate (and sample) at step `done`; whether it is the best evaluation so far and its weights are to be
        kept (train.keep_best)."""
        self._last_eval_step = done
        best = False
        if self.eval_fn is not None:
            self.engine.eval()
            try:
                with torch.no_grad():
                    metrics = self.eval_fn(self.engine)
            finally:
                self.engine.train()
            self._last_eval = {(k if "/" in k else f"val/{k}"): float(v) for k, v in metrics.items()}
            best = self.selection.update(done, self._last_eval) and self.cfg.keep_best
            if best:
                self.ckpt.pinned = tag_of(done)  # pruning keeps the best checkpoint
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
        return best

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
        self._restore_selection(state)
        if start > self.total:
            raise ScratchError(
                f"{self.ckpt.folder}: the checkpoint is at step {start}, past this budget's "
                f"{self.total} steps; delete the folder to start over"
            )
        if self.world.is_main:
            self._restore_history(start)
        self._last_ckpt_step = start if state else -1
        return start

    def _restore_selection(self, state: dict | None) -> None:
        """The best evaluation so far and the evaluations since, as the checkpoint recorded them; a best checkpoint
        that is gone (set aside as damaged, or deleted) is forgotten, saying so."""
        self.selection = Selection(self.cfg.best_metric)
        self._last_eval_step = int(state["step"]) if state and state.get("evaluated") else -1
        if not state or not state.get("selection"):
            return
        self.selection.load_state_dict(state["selection"])
        best = self.selection.step
        if best >= 0 and self.cfg.keep_best and not (self.ckpt.folder / tag_of(best) / "trainer_state.json").is_file():
            if self.world.is_main:
                progress_write(
                    f"{self.ckpt.folder / tag_of(best)}: the best evaluation's checkpoint is gone; the best "
                    f"weights are chosen among the evaluations from step {state['step']} on"
                )
            self.selection = Selection(self.cfg.best_metric)
        elif best >= 0 and self.cfg.keep_best:
            self.ckpt.pinned = tag_of(best)

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
        state["selection"] = self.selection.state_dict()
        state["evaluated"] = self._last_eval_step == done  # a resumed run does not evaluate this step again
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
            f"{self.world.size}; ZeRO {c.zero_stage}, {self.precision}{', compiled' if self.compiled else ''}, "
            f"{self.world.backend} on {self.world.device.type}; peak {format_flops(peak)}\n"
            f"  {self.compile_reason}{self._memory_plan()}\n"
            f"  checkpoints {self.ckpt.folder}"
        )

    def _memory_plan(self) -> str:
        c, parts = self.cfg, []
        if c.activation_checkpointing:
            every = (
                "every block"
                if c.activation_checkpointing == 1
                else f"every N-th block, N = {c.activation_checkpointing}"
            )
            parts.append(f"activation checkpointing {every}")
        if c.offload != "none":
            parts.append(f"offload {c.offload} to host memory ({self.optimizer_name})")
        return "; " + "; ".join(parts) if parts else ""

    # ---- the trained weights -------------------------------------------------------------------------------

    def train(self, history_to: Path) -> tuple[dict[str, Any], nn.Module | None]:
        """fit(), then the trained weights: (the run's summary, a plain fp32 module on rank 0 / None elsewhere); rank 0
        also copies the logged curve to `history_to` (the stage's output folder). Collective: call it on every rank."""
        summary = self.fit()
        model = self.final_model()
        if model is not None:
            shutil.copy2(self.history_path, history_to)
            write_curves(history_to)  # beside it: curves.json, what dvc.yaml's plots draw
        return summary, model

    def final_model(self) -> nn.Module | None:
        """Rank 0: a plain fp32 module holding the exported weights (the best evaluation's with train.keep_best, else
        the last step's); None elsewhere. Call on every rank."""
        barrier()
        model = None
        if self.world.is_main:
            step = self._exported_step()
            problem = self.ckpt.verify(tag_of(step)) if step != self.end else None
            if problem:
                progress_write(
                    f"{self.ckpt.folder / tag_of(step)}: {problem}; exporting the last step's weights instead of "
                    f"this best checkpoint's"
                )
                step = self.selection.step = self.end
            if step != self.end:
                progress_write(f"{self.name}: exporting step {step}'s weights: {self._export_reason(step)}")
            if self.cfg.zero_stage >= 1:
                state = self.ckpt.fp32_state_dict(tag_of(step))  # fp32 master weights, every ZeRO partition gathered
            elif step != self.end:
                state = self.ckpt.module_state_dict(tag_of(step))
            else:
                state = {k: v.detach() for k, v in self.engine.module.state_dict().items()}
            model = self._plain_model(state).cpu().eval()
        barrier()
        return model

    def _exported_step(self) -> int:
        s = self.selection
        return s.step if self.cfg.keep_best and s.step >= 0 else self.end

    def _export_reason(self, step: int) -> str:
        s = self.selection
        if not self.cfg.keep_best:
            return "the last step (train.keep_best is off)"
        if s.step < 0:
            return "the last step (no evaluation to choose by)"
        if step == self.end:
            return f"the last step, also the best evaluation ({s.metric} {s.value:.4f})"
        last = self._last_eval.get(s.metric, math.nan)
        return (
            f"the best evaluation ({s.metric} {s.value:.4f}, against {last:.4f} at the last step {self.end}; "
            f"train.keep_best)"
        )


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
