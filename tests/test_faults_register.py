"""Fault injection, a broken model at register (issue 16, item 8): the model folder is loaded and generates before
anything is logged, and the logged model answers before it is registered; a broken one is one ScratchError naming
the file and what failed, no new version appears in the registry, @challenger stays where it was and the previous
registered.json is left in place."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tasks.common.config import ScratchError
from tasks.register import verify_model
from tests.evaluate_fixtures import registered, run_register, tiny_model, train_tokenizer

FIX = r"nothing was registered; restore it \(dvc checkout data/dpo\) or rebuild it \(dvc repro dpo\)"


@pytest.fixture(scope="module")
def good_model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("verify")
    return tiny_model(root / "model", train_tokenizer(root / "tokenizer"), seed=5)


@pytest.fixture
def model(good_model, tmp_path) -> Path:
    return Path(shutil.copytree(good_model, tmp_path / "model"))


def truncate(file: Path, keep: int) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: keep if keep >= 0 else len(data) // 2])


def test_a_good_model_passes(model):
    assert isinstance(verify_model(model, "dpo"), str)


@pytest.mark.parametrize("keep", [-1, 100, 0], ids=["half", "header", "empty"])
def test_truncated_weights_name_the_file(model, keep):
    truncate(model / "model.safetensors", keep)
    with pytest.raises(ScratchError) as e:
        verify_model(model, "dpo")
    assert str(e.value).startswith(f"{model / 'model.safetensors'}: the dpo model does not load (SafetensorError: ")
    assert "\n" not in str(e.value) and str(e.value).endswith("or rebuild it (dvc repro dpo)")


def test_missing_weights_config_or_tokenizer_name_the_file(model):
    (model / "model.safetensors").unlink()
    with pytest.raises(ScratchError, match=rf"^{model / 'model.safetensors'}: the dpo model does not load"):
        verify_model(model, "dpo")


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json"])
def test_a_truncated_json_file_is_named(model, name):
    truncate(model / name, -1)
    with pytest.raises(ScratchError, match=rf"^{model / name}: the dpo model does not load \(.*\); {FIX}$"):
        verify_model(model, "dpo")


def test_nan_weights_are_refused(model):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(model / "model.safetensors"))
    name = sorted(tensors)[0]
    tensors[name][0] = float("nan")
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ScratchError, match=rf"^{model / 'model.safetensors'}: the dpo model has NaN or infinite"):
        verify_model(model, "dpo")


def test_a_model_that_loads_but_cannot_generate_is_refused(good_model, tmp_path):
    # a context shorter than the input example's chat prompt: it loads, but answers nothing
    short = tiny_model(tmp_path / "model", good_model, seed=1, max_seq_len=8)
    with pytest.raises(ScratchError, match=rf"^{short}: the dpo model loads but does not generate \(MlflowException: "):
        verify_model(short, "dpo")  # the pyfunc's own refusal: "the input is 45 tokens; the model's context is 8"


# ------------------------------------------------------------------------------------------------ through MLflow


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A project with one good version registered (@challenger on it), MLflow pointed at its SQLite store."""
    with registered(tmp_path_factory, "faults_register") as project:
        yield project


def versions() -> list[str]:
    import mlflow

    return sorted(str(v.version) for v in mlflow.MlflowClient().search_model_versions("name = 'scratchlm'"))


def assert_nothing_registered(root: Path, record: dict, before: bytes) -> None:
    import mlflow

    client = mlflow.MlflowClient()
    assert versions() == [str(record["version"])]
    assert str(client.get_model_version_by_alias("scratchlm", "challenger").version) == str(record["version"])
    assert (root / "data" / "register" / "registered.json").read_bytes() == before
    failed = mlflow.search_runs(
        experiment_names=["scratchlm"], output_format="list", order_by=["attributes.start_time DESC"], max_results=1
    )[0]
    assert failed.info.run_name == "register" and failed.info.status == "FAILED"


@pytest.mark.slow
def test_truncated_dpo_weights_register_no_version(registry):
    root, record = registry
    weights = root / "data" / "dpo" / "model" / "model.safetensors"
    good = weights.read_bytes()
    before = (root / "data" / "register" / "registered.json").read_bytes()
    try:
        truncate(weights, -1)
        with pytest.raises(ScratchError, match=rf"^{weights}: the dpo model does not load \(SafetensorError: "):
            run_register(root)
    finally:
        weights.write_bytes(good)
    assert_nothing_registered(root, record, before)
    assert json.loads(before)["version"] == record["version"]


@pytest.mark.slow
def test_a_logged_model_that_does_not_load_back_is_not_registered(registry, monkeypatch):
    import mlflow

    root, record = registry
    before = (root / "data" / "register" / "registered.json").read_bytes()

    def broken(uri, *args, **kwargs):
        raise OSError("artifact store returned a truncated file")

    monkeypatch.setattr(mlflow.pyfunc, "load_model", broken)
    with pytest.raises(
        ScratchError, match=r"^models:/\S+: the logged model does not load back .*nothing was registered"
    ):
        run_register(root)
    assert_nothing_registered(root, record, before)
