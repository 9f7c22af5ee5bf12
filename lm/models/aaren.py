"""``aaren``: attention of a learned query computed as an RNN ("Attention as an RNN", Feng et al., 2024).

Per head, with a query ``q`` learned per layer (not per token)::

    s_t = (q . W_k x_t) / sqrt(K),   v_t = W_v x_t
    o_t = sum_{i<=t} exp(s_i) v_i / sum_{i<=t} exp(s_i)     (the softmax_scan kernel)
    y_t = W_o o_t

The many-to-many outputs come from a prefix scan over (running max, normaliser, weighted sum); the
state is that triple, so the layer steps in constant memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

import kernels
from kernels.ops.softmax_scan.reference import empty_state
from lm.models.mixer import ImplicitAttention, TokenMixer, get, onehot_values, packed_scan
from lm.models.registry import register


@dataclass
class AarenOptions:
    query_init_std: float = 1.0


@register("aaren", AarenOptions, variants={"aaren": {}}, default_variant="aaren")
class Aaren(TokenMixer):
    """Aaren layer: a learned query attends over the prefix through an associative scan."""

    def __init__(self, cfg: Any, options: AarenOptions, layer_idx: int):
        super().__init__(cfg, options, layer_idx)
        D, H, K = self.d_model, self.n_heads, self.head_dim
        self.query = nn.Parameter(torch.empty(H, K))
        self.k_proj = nn.Linear(D, H * K, bias=False)
        self.v_proj = nn.Linear(D, H * K, bias=False)
        self.o_proj = nn.Linear(H * K, D, bias=False)
        self.o_proj.is_residual_out = True
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            nn.init.normal_(self.query, 0.0, self.options.query_init_std)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """s [B, T, H] = q . k_t / sqrt(K)."""
        B, T, _ = x.shape
        k = self.k_proj(x).view(B, T, self.n_heads, self.head_dim)
        return torch.einsum("bthk,hk->bth", k.float(), self.query.float()) * self.head_dim**-0.5

    def forward(self, x, state=None, return_state=False, segments=None):
        B, T, _ = x.shape
        H, K = self.n_heads, self.head_dim
        v = self.v_proj(x).view(B, T, H, K)
        s0 = None if get(state, "m") is None else (state["m"], state["u"], state["w"])
        if segments is None:
            out, final = kernels.softmax_scan(
                self.scores(x).to(x.dtype), v, initial_state=s0, output_final_state=return_state, backend=self.backend
            )
        else:  # the scan restarts (empty state) at every document start
            out, final = packed_scan(
                kernels.softmax_scan,
                segments,
                (self.scores(x).to(x.dtype), v),
                s0,
                lambda n: empty_state(n, H, K, x.device),
                return_state,
                backend=self.backend,
            )
        y = self.o_proj(out.reshape(B, T, H * K))
        if not return_state:
            return y, None
        return y, {"m": final[0], "u": final[1], "w": final[2]}

    def implicit_attention(self, x: torch.Tensor) -> ImplicitAttention:
        """Softmax weights of the learned query over the prefix (the scan on one-hot values)."""
        B, T, _ = x.shape
        H, K = self.n_heads, self.head_dim
        v = self.v_proj(x).view(B, T, H, K)
        s = self.scores(x).to(x.dtype)
        out, _ = kernels.softmax_scan(s, v, backend=self.backend)
        weights, _ = kernels.softmax_scan(s, onehot_values(B, T, H, x.device).to(v.dtype), backend=self.backend)
        return ImplicitAttention(weights.permute(0, 2, 1, 3), v, out)

    def init_state(self, batch_size, device=None, dtype=None):
        H, K = self.n_heads, self.head_dim
        m, u, w = empty_state(batch_size, H, K, device)
        return {"m": m, "u": u, "w": w}
