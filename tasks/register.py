"""register — log the final model to MLflow as a servable pyfunc, register it as `scratchlm`, alias it `@challenger`.

Runbook
    dvc repro register                         # or: scratchlm stage register / python -m tasks.register
    scratchlm chat --model models:/scratchlm@challenger
    MLFLOW_TRACKING_URI=sqlite:///mlruns.db mlflow models serve -m models:/scratchlm@challenger \
        --env-manager local -p 5001            # MLflow's own commands default to ./mlflow.db: name the store
    scratchlm promote                          # then: move @champion here if the gates in params.yaml pass
    The closing summary prints these for a fresh shell in the project folder (`next_commands`): the store as
    `tracking_uri()` names it, after `source .venv/bin/activate` while that environment is not the active one.

Reads   data/<register.model_stage>/model/     the final model (ppo by default): an HF LlamaForCausalLM folder with
                                               its tokenizer and chat template
        metrics/all/evaluate.json             that model's evaluation (bpb, benchmarks, satisfaction, win rates),
                                               found by its stage in `model_stages` (label → stage)
        dvc.lock                               the hashes of the data, params and code the model came from
Writes  MLflow: in this stage's run, a logged model `model` (pyfunc from code: tasks/common/pyfunc.py, artifacts =
                the HF folder, code = model/ + tasks/common/chat.py, signature with prompt/messages inputs and
                max_new_tokens/temperature/top_p/seed params, an input example), registered as a new version of
                `register.model_name` with the alias `register.alias`; the version's tags (about 25): the
                pipeline run id, the git commit, the dvc.lock hashes of the outputs of the model's stage and of
                evaluate, `eval.*` = the model's evaluation (what `flows/promote.py` gates on; `EVAL_TAGS_LEFT_OUT`)
        data/register/registered.json          {name, version, alias, run_id, pipeline_run_id, model_uri, ...,
                                               smoke_test (the logged model's answer to its input example)}
        metrics/register.json                  version and the evaluation numbers it was registered with
Checks  the model folder and its evaluation must exist; MLflow must be on (SCRATCHLM_NO_MLFLOW=1 is an error here);
        before anything is logged the folder is loaded as the pyfunc loads it (every weight finite) and generates a
        few tokens from each input example row; the logged model is loaded back from MLflow and answers its input
        example before it is registered. A model that fails either is one error line naming the file or the
        logged model and what failed, and no version is created.
Scale   the model is logged once per run; on an MLflow server (MLFLOW_TRACKING_URI) with S3/MinIO artifacts the
        same code uploads there. Serving scales with MLflow's own options (workers, Docker images, KServe).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from dataclasses import dataclass
from importlib.metadata import version as package_version
from pathlib import Path

from tasks.common.config import ROOT, ScratchError, check
from tasks.common.dvcio import StagePaths, fresh_dir, read_json, stage_paths, write_json
from tasks.common.stage import stage_main
from tasks.common.tracking import PARENT_ENV, Tracker, dvc_lock_tags, flatten, git_commit, tracking_uri

PYFUNC_FILE = ROOT / "tasks" / "common" / "pyfunc.py"
CODE_PATHS = [ROOT / "model", ROOT / "tasks" / "common" / "chat.py"]
INPUT_EXAMPLE_PROMPT = "Write a short story about a cat named Tom who goes to the park."


@dataclass(frozen=True)
class RegisterConfig:
    model_name: str = "scratchlm"
    """Registered model name in the MLflow model registry."""
    model_stage: str = "ppo"
    """The stage whose data/<stage>/model folder is the final model: ppo (GRPO on the checker passes the degeneration
    gates where DPO's title stacks do not; docs/BENCHMARKS.md), dpo, or sft / pretrain for a shorter pipeline."""
    alias: str = "challenger"
    """Alias the new version gets; `flows/promote.py` moves @champion to it when the gates pass."""

    def __post_init__(self) -> None:
        check(bool(self.model_name.strip()), "model_name", "must not be empty")
        check(
            self.alias not in ("", "champion", "latest"),
            "alias",
            "must name the candidate (e.g. challenger); @champion is moved only by the promote flow",
        )


Config = RegisterConfig  # the section class params.yaml loads (tasks/common/config.py)


# ------------------------------------------------------------------------------------------------ inputs


def model_folder(paths: StagePaths, stage: str) -> Path:
    folder = paths.of(stage) / "model"
    if not (folder / "config.json").is_file() or not (folder / "tokenizer.json").is_file():
        raise ScratchError(
            f"{folder}: no exported model (config.json + tokenizer.json); run `dvc repro {stage}` "
            f"or set register.model_stage"
        )
    return folder


def model_evaluation(root: Path, stage: str) -> dict:
    """The evaluation of the model that `stage` produced, from metrics/all/evaluate.json: its `model_stages` says
    which label evaluate gave each stage's model."""
    file = stage_paths("evaluate", root).details
    if not file.is_file():
        raise ScratchError(f"{file}: missing; run `dvc repro evaluate` before register")
    metrics = read_json(file)
    stages = metrics.get("model_stages")
    if not isinstance(stages, dict):
        raise ScratchError(f"{file}: no `model_stages` (label → stage of each evaluated model); rerun evaluate")
    found = [label for label, s in stages.items() if s == stage and isinstance(metrics.get(label), dict)]
    if not found:
        raise ScratchError(
            f"{file}: no evaluation of the {stage!r} model (evaluated: "
            f"{', '.join(f'{k} ({v})' for k, v in stages.items()) or 'none'}); add it to "
            f"evaluate.models and rerun evaluate, or set register.model_stage"
        )
    label = found[0]
    return {"label": label, **metrics[label], "win_rate": metrics.get("win_rate", {})}


EVAL_TAGS_LEFT_OUT = ("per_constraint.", "val_docs", "val_tokens", "val_ppl", "fluency_nll", "distinct_1")
"""Evaluation figures not made version tags: per-kind detail, counts and figures another tag implies (val_ppl =
e^val_loss; fluency_gap is fluency_nll less the base's loss). They stay in the run's metrics artifact
(metrics/all/evaluate.json) and in the report card."""


def eval_tags(evaluation: dict) -> dict[str, str]:
    """`eval.<key>` tags from an evaluation: the numbers the promotion gates read back and a person compares
    versions by (bits per byte, satisfaction, benchmarks, degeneration, win rates), not `EVAL_TAGS_LEFT_OUT`."""
    flat = flatten({k: v for k, v in evaluation.items() if k != "label"})
    return {
        f"eval.{k}": str(v)
        for k, v in flat.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.startswith(EVAL_TAGS_LEFT_OUT)
    }


def lineage_tags(model_stage: str, root: Path = ROOT) -> dict[str, str]:
    """Git commit and the dvc.lock hashes of the outputs of the model's stage and of evaluate: what a version was
    built from is the commit plus those outputs (every dependency's hash is in the run's `lineage/dvc.lock`)."""
    tags = {"git_commit": git_commit(), "model_stage": model_stage}
    for stage in (model_stage, "evaluate"):
        locked = dvc_lock_tags(stage, root / "dvc.lock")
        tags.update(
            {f"dvc.{stage}.{k.removeprefix('dvc.')}": v for k, v in locked.items() if k.startswith("dvc.outs.")}
        )
    return tags


# ------------------------------------------------------------------------------------------------ MLflow


def pip_requirements() -> list[str]:
    """The packages the pyfunc imports, pinned to what runs here (so `--env-manager virtualenv` rebuilds it)."""
    return [f"{p}=={package_version(p)}" for p in ("mlflow", "torch", "tokenizers", "safetensors", "pandas", "numpy")]


def signature():
    from tasks.common.pyfunc import signature as pyfunc_signature

    return pyfunc_signature()


def input_example() -> tuple:
    import pandas as pd  # here, not at the top: pandas (~1 s) would weigh on every `scratchlm params --check`

    # every row names both inputs (an empty one is absent): a column missing from some rows would be NaN there
    frame = pd.DataFrame(
        [
            {"prompt": "", "messages": [{"role": "user", "content": INPUT_EXAMPLE_PROMPT}]},
            {"prompt": "Once upon a time", "messages": []},
        ]
    )
    return frame, {"max_new_tokens": 16, "temperature": 0.8, "top_p": 0.95, "seed": 0}


def log_and_register(folder: Path, cfg: RegisterConfig, run_id: str, tags: dict[str, str]):
    """Log the pyfunc into run `run_id`, load it back (`smoke_test`), then register it and tag the version; returns
    (ModelVersion, logged model uri, the smoke test's answer). A logged model that fails to load or answer is never
    registered."""
    import mlflow

    client = mlflow.MlflowClient()
    with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):  # log_model logs to the active run
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_FILE),
            artifacts={"model": str(folder)},
            code_paths=[str(p) for p in CODE_PATHS],
            signature=signature(),
            input_example=input_example(),
            pip_requirements=pip_requirements(),
        )
    sample = smoke_test(info.model_uri)
    version = mlflow.register_model(info.model_uri, cfg.model_name, tags=tags)
    for key, value in tags.items():  # register_model's tags land on the version; set again for older servers
        client.set_model_version_tag(cfg.model_name, version.version, key, value)
    return version, info.model_uri, sample


