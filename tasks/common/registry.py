"""The model registry's side of loading: a logged scratchlm pyfunc (models:/ or runs:/ URI) to its HF folder.

    folder = download_model("models:/scratchlm@champion", workdir)    # workdir/<...>/model: config.json, ...

Used by `scratchlm chat` and `scratchlm serve` (flows/commands.py) and by a registered judge (tasks/common/judge.py).
"""

from __future__ import annotations

from pathlib import Path

from tasks.common.config import ScratchError
from tasks.common.tracking import setup_mlflow


def download_model(uri: str, workdir: Path, key: str = "") -> Path:
    """Download a logged scratchlm pyfunc (a models:/ or runs:/ URI) and return its HF model folder (the `model`
    artifact): what chat, serve and the judge load. `key` names the param the URI came from in the errors
    ("evaluate.judge.model: models:/... cannot be loaded"); without it the URI leads ("models:/...: cannot ...")."""
    where = f"{key}: {uri}" if key else f"{uri}:"
    import yaml
    from mlflow.exceptions import MlflowException

    mlflow = setup_mlflow()
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(workdir)))
    except MlflowException as e:
        raise ScratchError(
            f"{where} cannot be loaded from {mlflow.get_tracking_uri()} ({e.message.splitlines()[0]})"
        ) from e
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    artifact = mlmodel.get("flavors", {}).get("python_function", {}).get("artifacts", {}).get("model", {})
    if not artifact:
        raise ScratchError(f"{where} not a scratchlm model (no `model` artifact in its MLmodel)")
    return local / artifact["path"]
