"""Resumable training checkpoints, kept outside DVC's outputs so that a rerun can resume from them.

DVC deletes a stage's outs before running it again, so DeepSpeed checkpoints live in

    checkpoints/<stage>/<fingerprint>/        (gitignored, not declared in dvc.yaml)
        fingerprint.json                      what the fingerprint hashes: the stage's params, model config, data
        latest                                the newest complete checkpoint's tag (replaced atomically)
        step_00000200/                        DeepSpeed's files (module, optimizer, LR scheduler; ZeRO shards)
            trainer_state.json                step, tokens seen, data cursor, the fingerprint
            rng_rank00000.pt                  each rank's torch / CUDA / numpy / python RNG states
            manifest.json                     every file above: name, size, sha256 (written last, atomically)
        rejected/step_00000300/               a checkpoint that failed verification, set aside (delete at will)
        history.jsonl                         every logged metric row, for a complete curve across restarts

The fingerprint hashes the configuration that determines the weights, so a resume never picks up a checkpoint of
another configuration. A save ends, once every rank's files are on disk, with rank 0 writing the manifest and then
moving `latest`, so a run killed mid-save resumes from the previous checkpoint. Only the newest `keep` checkpoints
stay on disk, and never fewer than the one `latest` points to; the `pinned` one (the trainer pins the best
evaluation's checkpoint, train.keep_best) stays too.

Resuming is safe against damaged and planted files. Rank 0 verifies the newest checkpoint against its manifest
(sizes, then sha256) before DeepSpeed opens any file of it, and falls back to the next older one that verifies,
saying in one line which one it skipped and why; a checkpoint without a manifest (written by an older scratchlm) is
skipped too, since nothing says what it should hold. DeepSpeed then loads with torch.load(weights_only=True)
(its own engine hard-codes weights_only=False): a file that passes a forged manifest still cannot run code.
The manifest covers what rank 0 sees, i.e. every rank's files when the folder is shared (a single host, or the
shared file system multi-node DeepSpeed checkpoints need anyway).

    ckpt = Checkpoints(checkpoint_dir("pretrain", fp, root), keep=2)
    ckpt.save(engine, step, state)            # collective; rank 0 writes the manifest, moves `latest`, prunes
    state = ckpt.load(engine)                 # collective; None when no checkpoint verifies
    fp32 = ckpt.fp32_state_dict(tag)          # rank 0: consolidated fp32 weights of a ZeRO checkpoint
    state = ckpt.module_state_dict(tag)       # rank 0: the module's weights of a ZeRO-0 checkpoint
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import random
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.common.config import ROOT, ScratchError
from tasks.common.console import progress_write
from tasks.common.distributed import barrier, broadcast_object
from tasks.common.dvcio import file_sha256, write_json

if TYPE_CHECKING:
    import torch

LATEST = "latest"  # DeepSpeed's own pointer name, so its tools (zero_to_fp32.py) find the newest tag too
MANIFEST = "manifest.json"
REJECTED = "rejected"
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

    def __init__(self, folder: Path, keep: int = 2, rank: int = 0, say: Callable[[str], None] = progress_write) -> None:
        self.folder, self.keep, self.rank, self.say = Path(folder), keep, rank, say
        self.pinned: str | None = None  # a tag pruning keeps whatever its age (the best evaluation's)

    # ---- reading -------------------------------------------------------------------------------------------

    def latest_tag(self) -> str | None:
        """The tag `latest` points to, when that checkpoint is complete."""
        pointer = self.folder / LATEST
        if not pointer.is_file():
            return None
        tag = pointer.read_text().strip()
        if not TAG.match(tag) or not (self.folder / tag / "trainer_state.json").is_file():
            raise ScratchError(
                f"{pointer}: points to {tag!r}, which is not a complete checkpoint; delete {self.folder} to start over"
            )
        return tag

    def tags(self) -> list[str]:
        """Every checkpoint folder present, oldest first (complete or not)."""
        if not self.folder.is_dir():
            return []
        return sorted(p.name for p in self.folder.iterdir() if p.is_dir() and TAG.match(p.name))

    def verify(self, tag: str) -> str | None:
        """Why checkpoint `tag` does not match its manifest (sizes first, then sha256), or None when it does."""
        where = self.folder / tag
        try:
            manifest = json.loads((where / MANIFEST).read_text())
            wanted = {name: (int(f["bytes"]), str(f["sha256"])) for name, f in manifest["files"].items()}
        except FileNotFoundError:
            return (
                f"has no {MANIFEST} (written by an older scratchlm, or by a save that was cut short), so "
                f"nothing says what it should hold"
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            return f"{MANIFEST} is unreadable ({type(e).__name__}: {e})"
        present = set(checkpoint_files(where))
        for name, (size, _) in sorted(wanted.items()):
            if ".." in Path(name).parts or Path(name).is_absolute():
                return f"{MANIFEST} names a file outside the checkpoint ({name!r})"
            if name not in present:
                return f"{name} is missing (the manifest says {size:,} bytes)"
            actual = (where / name).stat().st_size
            if actual != size:
                return f"{name} is {actual:,} bytes, the manifest says {size:,}"
        extra = sorted(present - set(wanted))
        if extra:
            return f"{extra[0]} is not in the manifest (planted after the save?)"
        for name, (_, digest) in sorted(wanted.items()):
            if file_sha256(where / name) != digest:
                return f"{name} does not match its sha256 in the manifest (replaced or damaged after the save)"
        return None

    def resume_tag(self) -> str | None:
        """Collective: the newest checkpoint that verifies (None: none does). Rank 0 checks them newest first, sets
        aside each one that fails, saying why in one line, and points `latest` at the one chosen."""
        chosen = None
        if self.rank == 0:
            rejected: list[tuple[str, str]] = []
            for tag in reversed(self.tags()):
                problem = self.verify(tag)
                if problem is None:
                    chosen = tag
                    break
                rejected.append((tag, problem))
            for tag, problem in rejected:
                aside = self._set_aside(tag)
                then = f"resuming from {chosen} instead" if chosen else "no checkpoint verifies, starting from scratch"
                self.say(f"{shown(self.folder / tag)}: {problem}; {then} (set aside in {shown(aside)})")
            self._point_latest(chosen)
        return broadcast_object(chosen)

    def load(self, engine: Any) -> dict | None:
        """Collective: restore module, optimizer, scheduler and this rank's RNG from the newest checkpoint that
        verifies; its trainer state, or None when there is none."""
        tag = self.resume_tag()
        if tag is None:
            return None
        with weights_only_loading():
            path, _ = engine.load_checkpoint(
                str(self.folder), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
            )
        if path is None:
            raise ScratchError(
                f"{self.folder / tag}: DeepSpeed could not load this checkpoint (written by another "
                f"rank count or ZeRO stage?); delete the folder to start over"
            )
        set_rng_state(self.folder / tag / f"rng_rank{self.rank:05d}.pt")
        return json.loads((self.folder / tag / "trainer_state.json").read_text())

    # ---- writing -------------------------------------------------------------------------------------------

    def prepare(self, description: dict[str, Any]) -> None:
        """Rank 0: create the folder, record what it holds, and drop what saves killed before `latest` moved left
        behind (newer than `latest` and without a manifest)."""
        if self.rank != 0:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json(self.folder / "fingerprint.json", description)
        pointer = self._pointer()
        newest_good = step_of(pointer) if pointer else -1
        for tag in self.tags():
            if step_of(tag) > newest_good and not (self.folder / tag / MANIFEST).is_file():
                shutil.rmtree(self.folder / tag, ignore_errors=True)

    def save(self, engine: Any, step: int, state: dict[str, Any]) -> Path:
        """Write checkpoint `step` on every rank, then (rank 0) its manifest, point `latest` at it, prune."""
        import torch

        tag = tag_of(step)
        engine.save_checkpoint(str(self.folder), tag=tag, client_state={"trainer": state}, save_latest=False)
        torch.save(rng_state(), self.folder / tag / f"rng_rank{self.rank:05d}.pt")
        if self.rank == 0:
            write_json(self.folder / tag / "trainer_state.json", state)
        barrier()  # every rank's files are complete before the manifest describes them and `latest` moves
        if self.rank == 0:
            write_json(self.folder / tag / MANIFEST, {"tag": tag, "files": manifest_files(self.folder / tag)})
            self._point_latest(tag)
            self.prune()
        barrier()
        return self.folder / tag

    def prune(self) -> None:
        """Keep the newest `keep` checkpoints up to `latest`; `latest` itself and the pinned one always stay."""
        latest = self.latest_tag()
        complete = [t for t in self.tags() if latest and step_of(t) <= step_of(latest)]
        for tag in complete[: -self.keep] if self.keep > 0 else []:
            if tag not in (latest, self.pinned):
                shutil.rmtree(self.folder / tag, ignore_errors=True)

    def _pointer(self) -> str | None:
        """What `latest` names, when it names a tag at all (unlike latest_tag, never raises)."""
        try:
            tag = (self.folder / LATEST).read_text().strip()
        except OSError:
            return None
        return tag if TAG.match(tag) else None

    def _point_latest(self, tag: str | None) -> None:
        """Rank 0: point `latest` at `tag` atomically (remove it for None)."""
        if tag is None:
            (self.folder / LATEST).unlink(missing_ok=True)
        elif self._pointer() != tag:
            tmp = self.folder / f".{LATEST}.tmp"
            tmp.write_text(tag)
            os.replace(tmp, self.folder / LATEST)

    def _set_aside(self, tag: str) -> Path:
        """Move a checkpoint that failed verification to rejected/<tag> (replacing an earlier one of that tag), so
        that a new save of its step starts from an empty folder and the evidence stays for a look."""
        aside = self.folder / REJECTED / tag
        if aside.exists():
            shutil.rmtree(aside)
        aside.parent.mkdir(exist_ok=True)
        os.replace(self.folder / tag, aside)
        return aside

    # ---- consolidation -------------------------------------------------------------------------------------

    def fp32_state_dict(self, tag: str) -> dict[str, torch.Tensor]:
        """Consolidated fp32 weights of a ZeRO (stage >= 1) checkpoint: every rank's partition, gathered."""
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with weights_only_loading():
            return get_fp32_state_dict_from_zero_checkpoint(str(self.folder), tag=tag)

    def module_state_dict(self, tag: str) -> dict[str, torch.Tensor]:
        """The module's weights of a ZeRO-0 checkpoint (DeepSpeed's mp_rank_00_model_states.pt), loaded safely."""
        import torch

        path = self.folder / tag / "mp_rank_00_model_states.pt"
        if not path.is_file():
            raise ScratchError(f"{path}: missing (not a ZeRO-0 checkpoint, or damaged); delete {self.folder}")
        with weights_only_loading():
            return torch.load(path, map_location="cpu")["module"]