def smoke_test(model_uri: str) -> str:
    """Load the logged model back as MLflow will serve it and generate from its input example (before it is
    registered: a failure is a ScratchError naming the logged model)."""
    import mlflow

    frame, params = input_example()
    try:
        out = mlflow.pyfunc.load_model(model_uri).predict(frame.iloc[:1], params=params)
    except Exception as e:
        raise ScratchError(
            f"{model_uri}: the logged model does not load back or answer its input example ({one_line(e)}); "
            "nothing was registered"
        ) from e
    text = out[0].get("text") if isinstance(out, list) and out and isinstance(out[0], dict) else None
    if not isinstance(text, str):
        raise ScratchError(
            f"{model_uri}: the logged model answered {str(out)[:200]!r}, not text; nothing was registered"
        )
    return text


# ------------------------------------------------------------------------------------------------ verification

VERIFY_NEW_TOKENS = 4
"""Tokens generated per input example row when the model folder is verified before logging."""


def one_line(error: BaseException, limit: int = 300) -> str:
    """`Type: first line of the message`, shortened: what a one-line error says of an exception."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def weight_files(folder: Path) -> list[Path]:
    """model.safetensors, or the shards its index names (what model.hf.load reads)."""
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file() or not index.is_file():
        return [folder / "model.safetensors"]
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return [index]
    return [folder / shard for shard in shards]


def broken_file(folder: Path) -> Path:
    """The first file of `folder` that does not read on its own (config.json, the weights, tokenizer.json), else
    the folder: names what to fix when the folder as a whole does not load. Headers only, no tensor is read."""
    from safetensors import safe_open
    from tokenizers import Tokenizer

    from model.hf import load_config

    checks = [(folder / "config.json", lambda f: load_config(f.parent))]
    checks += [(f, lambda f: safe_open(str(f), "pt").keys()) for f in weight_files(folder)]
    checks += [(folder / "tokenizer.json", lambda f: Tokenizer.from_file(str(f)))]
    for file, read in checks:
        try:
            read(file)
        except Exception:
            return file
    return folder


def verify_model(folder: Path, stage: str) -> str:
    """Load `folder` as the registered pyfunc will (tasks/common/pyfunc.py: load_folder), check every weight is
    finite and generate a few tokens from each input example row; returns the first row's text. Any failure is a
    ScratchError naming the file (or folder) and what failed: such a model is never logged or registered."""
    import torch

    from tasks.common.pyfunc import ScratchLMModel

    fix = f"nothing was registered; restore it (dvc checkout data/{stage}) or rebuild it (dvc repro {stage})"
    try:
        pyfunc = ScratchLMModel().load_folder(folder)
    except Exception as e:
        file = broken_file(folder)
        reason = one_line(e).replace(f"{file}: ", "").replace(f"{folder}: ", "")
        raise ScratchError(f"{file}: the {stage} model does not load ({reason}); {fix}") from e
    bad = [name for name, p in pyfunc.model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        files = weight_files(folder)
        where = files[0] if len(files) == 1 else folder
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise ScratchError(f"{where}: the {stage} model has NaN or infinite weights ({bad[0]}{more}); {fix}")
    frame, params = input_example()
    try:
        out = pyfunc.predict(None, frame, params={**params, "max_new_tokens": VERIFY_NEW_TOKENS})
    except Exception as e:
        raise ScratchError(f"{folder}: the {stage} model loads but does not generate ({one_line(e)}); {fix}") from e
    texts = [row.get("text") if isinstance(row, dict) else None for row in out]
    if len(texts) != len(frame) or not all(isinstance(t, str) for t in texts):
        raise ScratchError(f"{folder}: the {stage} model answered {str(out)[:200]!r}, not text; {fix}")
    return texts[0]


# ------------------------------------------------------------------------------------------------ stage


def run(cfg: RegisterConfig, paths: StagePaths, tracker: Tracker) -> dict:
    if not tracker.active:
        raise ScratchError("register needs MLflow (unset SCRATCHLM_NO_MLFLOW); the model registry lives there")
    folder = model_folder(paths, cfg.model_stage)
    evaluation = model_evaluation(paths.root, cfg.model_stage)
    verify_model(folder, cfg.model_stage)  # before anything is logged: a broken model never becomes a version
    pipeline_run = os.environ.get(PARENT_ENV) or tracker.run_id  # run alone (dvc repro), the stage is the pipeline
    tags = {
        **lineage_tags(cfg.model_stage, paths.root),
        "pipeline_run_id": pipeline_run,
        "run_id": tracker.run_id,
        "eval_label": evaluation["label"],
        **eval_tags(evaluation),
    }
    import mlflow

    client = mlflow.MlflowClient()
    version, logged_uri, sample = log_and_register(folder, cfg, tracker.run_id, tags)
    client.set_registered_model_alias(cfg.model_name, cfg.alias, version.version)
    client.update_registered_model(
        cfg.model_name,
        description="scratchlm: a Llama-style LM built from scratch by "
        "the scratchlm pipeline (chat or plain-text generation pyfunc).",
    )
    record = {
        "name": cfg.model_name,
        "version": int(version.version),
        "alias": cfg.alias,
        "run_id": tracker.run_id,
        "pipeline_run_id": tags["pipeline_run_id"],
        "model_uri": f"models:/{cfg.model_name}@{cfg.alias}",
        "version_uri": f"models:/{cfg.model_name}/{version.version}",
        "logged_model_uri": logged_uri,
        "model_stage": cfg.model_stage,
        "eval_label": evaluation["label"],
        "git_commit": tags["git_commit"],
        "smoke_test": sample,
    }
    out = fresh_dir(paths.out)  # only now: a refused model leaves the previous registered.json in place
    write_json(out / "registered.json", record)
    tracker.log_artifact(out / "registered.json", "register")
    if (paths.root / "dvc.lock").is_file():
        tracker.log_artifact(paths.root / "dvc.lock", "lineage")
    numbers = {k.removeprefix("eval."): float(v) for k, v in eval_tags(evaluation).items()}
    return {"version": record["version"], "eval": numbers}


# ------------------------------------------------------------------------------------------------ next commands

SERVE_PORT = 5001
"""The port the printed serve command listens on."""
NOTES = {
    "first": "(once per new shell: make uses .venv without activating it in yours)",
    "serve": '(requests: README.md, "Serving")',
    "promote": "(moves @champion here when the gates in params.yaml pass)",
}
"""What the closing summary says beside each next command."""


def activate_command() -> str | None:
    """`source .venv/bin/activate` when this Python is a virtual environment that is not the active one (`make run`
    puts .venv/bin on its own PATH only), else None. A fresh shell needs it before `scratchlm` and `mlflow`, and
    `mlflow models serve` needs it even when called by path: it starts `uvicorn` from PATH."""
    if sys.prefix == sys.base_prefix:
        return None
    active = os.environ.get("VIRTUAL_ENV")
    if active and Path(active).resolve() == Path(sys.prefix).resolve():
        return None
    script = Path(sys.prefix).resolve() / "bin" / "activate"
    return f"source {shlex.quote(str(script.relative_to(ROOT) if script.is_relative_to(ROOT) else script))}"


def serve_command(model_uri: str, port: int = SERVE_PORT) -> str:
    """`mlflow models serve` for `model_uri`, told the tracking store the project uses (unset, MLflow would look in
    ./mlflow.db, create it, and find no registered model)."""
    return (
        f"MLFLOW_TRACKING_URI={shlex.quote(tracking_uri())} mlflow models serve "
        f"-m {shlex.quote(model_uri)} --env-manager local -p {port}"
    )


def ui_command() -> str:
    """How to browse the tracking store: `mlflow ui --backend-store-uri <uri>` for a local one, the server's URL."""
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {shlex.quote(uri)}"


