"""`scratchlm params`: every knob with the value in force (params.yaml, inheritance applied), its default where the
two differ, and its documentation."""

from __future__ import annotations

import re

import yaml

from flows.cli import main
from tasks.common.config import ROOT, section_class
from tasks.common.params_check import REQUIRED, _default_at, knobs, load_all, show_value


def listing(tmp_path, monkeypatch, capsys, edit) -> dict[str, str]:
    """{key: the rest of its line} of `scratchlm params` on a copy of params.yaml changed by `edit(dict)`."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    edit(params)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.setenv("SCRATCHLM_PARAMS", str(path))
    assert main(["params"]) == 0
    lines = capsys.readouterr().out.splitlines()
    return {m[1]: m[2] for ln in lines if (m := re.match(r"^  (\S+)\s+(.*)$", ln))}


def test_values_in_force_and_defaults(tmp_path, monkeypatch, capsys):
    lr = _default_at(section_class("train"), "lr")
    seq_len = _default_at(section_class("pretrain"), "seq_len")

    def edit(p):
        p["pretrain"]["seq_len"] = seq_len // 2
        p["train"]["lr"] = lr * 2
        p["sft"]["train"] = {"max_steps": 7}
        p["model"]["preset"] = "tiny"

    rows = listing(tmp_path, monkeypatch, capsys, edit)
    assert rows["pretrain.seq_len"].split()[:4] == ["int", str(seq_len // 2), "(default", f"{seq_len})"]
    assert rows["model.preset"].split()[:4] == ["str", '"tiny"', "(default", '"small")']
    assert rows["train.lr"].split()[1] == f"{lr * 2:g}" and f"(default {lr:g})" in rows["train.lr"]
    assert rows["sft.train"].startswith("section  overrides max_steps=7")  # the rest inherited from `train`
    assert rows["sft.sampling"].startswith("section  as `sampling`")
    assert rows["data.builtin.n_docs"].split()[:2] == ["int", "12000"] and "(default" not in rows["data.builtin.n_docs"]
    assert "Documents the builtin story generator writes" in rows["data.builtin.n_docs"]


def test_every_key_is_listed_with_a_value():
    sections = load_all()
    for name in sections:
        rows = knobs(name, sections)
        assert rows, name
        for r in rows:
            assert r.type == "section" or r.value, r
            assert r.default != REQUIRED or r.key == "data.sources" or not r.changed, r
    assert show_value(["a"] * 40).endswith("…") and show_value("") == '""' and show_value(None) == "null"
    assert _default_at(section_class("pretrain"), "samples.temperature") == 0.8
