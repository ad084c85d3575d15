"""params.yaml → frozen, typed, self-documenting dataclasses.

Every section of `params.yaml` loads into a frozen dataclass: `data` and `model` are defined here, `train` and
`sampling` in tasks/common/train_config.py, and each stage section `<stage>` is the `Config` class of
`tasks/<stage>.py` (so a new stage brings its own section without touching this file). A field's documentation is
the string literal written right after it (litgpt style); `describe()` reads it back for `scratchlm params`.

Inheritance: a stage field named like a base section (`train`, `sampling`) and of its type starts from that
section, and the stage's own mapping under that key (optional) overrides single keys:
`sft.train.lr` wins over `train.lr`, every other `train` key is inherited. DVC sees both (the training stages list
`train` and their own section under `params:`), so a change to `train.lr` reruns every training stage and a change
to `sft.train.lr` reruns sft and what follows it only.

params.yaml is the authority: the pipeline runs on its values. The dataclass defaults are the same values (a test,
tests/test_config.py, holds them equal), so a config built in code (`SftConfig(max_len=64)` in a test) means what
the same keys mean in params.yaml.

Loading is strict and happens before any work: an unknown key, a missing key, a wrong type or an impossible value
raises `ConfigError` naming the file and the dotted key, e.g.
`params.yaml: pretrain.lr: expected float, got str ('fast')`. `load_all` (tasks/common/params_check.py, which no
stage imports: it builds the model's config) also checks what spans sections
(`check_all`: the model preset and overrides, sequence lengths against the model's context, warmup against a
max_steps budget), so `scratchlm params --check` and the flow's first step catch what a stage would only find late.

Numbers are read as YAML 1.2 reads them (what `dvc exp run -S` and ruamel write): PyYAML's YAML 1.1 leaves
`3e-4`, `1e6` and `1.0e6` as strings, and a float field takes such a string as the float it spells; an int field
takes a float that is exactly a whole number (`1e6`, `4.5e6`, `1000000.0`: DVC writes `-S max_tokens=1e6` as
`1000000.0`) and refuses any other (`2.5`, `1e-3`).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import importlib
import inspect
import math
import os
import re
import textwrap
import types
import typing
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

ROOT = Path(__file__).resolve().parents[2]
"""The working tree this code runs in: the project, or the copy `dvc exp run --temp/--queue` runs in."""


def project_root() -> Path:
    """The DVC project a run belongs to: ROOT, except in the copy `dvc exp run --temp` or `--queue` runs in
    (.dvc/tmp/exps/...), where it is the project that copy came from. DVC names it in `DVC_ROOT` for every stage
    command; the MLflow store and the user's relative input paths (`../shared/data`) are the project's, so an
    experiment tracks into the same store and reads the same data as the workspace."""
    named = os.environ.get("DVC_ROOT")
    if named and Path(named, "dvc.yaml").is_file():
        return Path(named).resolve()
    return ROOT


def input_path(spec: str, root: Path = ROOT) -> Path:
    """A user's input path (a source file, folder or glob; a data folder) as the user meant it: absolute as given;
    relative against `root`, the working tree, when it is there (a file the experiment's copy has, which may differ
    from the project's), else against the project root (`../shared/data` seen from .dvc/tmp/exps/<copy>/ is not
    the folder beside the project)."""
    path = Path(spec)
    if path.is_absolute():
        return path
    here, project = root / path, project_root() / path
    if project == here or _exists(here) or not _exists(project):
        return here
    return project


def _exists(path: Path) -> bool:
    """`path` exists; for a glob, its first wildcard-free folder does."""
    parts = path.parts
    for i, part in enumerate(parts):
        if any(ch in part for ch in "*?["):
            return Path(*parts[:i]).is_dir()
    return path.exists()


def params_file() -> Path:
    """params.yaml at the repository root, or the file named by SCRATCHLM_PARAMS (read on every call)."""
    return Path(os.environ.get("SCRATCHLM_PARAMS", ROOT / "params.yaml"))


T = TypeVar("T")


class ScratchError(Exception):
    """An error a user can fix; stages print it as one line (`error: ...`) instead of a traceback."""


class ConfigError(ScratchError):
    """A params.yaml key is unknown, missing, mistyped or impossible."""


# ------------------------------------------------------------------------------------------------ sections


@dataclasses.dataclass(frozen=True)
class BuiltinCorpus:
    n_docs: int = 12000
    """Documents the builtin story generator writes (planted duplicates and junk included)."""
    seed: int = 1337
    """Seed of the generator; the corpus is a pure function of it and the rates."""
    exact_dup_rate: float = 0.03
    """Fraction of documents that are byte-identical copies of an earlier story."""
    near_dup_rate: float = 0.03
    """Fraction of documents that are lightly edited copies of an earlier story."""
    junk_rate: float = 0.05
    """Fraction of documents that are junk (boilerplate, symbol soup, repeated lines, ...)."""

    def __post_init__(self) -> None:
        for name in ("exact_dup_rate", "near_dup_rate", "junk_rate"):
            check(0.0 <= getattr(self, name) < 1.0, name, "must be in [0, 1)")
        check(
            self.exact_dup_rate + self.near_dup_rate + self.junk_rate < 0.9,
            "junk_rate",
            "exact_dup_rate + near_dup_rate + junk_rate must leave room for clean stories (< 0.9)",
        )
        check(self.n_docs > 0, "n_docs", "must be positive")


@dataclasses.dataclass(frozen=True)
class RunnerConfig:
    runner: Literal["local", "dask"] = "local"
    """Where the data stages (ingest, filter, dedup) run their per-file/per-shard work: `local` (a process pool)
    or `dask` (Prefect task mapping on a Dask cluster through prefect-dask)."""
    workers: int = 2
    """Worker processes (local pool size, or local Dask cluster size); 1 runs inline."""
    dask_address: str = ""
    """Scheduler address of an existing Dask cluster (tcp://host:8786); empty starts a local cluster."""

    def __post_init__(self) -> None:
        check(self.workers >= 1, "workers", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    sources: list[str]
    """Where documents come from, in order: `builtin:stories`, a file, folder or glob of .txt/.jsonl/.jsonl.gz/
    .parquet (relative paths are relative to the repository), or `hf:<name>[:<split>]` (needs the network)."""
    text_field: str = "text"
    """Field holding the document text in .jsonl/.jsonl.gz/.parquet sources."""
    txt_separator: str = "<|endoftext|>"
    """Document separator inside .txt files; an empty string makes each file one document."""
    builtin: BuiltinCorpus = dataclasses.field(default_factory=BuiltinCorpus)
    """Size, seed and planted rates of the builtin corpus."""
    parallel: RunnerConfig = dataclasses.field(default_factory=RunnerConfig)
    """How the data stages spread their work over processes or a Dask cluster."""

    def __post_init__(self) -> None:
        check(len(self.sources) > 0, "sources", "must list at least one source")


@dataclasses.dataclass(frozen=True)
class ModelSection:
    preset: str = "small"
    """Size preset from model/config.py: tiny (tests), small (CPU default), 125m, 1b, 7b."""
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Explicit ModelConfig fields that replace the preset's (e.g. {n_layers: 6, max_seq_len: 512}).
    vocab_size always comes from the trained tokenizer."""

    def __post_init__(self) -> None:
        # every ModelConfig field is a number or a bool: a YAML 1.2 float PyYAML left a string (`norm_eps: 1e-6`)
        # is that number, a whole one (`max_seq_len: 1e3`) an int (ModelConfig widens an int for its float fields)
        numbers = {
            k: v if whole_number(v) is None else whole_number(v)
            for k, v in ((k, yaml12_float(v)) for k, v in self.overrides.items() if isinstance(v, str))
            if v is not None
        }
        if numbers:
            object.__setattr__(self, "overrides", {**self.overrides, **numbers})


BASE_SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelSection}
EXTRA_SECTIONS: dict[str, str] = {
    "train": "tasks.common.train_config:TrainConfig",
    "sampling": "tasks.common.train_config:SamplingConfig",
    "promote": "tasks.common.promotion:PromoteConfig",
}
"""Sections that configure no single stage: name → "module:Class" of their dataclass (imported when loaded;
train_config and promotion import this module, so naming them here keeps the imports one-way)."""
INHERITED = ("train", "sampling")
"""Base sections a stage inherits from when it has a field of that name and type (see the module docstring)."""


def check(ok: bool, key: str, message: str) -> None:
    """Raise a ConfigError for `key` unless `ok` (call from a dataclass's __post_init__)."""
    if not ok:
        raise ConfigError(f"{key}: {message}")


# ------------------------------------------------------------------------------------------------ loading


def read_params(path: Path | str | None = None) -> dict[str, Any]:
    """The raw params.yaml mapping, with a clear error when it is missing or not YAML."""
    path = Path(path or params_file())
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a mapping of sections")
    return raw


def section_class(name: str) -> type:
    """The dataclass of section `name`: `data`/`model` here, EXTRA_SECTIONS (`train`, `sampling`, `promote`), else
    `Config` in `tasks/<name>.py`."""
    if name in BASE_SECTIONS:
        return BASE_SECTIONS[name]
    if name in EXTRA_SECTIONS:
        module, _, cls = EXTRA_SECTIONS[name].partition(":")
        return getattr(importlib.import_module(module), cls)
    if not (ROOT / "tasks" / f"{name}.py").is_file():
        known = ", ".join(sorted([*BASE_SECTIONS, *EXTRA_SECTIONS, *stage_modules()]))
        raise ConfigError(f"unknown section {name!r} (known: {known})")
    module = importlib.import_module(f"tasks.{name}")
    return module.Config


def stage_modules() -> list[str]:
    return sorted(p.stem for p in (ROOT / "tasks").glob("*.py") if not p.stem.startswith("_"))


def load_section(name: str, cls: type[T] | None = None, path: Path | str | None = None) -> T:
    """Load section `name` of params.yaml into its frozen dataclass, or raise ConfigError."""
    path = Path(path or params_file())
    raw = read_params(path)
    if name not in raw:
        raise ConfigError(f"{path.name}: missing section {name!r}")
    cls = cls or section_class(name)
    return build(cls, inherit(cls, raw, name, path), f"{path.name}: {name}")


def inherited_fields(cls: type) -> list[str]:
    """The fields of `cls` that start from a base section: named like one of INHERITED and of its type."""
    if not dataclasses.is_dataclass(cls) or cls.__name__ in {section_class(b).__name__ for b in INHERITED}:
        return []
    hints = typing.get_type_hints(cls)
    return [f.name for f in dataclasses.fields(cls) if f.name in INHERITED and hints[f.name] is section_class(f.name)]


def inherit(cls: type, raw: dict[str, Any], name: str, path: Path) -> Any:
    """Section `name` of the raw params with each inherited field's base section merged under its overrides."""
    section = raw[name]
    fields = inherited_fields(cls)
    if not fields or not isinstance(section, dict):
        return section
    section = dict(section)
    for field_name in fields:
        if field_name not in raw:
            raise ConfigError(
                f"{path.name}: missing section {field_name!r} (the base that {name}.{field_name} inherits from)"
            )
        base, own = raw[field_name], section.get(field_name) or {}
        build(section_class(field_name), base, f"{path.name}: {field_name}")  # an error in the base names the base
        if not isinstance(own, dict):
            raise ConfigError(
                f"{path.name}: {name}.{field_name}: expected a mapping of overrides of "
                f"{field_name!r}, got {type(own).__name__}"
            )
        section[field_name] = {**base, **own}
    return section


def section_class_for_file(name: str, path: Path) -> type:
    try:
        return section_class(name)
    except ConfigError as e:
        raise ConfigError(f"{path.name}: {e}") from None


def build(cls: type[T], value: Any, where: str) -> T:
    """Build dataclass `cls` from a mapping, checking keys and types recursively."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        hint = _closest(unknown[0], list(fields))
        raise ConfigError(f"{where}.{unknown[0]}: unknown key{hint} (known: {', '.join(fields)})")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, field in fields.items():
        if name not in value:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{where}.{name}: missing key ({field_doc(cls, name)})")
            continue
        kwargs[name] = coerce(hints[name], value[name], f"{where}.{name}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}.{e}") from None


def coerce(tp: Any, value: Any, where: str) -> Any:
    """Check `value` against type `tp` (int, float, str, bool, list, dict, Optional, Literal, dataclass)."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(arg, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {tp}")
    if origin is Literal:  # `true` is not the 1 of Literal[0, 1, 2, 3], though True == 1
        matches = [a for a in args if a == value and isinstance(a, bool) == isinstance(value, bool)]
        if not matches:
            raise ConfigError(f"{where}: must be one of {', '.join(map(repr, args))}, got {value!r}")
        return matches[0]
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} ({value!r})")
        item = args[0] if args else Any
        return [coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): coerce(vt, v, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {type(value).__name__} ({value!r})")
        return value
    if tp is float:
        if isinstance(value, str) and yaml12_float(value) is not None:
            return yaml12_float(value)  # `3e-4`: a float in YAML 1.2, a string to PyYAML
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected float, got {type(value).__name__} ({value!r})")
        return float(value)
    if tp is int:
        number = whole_number(value)  # also `1000000.0`: what DVC writes for `-S max_tokens=1e6`
        if number is None:
            raise ConfigError(f"{where}: expected int, got {type(value).__name__} ({value!r})")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected str, got {type(value).__name__} ({value!r})")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")


_YAML12_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?|[-+]?\.(inf|Inf|INF)|\.(nan|NaN|NAN)")
"""A float in the YAML 1.2 core schema (https://yaml.org/spec/1.2.2/#1023-core-schema)."""


def yaml12_float(text: str) -> float | None:
    """The float a string spells when YAML 1.2 reads it as one and PyYAML (YAML 1.1) left it a string (`3e-4`,
    `1e6`, `1.0e6`), else None. Digits alone are not one: a string "10" was quoted (both YAMLs read 10 as an int)."""
    if not _YAML12_FLOAT.fullmatch(text) or text.lstrip("+-").isdigit():
        return None
    lowered = text.lower()
    return float(lowered.replace(".", "") if lowered.endswith((".inf", ".nan")) else text)


def whole_number(value: Any) -> int | None:
    """`value` as an int when it is exactly a whole number: an int, a float such as 1000000.0 (up to 2**53, where
    floats stop being exact), or a YAML 1.2 float string such as `1e6` (exactly, via Decimal); else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() and abs(value) <= 2**53 else None
    if isinstance(value, str) and yaml12_float(value) is not None and math.isfinite(yaml12_float(value)):
        exact = Decimal(value)
        return int(exact) if exact == exact.to_integral_value() else None
    return None


def _closest(word: str, options: list[str]) -> str:
    match = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


# ------------------------------------------------------------------------------------------------ docs


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Map field name → the string literal written under it in the class body (or in a base class's)."""
    docs: dict[str, str] = {}
    for base in reversed(cls.__mro__[1:]):
        if dataclasses.is_dataclass(base):
            docs.update(field_docs(base))
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return docs
    body = tree.body[0].body
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(getattr(nxt, "value", None), ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def field_doc(cls: type, name: str) -> str:
    return field_docs(cls).get(name, "undocumented")


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, type, doc) for every field of `cls`, nested dataclasses flattened."""
    rows = []
    hints = typing.get_type_hints(cls)
    inherited = inherited_fields(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if f.name in inherited:
            rows.append(
                (
                    key,
                    "section",
                    f"{field_doc(cls, f.name)} Any key of `{f.name}` (listed under it); the rest inherited.",
                )
            )
        elif dataclasses.is_dataclass(hints[f.name]):
            rows.append((key, "section", field_doc(cls, f.name)))
            rows.extend(describe(hints[f.name], key + "."))
        else:
            tp = getattr(hints[f.name], "__name__", str(hints[f.name]))
            rows.append((key, tp.replace("typing.", ""), field_doc(cls, f.name)))
    return rows


def as_dict(cfg: Any) -> dict[str, Any]:
    """A config as a plain dict (for MLflow params and summaries)."""
    return dataclasses.asdict(cfg)
