"""ModelConfig: the typed, validated shape of a scratchlm Llama, plus named size presets.

    from model.config import ModelConfig, PRESETS
    cfg = ModelConfig.from_preset("small", vocab_size=4096)      # preset + explicit overrides
    cfg.n_params(), cfg.flops_per_token(seq_len=256), cfg.head_dim
    ModelConfig.from_dict(cfg.to_dict()) == cfg                   # JSON round trip; unknown keys are rejected

Every check runs in ``__post_init__``, so an impossible shape (heads not divisible by KV heads, an odd head
dimension for RoPE, ...) fails before any tensor is allocated, with a message that names the field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

__all__ = ["ModelConfig", "PRESETS", "default_ffn_hidden"]


def default_ffn_hidden(d_model: int, multiple_of: int = 64) -> int:
    """SwiGLU hidden width that keeps the FFN's parameter count at that of a 4*d GELU MLP: 8/3*d, rounded up.

    Rounded to a multiple of 64 (32 below d=128) so matmuls stay on friendly tile sizes.
    """
    if d_model < 128:
        multiple_of = 32
    hidden = int(8 * d_model / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-style decoder. ``n_kv_heads`` and ``ffn_hidden`` are resolved when left as None."""

    vocab_size: int
    """Number of token ids (embedding rows and logits). Must match the tokenizer's vocabulary."""
    n_layers: int
    """Number of transformer blocks."""
    d_model: int
    """Residual stream width (HF ``hidden_size``)."""
    n_heads: int
    """Query heads per attention layer; ``d_model`` must be divisible by it."""
    n_kv_heads: int | None = None
    """Key/value heads (GQA): ``n_heads`` = MHA, 1 = MQA, in between = GQA. None means ``n_heads``."""
    ffn_hidden: int | None = None
    """SwiGLU hidden width (HF ``intermediate_size``). None means 8/3*d_model rounded up (see default_ffn_hidden)."""
    max_seq_len: int = 2048
    """Context length: the RoPE table size and the longest sequence forward() and generate() accept."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = True
    """Share the input embedding with the output projection (lm_head)."""
    dropout: float = 0.0
    """Dropout on attention probabilities and on each residual branch, training only."""

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.ffn_hidden is None and isinstance(self.d_model, int) and not isinstance(self.d_model, bool):
            object.__setattr__(self, "ffn_hidden", default_ffn_hidden(self.d_model))
        for name in ("rope_theta", "norm_eps", "dropout"):  # JSON writes 10000.0 as 10000
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, name, float(value))
        self._check_types()
        self._check_shapes()

    def _check_types(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            expected = _FIELD_TYPES[f.name]
            if expected is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"ModelConfig.{f.name} must be an int, got {value!r} ({type(value).__name__})")
            if expected is float and (isinstance(value, bool) or not isinstance(value, float)):
                raise TypeError(f"ModelConfig.{f.name} must be a number, got {value!r} ({type(value).__name__})")
            if expected is bool and not isinstance(value, bool):
                raise TypeError(f"ModelConfig.{f.name} must be true/false, got {value!r} ({type(value).__name__})")

    def _check_shapes(self) -> None:
        for name in ("vocab_size", "n_layers", "d_model", "n_heads", "n_kv_heads", "ffn_hidden", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"ModelConfig.d_model={self.d_model} must be divisible by ModelConfig.n_heads={self.n_heads} "
                f"(head_dim = d_model / n_heads)"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelConfig.n_heads={self.n_heads} must be divisible by ModelConfig.n_kv_heads={self.n_kv_heads} "
                f"(each KV head serves a whole group of query heads)"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"ModelConfig.d_model / n_heads = head_dim = {self.head_dim} must be even for rotary embeddings "
                f"(RoPE rotates pairs of channels); change ModelConfig.d_model or ModelConfig.n_heads"
            )
        if not self.rope_theta > 0:
            raise ValueError(f"ModelConfig.rope_theta must be > 0, got {self.rope_theta}")
        if not self.norm_eps > 0:
            raise ValueError(f"ModelConfig.norm_eps must be > 0, got {self.norm_eps}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout}")

    # ---- derived sizes -------------------------------------------------------------------------------------

    @property
    def head_dim(self) -> int:
        """Channels per attention head: d_model // n_heads."""
        return self.d_model // self.n_heads

    def n_params(self, exclude_embedding: bool = False) -> int:
        """Exact trainable parameter count of ``Llama(self)`` (tied embeddings counted once).

        ``exclude_embedding=True`` drops the input embedding table (Kaplan-style "non-embedding" count); the
        untied lm_head, a real matmul, stays in.
        """
        d, kv = self.d_model, self.n_kv_heads * self.head_dim
        attn = d * d + 2 * d * kv + d * d  # q, k, v, o
        ffn = 3 * d * self.ffn_hidden  # gate, up, down
        norms = 2 * d
        per_layer = attn + ffn + norms
        embedding = self.vocab_size * d
        lm_head = 0 if self.tie_embeddings else self.vocab_size * d
        total = self.n_layers * per_layer + d + embedding + lm_head  # + final norm
        return total - embedding if exclude_embedding else total

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6*N + 12*L*d*T.

        N counts the parameters that take part in a matmul: every weight except the embedding lookup, plus the
        output projection (which is the embedding itself when tied). The attention term 12*L*d_model*T counts
        QK^T and AV for a sequence of T tokens, without halving for causality (PaLM's convention, also
        nanoGPT's estimate_mfu). Divide by 3 for forward-only (inference) FLOPs.
        """
        t = self.max_seq_len if seq_len is None else seq_len
        matmul_params = self.n_params(exclude_embedding=True) + (
            self.vocab_size * self.d_model if self.tie_embeddings else 0
        )
        return 6.0 * matmul_params + 12.0 * self.n_layers * self.d_model * t

    # ---- (de)serialisation ---------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict with every field resolved (n_kv_heads and ffn_hidden filled in)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Inverse of to_dict. Unknown keys raise (a typo must never silently fall back to a default)."""
        if not isinstance(d, dict):
            raise TypeError(f"ModelConfig.from_dict expects a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig key(s) {unknown}; known keys: {sorted(known)}")
        required = {
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        missing = sorted(required - set(d))
        if missing:
            raise ValueError(f"missing ModelConfig key(s) {missing}")
        return cls(**d)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named size from PRESETS with explicit overrides, e.g. from_preset("small", vocab_size=8192)."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        base = dataclasses.asdict(PRESETS[name])
        if "d_model" in overrides and "ffn_hidden" not in overrides:
            base["ffn_hidden"] = None  # re-derive from the new width instead of keeping the preset's
        if "n_heads" in overrides and "n_kv_heads" not in overrides and base["n_kv_heads"] == base["n_heads"]:
            base["n_kv_heads"] = None  # an MHA preset stays MHA
        unknown = sorted(set(overrides) - set(base))
        if unknown:
            raise ValueError(
                f"unknown ModelConfig override(s) {unknown} for preset {name!r}; known keys: {sorted(base)}"
            )
        base.update(overrides)
        return cls(**base)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return self.from_dict({**self.to_dict(), **changes})


_FIELD_TYPES: dict[str, type] = {
    "vocab_size": int,
    "n_layers": int,
    "d_model": int,
    "n_heads": int,
    "n_kv_heads": int,
    "ffn_hidden": int,
    "max_seq_len": int,
    "rope_theta": float,
    "norm_eps": float,
    "tie_embeddings": bool,
    "dropout": float,
}


def _llama3_shaped(**shape: Any) -> ModelConfig:
    """A Llama-3-family shape (32 query heads over 8 KV heads, RoPE base 500k) with a 32k vocabulary."""
    return ModelConfig(**{"vocab_size": 32000, "n_heads": 32, "n_kv_heads": 8, "rope_theta": 500000.0, **shape})


# Sizes. vocab_size is the default only; the pipeline overrides it with the tokenizer's vocabulary.
PRESETS: dict[str, ModelConfig] = {
    # unit tests: ~100k params, GQA, everything exercised, fast
    "tiny": ModelConfig(vocab_size=512, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, max_seq_len=128),
    # CPU default (2 cores): 4.0M params with vocab 4096. Chosen by val bits/byte after a fixed CPU-time budget
    # on TinyStories (docs/BENCHMARKS.md, "## Model"): 4 layers beat 6 (and 6 narrower MQA layers) at this scale,
    # where tokens seen per second matter more than depth; head_dim 64 and GQA keep attention cheap on CPU
    "small": ModelConfig(vocab_size=4096, n_layers=4, d_model=256, n_heads=4, n_kv_heads=2, max_seq_len=256),
    # GPT-2-small-sized Llama (~110M with a 32k vocab)
    "125m": ModelConfig(vocab_size=32000, n_layers=12, d_model=768, n_heads=12, n_kv_heads=12, max_seq_len=1024),
    # Llama-3.2-1B-shaped (~1.0B with a 32k vocab)
    "1b": _llama3_shaped(n_layers=16, d_model=2048, ffn_hidden=8192, max_seq_len=2048),
    # Llama-3-8B-shaped body with a 32k vocab (~7.2B, untied as in Llama)
    "7b": _llama3_shaped(n_layers=32, d_model=4096, ffn_hidden=14336, max_seq_len=4096, tie_embeddings=False),
}
