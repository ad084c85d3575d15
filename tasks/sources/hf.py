"""`hf:<name>[:<split>]` sources through 🤗 `datasets`.

`<name>` is a Hub dataset id (needs the network) or a local folder: one written by `Dataset.save_to_disk`, or a
folder of data files in the Hub layout. Offline, a Hub id fails with a clear error instead of a traceback.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

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


def read(spec: str, root: Path, text_field: str) -> Iterator[Record]:
    """Documents of an HF dataset split; rows without a usable text field are quarantined by row number. A read
    error while iterating (a corrupt local file, a dropped connection while streaming) keeps every row before it
    and quarantines the rest of the split as one record."""
    dataset = load(spec, root)
    field = f"text field {text_field!r}"
    rows = iter(dataset)
    row = 0
    while True:
        try:
            example = next(rows)
        except StopIteration:
            return
        except Exception as e:  # datasets / pyarrow / fsspec raise many types
            message = str(e).strip().splitlines()
            yield Record(
                f"{spec}@{row}",
                reason=f"read error (at row {row}; the rest of the split is unreadable): "
                f"{type(e).__name__}: {message[0] if message else ''}",
            )
            return
        text = example.get(text_field)
        if text is None:
            yield Record(f"{spec}@{row}", reason=f"missing {field}")
        else:
            yield value_record(f"{spec}@{row}", text, field)
        row += 1
