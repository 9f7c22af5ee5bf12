"""``transformer``: the softmax-attention baseline with rotary position embeddings (RoPE)::

    q, k, v = W_q x, W_k x, W_v x;   q, k <- rotate(q, k, positions)
    o_t = sum_{s<=t} softmax_s(q_t . k_s / sqrt(d)) v_s       (PyTorch scaled_dot_product_attention)
    y_t = W_o o_t

The state is a KV cache (keys and values of all past tokens), so ``forward`` with a state continues
a sequence and ``step`` decodes one token; memory grows with the context, unlike the RNN families.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels._chunk_utils import causal_mask
from lm.models.mixer import ImplicitAttention, TokenMixer, get
from lm.models.registry import register


@dataclass
class TransformerOptions:
    rope_theta: float = 10000.0


def rotary_angles(T: int, offset: int, d: int, theta: float, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [T, d/2] (fp32) of the angles pos * theta^(-2i/d), positions offset .. offset + T - 1."""
    inv_freq = theta ** (-torch.arange(0, d, 2, device=device, dtype=torch.float32) / d)
    pos = torch.arange(offset, offset + T, device=device, dtype=torch.float32)
    angles = pos[:, None] * inv_freq[None]  # [T, d/2]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x_i, x_{i+d/2}) of x [B, H, T, d] by the angles of :func:`rotary_angles`
    (half-split RoPE); computed once per forward and applied to both q and k."""
    d = x.shape[-1]
    x1, x2 = x.float()[..., : d // 2], x.float()[..., d // 2:]
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.to(x.dtype)


@register("transformer", TransformerOptions, variants={"transformer": {}}, default_variant="transformer")
class Attention(TokenMixer):
    """Causal multi-head softmax attention with RoPE and a KV cache."""

    def __init__(self, cfg: Any, options: TransformerOptions, layer_idx: int):
        super().__init__(cfg, options, layer_idx)
        D, H, K = self.d_model, self.n_heads, self.head_dim
        self.qkv = nn.Linear(D, 3 * H * K, bias=False)
        self.o_proj = nn.Linear(H * K, D, bias=False)
        self.o_proj.is_residual_out = True

    def forward(self, x, state=None, return_state=False):
        B, T, _ = x.shape
        H, K = self.n_heads, self.head_dim
        q, k, v = self.qkv(x).view(B, T, 3, H, K).permute(2, 0, 3, 1, 4)  # each [B, H, T, K]
        past_k, past_v = get(state, "k"), get(state, "v")
        offset = 0 if past_k is None else past_k.shape[2]
        cos, sin = rotary_angles(T, offset, K, self.options.rope_theta, x.device)  # shared by q and k
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if past_k is not None:
            k = torch.cat([past_k.to(k.dtype), k], dim=2)
            v = torch.cat([past_v.to(v.dtype), v], dim=2)
        if offset == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            L = k.shape[2]
            mask = torch.arange(L, device=x.device)[None, :] <= (offset + torch.arange(T, device=x.device))[:, None]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = self.o_proj(out.transpose(1, 2).reshape(B, T, H * K))
        return y, ({"k": k, "v": v} if return_state else None)

    def implicit_attention(self, x: torch.Tensor) -> ImplicitAttention:
        """The softmax attention matrix of a whole sequence, and the values it weights."""
        B, T, _ = x.shape
        H, K = self.n_heads, self.head_dim
        q, k, v = self.qkv(x).view(B, T, 3, H, K).permute(2, 0, 3, 1, 4)
        cos, sin = rotary_angles(T, 0, K, self.options.rope_theta, x.device)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
        scores = q.float() @ k.float().transpose(-1, -2) * K ** -0.5
        weights = torch.softmax(scores.masked_fill(~causal_mask(T, x.device), float("-inf")), -1)
        return ImplicitAttention(weights, v.transpose(1, 2), out)

    def init_state(self, batch_size, device=None, dtype=None):
        H, K = self.n_heads, self.head_dim
        empty = torch.zeros(batch_size, H, 0, K, device=device, dtype=dtype)
        return {"k": empty, "v": empty.clone()}
