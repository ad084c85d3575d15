"""The report card: one Markdown page with PNG plots that says what the pipeline built and how good it is.

    from tasks.common.report import build_report
    build_report(ROOT, evaluation=metrics, tracker=tracker)   # the evaluate stage, at its end (logged to MLflow)
    build_report(ROOT)                                         # `scratchlm report --regenerate`: from the files

Sections (each from what exists; a missing source is named in the page, never an error):
    models        per model (base / SFT / DPO): validation loss, perplexity, bits per byte, constraint
                  satisfaction, reward-model win rates                           ← metrics/all/evaluate.json
    degeneration  per model: fluency of its answers under the base model, repeated lines and 3-grams,
                  distinct-2, words outside the story world, length              ← metrics/all/evaluate.json
    benchmarks    lm-eval accuracy per task, one column per model + bar chart    ← metrics/all/evaluate.json
    training      train/validation curves of every stage                         ← MLflow: the child runs of
                  SCRATCHLM_PARENT_RUN_ID, else the latest run of each stage name in the experiment
    data funnel   documents from ingest to pretokenize, rejects per rule, duplicates  ← metrics/all/<stage>.json
    tokenizer     vocabulary and bytes per token (compression) per split         ← metrics/all/tokenizer.json,
                                                                                   metrics/all/pretokenize.json
    samples       the fixed-prompt generations                                   ← data/evaluate/samples.md
Writes reports/report.md and reports/*.png (relative links, so the folder renders anywhere: GitHub, MLflow UI).
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Any

from tasks.common import dvcio, tracking
from tasks.common.console import fmt
from tasks.common.dvcio import pipeline_stages
from tasks.common.tracking import PARENT_ENV, Tracker, git_commit, tracking_uri

REPORT_DIR = "reports"
CURVE_SKIP = ("lr", "grad_norm", "tokens_per_s", "mfu", "seconds", "step", "epoch", "tokens")
"""Metric names (after the `/`) left out of the training curves: throughput and schedule, not quality."""
MAX_PANELS = 9


# ------------------------------------------------------------------------------------------------ inputs


def read_metrics(root: Path, stage: str) -> dict | None:
    """Every figure of `stage` (metrics/all/<stage>.json), None before it has run."""
    return dvcio.read_metrics(stage, root) or None


def stage_runs(stages: list[str], parent_run_id: str | None = None) -> tuple[dict[str, Any], str]:
    """MLflow runs by stage name, and how they were found (the pipeline run's children, or the latest per stage)."""
    if os.environ.get("SCRATCHLM_NO_MLFLOW") == "1":
        return {}, "MLflow is off (SCRATCHLM_NO_MLFLOW=1)"
    mlflow = tracking.setup_mlflow()
    parent = parent_run_id or os.environ.get(PARENT_ENV)
    children = tracking.find_stage_runs(parent) if parent else {}
    runs = {}
    for stage in stages:
        if stage in children:
            runs[stage] = children[stage]
            continue
        # DVC skipped this stage in the pipeline run (up to date): its curves are in the run that last made it
        found = mlflow.search_runs(
            experiment_names=[tracking.EXPERIMENT],
            output_format="list",
            max_results=1,
            filter_string=f"tags.`scratchlm.stage` = '{stage}'",
            order_by=["attributes.start_time DESC"],
        )
        if found:
            runs[stage] = found[0]
    if not children:
        return runs, "latest run of each stage in the experiment"
    reused = [s for s in runs if s not in children]
    return runs, (
        f"children of pipeline run {parent}"
        + (f"; stages it skipped as up to date ({', '.join(reused)}): their latest run" if reused else "")
    )


def curves(run: Any) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{metric name: {prefix (train/val/...): [(step, value)]}} for the run's metrics logged at several steps."""
    import mlflow

    client = mlflow.MlflowClient()
    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for key in sorted(run.data.metrics):
        prefix, sep, name = key.rpartition("/")
        if not sep or name in CURVE_SKIP or any(name.endswith(s) for s in ("_per_s", "_seconds")):
            continue
        history = client.get_metric_history(run.info.run_id, key)
        if len(history) < 2:
            continue
        out.setdefault(name, {})[prefix] = sorted((h.step, h.value) for h in history)
    return out


# ------------------------------------------------------------------------------------------------ plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


FIRST_PANELS = ("loss", "bpb", "reward", "checker", "kl", "entropy", "clip_fraction", "response_length", "value_loss")
"""The panels a stage's curves show first (the RL diagnostics lead for ppo); the rest follow by name."""


def plot_curves(stage: str, series: dict[str, dict[str, list[tuple[int, float]]]], out: Path) -> Path:
    plt = _pyplot()
    names = sorted(series, key=lambda n: (FIRST_PANELS.index(n) if n in FIRST_PANELS else len(FIRST_PANELS), n))
    names = names[:MAX_PANELS]
    cols = min(3, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for prefix, points in sorted(series[name].items()):
            steps, values = zip(*points)
            ax.plot(steps, values, label=prefix, marker="o" if len(points) < 15 else None, markersize=3)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle(f"{stage}: training curves")
    fig.tight_layout()
    return _save(fig, out / f"curves_{stage}.png")


def _number(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"


def plot_bars(title: str, labels: list[str], values: list[float], xlabel: str, out: Path, name: str) -> Path:
    """Horizontal bars, first label on top, each bar labelled with its value."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 0.45 * len(labels) + 1.3))
    bars = ax.barh(labels[::-1], values[::-1], color="#4c72b0")
    ax.bar_label(bars, labels=[_number(v) for v in values[::-1]], fontsize=8, padding=3)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_xlim(0, max(values) * 1.18 if values and max(values) > 0 else 1)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _save(fig, out / name)


def plot_grouped(
    title: str,
    groups: list[str],
    series: dict[str, list[float | None]],
    ylabel: str,
    out: Path,
    name: str,
    reference: dict[str, float] | None = None,
) -> Path:
    """Bars per group (benchmark), one colour per series (model); `reference` marks chance per group."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(groups) + 2), 3.4))
    width = 0.8 / max(len(series), 1)
    for i, (label, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [v if v is not None else 0 for v in values], width, label=label)
    for g, group in enumerate(groups):
        if reference and group in reference:
            ax.hlines(reference[group], g - 0.45, g + 0.45, colors="black", linestyles="dashed", zorder=3)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, out / name)


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


# ------------------------------------------------------------------------------------------------ sections


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]


MODEL_METRICS = [  # (key in metrics/all/evaluate.json, report card's name, the closing summary's, None = not there)
    ("val_loss", "validation loss (nats/token)", "val loss"),
    ("val_ppl", "perplexity", None),
    ("val_bpb", "bits per byte", "val bpb"),
    ("satisfaction", "constraint satisfaction (share of constraints met)", "satisfaction"),
    ("all_satisfied", "answers meeting every constraint", "all satisfied"),
]


def models_section(ev: dict | None, out: Path) -> list[str]:
    lines = ["## Models", ""]
    if not ev:
        return lines + ["_No evaluation yet (metrics/all/evaluate.json is missing: run `dvc repro evaluate`)._", ""]
    labels = ev["models"]
    rows = [
        [name, *[ev[m].get(key, "-") for m in labels]]
        for key, name, _ in MODEL_METRICS
        if any(key in ev[m] for m in labels)
    ]
    lines += _table(["", *labels], rows) + [""]
    first = ev[labels[0]]
    lines += [
        f"Held-out split: {first.get('val_docs', 0):,} documents, {first.get('val_tokens', 0):,} tokens, "
        f"{ev.get('val_text_bytes', 0):,} bytes of text; bits per byte = summed nats / ln 2 / UTF-8 bytes "
        f"of the documents' text.",
        "",
    ]
    plot = plot_bars(
        "Validation bits per byte (lower is better)",
        labels,
        [ev[m]["val_bpb"] for m in labels],
        "bits per byte",
        out,
        "bpb.png",
    )
    lines += [f"![bits per byte per model]({plot.name})", ""]
    if ev.get("win_rate"):
        lines += [
            "Reward-model win rates on the same held-out prompts and sampling seed "
            "(share of prompts where the first model's answer scores higher; ties count 1/2):",
            "",
        ]
        lines += _table(["pair", "win rate"], [[k.replace("_vs_", " vs "), v] for k, v in ev["win_rate"].items()])
        lines += [""]
    return lines


DEGENERATION_METRICS = [  # (key in metrics/all/evaluate.json, the report card's name, the closing summary's)
    ("fluency_nll", "fluency: nats/token of the answers read by the base model", "fluency"),
    ("fluency_gap", "fluency gap: that minus the base model's val loss", "gap"),
    ("repeated_line_rate", "repeated lines (share of an answer's lines)", "repeated lines"),
    ("repeated_ngram_rate", "repeated word 3-grams (share of an answer's)", "repeated 3-grams"),
    ("distinct_1", "distinct-1 (unique words / words, all answers)", None),
    ("distinct_2", "distinct-2 (unique word pairs / pairs, all answers)", "distinct-2"),
    ("nonword_rate", "words outside the story world (share of an answer's)", "nonwords"),
    ("mean_words", "answer length (mean words)", "words"),
]
"""The degeneration figures of tasks/common/degeneration.py and the evaluate stage's fluency, in report order."""
DEGENERATION_NOTE = (
    "On the same held-out answers, averaged per answer: fluency = nats/token of each answer read as plain text by "
    "the base model (gap: minus its held-out loss; about 0 reads like the corpus); repeated lines / 3-grams = share "
    "of an answer's lines restarting an earlier one / of its word 3-grams seen before; distinct-2 = unique word "
    "pairs over all pairs, answers pooled (low: the answers are all alike); nonwords = share of words the story "
    "world never writes. The `scratchlm promote` gates read them (params.yaml `promote:`)."
)


def degeneration_section(ev: dict | None) -> list[str]:
    """The DEGENERATION_METRICS table, one column per model, and what the figures mean."""
    if not ev:
        return []
    lines = ["## Degeneration", ""]
    labels = ev["models"]
    rows = [
        [name, *[ev[m].get(key, "-") for m in labels]]
        for key, name, _ in DEGENERATION_METRICS
        if any(key in ev[m] for m in labels)
    ]
    if not rows:
        return lines + [
            "_No degeneration figures (no held-out prompts were answered, or the evaluation predates "
            "them: rerun evaluate)._",
            "",
        ]
    return lines + _table(["", *labels], rows) + ["", DEGENERATION_NOTE, ""]


JUDGE_MODE_NOTE = {
    "pairwise": "Each pair of answers to a held-out builtin prompt is judged twice, the answers swapped; a verdict "
    "that flips with the order is a tie.",
    "pointwise": "Each answer to a held-out builtin prompt is graded alone (log p(yes) - log p(no) of the judge); the "
    "higher grade wins the pair, so the verdict cannot depend on the order (consistency 1 by construction).",
}
JUDGE_NOTE = (
    "Win rate = (wins + ties / 2) / pairs with its 95 % Wilson interval; consistency = "
    "pairs judged alike in both orders; first picked = share of decisive single-order verdicts for the answer shown "
    "first (0.5: no position bias); longer picked = share of decisive verdicts for the longer answer (the checker's "
    "own share beside it). Calibration: on the pairs the constraint checker strictly decides, the share where the "
    "judge picks the checker's answer (chance is below 0.5: a tie never agrees) and Cohen's kappa (0 = chance, "
    "1 = the checker): how far these verdicts can be trusted."
)


def judge_section(ev: dict | None) -> list[str]:
    """The judge's verdicts per pair (tasks/common/judge.py), its calibration against the checker beside them."""
    judged = (ev or {}).get("judge") or {}
    if not judged.get("pairs"):
        return []
    mode = judged.get("mode", "pairwise")  # records before the pointwise mode have no `mode`: they are pairwise
    lines = [f"## Judge (LLM-as-judge, {mode}, calibrated on the checker)", ""]
    rows = []
    for key, figures in judged["pairs"].items():
        f = {k: "-" if v is None else v for k, v in figures.items()}  # None: a figure with no items
        lo, hi = f["win_rate_ci95_low"], f["win_rate_ci95_high"]
        rm = (ev or {}).get("win_rate", {}).get(key, "-")
        rows.append(
            [
                key.replace("_vs_", " vs "),
                judged["judges"].get(key, "-"),
                f["pairs"],
                f"{fmt(f['win_rate'])} [{lo:.2f}, {hi:.2f}]",
                rm,
                f["tie_rate"],
                f["position_consistency"],
                f["position_bias"],
                f"{fmt(f['length_bias'])} ({fmt(f['checker_length_share'])})",
                f"{fmt(f['checker_agreement'])} of {f['checker_pairs']}",
                f["checker_kappa"],
            ]
        )
    header = ["pair", "judge", "pairs", "win rate [95 %]", "reward model's", "ties", "consistency", "first picked"]
    lines += _table([*header, "longer picked (checker)", "checker agreement", "kappa"], rows)
    lines += ["", f"{JUDGE_MODE_NOTE[mode]} {JUDGE_NOTE}", ""]
    if judged.get("preferences"):
        lines += [
            f"Judge feedback (not human feedback): {judged['preferences']['pairs']} decisive, order-consistent "
            f"verdicts written to `{judged['preferences']['file']}` (rows labelled `source: judge:<name>`).",
            "",
        ]
    return lines


CHANCE = {"cloze": 0.25, "hellaswag": 0.25, "piqa": 0.5}


def benchmarks_section(ev: dict | None, out: Path) -> list[str]:
    lines = ["## Benchmarks (lm-evaluation-harness, offline)", ""]
    if not ev:
        return lines + ["_No evaluation yet._", ""]
    labels = ev["models"]
    names = sorted({b for m in labels for b in ev[m].get("bench", {})})
    if not names:
        return lines + ["_No benchmark ran (see skipped below)._", ""]
    items = ev.get("benchmark_items", {})

    def score(m: str, b: str, key: str) -> Any:
        return ev[m]["bench"].get(b, {}).get(key, "-")

    rows = [
        [
            b,
            items.get(b, {}).get("items", "-"),
            CHANCE.get(b, "-"),
            *[
                f"{score(m, b, 'acc'):.3f} ({score(m, b, 'acc_norm'):.3f})"
                if isinstance(score(m, b, "acc"), float) and isinstance(score(m, b, "acc_norm"), float)
                else score(m, b, "acc")
                for m in labels
            ],
        ]
        for b in names
    ]
    lines += _table(["task", "items", "chance", *[f"{m} acc (acc_norm)" for m in labels]], rows) + [""]
    plot = plot_grouped(
        "Benchmark accuracy (dashed: chance)",
        names,
        {m: [ev[m]["bench"].get(b, {}).get("acc") for b in names] for m in labels},
        "accuracy",
        out,
        "benchmarks.png",
        CHANCE,
    )
    lines += [f"![benchmark accuracy]({plot.name})", ""]
    too_long = {b: c["too_long_for_context"] for b, c in items.items() if c.get("too_long_for_context")}
    if too_long:
        lines += [
            "Items left out because prompt + answer exceed the model's context: "
            + ", ".join(f"{b} {n}" for b, n in too_long.items()),
            "",
        ]
    return lines


def training_section(root: Path, out: Path, parent_run_id: str | None) -> list[str]:
    lines = ["## Training curves (MLflow)", ""]
    try:
        runs, how = stage_runs(pipeline_stages(root), parent_run_id)
    except Exception as e:  # a report must render without a reachable tracking server
        return lines + [f"_MLflow unavailable ({type(e).__name__}: {e})._", ""]
    lines += [f"Runs: {how} in `{tracking_uri()}`.", ""]
    drawn = 0
    for stage, run in runs.items():
        series = curves(run)
        if not series:
            continue
        plot = plot_curves(stage, series, out)
        lines += [f"### {stage}", "", f"MLflow run `{run.info.run_id}`.", "", f"![{stage} curves]({plot.name})", ""]
        drawn += 1
    if not drawn:
        lines += ["_No stage logged metrics at more than one step yet._", ""]
    return lines


def funnel_section(root: Path, out: Path) -> list[str]:
    lines = ["## Data funnel", ""]
    ingest, filt, dedup, pretok = (read_metrics(root, s) for s in ("ingest", "filter", "dedup", "pretokenize"))
    steps: list[tuple[str, int]] = []
    if ingest:
        steps += [("records read", ingest["docs_in"]), ("documents (ingest)", ingest["docs_out"])]
    if filt:
        steps.append(("kept by filter", filt["kept"]))
    if dedup:
        steps.append(("unique (dedup)", dedup["kept"]))
    if pretok:
        steps += [
            ("train documents", pretok.get("train_documents", 0)),
            ("validation documents", pretok.get("val_documents", 0)),
        ]
    if not steps:
        return lines + ["_No data stage has run yet._", ""]
    lines += _table(["step", "documents"], [[name, n] for name, n in steps]) + [""]
    plot = plot_bars(
        "Documents through the data stages",
        [n for n, _ in steps],
        [v for _, v in steps],
        "documents",
        out,
        "funnel.png",
    )
    lines += [f"![data funnel]({plot.name})", ""]
    if ingest and ingest.get("quarantined"):
        lines += [
            "Quarantined at ingest: "
            + ", ".join(f"{k} {v:,}" for k, v in ingest.get("quarantined_by_reason", {}).items()),
            "",
        ]
    if filt and filt.get("rejected_by_rule"):
        lines += ["Filter rejects by rule (a document counts under the first rule it fails):", ""]
        lines += _table(["rule", "rejected"], [[k, v] for k, v in filt["rejected_by_rule"].items()]) + [""]
    if dedup:
        lines += [
            f"Duplicates removed: {dedup.get('exact_duplicates', 0):,} exact, "
            f"{dedup.get('near_duplicates', 0):,} near (MinHash LSH).",
            "",
        ]
    return lines


def tokenizer_section(root: Path, out: Path) -> list[str]:
    lines = ["## Tokenizer", ""]
    tok, pretok = read_metrics(root, "tokenizer"), read_metrics(root, "pretokenize")
    if not tok and not pretok:
        return lines + ["_The tokenizer has not been trained yet._", ""]
    bars: list[tuple[str, float]] = []
    if tok:
        asked = tok.get("vocab_size_requested", 0)
        lines += [f"Byte-level BPE, {tok.get('vocab_size', 0):,} tokens (asked {asked:,}).", ""]
    if pretok:
        bars += [
            (f"{s} split", pretok[f"{s}_bytes_per_token"]) for s in ("train", "val") if f"{s}_bytes_per_token" in pretok
        ]
        lines += [f"Tokens: {pretok.get('train_tokens', 0):,} train, {pretok.get('val_tokens', 0):,} validation."]
    elif tok and "val_bytes_per_token" in tok:
        bars.append(("val split", tok["val_bytes_per_token"]))
    if bars:
        lines += [
            "Compression (UTF-8 bytes per text token): "
            + ", ".join(f"{n} {v:.3f}" for n, v in bars)
            + "; raw bytes would be 1.0.",
            "",
        ]
        plot = plot_bars(
            "Tokenizer compression", [n for n, _ in bars], [v for _, v in bars], "bytes per token", out, "tokenizer.png"
        )
        lines += [f"![tokenizer compression]({plot.name})", ""]
    return lines


def rl_section(root: Path) -> list[str]:
    """The ppo stage: what ran, how its rollouts moved (reward, checker, reward model, KL), the held-out comparison
    with its starting policy, and a reward-hacking warning when the reward model and the checker disagree."""
    m = read_metrics(root, "ppo")
    if not m:
        return []
    lines = [
        "## Reinforcement learning (ppo stage)",
        "",
        f"{m['algorithm']} on the {m['reward']} reward, from the {m['init']} policy: {m['steps']} steps x "
        f"{m['prompts_per_step']} prompts x {m['group_size']} answers, {m['seconds_per_step']:.1f} s/step, rollouts "
        f"{m.get('rollout_tokens_per_s', 0):,.0f} tokens/s. Per-step curves (entropy, clip fraction, value loss, ...) "
        "are under Training curves.",
        "",
    ]
    moved = [
        [name, f"{m[f'rollout_{key}_first']:.3f}", f"{m[f'rollout_{key}_last']:.3f}"]
        for key, name in RL_CURVES.items()
        if f"rollout_{key}_first" in m
    ]
    lines += _table(["rollouts", "first logged step", "last"], moved) + [""]
    init = m["init"]
    if "win_rate" in m:
        lines += _table(
            ["held-out builtin prompts", init, "ppo"],
            [
                ["constraint satisfaction", f"{m[f'{init}_satisfaction']:.1%}", f"{m['ppo_satisfaction']:.1%}"],
                ["reward model's mean score", f"{m[f'{init}_reward']:+.3f}", f"{m['ppo_reward']:+.3f}"],
                [
                    "repeated lines",
                    f"{m.get(f'{init}_repeated_line_rate', 0):.3f}",
                    f"{m.get('ppo_repeated_line_rate', 0):.3f}",
                ],
                [
                    "words outside the world",
                    f"{m.get(f'{init}_nonword_rate', 0):.3f}",
                    f"{m.get('ppo_nonword_rate', 0):.3f}",
                ],
            ],
        )
        lines += [
            "",
            f"The reward model prefers the ppo answer on {m['win_rate']:.1%} of the prompts; KL(ppo || {init}) along "
            f"the ppo answers {m['kl_to_reference']:.2f} nats.",
            "",
        ]
        if m.get("reward_hacking"):
            lines += [
                "**Reward hacking:** the reward model's score rose while the checker's constraint satisfaction fell: "
                "the policy learned what the reward model likes, not what the prompts ask.",
                "",
            ]
    return lines


RL_CURVES = {"reward": "reward", "checker": "checker score", "rm": "reward model", "kl": "KL to the reference (nats)"}


def samples_section(evaluate_out: Path) -> list[str]:
    file = evaluate_out / "samples.md"
    if not file.is_file():
        return []
    # one heading level down, so the samples sit under the report's title
    lines = file.read_text(encoding="utf-8").splitlines()
    return ["#" + line if line.startswith("#") else line for line in lines] + [""]


def skipped_section(ev: dict | None) -> list[str]:
    if not ev or not ev.get("skipped"):
        return []
    return ["## Skipped", "", *[f"- **{k}**: {v}" for k, v in ev["skipped"].items()], ""]


# ------------------------------------------------------------------------------------------------ report


def build_report(
    root: Path,
    evaluation: dict | None = None,
    tracker: Tracker | None = None,
    out: Path | None = None,
    parent_run_id: str | None = None,
    evaluate_out: Path | None = None,
) -> Path:
    """Write <root>/reports/report.md and its PNGs; log the folder to `tracker`'s run. Returns the .md path.
    `evaluate_out`: the evaluate stage's output folder (its staging folder while the stage runs; data/evaluate)."""
    out = out or root / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()
    ev = evaluation if evaluation is not None else read_metrics(root, "evaluate")
    header = [
        "# scratchlm report card",
        "",
        f"Generated {dt.datetime.now().strftime('%Y-%m-%d %H:%M')} from commit `{git_commit()}`"
        + (
            f", pipeline run `{parent_run_id or os.environ[PARENT_ENV]}`"
            if parent_run_id or os.environ.get(PARENT_ENV)
            else ""
        )
        + ".",
        "",
    ]
    body = (
        models_section(ev, out)
        + degeneration_section(ev)
        + judge_section(ev)
        + benchmarks_section(ev, out)
        + rl_section(root)
        + training_section(root, out, parent_run_id)
        + funnel_section(root, out)
        + tokenizer_section(root, out)
        + samples_section(evaluate_out or root / "data" / "evaluate")
        + skipped_section(ev)
    )
    report = out / "report.md"
    report.write_text("\n".join(header + body).rstrip() + "\n", encoding="utf-8")
    if tracker is not None:
        tracker.log_artifact(out, "report")
    return report