def checkpoint_files(folder: Path) -> list[str]:
    """The files under a checkpoint folder but its manifest, as relative POSIX paths, sorted."""
    names = (p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return sorted(name for name in names if name != MANIFEST)


def manifest_files(folder: Path) -> dict[str, dict[str, Any]]:
    """name -> {bytes, sha256} of every file under a checkpoint folder but the manifest itself."""
    return {
        name: {"bytes": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)}
        for name in checkpoint_files(folder)
    }


def shown(path: Path) -> str:
    """A path as a message shows it: relative to the working directory when under it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


# ------------------------------------------------------------------------------------------------ safe loading


def deepspeed_safe_globals() -> list[Any]:
    """The classes DeepSpeed pickles into its checkpoints besides tensors and plain data (measured for ZeRO 0-3,
    fp32 / bf16 / autocast, deepspeed 0.19.8): plain records with no behaviour on unpickling."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loading() -> Iterator[None]:
    """Within the block, every torch.load runs with weights_only=True, DeepSpeed's few record classes allowed.

    DeepSpeed's TorchCheckpointEngine.load and zero_to_fp32 call torch.load(..., weights_only=False) themselves,
    so a planted pickle would run code; swapping torch.load for the block is the one hook that covers every load
    of both (a checkpoint engine of our own would miss zero_to_fp32). Only the loading thread is at work then.
    A refused file becomes one ScratchError line naming it."""
    import torch

    original = torch.load

    def safe_load(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        try:
            return original(f, *args, **kwargs)
        except pickle.UnpicklingError as e:
            detail = next((part.strip() for part in str(e).split("\n") if "WeightsUnpickler error" in part), str(e))
            detail = detail.replace("WeightsUnpickler error: ", "").split(". Please use")[0]
            raise ScratchError(
                f"{f}: refused to load: it holds more than tensors and plain data ({detail}); it "
                f"matches its manifest, so the manifest was rewritten too: delete "
                f"{Path(str(f)).parent} and look into who can write to it"
            ) from None

    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        torch.load = safe_load
        try:
            yield
        finally:
            torch.load = original


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
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_gauss": float(np_state[4]),
        "python_version": py_version,
        "python_state": torch.tensor(py_state, dtype=torch.int64),
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
    np.random.set_state(
        ("MT19937", s["numpy_keys"].numpy().astype(np.uint32), s["numpy_pos"], s["numpy_has_gauss"], s["numpy_gauss"])
    )
    random.setstate((s["python_version"], tuple(s["python_state"].tolist()), s["python_gauss"]))
