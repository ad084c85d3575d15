"""Faults in the parameters (issue 16, item 9): every float YAML 1.2 reads is accepted, an impossible configuration
fails before the first stage naming file and key, and a malformed `--set` is one line, not a YAML traceback."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

import pytest
import yaml

from tasks.common.config import ConfigError, ScratchError, coerce, load_section
from tasks.common.params_check import load_all
from tests.conftest import ROOT, copy_project, run_in

PARAMS_TEXT = (ROOT / "params.yaml").read_text()


def write_text(tmp_path: Path, old: str, new: str) -> Path:
    """params.yaml with one line edited as a user (or `dvc exp run -S`) writes it: the value unquoted."""
    assert PARAMS_TEXT.count(old) == 1, old
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS_TEXT.replace(old, new))
    return path


def write_params(tmp_path: Path, mutate) -> Path:
    params = yaml.safe_load(PARAMS_TEXT)
    mutate(params)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------------------ YAML 1.2 numbers


@pytest.mark.parametrize(
    ("text", "value"),
    [("3e-4", 3e-4), ("1e-3", 1e-3), ("1.0e-3", 1e-3), ("2E-3", 2e-3), ("+1e-2", 1e-2), (".001", 1e-3), ("1e0", 1.0)],
)
def test_a_float_field_takes_every_float_yaml_1_2_reads(tmp_path, text, value):
    """PyYAML (YAML 1.1) leaves `3e-4`, `1e6`, `1.0e6` strings; DVC and ruamel (YAML 1.2) write them."""
    path = write_text(tmp_path, "  lr: 5.0e-04\n", f"  lr: {text}\n")
    sections = load_all(path)
    assert sections["train"].lr == value and isinstance(sections["train"].lr, float)
    assert load_section("sft", path=path).train.lr == value, "inherited by the stages as the float"


@pytest.mark.parametrize(("text", "value"), [("1e6", 1_000_000), ("1.0e6", 1_000_000), ("4.5e6", 4_500_000)])
def test_an_int_field_takes_a_float_that_is_exactly_a_whole_number(tmp_path, text, value):
    """`dvc exp run -S pretrain.train.max_tokens=1e6` writes `1000000.0`; a user writes `1e6`."""
    path = write_text(tmp_path, "max_tokens: 4500000,", f"max_tokens: {text},")
    tokens = load_all(path)["pretrain"].train.max_tokens
    assert tokens == value and type(tokens) is int


@pytest.mark.parametrize(
    ("tp", "value", "message"),
    [
        (int, 2.5, "x.k: expected int, got float (2.5)"),
        (int, "1e-3", "x.k: expected int, got str ('1e-3')"),
        (int, "2.5e0", "x.k: expected int, got str ('2.5e0')"),
        (int, True, "x.k: expected int, got bool (True)"),
        (int, 2.0**60, "x.k: expected int, got float"),  # beyond 2**53 a float is no exact integer
        (float, "10", "x.k: expected float, got str ('10')"),  # quoted digits: both YAMLs read 10 bare as an int
        (float, "fast", "x.k: expected float, got str ('fast')"),
        (float, "1e", "x.k: expected float, got str ('1e')"),
        (Literal[0, 1, 2, 3], True, "x.k: must be one of 0, 1, 2, 3, got True"),
    ],
)
def test_what_is_no_number_of_the_type_is_still_refused(tp, value, message):
    with pytest.raises(ConfigError) as err:
        coerce(tp, value, "x.k")
    assert str(err.value).startswith(message)
    assert coerce(float, 1000000.0, "x") == 1e6 and coerce(int, 1e6, "x") == 1_000_000
    assert coerce(Literal[0, 1, 2, 3], 2.0, "x") == 2 and type(coerce(Literal[0, 1, 2, 3], 2.0, "x")) is int


def test_model_overrides_take_yaml_1_2_numbers(tmp_path):
    path = write_text(
        tmp_path, "  overrides: {}\n", "  overrides: {norm_eps: 1e-6, rope_theta: 5e5, max_seq_len: 5.12e2}\n"
    )
    model = load_all(path)["model"]
    assert model.overrides == {"norm_eps": 1e-6, "rope_theta": 500000, "max_seq_len": 512}
    from model.config import ModelConfig

    cfg = ModelConfig.from_preset(model.preset, **model.overrides)
    assert (cfg.norm_eps, cfg.rope_theta, cfg.max_seq_len) == (1e-6, 500000.0, 512)


# ------------------------------------------------------------------------------------------------ the whole config


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda p: p["model"].update(preset="huge"),
            "params.yaml: model.preset: unknown preset 'huge' (known: tiny, small, 125m, 1b, 7b)",
        ),
        (
            lambda p: p["model"].update(overrides={"n_layer": 6}),
            "params.yaml: model.overrides.n_layer: unknown ModelConfig field (did you mean 'n_layers'?)",
        ),
        (
            lambda p: p["model"].update(overrides={"n_heads": 3}),
            "params.yaml: model.overrides.n_heads: ModelConfig.d_model=256 must be divisible by ModelConfig.n_heads=3",
        ),
        (
            lambda p: p["model"].update(overrides={"dropout": 1.5}),
            "params.yaml: model.overrides.dropout: ModelConfig.dropout must be in [0, 1), got 1.5 (preset 'small')",
        ),
        (
            lambda p: p["model"].update(overrides={"n_layers": "six"}),
            "params.yaml: model.overrides.n_layers: ModelConfig.n_layers must be an int, got 'six'",
        ),
        (
            lambda p: p["pretrain"].update(seq_len=512),
            "params.yaml: pretrain.seq_len: 512 is longer than the model's max_seq_len (256, preset 'small'); "
            "lower it or set model.overrides.max_seq_len",
        ),
        (
            lambda p: p["model"].update(overrides={"max_seq_len": 128}),
            "params.yaml: pretrain.seq_len: 256 is longer than the model's max_seq_len (128, preset 'small')",
        ),
        (
            lambda p: p["dpo"].update(max_len=300),
            "params.yaml: dpo.max_len: 300 is longer than the model's max_seq_len",
        ),
        (
            lambda p: p["dpo"]["train"].update(warmup_steps=40),
            "params.yaml: dpo.train.warmup_steps: 40 warmup steps leave nothing of the 40-step budget (max_steps); "
            "lower it or raise dpo.train.max_steps",
        ),
        (
            lambda p: p["train"].update(warmup_steps=60),  # the base: sft inherits it and max_steps 60
            "params.yaml: sft.train.warmup_steps: 60 warmup steps (inherited from train.warmup_steps) leave nothing "
            "of the 60-step budget",
        ),
    ],
)
def test_an_impossible_configuration_fails_up_front_naming_file_and_key(tmp_path, mutate, message):
    """What pretrain (or sft, dpo) would only find after every data stage had run."""
    with pytest.raises(ConfigError) as err:
        load_all(write_params(tmp_path, mutate))
    assert str(err.value).startswith(message), str(err.value)


def test_a_max_tokens_budget_is_left_to_the_stage(tmp_path):
    """Steps of a max_tokens budget depend on the data (tokens per example): pretrain checks them itself."""
    load_all(write_params(tmp_path, lambda p: p["pretrain"]["train"].update(warmup_steps=10**6)))


def test_the_flow_refuses_a_bad_model_override_before_any_stage_and_keeps_the_file(tmp_path):
    from flows.pipeline import apply_overrides

    path = tmp_path / "params.yaml"
    path.write_bytes((ROOT / "params.yaml").read_bytes())
    before = path.read_bytes()
    with pytest.raises(ConfigError, match=r"^params.yaml: model.preset: unknown preset 'huge' \(known: tiny"):
        apply_overrides({"model.preset": "huge"}, path)
    with pytest.raises(ConfigError, match=r"^params.yaml: pretrain.seq_len: 512 is longer"):
        apply_overrides({"pretrain.seq_len": 512}, path)
    assert path.read_bytes() == before


@pytest.mark.slow
def test_params_check_names_the_bad_key_in_one_line(tmp_path):
    """`scratchlm params --check` runs the whole-configuration check (a subprocess: ~5 s of imports)."""
    path = write_params(tmp_path, lambda p: p["model"].update(preset="huge"))
    proc = run_in(ROOT, sys.executable, "-m", "flows.cli", "params", "--check", env={"SCRATCHLM_PARAMS": str(path)})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert (
        proc.stderr.strip()
        == "error: params.yaml: model.preset: unknown preset 'huge' (known: tiny, small, 125m, 1b, 7b)"
    )


# ------------------------------------------------------------------------------------------------ --set


@pytest.mark.parametrize(
    "pair", ["data.sources=[a", "data.text_field={", 'data.txt_separator="x', "data.sources=[a, [b]"]
)
def test_a_malformed_set_value_is_one_line(pair):
    from flows.pipeline import parse_overrides

    with pytest.raises(ScratchError) as err:
        parse_overrides([pair])
    message = str(err.value)
    assert message.startswith(f"--set {pair!r}: the value is not valid YAML ("), message
    assert "\n" not in message


def test_set_values_are_read_as_dvc_exp_run_s_reads_them(tmp_path):
    """YAML 1.2, as `dvc exp run -S`: `3e-4` is a float, `1e6` a float an int field takes exactly."""
    from flows.pipeline import apply_overrides, parse_overrides

    overrides = parse_overrides(
        ["train.lr=3e-4", "pretrain.train.max_tokens=1e6", "data.sources=[builtin:stories]", "data.txt_separator="]
    )
    assert overrides == {
        "train.lr": 3e-4,
        "pretrain.train.max_tokens": 1e6,
        "data.sources": ["builtin:stories"],
        "data.txt_separator": "",
    }
    path = tmp_path / "params.yaml"
    path.write_bytes((ROOT / "params.yaml").read_bytes())
    apply_overrides(overrides, path)
    sections = load_all(path)
    assert (sections["train"].lr, sections["pretrain"].train.max_tokens) == (3e-4, 1_000_000)
    assert "  sources: [builtin:stories]\n" in path.read_text(), "a flow-style list stays one"


@pytest.mark.slow
def test_a_malformed_set_from_the_cli_is_one_line_and_exit_2(tmp_path):
    project = copy_project(tmp_path / "project")
    before = (project / "params.yaml").read_bytes()
    proc = run_in(project, sys.executable, "-m", "flows.cli", "run", "--stages", "ingest", "--set", "data.sources=[a")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip() == (
        "error: --set 'data.sources=[a': the value is not valid YAML (expected ',' or ']', but got '<stream end>'); "
        "quote it, e.g. --set 'data.sources=\"...\"', or write a list as [a, b]"
    )
    assert (project / "params.yaml").read_bytes() == before
