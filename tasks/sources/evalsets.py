"""The evaluation sets the evaluate stage scores models on, as decontamination items (tasks/common/decontam.py):
what each item shows the model (`context`) and what a model must not have read in training (`targets`).

  cloze      builtin story cloze, generate_cloze(n, seed, "test"): context → the right ending
             (evaluate.cloze_seed; evaluate draws 2 x evaluate.limit items and keeps up to `limit`)
  hellaswag  the first *.jsonl of <data_dir>/hellaswag, every row: query → the gold ending
  piqa       the first *.jsonl of <data_dir>/piqa, every row: "Question: <goal>\nAnswer:" → the gold solution
  prompts    builtin held-out prompts, generate_instructions(n, seed, "test"): the user prompt itself (the
             sampling.prompt_seed that evaluate, dpo and ppo answer)

Item i of the generated sets depends only on (seed, i), so n items cover every evaluation that draws up to n.
The slices are read whole (evaluate scores the first `limit` that fit the model's context). A slice folder that
is absent is skipped, with the reason, as the evaluate stage skips it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from tasks.common.config import ScratchError
from tasks.common.decontam import Item
from tasks.common.dvcio import file_sha256
from tasks.sources import builtin

BENCHMARKS: tuple[str, ...] = ("cloze", "hellaswag", "piqa", "prompts")
SLICES = {"hellaswag": "hellaswag", "piqa": "piqa"}  # benchmark → its folder under data_dir


def _rows(path: Path) -> Iterator[tuple[int, dict]]:
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield line_no, json.loads(line)
                except json.JSONDecodeError as e:
                    raise ScratchError(f"filter.decontam: {path}:{line_no}: not JSON ({e.msg})") from None


def _slice_item(name: str, row: dict, where: str) -> Item:
    try:
        if name == "hellaswag":
            return Item(name, row["query"], (row["endings"][int(row["label"])],))
        return Item(name, f"Question: {row['goal']}\nAnswer:", ((row["sol1"], row["sol2"])[int(row["label"])],))
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise ScratchError(f"filter.decontam: {where}: not a {name} row ({type(e).__name__}: {e})") from None


def slice_file(name: str, data_dir: Path) -> Path | None:
    """The file the evaluate stage reads for a slice benchmark (the first *.jsonl of its folder), or None."""
    folder = data_dir / SLICES[name]
    found = sorted(folder.glob("*.jsonl")) if folder.is_dir() else []
    return found[0] if found else None


def items(
    benchmarks: list[str], data_dir: Path, cloze_seed: int, cloze_items: int, prompt_seed: int, prompt_items: int
) -> tuple[list[Item], dict[str, dict], dict[str, str]]:
    """(items, what each benchmark read: {source, items, sha256 for files}, skipped benchmark → reason)."""
    out: list[Item] = []
    read: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    for name in benchmarks:
        if name == "cloze":
            found = [
                Item(name, c["context"], (c["choices"][c["label"]],))
                for c in builtin.generate_cloze(cloze_items, cloze_seed, "test")
            ]
            read[name] = {"source": f"builtin generate_cloze(seed={cloze_seed}, split=test)"}
        elif name == "prompts":
            found = [
                Item(name, "", (ex["messages"][0]["content"],))
                for ex in builtin.generate_instructions(prompt_items, prompt_seed, "test")
            ]
            read[name] = {"source": f"builtin generate_instructions(seed={prompt_seed}, split=test)"}
        else:
            path = slice_file(name, data_dir)
            if path is None:
                skipped[name] = f"no {name} slice (*.jsonl) in {data_dir / SLICES[name]}"
                continue
            found = [_slice_item(name, row, f"{path}:{line_no}") for line_no, row in _rows(path)]
            read[name] = {"source": str(path), "sha256": file_sha256(path)}
        read[name]["items"] = len(found)
        out += found
    return out, read, skipped


__all__ = ["BENCHMARKS", "items", "slice_file"]
