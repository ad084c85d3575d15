"""The whole configuration at once: every section loaded, then what spans sections (the model preset and overrides,
sequence lengths against the model's context, warmups against max_steps budgets).

What `scratchlm params --check` and the flow run before the first stage. Its own module because it builds the
model's config (model/ imports torch): no stage imports it, so no stage's DVC deps include model/ for it.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from tasks.common.config import (
    ConfigError,
    ModelSection,
    _closest,
    build,
    inherit,
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
