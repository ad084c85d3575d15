"""params.yaml validation: every kind of mistake fails before any work, naming the file and the key."""
from __future__ import annotations

import pytest
import yaml

from tasks.common.config import ConfigError, DataConfig, describe, load_all, load_section
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


@pytest.mark.parametrize("mutate, message", [
    (lambda p: p["ingest"].update(doc_per_shard=3), "params.yaml: ingest.doc_per_shard: unknown key (did you mean 'docs_per_shard'?)"),
    (lambda p: p["ingest"].update(docs_per_shard="many"), "params.yaml: ingest.docs_per_shard: expected int, got str ('many')"),
    (lambda p: p["ingest"].update(docs_per_shard=0), "params.yaml: ingest.docs_per_shard: must be >= 1"),
    (lambda p: p["ingest"].update(txt_tail="drop"), "params.yaml: ingest.txt_tail: must be one of 'quarantine', 'keep', got 'drop'"),
    (lambda p: p["data"]["builtin"].update(junk_rate=1.5), "params.yaml: data.builtin.junk_rate: must be in [0, 1)"),
    (lambda p: p["data"]["builtin"].update(seed=True), "params.yaml: data.builtin.seed: expected int, got bool (True)"),
    (lambda p: p["data"]["parallel"].update(runner="ray"), "params.yaml: data.parallel.runner: must be one of 'local', 'dask', got 'ray'"),
    (lambda p: p["data"].pop("sources"), "params.yaml: data.sources: missing key (Where documents come from"),
    (lambda p: p["data"].update(sources="builtin:stories"), "params.yaml: data.sources: expected a list, got str"),
    (lambda p: p.update(ingets={}), "params.yaml: unknown section 'ingets'"),
])
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
    assert ("builtin.n_docs", "int") == rows[[r[0] for r in rows].index("builtin.n_docs")][:2]


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
