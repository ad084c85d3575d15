"""The whole configuration at once: every section loaded, then what spans sections (the model preset and overrides,
sequence lengths against the model's context, warmups against max_steps budgets).

What `scratchlm params --check` and the flow run before the first stage. Its own module because it builds the
model's config (model/ imports torch): no stage imports it, so no stage's DVC deps include model/ for it.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from pathlib import Path
from typing import Any

from tasks.common.config import (
    ConfigError,
    ModelSection,
    _closest,
    build,
    describe,
    inherit,
    inherited_fields,
    params_file,
    read_params,
    section_class,
    section_class_for_file,
)


def load_all(path: Path | str | None = None) -> dict[str, Any]:
    """Load and validate every section, then the whole configuration (`check_all`): what `scratchlm params --check`
    and the flow run before the first stage."""
    path = Path(path or params_file())
    raw = read_params(path)
    out = {}
    for name in raw:
        cls = section_class_for_file(name, path)
        out[name] = build(cls, inherit(cls, raw, name, path), f"{path.name}: {name}")
    check_all(out, raw, path)
    return out


def check_all(sections: dict[str, Any], raw: dict[str, Any], path: Path) -> None:
    """Checks that span sections, which no single section's dataclass can make; a ConfigError names file and key.

    - `model`: the preset exists and its overrides build a valid ModelConfig (vocab_size from `tokenizer`);
    - a section's `seq_len` (pretrain) and `max_len` (sft, reward, dpo) fit the model's max_seq_len;
    - a section's `train` with a max_steps budget leaves steps after the warmup (warmup_steps < max_steps). A
      max_tokens budget turns into steps only with the data's tokens per example: the stage checks it.
    """
    where = path.name
    model = sections.get("model")
    if isinstance(model, ModelSection):
        max_seq_len = _model_max_seq_len(model, sections, where)
        for name, cfg in sections.items():
            for key in ("seq_len", "max_len"):
                value = getattr(cfg, key, None)
                if isinstance(value, int) and value > max_seq_len:
                    raise ConfigError(
                        f"{where}: {name}.{key}: {value} is longer than the model's max_seq_len ({max_seq_len}, "
                        f"preset {model.preset!r}); lower it or set model.overrides.max_seq_len"
                    )
    base = section_class("train") if "train" in raw else None
    for name, cfg in sections.items():
        train = getattr(cfg, "train", None)
        if base is None or not isinstance(train, base) or cfg is train:
            continue
        if train.max_steps > 0 and train.warmup_steps >= train.max_steps:
            own = raw.get(name, {}).get("train") if isinstance(raw.get(name), dict) else None
            origin = "" if isinstance(own, dict) and "warmup_steps" in own else " (inherited from train.warmup_steps)"
            raise ConfigError(
                f"{where}: {name}.train.warmup_steps: {train.warmup_steps} warmup steps{origin} leave nothing of "
                f"the {train.max_steps}-step budget (max_steps); lower it or raise {name}.train.max_steps"
            )


def _model_max_seq_len(model: ModelSection, sections: dict[str, Any], where: str) -> int:
    """The max_seq_len of the ModelConfig that `model` builds, or a ConfigError naming the key that is wrong."""
    from model.config import PRESETS, ModelConfig  # imports torch (model/__init__): only when checking everything

    if model.preset not in PRESETS:
        raise ConfigError(f"{where}: model.preset: unknown preset {model.preset!r} (known: {', '.join(PRESETS)})")
    known = [f.name for f in dataclasses.fields(ModelConfig)]
    for key in model.overrides:
        if key not in known:
            raise ConfigError(
                f"{where}: model.overrides.{key}: unknown ModelConfig field{_closest(key, known)} "
                f"(known: {', '.join(known)})"
            )
    vocab = getattr(sections.get("tokenizer"), "vocab_size", None)
    overrides = {**model.overrides, **({"vocab_size": vocab} if isinstance(vocab, int) else {})}
    try:
        return ModelConfig.from_preset(model.preset, **overrides).max_seq_len
    except (TypeError, ValueError) as e:
        named = [f for f in re.findall(r"ModelConfig\.(\w+)", str(e)) if f in model.overrides]
        key = f"model.overrides.{named[0]}" if named else "model.overrides"
        raise ConfigError(f"{where}: {key}: {e} (preset {model.preset!r})") from None


# ------------------------------------------------------------------------------------------------ scratchlm params


@dataclasses.dataclass(frozen=True)
class Knob:
    """One row of `scratchlm params`: a key, its type, its current value, its default and its documentation."""

    key: str
    type: str
    value: str
    default: str
    doc: str

    @property
    def changed(self) -> bool:
        return self.type != "section" and self.default != REQUIRED and self.value != self.default


def knobs(name: str, sections: dict[str, Any]) -> list[Knob]:
    """Every key of section `name` (from `load_all`): the value in force (params.yaml's, with what the section
    inherits from its base), the dataclass default, the doc. An inherited section (`sft.train`) shows the keys it
    overrides instead of a value."""
    cfg = sections[name]
    cls = type(cfg)
    rows = []
    for key, tp, doc in describe(cls):
        value = _value_at(cfg, key)
        if tp == "section":
            shown = _overrides(value, sections.get(key), key) if _inherits(cls, key) else ""
            rows.append(Knob(f"{name}.{key}", tp, shown, shown, doc))
        else:
            rows.append(Knob(f"{name}.{key}", tp, show_value(value), show_value(_default_at(cls, key)), doc))
    return rows


def show_value(v: Any, width: int = 48) -> str:
    """A value as params.yaml would spell it: YAML scalars (`true`, `null`), strings quoted, long lists cut."""
    if v is _REQUIRED:
        return REQUIRED
    if isinstance(v, bool) or v is None:
        return {True: "true", False: "false", None: "null"}[v]
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (str, list, tuple, dict)):
        text = json.dumps(list(v) if isinstance(v, tuple) else v, ensure_ascii=False)
        return text if len(text) <= width else text[: width - 1] + "…"
    return str(v)


_REQUIRED = object()
REQUIRED = "(required)"
"""What `scratchlm params` shows as the default of a field that has none."""


def _value_at(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _default_at(cls: type, key: str) -> Any:
    """The dataclass default of a dotted key (nested sections walked through their classes)."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        field = {f.name: f for f in dataclasses.fields(cls)}[part]
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            return _REQUIRED
        if i == len(parts) - 1:
            return default
        if dataclasses.is_dataclass(default):
            return _value_at(default, ".".join(parts[i + 1 :]))
        cls = typing.get_type_hints(cls)[part]
    return _REQUIRED


def _inherits(cls: type, key: str) -> bool:
    return "." not in key and key in inherited_fields(cls)


def _overrides(value: Any, base: Any, name: str) -> str:
    """`overrides lr=0.0003, max_steps=200`: the fields of an inherited section that differ from its base's."""
    if not dataclasses.is_dataclass(value) or not dataclasses.is_dataclass(base):
        return ""
    diff = [
        f"{f.name}={show_value(getattr(value, f.name), 24)}"
        for f in dataclasses.fields(value)
        if getattr(value, f.name) != getattr(base, f.name)
    ]
    return "overrides " + ", ".join(diff) if diff else f"as `{name}`"
