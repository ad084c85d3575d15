"""params.yaml validation: every kind of mistake fails before any work, naming the file and the key."""

from __future__ import annotations

import pytest
import yaml

from tasks.common.config import ConfigError, DataConfig, describe, load_section
from tasks.common.params_check import load_all
from tests.conftest import ROOT


def write_params(tmp_path, mutate) -> str:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    mutate(params)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return str(path)


def test_repository_params_are_valid():
    sections = load_all()
    assert {"data", "model", "ingest"} <= set(sections)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda p: p["ingest"].update(doc_per_shard=3),
            "params.yaml: ingest.doc_per_shard: unknown key (did you mean 'docs_per_shard'?)",
        ),
        (
            lambda p: p["ingest"].update(docs_per_shard="many"),
            "params.yaml: ingest.docs_per_shard: expected int, got str ('many')",
        ),
        (lambda p: p["ingest"].update(docs_per_shard=0), "params.yaml: ingest.docs_per_shard: must be >= 1"),
        (
            lambda p: p["ingest"].update(txt_tail="drop"),
            "params.yaml: ingest.txt_tail: must be one of 'quarantine', 'keep', got 'drop'",
        ),
        (
            lambda p: p["data"]["builtin"].update(junk_rate=1.5),
            "params.yaml: data.builtin.junk_rate: must be in [0, 1)",
        ),
        (
            lambda p: p["data"]["builtin"].update(seed=True),
            "params.yaml: data.builtin.seed: expected int, got bool (True)",
        ),
        (
            lambda p: p["data"]["parallel"].update(runner="ray"),
            "params.yaml: data.parallel.runner: must be one of 'local', 'dask', got 'ray'",
        ),
        (lambda p: p["data"].pop("sources"), "params.yaml: data.sources: missing key (Where documents come from"),
        (lambda p: p["data"].update(sources="builtin:stories"), "params.yaml: data.sources: expected a list, got str"),
        (lambda p: p.update(ingets={}), "params.yaml: unknown section 'ingets'"),
    ],
)
def test_bad_params_fail_naming_file_and_key(tmp_path, mutate, message):
    path = write_params(tmp_path, mutate)
    with pytest.raises(ConfigError) as err:
        load_all(path)
    assert message in str(err.value)


def test_missing_section_and_missing_file(tmp_path):
    path = write_params(tmp_path, lambda p: p.pop("ingest"))
    with pytest.raises(ConfigError, match="missing section 'ingest'"):
        load_section("ingest", path=path)
    with pytest.raises(ConfigError, match="params file not found"):
        load_section("ingest", path=tmp_path / "nope.yaml")


def test_configs_are_frozen_and_documented():
    data = load_section("data", DataConfig)
    with pytest.raises(AttributeError):
        data.text_field = "body"  # type: ignore[misc]
    rows = describe(DataConfig)
    assert all(doc != "undocumented" for _, _, doc in rows), rows
    assert rows[[r[0] for r in rows].index("builtin.n_docs")][:2] == ("builtin.n_docs", "int")


def test_every_section_documents_every_field():
    from tasks.common.config import read_params, section_class

    for name in read_params():
        undocumented = [key for key, _, doc in describe(section_class(name)) if doc == "undocumented"]
        assert not undocumented, f"{name}: fields without a docstring: {undocumented}"


def test_params_and_dvc_yaml_parse_with_dvcs_yaml_reader():
    """DVC reads params.yaml with ruamel (stricter than PyYAML: e.g. `[builtin:x]` is an error there)."""
    from ruamel.yaml import YAML

    for name in ("params.yaml", "dvc.yaml"):
        YAML(typ="rt").load((ROOT / name).read_text())


# ------------------------------------------------------------------------------------------------ one source of truth


