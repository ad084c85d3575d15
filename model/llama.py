"""The whole scratchlm network in one file: a Llama-style decoder-only transformer.

Architecture choices (all match Hugging Face ``LlamaForCausalLM``, so model/hf.py only renames weights):
- token embedding, no absolute positions; optional weight tying of the embedding and the output projection
- pre-norm residual blocks: x + Attn(RMSNorm(x)), then x + FFN(RMSNorm(x)); a final RMSNorm before lm_head
- RMSNorm without bias, computed in float32 (HF's numerics)
- rotary position embeddings, "rotate-half" convention (channel i pairs with i + head_dim/2), cos/sin tables
  precomputed in float32 for ``max_seq_len`` positions and kept as non-persistent buffers (never checkpointed);
  rotate_half(x) * sin is computed as roll(x) * signed_sin (one fused multiply-add, no cat/neg)
- grouped-query attention: ``n_kv_heads`` = ``n_heads`` is MHA, 1 is MQA; no biases anywhere
- attention through ``F.scaled_dot_product_attention``: ``is_causal=True`` with no mask tensor when training on
  plain rows, a boolean mask only for padding or chunked prefill; single-token decode folds the query heads of a
  KV group into the query-length axis, so no K/V copies are made for GQA
- packed rows of several documents (``doc_ids``): attention stays within each document, a causal block-diagonal
  mask built once per forward as an additive float mask (on CPU, SDPA runs it ~20 % faster than the same boolean
  mask; docs/BENCHMARKS.md); positions are not reset, RoPE makes a score depend on relative positions only
- SwiGLU feed-forward: down(silu(gate(x)) * up(x))
- init: N(0, 0.02) everywhere, residual output projections (attention ``wo``, FFN ``w_down``) scaled by
  1/sqrt(2 * n_layers) (GPT-2 / nanoGPT), RMSNorm weights 1
- dropout (config.dropout) on attention probabilities and on each residual branch, training only

Usage:
    model = Llama(ModelConfig.from_preset("tiny"))
    logits, loss = model(idx, targets)                       # training: (B,T,V) logits, mean CE (-100 = ignored)
    logits, _ = model(idx)                                   # inference: last position only, (B,1,V)
    logits, _ = model(idx, all_logits=True)                  # evaluation: every position, (B,T,V)
    logits, loss = model(idx, targets, doc_ids=doc)          # packed documents: (B,T) ids, attention within each
    h = model.hidden_states(idx, attention_mask)             # (B,T,D) after the final norm (reward head)
    cache = KVCache.for_model(model, batch_size=B, max_len=S)
    logits, _ = model(prompt, kv_cache=cache, start_pos=0)   # prefill (B,P) ...
    logits = model.decode_step(token, cache, start_pos=P)    # ... then one token (B,1) per call (model/generate.py)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from model.config import ModelConfig
from model.losses import cross_entropy

__all__ = ["Llama", "KVCache", "RMSNorm", "rope_tables", "apply_rope"]


def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x / rms(x) * weight; below float32 the normalisation runs in float32 and is cast back before the weight."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return F.rms_norm(x.to(_at_least_fp32(x.dtype)), (x.shape[-1],), None, eps).to(x.dtype) * weight


class RMSNorm(nn.Module):
    """RMSNorm without bias (HF LlamaRMSNorm numerics)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_tables(head_dim: int, max_len: int, theta: float, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """cos and signed sin tables, (max_len, head_dim) float32, rotate-half layout (frequencies repeated twice).

    The sin table's first half is negated so that rotate_half(x) * sin == roll(x, hd/2) * signed_sin.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    positions = torch.arange(max_len, dtype=torch.int64, device=device).float()
    freqs = torch.outer(positions, inv_freq)  # (S, hd/2)
    return torch.cat((freqs, freqs), dim=-1).cos(), torch.cat((-freqs.sin(), freqs.sin()), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """Rotate x (B,H,T,hd) by position (HF's x*cos + rotate_half(x)*sin); cos/sin are (T,hd) or (B,1,T,hd)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


class KVCache:
    """Preallocated keys/values for every layer: (B, n_kv_heads, max_len, head_dim) each.

    The model writes positions [start_pos, start_pos + T) on each call and attends over [0, start_pos + T).
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.max_len = max_len
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]

    @classmethod
    def for_model(cls, model: Llama, batch_size: int, max_len: int | None = None) -> KVCache:
        """A cache shaped for ``model`` on its device and dtype; max_len defaults to the model's context."""
        cfg = model.cfg
        max_len = cfg.max_seq_len if max_len is None else max_len
        p = model.tok_emb.weight
        return cls(cfg.n_layers, batch_size, cfg.n_kv_heads, max_len, cfg.head_dim, p.device, p.dtype)

    def update(self, layer: int, k: Tensor, v: Tensor, start_pos: int) -> tuple[Tensor, Tensor]:
        """Store k, v (B,KV,T,hd) at start_pos; return every cached position so far, (B,KV,start_pos+T,hd)."""
        end = start_pos + k.shape[2]
        self.k[layer][:, :, start_pos:end] = k
        self.v[layer][:, :, start_pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    """Causal grouped-query self-attention with RoPE."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, kv_cache: KVCache | None, start_pos: int
    ) -> Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B,H,T,hd)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B,KV,T,hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B,KV,T,hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v, start_pos)  # (B,KV,S,hd), S = start_pos + T
        if T == 1 and kv_cache is not None:
            y = self._decode_one(q, k, v, mask)
        else:
            dropout = self.dropout if self.training else 0.0
            # no mask tensor at all on the plain causal path lets SDPA pick its fused causal kernel
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=dropout,
                is_causal=mask is None,
                enable_gqa=self.n_kv_heads != self.n_heads,
            )  # (B,H,T,hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B,T,D)
        return self.wo(y)

    def _decode_one(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """One new query per row: the query heads sharing a KV head become that head's query 'positions'."""
        B, H, _, hd = q.shape
        group = H // self.n_kv_heads
        q = q.view(B, self.n_kv_heads, group, hd)  # (B,KV,group,hd); heads h = kv*group + g, as in repeat_kv
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # mask (B,1,1,S) or None: see all cached
        return y.view(B, H, 1, hd)


class FeedForward(nn.Module):
    """SwiGLU: w_down(silu(w_gate(x)) * w_up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w_gate = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.w_up = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.w_down = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer_idx)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = FeedForward(cfg)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
    ) -> Tensor:
        x = x + self.resid_dropout(self.attn(self.attn_norm(x), cos, sin, mask, kv_cache, start_pos))
        return x + self.resid_dropout(self.ffn(self.ffn_norm(x)))


def document_mask(doc_ids: Tensor, dtype: torch.dtype) -> Tensor:
    """(B,1,T,T) additive mask, 0 where query t may see key s (s <= t, same document), -inf elsewhere."""
    T = doc_ids.shape[1]
    pos = torch.arange(T, device=doc_ids.device)
    allowed = (pos[None, :, None] >= pos[None, None, :]) & (doc_ids[:, :, None] == doc_ids[:, None, :])  # (B,T,T)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=doc_ids.device)
    return mask.masked_fill_(~allowed, float("-inf")).unsqueeze(1)


class Llama(nn.Module):
    """Decoder-only Llama, ``cfg`` kept as ``model.cfg``; ``gradient_checkpointing`` recomputes blocks in backward
    (True or 1: every block; N: every N-th block, 0, N, 2N, ...; False or 0: none)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gradient_checkpointing = False
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_seq_len, hd)
        self.register_buffer("rope_sin", sin, persistent=False)  # (max_seq_len, hd), first half negated
        self.reset_parameters()

    # ---- init ----------------------------------------------------------------------------------------------

    def reset_parameters(self) -> None:
        """N(0, 0.02) for embeddings and linears, residual outputs scaled by 1/sqrt(2*n_layers), norms 1."""
        residual_std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.ndim == 1:
                nn.init.ones_(p)
            elif name.endswith(("attn.wo.weight", "ffn.w_down.weight")):
                nn.init.normal_(p, mean=0.0, std=residual_std)
            else:
                nn.init.normal_(p, mean=0.0, std=0.02)

    def init_rope_tables(self) -> None:
        """Recompute the RoPE buffers (after building on the meta device and ``to_empty``, for instance)."""
        device = self.tok_emb.weight.device
        cos, sin = rope_tables(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta, device)
        self.rope_cos, self.rope_sin = cos, sin

    # ---- forward -------------------------------------------------------------------------------------------

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
        attention_mask: Tensor | None = None,
        all_logits: bool = False,
        doc_ids: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Logits, and the mean next-token cross-entropy when ``targets`` is given.

        idx: (B,T) token ids. targets: (B,T) the next token at each position (already shifted), -100 = ignore
            (SFT sets the prompt positions to -100 so that only response tokens count).
        kv_cache/start_pos: decode with a KVCache; idx holds positions [start_pos, start_pos + T).
        attention_mask: (B, start_pos + T), 1 = real token, 0 = padding (left padding for batched prompts); its
            running count gives the position ids, so a left-padded row starts at position 0 like an unpadded one.
        doc_ids: (B,T) document number of each position of rows that pack several documents (training and
            evaluation, no kv_cache or attention_mask): a position attends only to earlier positions of its own
            document. Equal ids along a row = the plain causal model.
        Returns (logits, loss): with targets, logits (B,T,V) and a scalar loss; without, logits (B,1,V) for the
        last position (B,T,V with all_logits=True) and None.
        """
        h = self.hidden_states(idx, attention_mask, kv_cache=kv_cache, start_pos=start_pos, doc_ids=doc_ids)  # (B,T,D)
        if targets is not None:
            logits = self.lm_head(h)  # (B,T,V)
            return logits, cross_entropy(logits, targets)
        if not all_logits:
            h = h[:, -1:, :]  # (B,1,D): generation only needs the next token
        return self.lm_head(h), None

    def hidden_states(
        self,
        idx: Tensor,
        attention_mask: Tensor | None = None,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
        doc_ids: Tensor | None = None,
    ) -> Tensor:
        """Final-norm hidden states (B,T,D): the input of lm_head, and of RewardModel's scalar head."""
        B, T = idx.shape
        end = start_pos + T
        if end > self.cfg.max_seq_len:
            raise ValueError(f"sequence reaches position {end} but ModelConfig.max_seq_len={self.cfg.max_seq_len}")
        if kv_cache is not None and end > kv_cache.max_len:
            raise ValueError(f"sequence reaches position {end} but the KVCache holds {kv_cache.max_len}")
        if start_pos and kv_cache is None:
            raise ValueError("start_pos > 0 needs the kv_cache that holds positions [0, start_pos)")
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (B, end):
                raise ValueError(
                    f"attention_mask must be (B, start_pos + T) = {(B, end)}, got {tuple(attention_mask.shape)}"
                )
            if bool(attention_mask.all()):
                attention_mask = None  # no padding: keep the fast unmasked path
        if doc_ids is None:
            cos, sin, mask = self._positions_and_mask(
                T, start_pos, attention_mask, idx.device, cached=kv_cache is not None
            )
        else:
            if kv_cache is not None or attention_mask is not None:
                raise ValueError("doc_ids is for whole packed rows: pass neither kv_cache nor attention_mask with it")
            if tuple(doc_ids.shape) != (B, T):
                raise ValueError(f"doc_ids must be (B,T) = {(B, T)}, got {tuple(doc_ids.shape)}")
            cos, sin, mask = self.rope_cos[:T], self.rope_sin[:T], document_mask(doc_ids, self._compute_dtype())
        x = self.tok_emb(idx)  # (B,T,D)
        every = int(self.gradient_checkpointing)  # True = 1: every block; N: blocks 0, N, 2N, ...
        for i, block in enumerate(self.blocks):
            if every and i % every == 0 and self.training and kv_cache is None:
                x = checkpoint(block, x, cos, sin, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, kv_cache, start_pos)
        return self.norm(x)

    def _compute_dtype(self) -> torch.dtype:
        """The dtype attention runs in: autocast's when it is on for the weights' device, else the weights'."""
        device = self.tok_emb.weight.device.type
        if torch.is_autocast_enabled(device):
            return torch.get_autocast_dtype(device)
        return self.tok_emb.weight.dtype

    def decode_weights(self) -> list[tuple[Tensor, ...]]:
        """Per layer (attn_norm, wq, wk, wv, wo, ffn_norm, w_gate, w_up, w_down): references, not copies.

        Collected once per generate() call so that decode_step skips ~20 nn.Module attribute lookups per layer.
        """
        return [
            (
                b.attn_norm.weight,
                b.attn.wq.weight,
                b.attn.wk.weight,
                b.attn.wv.weight,
                b.attn.wo.weight,
                b.ffn_norm.weight,
                b.ffn.w_gate.weight,
                b.ffn.w_up.weight,
                b.ffn.w_down.weight,
            )
            for b in self.blocks
        ]

    def decode_step(
        self,
        token: Tensor,
        kv_cache: KVCache,
        start_pos: int,
        attention_mask: Tensor | None = None,
        weights: list[tuple[Tensor, ...]] | None = None,
    ) -> Tensor:
        """Logits (B,1,V) for one new token per row, token (B,1) at position start_pos: forward() for generation.

        Same result as ``forward(token, kv_cache=..., start_pos=..., attention_mask=...)``, written as straight
        tensor calls on the weights (no module dispatch, dropout or checkpoint branches): at batch 1 the decode
        loop is bound by per-op overhead, and this cuts a token from 2.9 to 1.9 ms on the small preset (1 CPU core).
        ``weights``: ``decode_weights()``, to reuse across
        steps. Call under torch.inference_mode(). Reads parameters directly, so gather ZeRO-3 shards first.
        """
        if start_pos + 1 > kv_cache.max_len:
            raise ValueError(f"position {start_pos} is past the KVCache's {kv_cache.max_len} slots")
        B = token.shape[0]
        cfg = self.cfg
        H, KV, hd, eps = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.norm_eps
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None
        cos, sin, mask = self._positions_and_mask(1, start_pos, attention_mask, token.device, cached=True)
        x = F.embedding(token, self.tok_emb.weight)  # (B,1,D)
        for i, (attn_norm, wq, wk, wv, wo, ffn_norm, w_gate, w_up, w_down) in enumerate(
            weights or self.decode_weights()
        ):
            h = rms_norm(x, attn_norm, eps)
            q = apply_rope(F.linear(h, wq).view(B, H, 1, hd), cos, sin)  # (B,H,1,hd)
            k = apply_rope(F.linear(h, wk).view(B, KV, 1, hd), cos, sin)  # (B,KV,1,hd)
            k, v = kv_cache.update(i, k, F.linear(h, wv).view(B, KV, 1, hd), start_pos)  # (B,KV,S,hd)
            y = F.scaled_dot_product_attention(q.view(B, KV, H // KV, hd), k, v, attn_mask=mask)  # (B,KV,g,hd)
            x = x + F.linear(y.reshape(B, 1, H * hd), wo)
            h = rms_norm(x, ffn_norm, eps)
            x = x + F.linear(F.silu(F.linear(h, w_gate)) * F.linear(h, w_up), w_down)
        return F.linear(rms_norm(x, self.norm.weight, eps), self.lm_head.weight)  # (B,1,V)

    def _positions_and_mask(
        self, T: int, start_pos: int, attention_mask: Tensor | None, device: torch.device, cached: bool
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """RoPE cos/sin for the new positions, and the attention mask (None = plain causal / attend to all)."""
        end = start_pos + T
        if attention_mask is None:
            cos, sin = self.rope_cos[start_pos:end], self.rope_sin[start_pos:end]  # (T,hd)
            if start_pos == 0 or T == 1:
                return cos, sin, None  # causal from scratch, or one new token that sees the whole cache
            valid = torch.ones(1, end, dtype=torch.bool, device=device)
            position = torch.arange(start_pos, end, device=device).unsqueeze(0)  # (1,T)
        else:
            valid = attention_mask.bool()  # (B,S)
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)[:, start_pos:]  # (B,T)
            cos = self.rope_cos[position_ids].unsqueeze(1)  # (B,1,T,hd)
            sin = self.rope_sin[position_ids].unsqueeze(1)
            position = torch.arange(start_pos, end, device=device).unsqueeze(0)  # (1,T) absolute slot
        key = torch.arange(end, device=device)  # (S,)
        causal = key[None, None, :] <= position[:, :, None]  # (1,T,S)
        # a padding query has no valid key; letting it see itself keeps softmax finite (its output is unused)
        mask = causal & (valid[:, None, :] | (key[None, None, :] == position[:, :, None]))  # (B,T,S)
        return cos, sin, mask.unsqueeze(1)  # (B,1,T,S)

    # ---- helpers for trainers ------------------------------------------------------------------------------

    def num_params(self) -> int:
        """Trainable parameters, tied weights counted once (equals cfg.n_params())."""
        return sum(p.numel() for p in self.parameters())

    def optim_groups(self, weight_decay: float) -> list[dict]:
        """AdamW parameter groups: decay matrices (and embeddings), not norm weights."""
        decay = [p for p in self.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.parameters() if p.ndim < 2]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
