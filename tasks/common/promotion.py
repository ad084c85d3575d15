"""The promotion gates: when may the registered `@challenger` become `@champion`? Pure logic, no MLflow calls.

params.yaml's `promote:` section loads into `PromoteConfig`; `flows/promote.py` reads the two versions' `eval.*`
tags (written by the register stage from metrics/all/evaluate.json), calls `check_gates`, and moves the alias only
when every gate passes. A gate set to null is off; a gate whose figure the challenger lacks fails, saying so.

The degeneration gates (fluency gap, repeated lines, nonwords, distinct-2) read the figures the evaluate stage
computes on the sampled answers to its held-out prompts (tasks/common/degeneration.py): a model can raise
constraint satisfaction by writing stacks of pseudo-title lines ("Tom and the Sr / Tom and the Kov"), and these
gates refuse it even though the satisfaction gate passes.

    gates = check_gates(cfg, challenger={"val_bpb": 1.4, "satisfaction": 0.3, "bench.cloze.acc": 0.6, ...},
                        champion={...} or None, label="dpo")
    [g for g in gates if not g.passed]      # the failing gates, each with a sentence saying why
"""

from __future__ import annotations

from dataclasses import dataclass

from tasks.common.config import check


@dataclass(frozen=True)
class PromoteConfig:
    max_val_bpb: float | None = 3.0
    """The challenger's validation bits per byte must be at most this (an untrained small model scores about
    3.4; null = off)."""
    min_satisfaction: float | None = 0.1
    """Constraint satisfaction of the sampled answers to held-out prompts (share of their constraints met, as the
    dpo stage reports it): at least this (null = off)."""
    max_benchmark_drop: float | None = 0.05
    """No benchmark accuracy may be lower than the champion's by more than this, in absolute accuracy (null = off;
    passes when there is no champion yet)."""
    min_win_rate: float | None = None
    """Each reward-model win rate of the challenger over another model (e.g. dpo_vs_sft) at least this (null = off)."""
    max_fluency_gap: float | None = 1.5
    """The challenger's answers, read by the base (pretrained) model, may cost at most this many nats per token more
    than the base model's own held-out text (evaluate's `fluency_gap` = fluency_nll - the base's val_loss; relative
    to the base, so one value fits any corpus and model size). Measured on the tests' tiny world (held-out loss
    0.78): builtin answers 0.36 above it (0.61 for titled ones: the base never saw a title), stories with 3% of their
    words made up 2.4, the stacked pseudo-titles "Tom and the Sr / Tom and the Kov / ..." 9-11, so two such answers
    among 16 lift the mean past 1.5 (null = off)."""
    max_repeated_line_rate: float | None = 0.1
    """Share of an answer's lines that restart an earlier line of it, averaged over the answers: at most this (a
    story repeats none; "Tom and the Sr / Tom and the Kov / Tom and theendden" repeats 2 of 3; null = off)."""
    max_nonword_rate: float | None = 0.05
    """Share of an answer's words that the builtin story world never writes, averaged over the answers: at most
    this (builtin stories: 0; the stacked titles above: 0.3; null = off)."""
    min_distinct_2: float | None = 0.2
    """Distinct-2 of the answers (unique word pairs / all word pairs, pooled): at least this. It falls as more answers
    are pooled (16 builtin stories: about 0.75, 400: about 0.26); one answer given to every prompt scores about
    0.06 (null = off)."""

    def __post_init__(self) -> None:
        for name in (
            "min_satisfaction",
            "min_win_rate",
            "max_repeated_line_rate",
            "max_nonword_rate",
            "min_distinct_2",
        ):
            value = getattr(self, name)
            check(value is None or 0.0 <= value <= 1.0, name, f"must be in [0, 1] or null, got {value}")
        check(self.max_val_bpb is None or self.max_val_bpb > 0, "max_val_bpb", "must be > 0 or null")
        check(
            self.max_benchmark_drop is None or self.max_benchmark_drop >= 0,
            "max_benchmark_drop",
            "must be >= 0 or null",
        )


@dataclass(frozen=True)
class Gate:
    """One gate's verdict."""

    name: str
    passed: bool
    detail: str


