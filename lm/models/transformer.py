"""``transformer``: the softmax-attention baseline with rotary position embeddings (RoPE)::

    q, k, v = W_q x, W_k x, W_v x;   q, k <- rotate(q, k, positions)
    o_t = sum_{s<=t} softmax_s(q_t . k_s / sqrt(d)) v_s       (PyTorch scaled_dot_product_attention)
    y_t = W_o o_t

The state is a KV cache (keys and values of all past tokens), so ``forward`` with a state continues
a sequence and ``step`` decodes one token; memory grows with the context, unlike the RNN families.

Document starts (``segments``): block-diagonal causal attention without a dense T x T mask, one SDPA
call per document over the packed row (a single batched call when every row holds one segment), and
RoPE positions restarting at 0 at every document start, so a packed window equals separate forwards
of its documents. Not supported (``ValueError``): document starts together with a carried, non-empty
KV cache (state passing across windows is for the constant-state families); returning the cache when
the rows' last documents differ in length (the cache is one [B, H_kv, L, K] tensor).

The KV cache is ``{"k", "v"}`` [B, H_kv, L, K], grown by concatenation when a forward continues it
(training, evaluation in pieces), or, for generation, preallocated (:meth:`Attention.reserve_state`):
``{"k", "v"}`` buffers [B, H_kv, capacity, K] with ``"length"`` L filled positions; a forward then writes
its keys and values in place at positions L .. L + T - 1 (the buffers never move; the state passed in
is updated, so it must not be reused) and attends to the first L + T. Both give the same outputs.

Grouped-query attention (``model.mixer.n_kv_heads``, Ainslie et al., 2023): keys and values are projected
to ``n_kv_heads`` heads, each shared by ``n_heads / n_kv_heads`` consecutive query heads; the KV cache
holds the ``n_kv_heads`` heads only. ``n_kv_heads`` 0 (the default) or equal to ``n_heads`` is plain
multi-head attention, computed exactly as before; 1 is multi-query attention. Cost: the
per-document loop launches one attention per document and layer (a few dozen per window of
~10 documents per row), each over its own document only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.ops.utils import causal_mask
from lm.errors import ConfigError
from lm.models.mixer import ImplicitAttention, TokenMixer, get
from lm.models.registry import register


@dataclass
class TransformerOptions:
    rope_theta: float = 10000.0
    n_kv_heads: int = 0  # key/value heads (grouped-query attention); 0: n_heads


def cache_length(state) -> int:
    """Positions held by a KV cache state: ``"length"`` of a preallocated one, else the keys' length."""
    if state is None or state.get("k") is None:
        return 0
    n = state.get("length")
    return int(n) if n is not None else int(state["k"].shape[2])


