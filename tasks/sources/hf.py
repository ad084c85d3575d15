"""`hf:<name>[:<split>]` sources through 🤗 `datasets`.

`<name>` is a Hub dataset id (needs the network) or a local folder: one written by `Dataset.save_to_disk`, or a
folder of data files in the Hub layout. Offline, a Hub id fails with a clear error instead of a traceback.

A split is read in pieces (`plan`), each by one process: row ranges of a local (map-style) dataset, or the shards
(data files) of a streamed Hub split. Row ids are `<spec>@<row>` (the row's place in the split) whatever the pieces;
a streamed split with several shards numbers rows within each shard, `<spec>@<shard>.<row>`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tasks.common.config import ScratchError
from tasks.sources.files import Record, value_record


def parse(spec: str) -> tuple[str, str]:
    """`hf:name[:split]` → (name, split); split defaults to `train`."""
    body = spec.removeprefix("hf:")
    name, _, split = body.partition(":")
    if not name:
        raise ScratchError(f"data.sources: {spec!r}: expected hf:<name>[:<split>]")
    return name, split or "train"


def load(spec: str, root: Path):
    """Open the dataset split (streaming for Hub ids) or raise a ScratchError saying why it could not."""
    name, split = parse(spec)
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a pinned dependency
        raise ScratchError(f"data.sources: {spec!r}: the `datasets` package is not installed ({e})") from None
    local = Path(name) if Path(name).is_absolute() else root / name
    try:
        if local.is_dir() and (local / "dataset_info.json").is_file():
            return datasets.load_from_disk(str(local))
        if local.is_dir() and (local / "dataset_dict.json").is_file():
            return datasets.load_from_disk(str(local))[split]
        if local.is_dir():
            return datasets.load_dataset(str(local), split=split)
        return datasets.load_dataset(name, split=split, streaming=True)
    except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError, ...)
        hint = " (the network or the Hub is unreachable, or HF_DATASETS_OFFLINE=1 is set)" if not local.is_dir() else ""
        raise ScratchError(
            f"data.sources: {spec!r}: could not load split {split!r}{hint}: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None


@dataclass(frozen=True)
class Piece:
    """What one process reads of a split: rows [start, stop) of a map-style dataset (kind `rows`), shard `start` of
    `stop` shards of a streamed one (kind `shard`), or everything (kind `all`: a dataset of unknown length)."""

    kind: Literal["all", "rows", "shard"] = "all"
    start: int = 0
    stop: int = 0

    def describe(self) -> str:
        return {"rows": f"rows {self.start}-{self.stop - 1}", "shard": f"shard {self.start} of {self.stop}"}.get(
            self.kind, "the whole split"
        )


def plan(spec: str, root: Path, rows_per_piece: int) -> list[Piece]:
    """The pieces `spec` is read in: `rows_per_piece` rows each for a dataset of known length, one per shard
    for a streamed split with several, else one."""
    return pieces_of(load(spec, root), rows_per_piece)


def pieces_of(dataset, rows_per_piece: int) -> list[Piece]:
    import datasets

    if isinstance(dataset, datasets.Dataset):
        n = len(dataset)
        return [Piece("rows", start, min(n, start + rows_per_piece)) for start in range(0, n, rows_per_piece)] or [
            Piece("rows", 0, 0)
        ]
    if isinstance(dataset, datasets.IterableDataset) and dataset.num_shards > 1:
        return [Piece("shard", i, dataset.num_shards) for i in range(dataset.num_shards)]
    return [Piece()]


def _rows_of(dataset, piece: Piece) -> tuple[Iterator[dict], str]:
    """The rows of `piece` and the prefix of their row numbers (`<shard>.` for shards)."""
    if piece.kind == "rows":
        return iter(dataset.select(range(piece.start, piece.stop))), ""
    if piece.kind == "shard":
        return iter(dataset.shard(num_shards=piece.stop, index=piece.start)), f"{piece.start}."
    return iter(dataset), ""


def read(spec: str, root: Path, text_field: str, piece: Piece = Piece()) -> Iterator[Record]:
    """Documents of (a piece of) an HF dataset split; rows without a usable text field are quarantined by row
    number. A read error while iterating (a corrupt local file, a dropped connection while streaming) keeps every
    row before it and quarantines the rest of the piece as one record."""
    rows, prefix = _rows_of(load(spec, root), piece)
    field = f"text field {text_field!r}"
    row = piece.start if piece.kind == "rows" else 0
    rest = "the split" if piece.kind == "all" else f"{piece.describe()} of the split"
    while True:
        try:
            example = next(rows)
        except StopIteration:
            return
        except Exception as e:  # datasets / pyarrow / fsspec raise many types
            message = str(e).strip().splitlines()
            yield Record(
                f"{spec}@{prefix}{row}",
                reason=f"read error (at row {prefix}{row}; the rest of {rest} is unreadable): "
                f"{type(e).__name__}: {message[0] if message else ''}",
            )
            return
        text = example.get(text_field)
        if text is None:
            yield Record(f"{spec}@{prefix}{row}", reason=f"missing {field}")
        else:
            yield value_record(f"{spec}@{prefix}{row}", text, field)
        row += 1