def check_gates(
    cfg: PromoteConfig, challenger: dict[str, float], champion: dict[str, float] | None, label: str = ""
) -> list[Gate]:
    """Every gate's verdict for `challenger` (eval metrics without the `eval.` prefix) against `champion`."""
    gates = []
    if cfg.max_val_bpb is not None:
        gates.append(_at_most("max_val_bpb", challenger.get("val_bpb"), cfg.max_val_bpb, "validation bits per byte"))
    if cfg.min_satisfaction is not None:
        gates.append(
            _at_least(
                "min_satisfaction", challenger.get("satisfaction"), cfg.min_satisfaction, "constraint satisfaction"
            )
        )
    if cfg.min_win_rate is not None:
        gates.append(_win_rates(challenger, cfg.min_win_rate, label))
    if cfg.max_benchmark_drop is not None:
        gates.append(_benchmarks(challenger, champion, cfg.max_benchmark_drop))
    return gates + degeneration_gates(cfg, challenger)


def degeneration_gates(cfg: PromoteConfig, challenger: dict[str, float]) -> list[Gate]:
    """The gates on the challenger's answers: fluency gap, repeated lines, nonwords (at most), distinct-2 (at least)."""
    gates = []
    for name, key, what in (
        ("max_fluency_gap", "fluency_gap", "fluency gap (nats/token over the base model's val loss)"),
        ("max_repeated_line_rate", "repeated_line_rate", "repeated-line rate"),
        ("max_nonword_rate", "nonword_rate", "nonword rate"),
    ):
        if getattr(cfg, name) is not None:
            gates.append(_at_most(name, challenger.get(key), getattr(cfg, name), what))
    if cfg.min_distinct_2 is not None:
        gates.append(_at_least("min_distinct_2", challenger.get("distinct_2"), cfg.min_distinct_2, "distinct-2"))
    return gates


def _at_most(name: str, value: float | None, limit: float, what: str) -> Gate:
    if value is None:
        return Gate(name, False, f"the challenger has no recorded {what}")
    ok = value <= limit
    return Gate(name, ok, f"{what} {value:.4f} {'<=' if ok else '>'} {limit}")


def _at_least(name: str, value: float | None, limit: float, what: str) -> Gate:
    if value is None:
        return Gate(name, False, f"the challenger has no recorded {what}")
    ok = value >= limit
    return Gate(name, ok, f"{what} {value:.4f} {'>=' if ok else '<'} {limit}")


def _win_rates(challenger: dict[str, float], limit: float, label: str) -> Gate:
    own = {
        k.removeprefix("win_rate."): v
        for k, v in challenger.items()
        if k.startswith(f"win_rate.{label}_vs_" if label else "win_rate.")
    }
    if not own:
        return Gate("min_win_rate", False, f"the challenger ({label or 'model'}) has no recorded win rate")
    low = {k: v for k, v in own.items() if v < limit}
    if low:
        return Gate("min_win_rate", False, "; ".join(f"win rate {k} {v:.3f} < {limit}" for k, v in low.items()))
    return Gate("min_win_rate", True, ", ".join(f"win rate {k} {v:.3f} >= {limit}" for k, v in own.items()))


def benchmark_scores(metrics: dict[str, float]) -> dict[str, float]:
    """`bench.<task>.acc` → {task: acc}."""
    return {k.split(".")[1]: v for k, v in metrics.items() if k.startswith("bench.") and k.endswith(".acc")}


def _benchmarks(challenger: dict[str, float], champion: dict[str, float] | None, max_drop: float) -> Gate:
    if champion is None:
        return Gate("max_benchmark_drop", True, "no champion yet: nothing to compare with")
    ours, theirs = benchmark_scores(challenger), benchmark_scores(champion)
    shared = sorted(set(ours) & set(theirs))
    if not shared:
        return Gate("max_benchmark_drop", True, "no benchmark in common with the champion")
    worse = [b for b in shared if ours[b] < theirs[b] - max_drop]
    if worse:
        return Gate(
            "max_benchmark_drop",
            False,
            "; ".join(
                f"{b} acc {ours[b]:.4f} is {theirs[b] - ours[b]:.4f} below the champion's {theirs[b]:.4f} "
                f"(allowed {max_drop})"
                for b in worse
            ),
        )
    return Gate(
        "max_benchmark_drop",
        True,
        ", ".join(f"{b} {ours[b]:.3f} vs {theirs[b]:.3f}" for b in shared) + f" (allowed drop {max_drop})",
    )
