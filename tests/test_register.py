"""The register stage against a real (SQLite) MLflow registry: a pyfunc version of the DPO model with its HF
folder, signature and input example, the @challenger alias, lineage and evaluation tags, registered.json; the
registered model generates exactly what our own generate() does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model.generate import generate
from model.hf import load
from tasks.common.alignment import load_tokenizer
from tasks.common.chat import encode_chat
from tasks.common.config import ScratchError
from tasks.common.dvcio import stage_paths
from tasks.common.tracking import Tracker, setup_mlflow
from tasks.register import RegisterConfig, activate_command, model_evaluation, next_commands, run, summary
from tests.conftest import ROOT
from tests.evaluate_fixtures import evaluation, registry_project, run_register


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    root = tmp_path_factory.mktemp("register")
    with pytest.MonkeyPatch.context() as mp:
        registry_project(root, mp)
        import mlflow

        setup_mlflow()
        parent = mlflow.MlflowClient().create_run(
            mlflow.get_experiment_by_name("scratchlm").experiment_id, run_name="build_llm"
        )  # the flow's parent run
        mp.setenv("SCRATCHLM_PARENT_RUN_ID", parent.info.run_id)
        record = run_register(root)
        yield root, record, parent.info.run_id


def test_version_alias_and_record(registered):
    import mlflow

    root, record, parent = registered
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias("scratchlm", "challenger")
    assert record["name"] == "scratchlm" and record["alias"] == "challenger"
    assert int(version.version) == record["version"] and record["model_uri"] == "models:/scratchlm@challenger"
    assert version.run_id == record["run_id"] and record["pipeline_run_id"] == parent
    assert client.get_run(record["run_id"]).info.run_name == "register"
    saved = json.loads((root / "data/register/registered.json").read_text())
    assert saved == record and isinstance(record["smoke_test"], str) and record["eval_label"] == "dpo"
    said = summary({"version": record["version"], "eval": {"val_bpb": 1.5}}, stage_paths("register", root=root))
    assert (
        said[0] == f"scratchlm version {record['version']} is @challenger: the dpo model, evaluated as 'dpo', "
        "val_bpb 1.5000"
    )
    assert said[-3].startswith("chat     scratchlm chat --model models:/scratchlm@challenger")
    assert said[-2].startswith("serve    MLFLOW_TRACKING_URI=") and "(requests: README.md" in said[-2]
    assert said[-1].startswith("promote  scratchlm promote")


def readme_row(row: str) -> str:
    """The command README.md's "Using it" table gives for `row`."""
    lines = (ROOT / "README.md").read_text().splitlines()
    return next(line.split("`")[1] for line in lines if line.startswith(f"| {row} | `"))


def test_printed_commands_are_the_readmes_for_this_store(registered):
    """What the summaries print is README.md's command with the store the project uses (tracking_uri: an
    absolute path, so it also works outside the project folder), and `scratchlm chat` for the registered URI."""
    from tasks.common.tracking import tracking_uri

    commands = next_commands({"model_uri": "models:/scratchlm@challenger"})
    readme = readme_row("serve the new model").replace("sqlite:///mlruns.db", tracking_uri())
    assert commands["serve"] == readme and tracking_uri().startswith("sqlite:///")
    assert commands["promote"] == readme_row("promote it") == "scratchlm promote"
    assert readme_row("serve the champion") == readme_row("serve the new model").replace("@challenger", "@champion")


def test_a_fresh_shell_is_told_to_activate_the_environment(monkeypatch):
    import sys

    monkeypatch.setattr(sys, "prefix", str(ROOT / ".venv"))
    monkeypatch.setattr(sys, "base_prefix", "/usr")
    monkeypatch.delenv("VIRTUAL_ENV", raising=False)  # `make run`: .venv on make's PATH, not activated
    assert activate_command() == "source .venv/bin/activate"
    assert next(iter(next_commands({"model_uri": "models:/m@a"}).items())) == ("first", "source .venv/bin/activate")
    monkeypatch.setenv("VIRTUAL_ENV", str(ROOT / ".venv"))  # the user's shell has activated it
    assert activate_command() is None and "first" not in next_commands({"model_uri": "models:/m@a"})
    monkeypatch.delenv("VIRTUAL_ENV")
    monkeypatch.setattr(sys, "base_prefix", sys.prefix)  # no virtual environment: nothing to activate
    assert activate_command() is None


