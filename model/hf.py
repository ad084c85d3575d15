"""The scratchlm checkpoint format: a Hugging Face ``LlamaForCausalLM`` folder (safetensors + JSON, no pickles).

Every stage writes and reads "consolidated weights" through these helpers, and any HF tool (transformers,
lm-evaluation-harness, vLLM, mlflow.transformers) can load the same folder:

    save(model, "out/pretrain/model", tokenizer_dir="out/tokenizer",   # config.json, model.safetensors,
         stop_tokens=("<|end|>", "<|endoftext|>"))                     # generation_config.json, tokenizer files
    model = load("out/pretrain/model", device="cpu")                    # -> Llama (float32 unless dtype= given)
    cfg = load_config("out/pretrain/model")                             # -> ModelConfig

config.json carries the HF keys (both ``rope_theta`` and ``rope_parameters`` so transformers 4.x and 5.x agree)
plus a ``"scratchlm"`` key with ``ModelConfig.to_dict()``; import checks that the two agree. A folder written by
another tool (no ``"scratchlm"`` key) is imported from its HF keys when it is a plain Llama (SiLU, no biases, default
RoPE); anything else is refused with the reason. Weight names are translated by ``to_hf_names`` /
``from_hf_names``; tied embeddings are stored once (``model.embed_tokens.weight``, no ``lm_head.weight``).

``stop_tokens`` names every token generation ends at (a chat model's end of turn as well as the tokenizer's end of
text): their ids become ``eos_token_id`` as a list, in config.json and generation_config.json alike, so
``transformers``' ``generate`` stops at any of them, as Llama 3's folders do. The tokenizer's own ``eos_token`` is
left as it is. The model card (README.md) is ``model/card.py``'s, written by the stage once its metrics are known.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from model.config import ModelConfig
from model.llama import Llama

__all__ = [
    "export_hf",
    "import_hf",
    "load_config",
    "save",
    "load",
    "stop_token_ids",
    "to_hf_names",
    "from_hf_names",
    "hf_config_dict",
    "WEIGHTS_NAME",
    "CONFIG_NAME",
]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
CARD_NAME = "README.md"
_OUR_FILES = {WEIGHTS_NAME, CONFIG_NAME, GENERATION_CONFIG_NAME, CARD_NAME, "model.safetensors.index.json"}

# ours -> HF, per layer ("{i}" is the layer index)
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn.w_gate.weight": "mlp.gate_proj.weight",
    "ffn.w_up.weight": "mlp.up_proj.weight",
    "ffn.w_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {
    "tok_emb.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}


class _Naming(NamedTuple):
    """One direction of the name tables: `layer` splits a per-layer name into (index, rest), `rest` is renamed
    through `layer_names` and put under `layers_prefix`; every other tensor is renamed through `top_names`."""

    layer: re.Pattern[str]
    layer_names: dict[str, str]
    layers_prefix: str
    top_names: dict[str, str]


_TO_HF = _Naming(re.compile(r"^blocks\.(\d+)\.(.+)$"), _LAYER_NAMES, "model.layers", _TOP_NAMES)
_FROM_HF = _Naming(
    re.compile(r"^model\.layers\.(\d+)\.(.+)$"),
    {v: k for k, v in _LAYER_NAMES.items()},
    "blocks",
    {v: k for k, v in _TOP_NAMES.items()},
)
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


# ---- weight names --------------------------------------------------------------------------------------------


def to_hf_names(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Our state_dict -> HF LlamaForCausalLM names; drops lm_head when embeddings are tied."""
    weights = {name: t for name, t in state.items() if not name.startswith(("rope_cos", "rope_sin"))}
    return _rename(
        weights, cfg, _TO_HF, lambda name: f"no HF name for parameter {name!r}; model/hf.py's name table is out of date"
    )


def from_hf_names(tensors: dict[str, Tensor], cfg: ModelConfig, source: str = "state") -> dict[str, Tensor]:
    """HF LlamaForCausalLM names -> ours. Unknown names raise; lm_head is ignored when embeddings are tied."""
    weights = {name: t for name, t in tensors.items() if not name.endswith("rotary_emb.inv_freq")}
    return _rename(
        weights,
        cfg,
        _FROM_HF,
        lambda name: f"{source}: tensor {name!r} is not part of a plain Llama (bias, adapter, other arch?)",
    )


def _rename(
    tensors: dict[str, Tensor], cfg: ModelConfig, naming: _Naming, unknown: Callable[[str], str]
) -> dict[str, Tensor]:
    """`tensors` under the names of the other side; lm_head is dropped when embeddings are tied, and a name that
    neither table knows raises KeyError(unknown(name))."""
    out: dict[str, Tensor] = {}
    for name, tensor in tensors.items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        match = naming.layer.match(name)
        if match and match.group(2) in naming.layer_names:
            out[f"{naming.layers_prefix}.{match.group(1)}.{naming.layer_names[match.group(2)]}"] = tensor
        elif name in naming.top_names:
            out[naming.top_names[name]] = tensor
        else:
            raise KeyError(unknown(name))
    return out