def test_code_defaults_are_the_params_yaml_values():
    """params.yaml is the authority; every dataclass default repeats its value, so a config built in code (tests,
    notebooks) means what the same keys mean in the pipeline. Sections with a required key (data.sources) excepted."""
    import dataclasses

    from tasks.common.config import read_params, section_class

    differ = {}
    for name, loaded in load_all().items():
        cls = section_class(name)
        if any(
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            for f in dataclasses.fields(cls)
        ):
            continue
        if loaded != cls():
            differ[name] = {k: (v, getattr(cls(), k)) for k, v in vars(loaded).items() if v != getattr(cls(), k)}
    assert not differ, f"params.yaml value vs code default: {differ}"
    assert {"train", "sampling", "pretrain", "sft", "reward", "dpo", "evaluate"} <= set(read_params())


def test_a_stage_inherits_the_train_and_sampling_bases_and_overrides_single_keys(tmp_path):
    def mutate(p):
        p["train"]["beta2"] = 0.99
        p["sampling"]["top_p"] = 0.5
        p["sft"]["train"] = {"lr": 1.0e-5}

    path = write_params(tmp_path, mutate)
    sft, reward = load_section("sft", path=path), load_section("reward", path=path)
    assert (sft.train.lr, sft.train.beta2, sft.sampling.top_p) == (1.0e-5, 0.99, 0.5)
    assert (reward.train.lr, reward.train.beta2) == (3.0e-4, 0.99)  # reward's own override, the base's beta2
    assert load_section("pretrain", path=path).train.max_tokens == 4_500_000


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda p: p["sft"].update(train={"lrr": 1.0}), "params.yaml: sft.train.lrr: unknown key (did you mean 'lr'?)"),
        (lambda p: p["train"].update(lr="fast"), "params.yaml: train.lr: expected float, got str ('fast')"),
        (lambda p: p["sft"].update(train=[1]), "params.yaml: sft.train: expected a mapping of overrides of 'train'"),
        (lambda p: p.pop("sampling"), "params.yaml: missing section 'sampling' (the base that"),
        (lambda p: p["dpo"].update(train={"max_tokens": 100}), "params.yaml: dpo.train.max_steps: set exactly one"),
    ],
)
def test_inheritance_errors_name_where_the_bad_value_is(tmp_path, mutate, message):
    with pytest.raises(ConfigError) as err:
        load_all(write_params(tmp_path, mutate))
    assert message in str(err.value)


def test_checking_params_loads_neither_deepspeed_nor_mlflow():
    """`scratchlm params --check` imports every stage module (each holds its Config). DeepSpeed (~5 s) and MLflow
    (~2 s) stay behind the functions that use them; torch is imported (the alignment stages' Configs sit beside
    their tensor code), which costs ~3 s once."""
    import subprocess
    import sys

    code = (
        "import sys; from tasks.common.params_check import load_all; load_all(); "
        "print(sorted(m for m in ('deepspeed', 'mlflow', 'lm_eval', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_set_reaches_an_inherited_key_and_a_bad_one_leaves_the_file_as_it_was(tmp_path):
    """`scratchlm run --set sft.train.beta2=0.99` adds the key to sft's overrides of `train`."""
    from flows.pipeline import apply_overrides

    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text())
    apply_overrides({"sft.train.beta2": 0.99, "sft.sampling.top_p": 0.5, "train.lr": 1.0e-3}, path)
    assert (load_section("sft", path=path).train.beta2, load_section("sft", path=path).sampling.top_p) == (0.99, 0.5)
    assert (load_section("sft", path=path).train.lr, load_section("reward", path=path).train.lr) == (1.0e-3, 3.0e-4)
    before = path.read_text()
    with pytest.raises(ConfigError, match=r"sft.train.betta2: unknown key \(did you mean 'beta2'\?\)"):
        apply_overrides({"sft.train.betta2": 0.5}, path)
    with pytest.raises(ConfigError, match=r"reward.sampling: unknown key"):  # reward samples nothing
        apply_overrides({"reward.sampling.top_p": 0.5}, path)
    assert path.read_text() == before
