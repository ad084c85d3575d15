"""The alignment stages' examples (sft, reward, dpo, evaluate): loaded from their sources with a counted quarantine,
split into train and validation, and the builtin held-out prompts with the checker of their answers.

    loaded = load_instruction_data(cfg, root)                      # or load_preference_data: cfg is AlignmentData
    train = loaded.keep_encoded("train", encode, why_not)          # encodings; a None encoding is quarantined
    loaded.counts()                                                # rows_in = train + val + quarantined

builtin sources draw their "train" and "val" splits (disjoint seeds and (animal, place) pairs); file rows go to
validation by a salted hash of their id (`val_fraction`), stable across runs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.common.config import ScratchError
from tasks.common.split import Split
from tasks.common.train_config import AlignmentData
from tasks.sources import builtin
from tasks.sources.builtin import check_constraints
from tasks.sources.instructions import final_answer, load_instructions, load_preferences, load_prompts

VAL_SALT = "scratchlm-align-v1"


@dataclass
class Loaded:
    """Examples of one stage's sources: train and validation lists plus what was quarantined.

    Every example carries `source` (its sources entry), so per-source counts stay exact when a later step
    (encoding) quarantines one: rows_in = train + val + quarantined, in total and per source."""

    train: list[dict] = field(default_factory=list)
    val: list[dict] = field(default_factory=list)
    quarantine: list[dict] = field(default_factory=list)
    per_source: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, example: dict, split: str) -> None:
        getattr(self, split).append(example)
        self.per_source[example["source"]][split] += 1

    def quarantine_row(self, location: str, reason: str, source: str) -> None:
        self.quarantine.append({"location": location, "reason": reason, "source": source})
        self.per_source[source]["quarantined"] += 1

    def keep_only(self, split: str, keep: Callable[[dict], str | None]) -> list[dict]:
        """Quarantine the examples of `split` for which keep() gives a reason; the kept examples, in order."""
        kept = []
        for example in getattr(self, split):
            reason = keep(example)
            if reason is None:
                kept.append(example)
            else:
                self.per_source[example["source"]][split] -= 1
                self.quarantine_row(example["id"], reason, example["source"])
        setattr(self, split, kept)
        return kept

    def keep_encoded(self, split: str, encode: Callable[[dict], Any | None], why_not: str) -> list[Any]:
        """The encodings of `split`'s examples; an example whose encoding is None is quarantined with `why_not`."""
        encoded: dict[str, Any] = {}

        def keep(example: dict) -> str | None:
            encoded[example["id"]] = encode(example)
            return None if encoded[example["id"]] is not None else why_not

        return [encoded[e["id"]] for e in self.keep_only(split, keep)]

    def counts(self) -> dict:
        reasons = Counter(_reason_key(q["reason"]) for q in self.quarantine)
        return {
            "rows_in": len(self.train) + len(self.val) + len(self.quarantine),
            "train_examples": len(self.train),
            "val_examples": len(self.val),
            "quarantined": len(self.quarantine),
            "quarantined_by_reason": dict(sorted(reasons.items())),
            "per_source": self.per_source,
        }


def _reason_key(reason: str) -> str:
    """Group reasons for metrics ("message 1 (user): content must be ..." → "content must be ...")."""
    text = reason.split(": ")[-1] if reason.startswith(("message ", "prompt: message")) else reason
    return text.split(" at column")[0].split(" (")[0].strip()


LoaderFn = Callable[..., Iterator[tuple[dict | None, Any]]]


def _load(
    loader: LoaderFn,
    sources: list[str],
    root: Path,
    builtin_train: int,
    builtin_val: int,
    seed: int,
    val_fraction: float,
) -> Loaded:
    """Every source in order: builtin splits drawn directly, file rows split by id hash, bad rows quarantined."""
    if not sources:
        raise ScratchError("sources: list at least one source (e.g. builtin:instructions)")
    split = Split(val_fraction, VAL_SALT) if val_fraction > 0 else None
    out = Loaded()
    for spec in sources:
        out.per_source.setdefault(spec, {"train": 0, "val": 0, "quarantined": 0})
        if spec.startswith("builtin:"):
            parts = [
                ("train", loader([spec], root, builtin_train, seed, "train")),
                ("val", loader([spec], root, builtin_val, seed, "val")),
            ]
        else:
            parts = [(None, loader([spec], root, 0, seed))]
        for fixed_split, rows in parts:
            for example, record in rows:
                if example is None:
                    out.quarantine_row(record.location, record.reason or "unreadable", spec)
                    continue
                example = {**example, "source": spec}
                in_val = bool(split and split.is_validation(example["id"]))
                out.add(example, fixed_split or ("val" if in_val else "train"))
    return out