def rotary_angles(T: int, offset: int, d: int, theta: float, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [T, d/2] (fp32) of the angles pos * theta^(-2i/d), positions offset .. offset + T - 1."""
    inv_freq = theta ** (-torch.arange(0, d, 2, device=device, dtype=torch.float32) / d)
    pos = torch.arange(offset, offset + T, device=device, dtype=torch.float32)
    angles = pos[:, None] * inv_freq[None]  # [T, d/2]
    return angles.cos(), angles.sin()


def rotary_angles_at(positions: torch.Tensor, d: int, theta: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [B, 1, T, d/2] (fp32) for per-token positions [B, T] (the same angles as
    :func:`rotary_angles` at those positions; broadcast over heads by :func:`apply_rotary`)."""
    inv_freq = theta ** (-torch.arange(0, d, 2, device=positions.device, dtype=torch.float32) / d)
    angles = positions.to(torch.float32)[..., None] * inv_freq  # [B, T, d/2]
    return angles.cos()[:, None], angles.sin()[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x_i, x_{i+d/2}) of x [B, H, T, d] by the angles of :func:`rotary_angles`
    (half-split RoPE); computed once per forward and applied to both q and k."""
    d = x.shape[-1]
    x1, x2 = x.float()[..., : d // 2], x.float()[..., d // 2 :]
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.to(x.dtype)


@register("transformer", TransformerOptions, variants={"transformer": {}}, default_variant="transformer")
class Attention(TokenMixer):
    """Causal multi-head softmax attention with RoPE and a KV cache."""

    constant_state = False  # the KV cache grows with the context

    def __init__(self, cfg: Any, options: TransformerOptions, layer_idx: int):
        super().__init__(cfg, options, layer_idx)
        D, H, K = self.d_model, self.n_heads, self.head_dim
        self.n_kv_heads = Hkv = int(options.n_kv_heads) or H
        self.qkv = nn.Linear(D, (H + 2 * Hkv) * K, bias=False)
        self.o_proj = nn.Linear(H * K, D, bias=False)
        self.o_proj.is_residual_out = True

    @staticmethod
    def check_config(cfg: Any, options: TransformerOptions) -> None:
        n_kv, n_heads = int(options.n_kv_heads), int(cfg.n_heads)
        if n_kv < 0 or (n_kv and n_heads % n_kv != 0):
            raise ConfigError(
                f"model.mixer.n_kv_heads: {n_kv} must divide model.n_heads ({n_heads}) (or 0: one per query head)"
            )

    def project(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, H, T, K] and k, v [B, H_kv, T, K] (before RoPE)."""
        B, T, _ = x.shape
        H, Hkv, K = self.n_heads, self.n_kv_heads, self.head_dim
        if Hkv == H:
            q, k, v = self.qkv(x).view(B, T, 3, H, K).permute(2, 0, 3, 1, 4)  # each [B, H, T, K]
            return q, k, v
        q, k, v = self.qkv(x).view(B, T, H + 2 * Hkv, K).transpose(1, 2).split([H, Hkv, Hkv], dim=1)
        return q, k, v

    def expand_kv(self, t: torch.Tensor) -> torch.Tensor:
        """[B, H_kv, ...] -> [B, H, ...]: each key/value head repeated for its group of query heads."""
        groups = self.n_heads // self.n_kv_heads
        return t if groups == 1 else t.repeat_interleave(groups, dim=1)

    def forward(self, x, state=None, return_state=False, segments=None):
        if segments is not None:
            return self._forward_segments(x, state, return_state, segments)
        B, T, _ = x.shape
        H, K = self.n_heads, self.head_dim
        q, k, v = self.project(x)  # q [B, H, T, K], k, v [B, H_kv, T, K]
        past_k, past_v = get(state, "k"), get(state, "v")
        offset = cache_length(state)
        cos, sin = rotary_angles(T, offset, K, self.options.rope_theta, x.device)  # shared by q and k
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        preallocated = get(state, "length") is not None
        if preallocated:  # write in place into the reserved buffers (see the module docstring)
            end = offset + T
            if end > past_k.shape[2]:
                raise ValueError(
                    f"Transformer: the preallocated KV cache holds {past_k.shape[2]} positions; {offset} are "
                    f"filled and {T} more do not fit (reserve_state with a larger capacity)"
                )
            past_k[:, :, offset:end] = k
            past_v[:, :, offset:end] = v
            k, v = past_k[:, :, :end], past_v[:, :, :end]
        elif past_k is not None:
            k = torch.cat([past_k.to(k.dtype), k], dim=2)
            v = torch.cat([past_v.to(v.dtype), v], dim=2)
        ka, va = self.expand_kv(k), self.expand_kv(v)
        if offset == 0:
            out = F.scaled_dot_product_attention(q, ka, va, is_causal=True)
        else:
            L = k.shape[2]
            mask = torch.arange(L, device=x.device)[None, :] <= (offset + torch.arange(T, device=x.device))[:, None]
            out = F.scaled_dot_product_attention(q, ka, va, attn_mask=mask)
        y = self.o_proj(out.transpose(1, 2).reshape(B, T, H * K))
        if not return_state:
            return y, None
        if preallocated:
            return y, {"k": past_k, "v": past_v, "length": offset + T}
        return y, {"k": k, "v": v}

    def reserve_state(self, state, capacity: int):
        """The cache ``state`` moved into buffers preallocated to ``capacity`` positions (at least the
        filled length), ``{"k", "v", "length"}``; a state that already has room is returned as it is."""
        k, v, n = get(state, "k"), get(state, "v"), cache_length(state)
        if k is None:
            raise ValueError("Transformer.reserve_state: needs a state (init_state or a forward's)")
        if get(state, "length") is not None and k.shape[2] >= capacity:
            return state
        B, Hkv, _, K = k.shape
        size = max(int(capacity), n)
        buf_k = k.new_zeros(B, Hkv, size, K)
        buf_v = v.new_zeros(B, Hkv, size, K)
        buf_k[:, :, :n] = k[:, :, :n]
        buf_v[:, :, :n] = v[:, :, :n]
        return {"k": buf_k, "v": buf_v, "length": n}

    def _forward_segments(self, x, state, return_state, segments):
        """Block-diagonal causal attention: every document attends to itself only (see the module
        docstring)."""
        if get(state, "length") is not None and segments.has_starts():
            raise ValueError(
                "Transformer: document starts with a preallocated KV cache (generation's) are not supported"
            )
        if cache_length(state) > 0 or get(state, "length") is not None:
            if segments.has_starts():
                raise ValueError(
                    "Transformer: document resets with a carried KV cache are not supported (a window with "
                    "document starts must begin from an empty cache; state passing across windows is for "
                    "constant-state families)"
                )
            return self.forward(x, state, return_state)  # no document starts: the plain continuation
        B, T, _ = x.shape
        H, K = self.n_heads, self.head_dim
        q, k, v = self.project(x)  # q [B, H, T, K], k, v [B, H_kv, T, K]
        cos, sin = rotary_angles_at(segments.position, K, self.options.rope_theta)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        ka, va = self.expand_kv(k), self.expand_kv(v)
        if segments.num_segments == B:  # one segment per row: the plain batched call
            out = F.scaled_dot_product_attention(q, ka, va, is_causal=True).transpose(1, 2)  # [B, T, H, K]
        else:  # the packed row [H, B*T, K], one causal call per document
            qp, kp, vp = (t.transpose(0, 1).reshape(H, B * T, K) for t in (q, ka, va))
            bounds = segments.offsets
            parts = [
                F.scaled_dot_product_attention(qp[:, a:b], kp[:, a:b], vp[:, a:b], is_causal=True)
                for a, b in zip(bounds[:-1], bounds[1:])
            ]
            out = torch.cat(parts, dim=1).view(H, B, T, K).permute(1, 2, 0, 3)  # [B, T, H, K]
        y = self.o_proj(out.reshape(B, T, H * K))
        if not return_state:
            return y, None
        lengths = set(segments.last_lengths())
        if len(lengths) != 1:
            raise ValueError(
                "Transformer: the KV cache after a window with document starts holds each row's last document; "
                f"these differ in length across rows ({sorted(lengths)}), so it cannot be returned as one tensor"
            )
        L = lengths.pop()
        return y, {"k": k[:, :, T - L :], "v": v[:, :, T - L :]}

    def implicit_attention(self, x: torch.Tensor) -> ImplicitAttention:
        """The softmax attention matrix of a whole sequence, and the values it weights."""
        B, T, _ = x.shape
        K = self.head_dim
        q, k, v = self.project(x)
        cos, sin = rotary_angles(T, 0, K, self.options.rope_theta, x.device)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k, v = self.expand_kv(k), self.expand_kv(v)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
        scores = q.float() @ k.float().transpose(-1, -2) * K**-0.5
        weights = torch.softmax(scores.masked_fill(~causal_mask(T, x.device), float("-inf")), -1)
        return ImplicitAttention(weights, v.transpose(1, 2), out)

    def forward_flops(self, seq_len: int) -> float:
        """Causal softmax attention: scores and the weighted sum, ``2 * 2 * d * T/2`` per token. The same
        with grouped-query attention (every query head still scores every key; the smaller key/value
        projection is counted with the parameters)."""
        return 2.0 * self.d_model * seq_len

    def state_size(self, batch_size: int = 1, context: int = 0, dtype=None) -> int:
        """The KV cache after ``context`` tokens: keys and values [B, H_kv, context, K] in ``dtype`` (the
        activations', default the parameters'), growing with the context."""
        itemsize = torch.empty((), dtype=dtype or self.parameter_dtype()).element_size()
        return 2 * batch_size * self.n_kv_heads * int(context) * self.head_dim * itemsize

    def init_state(self, batch_size, device=None, dtype=None):
        H, K = self.n_kv_heads, self.head_dim
        empty = torch.zeros(batch_size, H, 0, K, device=device, dtype=dtype)
        return {"k": empty, "v": empty.clone()}
