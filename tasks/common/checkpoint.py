"""Resumable training checkpoints, kept outside DVC's outputs so that a rerun can resume from them.

DVC deletes a stage's outs before running it again, so DeepSpeed checkpoints live in

    checkpoints/<stage>/<fingerprint>/        (gitignored, not declared in dvc.yaml)
        fingerprint.json                      what the fingerprint hashes: the stage's params, model config, data
        latest                                the newest complete checkpoint's tag (replaced atomically)
        step_00000200/                        DeepSpeed's files (module, optimizer, LR scheduler; ZeRO shards)
            trainer_state.json                step, tokens seen, data cursor, the fingerprint
            rng_rank00000.pt                  each rank's torch / CUDA / numpy / python RNG states
        history.jsonl                         every logged metric row, for a complete curve across restarts

The fingerprint hashes the configuration that determines the weights, so a resume never picks up a checkpoint of
another configuration; `latest` is written only after every rank finished writing, so a run killed mid-save
resumes from the previous checkpoint. Only the newest `keep` checkpoints stay on disk.

    ckpt = Checkpoints(checkpoint_dir("pretrain", fp, root), keep=2)
    ckpt.save(engine, step, state)            # collective; rank 0 moves `latest` and prunes old ones
    state = ckpt.load(engine)                 # collective; None when there is nothing to resume
    fp32 = ckpt.fp32_state_dict(tag)          # rank 0: consolidated fp32 weights of a ZeRO checkpoint
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

from tasks.common.config import ROOT, ScratchError
from tasks.common.distributed import barrier
from tasks.common.dvcio import write_json

if TYPE_CHECKING:
    import torch

LATEST = "latest"  # DeepSpeed's own pointer name, so its tools (zero_to_fp32.py) find the newest tag too
TAG = re.compile(r"^step_(\d{8})$")


def fingerprint(parts: dict[str, Any]) -> str:
    """A short, stable hash of JSON-able configuration (key order does not matter)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def checkpoint_dir(stage: str, fp: str, root: Path = ROOT) -> Path:
    return root / "checkpoints" / stage / fp


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int:
    match = TAG.match(tag)
    if not match:
        raise ValueError(f"not a checkpoint tag: {tag!r}")
    return int(match.group(1))


class Checkpoints:
    """The checkpoints of one training configuration (one fingerprint folder)."""

    def __init__(self, folder: Path, keep: int = 2, rank: int = 0) -> None:
        self.folder, self.keep, self.rank = Path(folder), keep, rank

    # ---- reading -------------------------------------------------------------------------------------------

    def latest_tag(self) -> str | None:
        """The tag `latest` points to, when that checkpoint is complete."""
        pointer = self.folder / LATEST
        if not pointer.is_file():
            return None
        tag = pointer.read_text().strip()
        if not TAG.match(tag) or not (self.folder / tag / "trainer_state.json").is_file():
            raise ScratchError(f"{pointer}: points to {tag!r}, which is not a complete checkpoint; delete "
                               f"{self.folder} to start over")
        return tag

    def tags(self) -> list[str]:
        """Every checkpoint folder present, oldest first (complete or not)."""
        if not self.folder.is_dir():
            return []
        return sorted(p.name for p in self.folder.iterdir() if p.is_dir() and TAG.match(p.name))

    def load(self, engine: Any) -> dict | None:
        """Restore module, optimizer, scheduler and this rank's RNG from `latest`; its trainer state, or None."""
        tag = self.latest_tag()
        if tag is None:
            return None
        path, _ = engine.load_checkpoint(str(self.folder), tag=tag, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
        if path is None:
            raise ScratchError(f"{self.folder / tag}: DeepSpeed could not load this checkpoint (written by another "
                               f"rank count or ZeRO stage?); delete the folder to start over")
        set_rng_state(self.folder / tag / f"rng_rank{self.rank:05d}.pt")
        return json.loads((self.folder / tag / "trainer_state.json").read_text())

    # ---- writing -------------------------------------------------------------------------------------------

    def prepare(self, description: dict[str, Any]) -> None:
        """Rank 0: create the folder, record what it holds, and drop incomplete checkpoints newer than `latest`."""
        if self.rank != 0:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json(self.folder / "fingerprint.json", description)
        latest = self.latest_tag()
        newest_good = step_of(latest) if latest else -1
        for tag in self.tags():
            if step_of(tag) > newest_good:  # a save that was killed before `latest` moved
                shutil.rmtree(self.folder / tag, ignore_errors=True)

    def save(self, engine: Any, step: int, state: dict[str, Any]) -> Path:
        """Write checkpoint `step` on every rank, then (rank 0) point `latest` at it and prune old ones."""
        import torch
        tag = tag_of(step)
        engine.save_checkpoint(str(self.folder), tag=tag, client_state={"trainer": state}, save_latest=False)
        torch.save(rng_state(), self.folder / tag / f"rng_rank{self.rank:05d}.pt")
        if self.rank == 0:
            write_json(self.folder / tag / "trainer_state.json", state)
        barrier()  # every rank's shards are on disk before `latest` moves
        if self.rank == 0:
            tmp = self.folder / f".{LATEST}.tmp"
            tmp.write_text(tag)
            os.replace(tmp, self.folder / LATEST)
            self.prune()
        barrier()
        return self.folder / tag

    def prune(self) -> None:
        latest = self.latest_tag()
        complete = [t for t in self.tags() if latest and step_of(t) <= step_of(latest)]
        for tag in complete[:-self.keep] if self.keep > 0 else []:
            if tag != latest:
                shutil.rmtree(self.folder / tag, ignore_errors=True)

    # ---- consolidation -------------------------------------------------------------------------------------

    def fp32_state_dict(self, tag: str) -> dict[str, "torch.Tensor"]:
        """Consolidated fp32 weights of a ZeRO (stage >= 1) checkpoint: every rank's partition, gathered."""
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        return get_fp32_state_dict_from_zero_checkpoint(str(self.folder), tag=tag)


# ------------------------------------------------------------------------------------------------ RNG states

def rng_state() -> dict[str, Any]:
    """Every RNG a loss or batch function might draw from, as tensors (loadable with weights_only=True)."""
    import numpy as np
    import torch
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]), "numpy_has_gauss": int(np_state[3]), "numpy_gauss": float(np_state[4]),
        "python_version": py_version, "python_state": torch.tensor(py_state, dtype=torch.int64),
        "python_gauss": py_gauss,
    }


def set_rng_state(path: Path) -> None:
    import numpy as np
    import torch
    if not path.is_file():
        raise ScratchError(f"{path}: missing RNG state of this rank (the checkpoint was written by fewer ranks?)")
    s = torch.load(path, weights_only=True)
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    np.random.set_state(("MT19937", s["numpy_keys"].numpy().astype(np.uint32), s["numpy_pos"],
                         s["numpy_has_gauss"], s["numpy_gauss"]))
    random.setstate((s["python_version"], tuple(s["python_state"].tolist()), s["python_gauss"]))
