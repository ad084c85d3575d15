"""The configs every training stage shares, and the learning-rate schedule: torch-free, so loading params is light.

params.yaml holds each of these once, as a top-level section that the stages inherit:

    train:          # TrainConfig: the loop of every training stage (ranks, ZeRO, precision, batch, AdamW, budget)
    sampling:       # SamplingConfig: how the alignment stages and evaluate sample answers to held-out prompts
    sft:
      train: {max_steps: 60, lr: 5.0e-4}     # the stage's overrides of `train`; every other key is inherited

`AlignmentData` is the data half of the sft, reward, dpo and ppo sections (their Config classes derive from it).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

from tasks.common.config import ConfigError, check


@dataclass(frozen=True)
class TrainConfig:
    ranks: int = 1
    """DeepSpeed ranks on this host (`deepspeed --num_gpus`): GPUs, or CPU processes sharing the cores."""
    hostfile: str = ""
    """DeepSpeed hostfile for several nodes (`host slots=N` per line, relative to the repo); the world is then
    every slot it lists and `ranks` is ignored. Empty = this host only."""
    zero_stage: Literal[0, 1, 2, 3] = 0
    """ZeRO stage: 0 = plain data parallel, 1 = shard optimizer states, 2 = + gradients, 3 = + parameters."""
    precision: Literal["auto", "fp32", "bf16", "autocast"] = "auto"
    """fp32; bf16 (DeepSpeed bf16: bf16 weights and activations, fp32 master weights); autocast (fp32 weights, bf16
    matmuls under torch.autocast). auto = bf16 on a GPU that supports it, autocast on a CPU with native bf16
    (AVX512-BF16/AMX), else fp32."""
    batch_size: int = 16
    """Examples (sequences) per optimizer step, over all ranks: micro_batch_size x accumulation x ranks."""
    micro_batch_size: int = 16
    """Examples per forward/backward pass on one rank; gradient accumulation = batch_size / (this x ranks)."""
    max_steps: int = 60
    """Training budget in optimizer steps (set this or max_tokens, the other 0)."""
    max_tokens: int = 0
    """Training budget in tokens: steps = ceil(max_tokens / (batch_size x tokens per example))."""
    lr: float = 5.0e-4
    """Peak learning rate of torch.optim.AdamW, reached after the warmup."""
    min_lr_ratio: float = 0.1
    """The cosine decay ends at lr x min_lr_ratio on the last step."""
    warmup_steps: int = 5
    """Steps of linear warmup from lr/warmup_steps to lr."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay on matrices and embeddings (not on norm weights)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1.0e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping)."""
    seed: int = 1337
    """Seed of the initial weights and of the data order (batches are a function of seed, step and rank)."""
    log_every: int = 10
    """Steps between train/* metrics (MLflow, history.jsonl, progress bar)."""
    eval_every: int = 0
    """Steps between evaluations and samples (0 = only at the end)."""
    checkpoint_every: int = 0
    """Steps between resumable DeepSpeed checkpoints (0 = only at the end)."""
    keep_checkpoints: int = 1
    """Newest checkpoints kept on disk (older ones are deleted once a newer one is complete)."""
    peak_flops: float = 0.0
    """Peak FLOP/s per GPU or per CPU host, for MFU; 0 = the GPU table, or a one-off matmul benchmark on CPU."""
    resume: bool = True
    """Resume from the newest checkpoint of the same configuration (fingerprint) when there is one."""
    keep_best: bool = True
    """Export the weights of the best evaluation (`best_metric`) instead of the last step's, and say which step and
    why. An evaluation that improves on the best saves a checkpoint (if one is not due anyway), which pruning keeps
    while it is the best. Nothing changes where the stage evaluates only at the end (eval_every 0)."""
    best_metric: str = "auto"
    """The evaluation metric that picks the best weights and counts for early stopping: a name the stage's
    evaluation reports (its val/<name>), lower is better; `max:<name>` where higher is better (e.g. max:checker).
    auto = loss when the evaluation reports one, else the first of checker, satisfaction, accuracy (maximised)."""
    early_stop_patience: int = 3
    """Stop training after this many evaluations in a row without improving on the best one (0 = never): more
    steps after validation stops improving only overfit. Counts only where the stage evaluates (eval_every > 0)."""
    compile: bool | Literal["auto"] = "auto"
    """torch.compile the model (in place) for training and evaluation; samples stay eager. Fuses the elementwise work
    and the casts around the matmuls: on the `small` preset, 2 CPU cores, 1.71x tokens/s under bf16 autocast and
    1.11x in fp32, after ~10-60 s of compiling (docs/BENCHMARKS.md); each new batch shape (evaluation,
    variable-length alignment batches) compiles once more. ZeRO 0-2; on CPU it needs a C++ compiler.
    auto = on where it pays (tasks/common/trainer.py `decide_compile`, the stage's first lines say which and why):
    a C++ compiler and Python headers (CPU) or Triton (GPU) are there, ZeRO 0-2, every batch has one shape (pretrain;
    not the alignment stages), and the eager run is estimated long enough for compiling to save twice what it costs
    (on CPU from ~150 s of eager training; docs/BENCHMARKS.md, "Compile")."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the ranks train: cuda (NCCL, one GPU per rank), cpu (gloo, the host's cores split between the ranks) or
    auto = cuda when torch sees a CUDA device, else cpu. The environment variable SCRATCHLM_DEVICE overrides it."""
    activation_checkpointing: int = 0
    """Recompute blocks in the backward instead of keeping their activations: 0 = off, 1 = every block, N = every
    N-th block (blocks 0, N, 2N, ...; a middle ground between memory and the ~1/3 extra forward compute)."""
    offload: Literal["none", "optimizer", "all"] = "none"
    """ZeRO-Offload to host memory: optimizer = the fp32 optimizer states and their step (ZeRO 1-3; DeepSpeedCPUAdam
    when its C++ op builds, else torch AdamW), all = also the parameters (ZeRO-3). For GPU runs whose states do
    not fit; on CPU ranks everything is in host memory already and it only adds copies."""

    # knobs that do not change the trained weights: left out of the checkpoint fingerprint, so changing them
    # resumes instead of starting over
    NOT_FINGERPRINTED: ClassVar[tuple[str, ...]] = (
        "log_every",
        "eval_every",
        "checkpoint_every",
        "keep_checkpoints",
        "peak_flops",
        "resume",
        "compile",
        # which weights are exported and when an overfitting run stops, not what a step computes
        "keep_best",
        "best_metric",
        "early_stop_patience",
        # same arithmetic, another place or schedule: a run may resume on another device, with or without offload
        # (the optimizer states keep their names) or activation checkpointing
        "device",
        "activation_checkpointing",
        "offload",
    )

    def __post_init__(self) -> None:
        check(self.ranks >= 1, "ranks", "must be >= 1")
        check(self.batch_size >= 1 and self.micro_batch_size >= 1, "batch_size", "batch sizes must be >= 1")
        check(self.max_steps >= 0 and self.max_tokens >= 0, "max_steps", "budgets must be >= 0")
        check(
            (self.max_steps > 0) != (self.max_tokens > 0),
            "max_steps",
            f"set exactly one training budget: max_steps ({self.max_steps}) or max_tokens ({self.max_tokens}), "
            f"the other 0",
        )
        check(self.lr > 0, "lr", "must be > 0")
        check(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", "must be in [0, 1]")
        check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        check(0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0, "beta1", "betas must be in [0, 1)")
        check(
            self.eps > 0 and self.weight_decay >= 0 and self.grad_clip >= 0,
            "eps",
            "eps must be > 0, weight_decay and grad_clip >= 0",
        )
        check(self.log_every >= 1, "log_every", "must be >= 1")
        check(self.eval_every >= 0 and self.checkpoint_every >= 0, "eval_every", "cadences must be >= 0")
        check(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1 (resume needs the newest)")
        check(self.peak_flops >= 0, "peak_flops", "must be >= 0")
        check(self.early_stop_patience >= 0, "early_stop_patience", "must be >= 0 (0 = never stop early)")
        check(
            bool(self.best_metric.removeprefix("max:")) and " " not in self.best_metric,
            "best_metric",
            f"must be auto, a metric name (e.g. loss) or max:<name>, got {self.best_metric!r}",
        )
        check(
            not (self.compile is True and self.zero_stage == 3),
            "compile",
            "is built and tested for ZeRO stages 0-2 only (ZeRO-3 gathers each layer's parameters in hooks "
            "inside the forward; DeepSpeed's deepcompile is the route there); set compile: false or zero_stage <= 2",
        )
        check(
            self.activation_checkpointing >= 0,
            "activation_checkpointing",
            "must be >= 0 (0 = off, N = every N-th block)",
        )
        check(
            self.offload == "none" or self.zero_stage >= 1,
            "offload",
            f"{self.offload!r} offloads ZeRO's partitioned optimizer states: set zero_stage >= 1 (or offload: none)",
        )
        check(
            self.offload != "all" or self.zero_stage == 3,
            "offload",
            "'all' also offloads the parameters, which only ZeRO-3 partitions: set zero_stage: 3 or offload: optimizer",
        )

    def grad_accum(self, world_size: int) -> int:
        """Micro batches per step on each rank; a clear error when the batch does not split evenly."""
        per_pass = self.micro_batch_size * world_size
        if self.batch_size % per_pass:
            lower, upper = (self.batch_size // per_pass) * per_pass, (self.batch_size // per_pass + 1) * per_pass
            raise ConfigError(
                f"train.batch_size: {self.batch_size} examples per step is not micro_batch_size "
                f"({self.micro_batch_size}) x accumulation x ranks ({world_size}); use a multiple of "
                f"{per_pass} (e.g. {lower or upper} or {upper}) or change micro_batch_size / ranks"
            )
        return self.batch_size // per_pass

    def total_steps(self, tokens_per_example: int) -> int:
        """Optimizer steps of the budget (max_steps, or max_tokens rounded up to whole steps)."""
        steps = self.max_steps or math.ceil(self.max_tokens / (self.batch_size * tokens_per_example))
        if self.warmup_steps >= steps:
            raise ConfigError(
                f"train.warmup_steps: {self.warmup_steps} warmup steps leave nothing of a "
                f"{steps}-step budget; lower it or raise max_steps / max_tokens"
            )
        return steps

    def lr_factor(self, step: int, total: int) -> float:
        """The schedule: LR multiplier of optimizer step `step` (0-based) of `total`: linear warmup, then cosine
        from 1 down to min_lr_ratio, reached exactly on the last step (total - 1)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        done = min(1.0, (step - self.warmup_steps) / max(1, total - 1 - self.warmup_steps))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * done))

    def fingerprint_dict(self) -> dict[str, Any]:
        """The fields that determine the trained weights."""
        return {k: v for k, v in asdict(self).items() if k not in self.NOT_FINGERPRINTED}


@dataclass(frozen=True)
class BatchIndex:
    """Which micro batch to produce: step `step`, accumulation index `micro` on rank `rank`."""

    step: int
    micro: int
    rank: int
    world: int
    accum: int
    micro_batch_size: int
    update: int = 0
    """Which of the step's optimizer updates this micro batch feeds (Recipe.updates_per_step > 1: PPO's minibatch
    epochs over one rollout batch); 0 otherwise."""

    @property
    def slot(self) -> int:
        """Position of this micro batch among the step's accum x world micro batches."""
        return self.micro * self.world + self.rank

    @property
    def examples(self) -> range:
        """Indices of this micro batch's examples within the step's global batch of batch_size examples."""
        return range(self.slot * self.micro_batch_size, (self.slot + 1) * self.micro_batch_size)


@dataclass(frozen=True)
class SamplingConfig:
    prompts: int = 64
    """How many held-out builtin "test" prompts are answered and checked against their constraints (0 = skip)."""
    prompt_seed: int = 4242
    """Seed of the builtin generator for those held-out prompts (the same prompts for base, SFT and DPO)."""
    seed: int = 0
    """Sampling seed: batch k samples with seed + k, so every model answers with the same random stream."""
    max_new_tokens: int = 200
    """Longest answer sampled (also capped by the model's context)."""
    temperature: float = 0.7
    """Sampling temperature (0 = greedy)."""
    top_p: float = 0.95
    """Nucleus sampling mass (1.0 = off)."""
    batch_size: int = 32
    """Prompts decoded together (left-padded, KV cache)."""

    def __post_init__(self) -> None:
        check(self.prompts >= 0, "prompts", "must be >= 0")
        check(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        check(self.temperature >= 0, "temperature", "must be >= 0")
        check(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")


@dataclass(frozen=True)
class AlignmentData:
    """The data half of an alignment stage's section (sft, reward, dpo): where its examples come from."""

    sources: list[str]
    """The stage's data, in order: its builtin set (builtin:instructions or builtin:preferences) and/or
    .json/.jsonl/.jsonl.gz files (relative paths are relative to the repository): chat, Alpaca, Self-Instruct or
    GSM8K rows for sft; prompt/chosen/rejected rows or HH-RLHF transcripts for reward and dpo; builtin:prompts and
    GSM8K question/answer, prompt/answer or chat rows ending with a user turn for ppo."""
    builtin_train: int
    """Examples drawn from the builtin generator's "train" split."""
    builtin_val: int
    """Examples drawn from the builtin generator's "val" split (the held-out evaluation during training)."""
    data_seed: int = 1337
    """Seed of the builtin generator."""
    val_fraction: float = 0.1
    """Share of file rows held out for validation, chosen by a hash of the row's location (0 = none)."""
    max_len: int = 0
    """Longest row in tokens (a conversation is cut at the end; a pair's prompt keeps its end, then replies are
    cut); 0 = the model's max_seq_len."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The stage's overrides of the top-level `train` section (the shared training loop)."""

    def __post_init__(self) -> None:
        check(len(self.sources) > 0, "sources", "list at least one source (e.g. builtin:instructions)")
        check(self.builtin_train >= 0 and self.builtin_val >= 0, "builtin_train", "counts must be >= 0")
        check(0.0 <= self.val_fraction < 1.0, "val_fraction", "must be in [0, 1)")
        check(self.max_len >= 0, "max_len", "must be >= 0 (0 = the model's max_seq_len)")

    def max_len_for(self, stage: str, model_max: int) -> int:
        """The row length this stage trains on: max_len, or the model's context when 0."""
        if self.max_len > model_max:
            raise ConfigError(f"{stage}.max_len: {self.max_len} is longer than the model's max_seq_len ({model_max})")
        return self.max_len or model_max