# ---- config ----------------------------------------------------------------------------------------------------


TokenIds = dict[str, int | list[int] | None]
"""bos/eos/pad ids of a folder; eos may be a list (every stop token)."""


def hf_config_dict(
    cfg: ModelConfig, dtype: torch.dtype = torch.float32, token_ids: TokenIds | None = None
) -> dict[str, Any]:
    """The config.json of a LlamaForCausalLM with our shape, plus {"scratchlm": cfg.to_dict()}."""
    token_ids = token_ids or {}
    dtype_name = _DTYPE_NAMES[dtype]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": cfg.dropout,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
        # written even when unknown: HF would otherwise assume Llama-2's 1/2, which are not our ids
        "bos_token_id": token_ids.get("bos_token_id"),
        "eos_token_id": token_ids.get("eos_token_id"),
        "pad_token_id": token_ids.get("pad_token_id"),
        "scratchlm": cfg.to_dict(),
    }


def _config_from_hf_keys(hf: dict[str, Any], where: str) -> ModelConfig:
    """ModelConfig from a plain HF Llama config.json; refuses variants our network does not implement."""

    def need(key: str) -> Any:
        if key not in hf:
            raise ValueError(f"{where}: config.json has no {key!r}")
        return hf[key]

    if hf.get("model_type", "llama") != "llama":
        raise ValueError(f"{where}: model_type {hf.get('model_type')!r} is not 'llama'")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (SwiGLU with silu only)")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ValueError(f"{where}: {key}=true is not supported (the network has no biases)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"{where}: rope type {rope.get('rope_type', rope.get('type'))!r} is not supported")
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    n_heads = need("num_attention_heads")
    if hf.get("head_dim") not in (None, need("hidden_size") // n_heads):
        raise ValueError(f"{where}: head_dim {hf['head_dim']} != hidden_size / num_attention_heads")
    return ModelConfig(
        vocab_size=need("vocab_size"),
        n_layers=need("num_hidden_layers"),
        d_model=need("hidden_size"),
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        ffn_hidden=need("intermediate_size"),
        max_seq_len=need("max_position_embeddings"),
        rope_theta=float(theta),
        norm_eps=float(need("rms_norm_eps")),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        dropout=float(hf.get("attention_dropout", 0.0)),
    )


def load_config(path: str | Path) -> ModelConfig:
    """ModelConfig of an HF folder: our "scratchlm" key when present (checked against the HF keys), else HF keys."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: not an exported model folder")
    hf = json.loads(file.read_text())
    from_hf = _config_from_hf_keys(hf, str(file))
    if "scratchlm" not in hf:
        return from_hf
    ours = ModelConfig.from_dict(hf["scratchlm"])
    ours_no_dropout, hf_no_dropout = ours.replace(dropout=0.0), from_hf.replace(dropout=0.0)
    if ours_no_dropout != hf_no_dropout:
        diff = {
            k: (v, hf_no_dropout.to_dict()[k])
            for k, v in ours_no_dropout.to_dict().items()
            if hf_no_dropout.to_dict()[k] != v
        }
        raise ValueError(f"{file}: the 'scratchlm' config disagrees with the HF keys (ours, hf): {diff}")
    return ours


# ---- tokenizer files -------------------------------------------------------------------------------------------


def _tokenizer_vocab(tokenizer_dir: Path) -> dict[str, int]:
    """Token → id from tokenizer.json: the model's vocabulary plus the added (special) tokens; empty without one."""
    tok_file = tokenizer_dir / "tokenizer.json"
    if not tok_file.is_file():
        return {}
    data = json.loads(tok_file.read_text())
    vocab: dict[str, int] = {}
    model_vocab = data.get("model", {}).get("vocab")
    if isinstance(model_vocab, dict):
        vocab.update(model_vocab)
    vocab.update({t["content"]: t["id"] for t in data.get("added_tokens", [])})
    return vocab


def _special_token_ids(tokenizer_dir: Path) -> dict[str, int | None]:
    """bos/eos/pad ids named in tokenizer_config.json (or special_tokens_map.json), looked up in tokenizer.json."""
    names: dict[str, str] = {}
    for fname in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
        f = tokenizer_dir / fname
        if f.is_file():
            data = json.loads(f.read_text())
            for role in ("bos", "eos", "pad"):
                token = data.get(f"{role}_token")
                if isinstance(token, dict):
                    token = token.get("content")
                if isinstance(token, str):
                    names[role] = token
    vocab = _tokenizer_vocab(tokenizer_dir)
    return {f"{role}_token_id": vocab.get(tok) for role, tok in names.items()}


def stop_token_ids(tokenizer_dir: str | Path | None, stop_tokens: Sequence[str]) -> list[int]:
    """Ids of `stop_tokens` in the tokenizer's tokenizer.json, then its eos token's if not among them.

    A name the tokenizer lacks is a ValueError naming it and the file: a folder whose generation never stops is
    worse than a stage that fails."""
    if not tokenizer_dir:
        raise ValueError(f"stop_tokens {list(stop_tokens)} need tokenizer_dir (their ids are the tokenizer's)")
    folder = Path(tokenizer_dir)
    vocab = _tokenizer_vocab(folder)
    missing = [t for t in stop_tokens if t not in vocab]
    if missing:
        raise ValueError(f"{folder / 'tokenizer.json'}: no stop token {', '.join(missing)} in the tokenizer")
    ids = [vocab[t] for t in stop_tokens]
    eos = _special_token_ids(folder).get("eos_token_id")
    return ids + ([eos] if eos is not None and eos not in ids else [])


# ---- export / import -------------------------------------------------------------------------------------------


def export_hf(
    model_or_state: Llama | dict[str, Tensor],
    cfg: ModelConfig | None,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    bos_token_id: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    stop_tokens: Sequence[str] = (),
) -> Path:
    """Write an HF LlamaForCausalLM folder: config.json, model.safetensors, generation_config.json, tokenizer files.

    model_or_state: a Llama (cfg may then be None) or our state_dict. tokenizer_dir: its files are copied and its
    bos/eos/pad ids go into the configs. stop_tokens: the tokens generation ends at (e.g. `<|end|>`,
    `<|endoftext|>`), looked up in the tokenizer: eos_token_id becomes their ids, a list, plus the tokenizer's eos.
    Explicit *_token_id arguments win. Returns out_dir.
    """
    if isinstance(model_or_state, Llama):
        cfg = cfg or model_or_state.cfg
        state = model_or_state.state_dict()
    else:
        state = model_or_state
    if cfg is None:
        raise ValueError("export_hf needs cfg when given a state_dict")
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"export dtype must be one of {list(_DTYPE_NAMES.values())}, got {dtype}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    token_ids: TokenIds = {**(_special_token_ids(Path(tokenizer_dir)) if tokenizer_dir else {})}
    if stop_tokens:
        token_ids["eos_token_id"] = stop_token_ids(tokenizer_dir, stop_tokens)
    eos = list(eos_token_id) if isinstance(eos_token_id, Sequence) else eos_token_id
    explicit = {"bos_token_id": bos_token_id, "eos_token_id": eos, "pad_token_id": pad_token_id}
    token_ids.update({k: v for k, v in explicit.items() if v is not None})

    tensors = {name: t.detach().to("cpu", dtype).contiguous() for name, t in to_hf_names(state, cfg).items()}
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps(hf_config_dict(cfg, dtype, token_ids), indent=2) + "\n")
    generation = {k: v for k, v in token_ids.items() if v is not None}
    (out / GENERATION_CONFIG_NAME).write_text(json.dumps(generation, indent=2) + "\n")
    if tokenizer_dir:
        _copy_tokenizer_files(Path(tokenizer_dir), out)
    return out