def load_instruction_data(cfg: AlignmentData, root: Path) -> Loaded:
    """SFT examples {"id", "messages", "constraints"?} of every source, split and quarantined."""
    return _load(
        load_instructions, cfg.sources, root, cfg.builtin_train, cfg.builtin_val, cfg.data_seed, cfg.val_fraction
    )


def load_preference_data(cfg: AlignmentData, root: Path) -> Loaded:
    """Preference pairs {"id", "prompt_messages", "chosen", "rejected", "constraints"?}, split and quarantined."""
    return _load(
        load_preferences, cfg.sources, root, cfg.builtin_train, cfg.builtin_val, cfg.data_seed, cfg.val_fraction
    )


def load_prompt_data(cfg: AlignmentData, root: Path) -> Loaded:
    """Prompts {"id", "prompt_messages", "constraints"? , "answer"?} (the ppo stage's), split and quarantined."""
    return _load(load_prompts, cfg.sources, root, cfg.builtin_train, cfg.builtin_val, cfg.data_seed, cfg.val_fraction)


def checker_score(example: dict, answer: str) -> float:
    """The verifiable reward of an answer in [0, 1]: the share of its builtin constraints met, or 1.0 when its final
    number equals the reference answer (GSM8K); 0.0 for a prompt with neither (nothing to check)."""
    if example.get("constraints"):
        return check_constraints(answer.strip(), example["constraints"])["score"]
    if example.get("answer") is not None:
        return float(final_answer(answer) == example["answer"])
    return 0.0


# ------------------------------------------------------------------------------------------------ held-out prompts


def held_out_prompts(n: int, seed: int) -> list[dict]:
    """n builtin "test" instructions: prompt messages and the constraints their answers are checked against."""
    return [
        {"id": ex["id"], "prompt_messages": ex["messages"][:-1], "constraints": ex["constraints"]}
        for ex in builtin.generate_instructions(n, seed, "test")
    ]


def constraint_scores(answers: Sequence[str], constraints: Sequence[dict]) -> dict:
    """Constraint satisfaction of answers: `satisfied` (share meeting every constraint), `constraint_rate` (share
    of all constraints met), and the rate of each constraint kind."""
    met, total, satisfied = Counter(), Counter(), 0
    for answer, wanted in zip(answers, constraints, strict=True):
        result = check_constraints(answer.strip(), wanted)
        satisfied += result["satisfied"]
        for kind, ok in result["per_constraint"].items():
            met[kind] += ok
            total[kind] += 1
    n = max(len(answers), 1)
    return {
        "satisfied": satisfied / n,
        "constraint_rate": sum(met.values()) / max(sum(total.values()), 1),
        "per_constraint": {k: met[k] / total[k] for k in sorted(total)},
    }


def check_answers(held_out: list[dict], texts: list[str], finished: list[bool]) -> tuple[dict, list[dict]]:
    """Scores of the answers `texts` to `held_out`, and their rows for a samples file."""
    scores = constraint_scores(texts, [h["constraints"] for h in held_out])
    rows = [
        {
            "id": h["id"],
            "prompt": h["prompt_messages"][-1]["content"],
            "answer": t,
            "finished": f,
            "constraints": h["constraints"],
        }
        for h, t, f in zip(held_out, texts, finished, strict=True)
    ]
    return scores, rows


def broken_constraint(pair: dict) -> str | None:
    """The constraint a builtin pair's rejected reply breaks (None for pairs without constraints)."""
    if not pair.get("constraints"):
        return None
    per = check_constraints(pair["rejected"], pair["constraints"])["per_constraint"]
    failed = [k for k, ok in per.items() if not ok]
    return failed[0] if failed else None
