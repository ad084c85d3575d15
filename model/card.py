"""The model card: README.md of an exported HF folder, the first thing a reader (or the Hugging Face Hub) opens.

    write_card("data/sft/model", stage="sft", training="supervised fine-tuning on chat examples",
               base="the pretrain stage's model (data/pretrain/model)", params={...}, metrics={...})

The stage says what it did (stage, training, base, its params and metrics as plain dicts); everything else is read
from the folder itself, so the card describes what is there: the network's shape and size (config.json), the stop
tokens (generation_config.json, named through tokenizer.json) and the chat template (tokenizer_config.json). It shows
how to load the folder with `transformers` and with scratchlm. JSON and Markdown only: no import beyond model/.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from model.hf import CARD_NAME, GENERATION_CONFIG_NAME, load_config

__all__ = ["write_card", "model_card", "MAX_ROWS"]

MAX_ROWS = 60
"""Rows shown per table (params, metrics); the rest are counted, and stay in the stage's params/metrics files."""


def write_card(
    folder: str | Path,
    *,
    stage: str,
    training: str,
    base: str | None = None,
    params: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write `folder`/README.md (see the module docstring); returns its path."""
    path = Path(folder) / CARD_NAME
    path.write_text(model_card(folder, stage=stage, training=training, base=base, params=params, metrics=metrics))
    return path


def model_card(
    folder: str | Path,
    *,
    stage: str,
    training: str,
    base: str | None = None,
    params: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> str:
    """The card's Markdown for the exported folder `folder`."""
    folder = Path(folder)
    sections = [
        _front_matter(),
        f"# scratchlm {stage} model\n\n{_description(folder)}",
        _training(stage, training, base, params),
        "## Metrics\n\n" + (_table(metrics, "metric") if metrics else "None recorded with this folder."),
        _transformers_usage(folder),
        _scratchlm_usage(),
        _chat_format(folder),
    ]
    return "\n\n".join(sections) + "\n"


# ---- sections ------------------------------------------------------------------------------------------------


def _front_matter() -> str:
    return "---\nlibrary_name: transformers\npipeline_tag: text-generation\ntags:\n- scratchlm\n- llama\n---"


def _description(folder: Path) -> str:
    cfg = load_config(folder)
    hf = _read_json(folder / "config.json")
    dtype = hf.get("torch_dtype") or hf.get("dtype") or "float32"
    tied = "tied" if cfg.tie_embeddings else "separate"
    return (
        f"A Llama-style causal language model (`LlamaForCausalLM`) built from scratch by the scratchlm pipeline: "
        f"{cfg.n_params():,} parameters, {cfg.n_layers} layers of width {cfg.d_model}, {cfg.n_heads} attention "
        f"heads ({cfg.n_kv_heads} key/value heads), SwiGLU width {cfg.ffn_hidden}, RoPE (theta {cfg.rope_theta:g}), "
        f"a {cfg.vocab_size:,}-token byte-level BPE vocabulary, a context of {cfg.max_seq_len:,} tokens and "
        f"{tied} input/output embeddings. Weights: `model.safetensors` ({dtype})."
    )


def _training(stage: str, training: str, base: str | None, params: dict[str, Any] | None) -> str:
    lines = [
        "## Training",
        "",
        f"- stage: `{stage}`, {training}",
        f"- base: {base or 'none (randomly initialised, trained from scratch)'}",
    ]
    if params:
        lines += ["", "Parameters the weights came from (the stage's params.yaml section, flattened):", ""]
        lines.append(_table(params, "parameter"))
    return "\n".join(lines)


def _transformers_usage(folder: Path) -> str:
    chat = bool(_read_json(folder / "tokenizer_config.json").get("chat_template"))
    prompt = (
        'messages = [{"role": "user", "content": "Tell me a story about a cat."}]\n'
        "inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, "
        'return_tensors="pt")'
        if chat
        else 'inputs = tok("Once upon a time", return_tensors="pt")'
    )
    return (
        "## Use with transformers\n\n"
        "```python\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        'folder = "path/to/this/folder"\n'
        "tok = AutoTokenizer.from_pretrained(folder)\n"
        "model = AutoModelForCausalLM.from_pretrained(folder)\n"
        f"{prompt}\n"
        "out = model.generate(**inputs, max_new_tokens=64, do_sample=True, temperature=0.8, top_p=0.95)\n"
        'print(tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))\n'
        "```\n\n"
        "`generate` stops at the first stop token below: generation_config.json lists them all as `eos_token_id`."
    )


def _scratchlm_usage() -> str:
    return (
        "## Use with scratchlm\n\n"
        "```python\n"
        "from model.hf import load\n\n"
        'model = load("path/to/this/folder")  # scratchlm\'s Llama (model/llama.py), in eval mode\n'
        "```\n\n"
        "In a terminal, from the scratchlm project folder: `scratchlm chat --model path/to/this/folder`."
    )


def _chat_format(folder: Path) -> str:
    stops = _stop_tokens(folder)
    listed = ", ".join(f"`{name}` (id {i})" for name, i in stops) or "none recorded"
    template = _read_json(folder / "tokenizer_config.json").get("chat_template")
    lines = ["## Chat format and stop tokens", "", f"Stop tokens: {listed}.", ""]
    if not template:
        return "\n".join([*lines, "The tokenizer has no chat template: this folder continues plain text."])
    return "\n".join(
        [
            *lines,
            "The chat template (tokenizer_config.json), which `apply_chat_template` renders; a reply is generated "
            "after the generation prompt and ends at a stop token:",
            "",
            "```jinja",
            template,
            "```",
        ]
    )


# ---- helpers -------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object file, or {} when absent."""
    return json.loads(path.read_text()) if path.is_file() else {}


def _stop_tokens(folder: Path) -> list[tuple[str, int]]:
    """(token, id) of every eos id in generation_config.json, named through tokenizer.json."""
    eos = _read_json(folder / GENERATION_CONFIG_NAME).get("eos_token_id")
    ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
    tokenizer = _read_json(folder / "tokenizer.json")
    names = {t["id"]: t["content"] for t in tokenizer.get("added_tokens", [])}
    vocab = tokenizer.get("model", {}).get("vocab")
    if isinstance(vocab, dict):
        names = {**{i: t for t, i in vocab.items()}, **names}
    return [(names.get(i, "?"), i) for i in ids]


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys of the scalars in a nested dict (lists and None are left out)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float, str, bool)):
            out[f"{prefix}{key}"] = value
    return out


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    text = text if len(text) <= 80 else text[:77] + "..."
    return text.replace("|", "\\|").replace("\n", " ")


def _table(d: dict[str, Any], what: str) -> str:
    """A two-column Markdown table of the scalars in `d`, MAX_ROWS at most: the top level's first (the headline
    numbers), then those of nested dicts (per-constraint rates, quarantine reasons, ...)."""
    top = {k: v for k, v in d.items() if not isinstance(v, dict)}
    flat = {**_flatten(top), **_flatten({k: v for k, v in d.items() if isinstance(v, dict)})}
    if not flat:
        return f"(no {what}s)"
    rows = [f"| {what} | value |", "|---|---|"]
    rows += [f"| `{k}` | {_cell(v)} |" for k, v in list(flat.items())[:MAX_ROWS]]
    if len(flat) > MAX_ROWS:
        rows.append(f"| ... | {len(flat) - MAX_ROWS} more |")
    return "\n".join(rows)