def test_the_scoring_server_refuses_wrongly_shaped_requests(registered, monkeypatch):
    """MLflow's own scoring app (in process): a documented request answers 200 with one text per row; a request
    with no usable row, a bad role or an input longer than the context answers 400 with the reason."""
    import mlflow
    from mlflow.pyfunc import scoring_server
    from starlette.testclient import TestClient

    monkeypatch.setenv("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "false")  # init() sets it; restored afterwards
    client = TestClient(scoring_server.init(mlflow.pyfunc.load_model("models:/scratchlm@challenger")))

    def post(body: dict):
        answer = client.post("/invocations", json=body)
        return answer.status_code, answer.json()

    readme = (ROOT / "README.md").read_text()
    documented = json.loads(readme.split("-d '", 1)[1].split("'", 1)[0])  # the curl example's body
    status, body = post({**documented, "params": {"max_new_tokens": 3}})
    assert status == 200 and [sorted(p) for p in body["predictions"]] == [["text"], ["text"]]
    mixed = {"dataframe_records": [{"messages": [{"role": "user", "content": "Hi!"}]}, {"prompt": "Once"}]}
    status, body = post(mixed)  # MLflow's own check: the prompt row's missing `messages` is NaN (README says so)
    assert status == 400 and "Failed to convert column messages" in body["message"]
    cases = [
        ({"dataframe_records": [{"foo": "bar"}]}, "the request has no input row with `messages` or `prompt`"),
        ({"dataframe_records": []}, "the request has no input row"),
        ({"dataframe_records": [{"foo": 1}, {"prompt": "x"}]}, "input row 0: needs `messages`"),
        (
            {"dataframe_records": [{"messages": [{"role": "bot", "content": "x"}]}]},
            "input row 0: messages[0]: role must be one of system, user, assistant, got 'bot'",
        ),
        ({"dataframe_records": [{"prompt": "Tom went to the park. " * 200}]}, "input row 0: the input is"),
    ]
    for request, reason in cases:
        status, body = post(request)
        assert status == 400 and body["error_code"] == "INVALID_PARAMETER_VALUE" and reason in body["message"], body


REGISTER_RUN_TAGS = {"git_commit", "model_stage", "pipeline_run_id", "run_id", "eval_label"}


def test_version_tags_trace_lineage_and_evaluation(registered):
    import mlflow

    root, record, parent = registered
    tags = mlflow.MlflowClient().get_model_version("scratchlm", str(record["version"])).tags
    assert tags["pipeline_run_id"] == parent and tags["run_id"] == record["run_id"]
    assert tags["git_commit"] and tags["git_commit"] != "unknown"
    assert tags["dvc.dpo.outs.data/dpo"] == "1111.dir" and tags["dvc.evaluate.outs.data/evaluate"] == "2222.dir"
    assert float(tags["eval.val_bpb"]) == 1.5 and float(tags["eval.satisfaction"]) == 0.25
    assert float(tags["eval.bench.cloze.acc"]) == 0.5 and float(tags["eval.win_rate.dpo_vs_sft"]) == 0.6
    assert tags["eval_label"] == "dpo"
    # fewer tags, grouped: no dependency hashes (the run's lineage/dvc.lock has them), no per-kind detail
    assert "dvc.evaluate.deps.data/dpo" not in tags and not any(".deps." in k for k in tags), sorted(tags)
    assert not any(k.startswith("eval.per_constraint.") for k in tags), sorted(tags)
    assert all(k.startswith(("eval.", "dvc.")) or k in REGISTER_RUN_TAGS for k in tags), sorted(tags)


def test_logged_model_has_folder_signature_and_example(registered):
    import mlflow

    _, record, _ = registered
    info = mlflow.models.get_model_info(record["version_uri"])
    assert [i["name"] for i in info.signature.inputs.to_dict()] == ["prompt", "messages"]
    assert {p.name for p in info.signature.params.params} == {"max_new_tokens", "temperature", "top_p", "seed"}
    local = mlflow.artifacts.download_artifacts(record["version_uri"])
    files = {p.name for p in Path(local).rglob("*")}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    assert "chat_template" in json.loads(next(Path(local).rglob("tokenizer_config.json")).read_text())
    assert {"input_example.json", "serving_input_example.json", "chat.py"} <= files


def test_pyfunc_generates_what_our_generate_does(registered):
    import mlflow
    import pandas as pd

    root, record, _ = registered
    pyfunc = mlflow.pyfunc.load_model("models:/scratchlm@challenger")
    params = {"max_new_tokens": 10, "temperature": 0.8, "top_p": 0.95, "seed": 3}
    messages = [{"role": "user", "content": "Tell me a story about a fox."}]
    out = pyfunc.predict(
        pd.DataFrame([{"prompt": "", "messages": messages}, {"prompt": "Once upon", "messages": []}]), params=params
    )
    model, tok = load(root / "data/dpo/model"), load_tokenizer(root / "data/dpo/model")
    chat_ids = encode_chat(tok.tok, messages, add_generation_prompt=True)[0]
    want_chat = generate(model, [chat_ids], 10, temperature=0.8, top_p=0.95, stop_tokens=tok.stop_ids, seed=3)[0]
    text_ids = [tok.special["<|endoftext|>"], *tok.plain("Once upon")]
    want_text = generate(
        model, [text_ids], 10, temperature=0.8, top_p=0.95, stop_tokens=[tok.special["<|endoftext|>"]], seed=3
    )[0]
    decode = lambda ids: tok.tok.decode(ids, skip_special_tokens=False)  # noqa: E731
    assert [o["text"] for o in out] == [decode(want_chat), decode(want_text)]


def test_register_refuses_without_mlflow_or_evaluation(tmp_path):
    with pytest.raises(ScratchError, match="register needs MLflow"):
        run(RegisterConfig(), stage_paths("register", root=tmp_path), Tracker("register", None))
    with pytest.raises(ScratchError, match=r"data/ppo/model: no exported model .*dvc repro ppo"):
        run(RegisterConfig(), stage_paths("register", root=tmp_path), Tracker("register", "some-run"))


def test_the_evaluation_is_found_by_the_stage_evaluate_recorded(tmp_path):
    file = tmp_path / "metrics" / "all" / "evaluate.json"
    file.parent.mkdir(parents=True)
    with pytest.raises(ScratchError, match=r"evaluate.json: missing; run `dvc repro evaluate`"):
        model_evaluation(tmp_path, "dpo")
    metrics = {**evaluation(), "model_stages": {"base": "pretrain", "sft": "sft", "aligned": "dpo"}}
    metrics["aligned"] = metrics.pop("dpo")
    file.write_text(json.dumps(metrics))
    found = model_evaluation(tmp_path, "dpo")  # a label other than the stage's name, as evaluate.models allows
    assert found["label"] == "aligned" and found["val_bpb"] == 1.5 and found["win_rate"]["dpo_vs_sft"] == 0.6
    with pytest.raises(ScratchError, match=r"no evaluation of the 'reward' model \(evaluated: base \(pretrain\)"):
        model_evaluation(tmp_path, "reward")
    file.write_text(json.dumps({k: v for k, v in metrics.items() if k != "model_stages"}))
    with pytest.raises(ScratchError, match="no `model_stages`"):
        model_evaluation(tmp_path, "dpo")


def test_alias_champion_is_reserved_for_promotion():
    with pytest.raises(ScratchError, match="alias"):
        RegisterConfig(alias="champion")
