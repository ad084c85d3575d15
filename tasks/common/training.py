"""The skeleton every training stage (pretrain, sft, reward, dpo) is built on, so that a stage module holds only its
own logic: its Config, its batches, its loss, its evaluation statistic.

    if __name__ == "__main__":
        training_main("sft", SftConfig, run, preflight, summary)

`python -m tasks.<stage>` is the launcher: it loads and checks the params, calls `preflight(cfg, paths, **sections)`
(inputs present, context long enough, batch arithmetic; it prints the plan and raises ScratchError on a problem),
then execs DeepSpeed, which starts `python -m tasks.<stage> --worker` once per rank: `stage_main` → `run`.

Inside `run`, the pieces every stage uses:
    check_models(paths, "sft", "reward")        # the upstream model folders, or one clear error naming the stage
    print_plan(stage, cfg.train, paths, tokens_per_example, what)    # "sft: 60 steps x 16 conversations ..."
    upstream_fingerprint({"sft": folder})        # sha256 of upstream weights/tokenizer, part of `info`
    sharded_means(engine, n, micro, names, batch_sums)   # an evaluation statistic over items split across ranks
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.common.config import ROOT, ScratchError, load_section
from tasks.common.distributed import WORKER_FLAG, all_reduce_sum, launch_command, planned_world_size
from tasks.common.dvcio import STAGING_ENV, StagePaths, file_sha256, stage_paths, staging_id
from tasks.common.stage import RunFn, SummaryFn, sections_for, stage_main, user_errors
from tasks.common.tracking import check_server
from tasks.common.train_config import TrainConfig

if TYPE_CHECKING:
    from torch import Tensor

PreflightFn = Callable[..., None]


def training_main(
    stage: str,
    config_cls: type,
    run: RunFn,
    preflight: PreflightFn,
    summary: SummaryFn | None = None,
    headline: tuple[str, ...] = (),
) -> None:
    """`python -m tasks.<stage>`: the launcher; with --worker (set by the launcher), one rank's run."""
    if WORKER_FLAG in sys.argv[1:]:
        stage_main(stage, config_cls, run, summary, headline)
    else:
        launch(stage, config_cls, preflight)


def launch(stage: str, config_cls: type, preflight: PreflightFn, root: Path = ROOT) -> None:
    """Check the params and inputs once (`preflight`), then exec the DeepSpeed launcher on `tasks.<stage> --worker`.

    Errors a user can fix print one `error: <stage>: ...` line and exit 2, before any rank starts. The ranks get
    this process's staging id (tasks/common/dvcio.py: Staging): exec keeps the pid, so the folder is the run's.
    """
    with user_errors(stage):
        cfg = load_section(stage, config_cls)
        preflight(cfg, stage_paths(stage, root), **sections_for(preflight))
        check_server()  # a tracking server that is down fails here, in seconds, not in rank 0 after the launch
        train: TrainConfig = cfg.train
        os.environ[STAGING_ENV] = staging_id()  # one staging folder for every rank (and host), owned by this process
        cmd, env = launch_command(f"tasks.{stage}", train, root)
    where = f"hostfile {train.hostfile}" if train.hostfile else f"{train.ranks} rank(s) on this host"
    device = "CPU (gloo)" if env.get("DS_ACCELERATOR") == "cpu" else "GPU (nccl)"
    print(f"{stage}: launching DeepSpeed, {where}, {device}\n  $ {' '.join(cmd[2:])}", flush=True)
    os.execvpe(cmd[0], cmd, env)


# ------------------------------------------------------------------------------------------------ preflight


def check_models(paths: StagePaths, *stages: str) -> dict[str, Path]:
    """stage → its saved model folder data/<stage>/model, or a ScratchError naming the stage to run first."""
    folders = {stage: paths.of(stage) / "model" for stage in stages}
    for stage, folder in folders.items():
        if not (folder / "config.json").is_file():
            raise ScratchError(f"{folder}: no {stage} model; run the {stage} stage first (dvc repro {stage})")
    return folders


def print_plan(stage: str, train: TrainConfig, paths: StagePaths, tokens_per_example: int, what: str) -> None:
    """The launcher's one-screen plan: steps, what a step holds, and the batch arithmetic (checked here)."""
    world = planned_world_size(train, paths.root)
    accum = train.grad_accum(world)
    steps = train.total_steps(tokens_per_example)
    print(
        f"{stage}: {steps:,} steps x {what}\n  batch {train.batch_size} = micro {train.micro_batch_size} x "
        f"accumulation {accum} x ranks {world}",
        flush=True,
    )


# ------------------------------------------------------------------------------------------------ fingerprints


def upstream_fingerprint(folders: dict[str, Path]) -> dict[str, str]:
    """sha256 of each upstream weights file / tokenizer, so checkpoints of other inputs are never resumed."""
    out = {}
    for name, folder in folders.items():
        for fname in ("model.safetensors", "reward_head.safetensors", "tokenizer.json"):
            if (Path(folder) / fname).is_file():
                out[f"{name}/{fname}"] = file_sha256(Path(folder) / fname)
    return out


# ------------------------------------------------------------------------------------------------ evaluation


def rank_share(n_items: int, micro_batch_size: int) -> list[list[int] | None]:
    """This rank's evaluation micro batches: item indices, or None for a padding pass. Every rank gets the same
    number of passes (ZeRO-3 gathers parameters collectively in each forward)."""
    import torch.distributed as dist

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    batches = [list(range(i, min(i + micro_batch_size, n_items))) for i in range(0, n_items, micro_batch_size)]
    mine = batches[rank::world]
    per_rank = max(1, math.ceil(len(batches) / world))
    return mine + [None] * (per_rank - len(mine))


BatchSums = Callable[[list[int]], "Tensor"]


def sharded_means(
    engine, n_items: int, micro_batch_size: int, names: Sequence[str], batch_sums: BatchSums
) -> dict[str, float]:
    """An evaluation statistic over `n_items` items split across the ranks.

    `batch_sums(indices)` returns a (1 + len(names),) tensor for those items: [weight, *sums] (the weight is what
    the sums are averaged over: items, tokens). Each rank runs its share in micro batches, plus padding passes on
    item 0 whose sums are dropped, so every rank runs the same number of forwards; one all-reduce adds the totals.
    Returns {name: total sum / total weight}.
    """
    import torch

    device = next(engine.module.parameters()).device
    totals = torch.zeros(1 + len(names), dtype=torch.float64, device=device)  # [weight, *sums]
    for share in rank_share(n_items, micro_batch_size):
        sums = batch_sums(share or [0]).to(device=device, dtype=torch.float64)
        if share is not None:
            totals += sums
    all_reduce_sum(totals)
    weight = totals[0].clamp(min=1e-12)
    return {name: (totals[1 + i] / weight).item() for i, name in enumerate(names)}