def _copy_tokenizer_files(tokenizer_dir: Path, out: Path) -> None:
    if not tokenizer_dir.is_dir():
        raise FileNotFoundError(f"tokenizer_dir {tokenizer_dir} is not a folder")
    for f in tokenizer_dir.iterdir():
        if f.is_file() and f.name not in _OUR_FILES and f.resolve() != (out / f.name).resolve():
            shutil.copy2(f, out / f.name)


def _read_weights(path: Path) -> dict[str, Tensor]:
    """model.safetensors, or the shards listed in model.safetensors.index.json."""
    single, index = path / WEIGHTS_NAME, path / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        tensors: dict[str, Tensor] = {}
        for shard in shards:
            tensors.update(load_file(str(path / shard)))
        return tensors
    raise FileNotFoundError(f"{path}: neither {WEIGHTS_NAME} nor model.safetensors.index.json found")


def import_hf(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Llama:
    """Read an HF Llama folder back into our Llama (strict: missing or extra tensors raise, naming them)."""
    path = Path(path)
    cfg = load_config(path)
    state = from_hf_names(_read_weights(path), cfg, source=str(path))
    with torch.device("meta"):  # no throwaway random init: every tensor is assigned from the file below
        model = Llama(cfg)
    expected = {k for k in model.state_dict() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        raise KeyError(f"{path}: weights do not match the config: missing {missing}, unexpected {extra}")
    for name, tensor in state.items():
        want = model.get_parameter(name).shape
        if tensor.shape != want:
            raise ValueError(f"{path}: tensor {name} has shape {tuple(tensor.shape)}, config implies {tuple(want)}")
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    model.init_rope_tables()
    return model


def save(
    model: Llama,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    stop_tokens: Sequence[str] = (),
    **token_ids: int | Sequence[int] | None,
) -> Path:
    """Checkpoint a Llama as an HF folder (see export_hf; stop_tokens: what generation ends at)."""
    return export_hf(
        model, model.cfg, out_dir, tokenizer_dir=tokenizer_dir, dtype=dtype, stop_tokens=stop_tokens, **token_ids
    )


def load(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Llama:
    """Load a checkpoint folder written by save/export_hf (or any plain HF Llama) as a Llama in eval mode."""
    return import_hf(path, device=device, dtype=dtype).eval()