def next_commands(record: dict) -> dict[str, str]:
    """What to run once `record` (registered.json) is registered, in order, for a fresh shell in the project folder:
    activate the environment (when needed), chat with the version, serve it (the alias it has now), promote it."""
    activate = activate_command()
    return {
        **({"first": activate} if activate else {}),
        "chat": f"scratchlm chat --model {shlex.quote(record['model_uri'])}",
        "serve": serve_command(record["model_uri"]),
        "promote": "scratchlm promote",
    }


def summary(m: dict, paths: StagePaths) -> list[str]:
    """Which version got the alias, what it answered, and the next commands (chat, serve, promote)."""
    r = read_json(paths.out / "registered.json")
    return [
        f"{r['name']} version {r['version']} is @{r['alias']}: the {r['model_stage']} model, evaluated as "
        f"{r['eval_label']!r}"
        + "".join(f", {k} {m['eval'][k]:.4f}" for k in ("val_bpb", "satisfaction") if k in m["eval"]),
        f"smoke test answered {r['smoke_test'][:60]!r}",
        *next_command_lines(r),
    ]


def next_command_lines(record: dict) -> list[str]:
    """`name     command   (note)` per next command (the closing summaries of register and `scratchlm run`)."""
    return [
        f"{name:<8} {command}" + (f"   {NOTES[name]}" if name in NOTES else "")
        for name, command in next_commands(record).items()
    ]


HEADLINE = ("version",)
"""What metrics/register.json keeps (`dvc metrics diff`); every figure is in metrics/all/register.json."""


if __name__ == "__main__":
    stage_main("register", RegisterConfig, run, summary, HEADLINE)
