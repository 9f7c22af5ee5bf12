"""``fwp``: recurrent and self-referential fast weight programmers ("Practical Computational Power
of Linear Transformers and Their Recurrent and Self-Referential Extensions", Irie et al., 2023).

recurrent_delta (per head, S in R^{K x V}; the previous output feeds back into the projections)::

    r = tanh(y_{t-1})
    q_t = softmax(W_q x_t + R_q r),  k_t = softmax(W_k x_t + R_k r)
    v_t = W_v x_t + R_v r,           beta_t = sigmoid(w_b x_t + r_b . r)
    S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T,   y_t = S_t^T q_t

srwm (per head the weight matrix programs itself; x_t = W_in x, D = head_dim)::

    [y_t; q_t; k_t; beta_t] = [W_y; W_q; W_k; w_b]_{t-1} x_t  with softmax on q, k and sigmoid on beta
    M <- M + beta_M (M q_t - M k_t) k_t^T   for each of the four blocks M, with y_t from the old W_y

The variant sets the option ``kind`` (``recurrent_delta`` | ``srwm``). Both outputs go through a
per-head RMS norm and W_o. Neither has a parallel form: the kernels run a fused time loop (see
kernels/README.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

import kernels
from kernels.ops.srwm.reference import broadcast_weights
from lm.errors import ConfigError
from lm.models.layers import HeadNorm
from lm.models.mixer import TokenMixer, get, packed_scan
from lm.models.registry import register


@dataclass
class FWPOptions:
    kind: str = "recurrent_delta"  # recurrent_delta | srwm (set by the variant)
    output_norm: bool = True
    recurrent_init_std: float = 0.02  # R_q, R_k, R_v, r_b (recurrent_delta)


KINDS = ("recurrent_delta", "srwm")
VARIANTS = {kind: {"kind": kind} for kind in KINDS}


@register("fwp", FWPOptions, variants=VARIANTS, default_variant="recurrent_delta")
class FastWeightProgrammer(TokenMixer):
    """Recurrent delta rule or self-referential weight matrix, per head."""

    def __init__(self, cfg: Any, options: FWPOptions, layer_idx: int):
        super().__init__(cfg, options, layer_idx)
        D, H, K = self.d_model, self.n_heads, self.head_dim
        self.kind = options.kind
        if self.kind == "recurrent_delta":
            self.q_proj = nn.Linear(D, H * K, bias=False)
            self.k_proj = nn.Linear(D, H * K, bias=False)
            self.v_proj = nn.Linear(D, H * K, bias=False)
            self.b_proj = nn.Linear(D, H, bias=True)
            self.r_q = nn.Parameter(torch.empty(H, K, K))
            self.r_k = nn.Parameter(torch.empty(H, K, K))
            self.r_v = nn.Parameter(torch.empty(H, K, K))
            self.r_b = nn.Parameter(torch.empty(H, K))
        else:
            self.in_proj = nn.Linear(D, H * K, bias=False)
            self.w_y = nn.Parameter(torch.empty(H, K, K))
            self.w_q = nn.Parameter(torch.empty(H, K, K))
            self.w_k = nn.Parameter(torch.empty(H, K, K))
            self.w_b = nn.Parameter(torch.empty(H, 4, K))
        self.o_norm = HeadNorm(H, K, eps=float(cfg.norm_eps)) if options.output_norm else None
        self.o_proj = nn.Linear(H * K, D, bias=False)
        self.o_proj.is_residual_out = True
        self.reset_parameters()

    @staticmethod
    def check_config(cfg: Any, options: FWPOptions) -> None:
        if options.kind not in KINDS:
            raise ConfigError(f"model.mixer.kind: '{options.kind}' is not one of {', '.join(KINDS)}")

    def forward_flops(self, seq_len: int) -> float:
        """The fused recurrence per head: ``~12 K V`` per step (read, update and readout; K = V = head_dim)."""
        return self.n_heads * 12.0 * self.head_dim * self.head_dim

    def reset_parameters(self) -> None:
        K = self.head_dim
        with torch.no_grad():
            if self.kind == "recurrent_delta":
                for p in (self.r_q, self.r_k, self.r_v, self.r_b):
                    nn.init.normal_(p, 0.0, self.options.recurrent_init_std)
            else:
                for p in (self.w_y, self.w_q, self.w_k, self.w_b):
                    nn.init.normal_(p, 0.0, K**-0.5)

    def forward(self, x, state=None, return_state=False, segments=None):
        if segments is not None:
            return self._forward_segments(x, state, return_state, segments)
        B, T, _ = x.shape
        H, K = self.n_heads, self.head_dim
        if self.kind == "recurrent_delta":
            S0 = None if get(state, "S") is None else (state["S"], state["y"])
            out, final = kernels.recurrent_delta(
                self.q_proj(x).view(B, T, H, K),
                self.k_proj(x).view(B, T, H, K),
                self.v_proj(x).view(B, T, H, K),
                self.b_proj(x),
                self.r_q.to(x.dtype),
                self.r_k.to(x.dtype),
                self.r_v.to(x.dtype),
                self.r_b.to(x.dtype),
                initial_state=S0,
                output_final_state=return_state,
                backend=self.backend,
            )
            new_state = {"S": final[0], "y": final[1]} if return_state else None
        else:
            W0 = get(state, "W")
            weights = (self.w_y, self.w_q, self.w_k, self.w_b)
            out, final = kernels.srwm(
                self.in_proj(x).view(B, T, H, K),
                *(w.to(x.dtype) for w in weights),
                initial_state=W0,
                output_final_state=return_state,
                backend=self.backend,
            )
            new_state = {"W": final} if return_state else None
        if self.o_norm is not None:
            out = self.o_norm(out)
        return self.o_proj(out.reshape(B, T, H * K)), new_state

    def _forward_segments(self, x, state, return_state, segments):
        """Reset at document starts: the kernels' ``cu_seqlens`` over the packed row. A fresh segment
        starts from S = 0, y = 0 (recurrent_delta) or from the learned initial weights (srwm: shared by
        every sequence when no row carries a state, else broadcast per segment)."""
        B, T, _ = x.shape
        H, K = self.n_heads, self.head_dim
        if self.kind == "recurrent_delta":
            S0 = None if get(state, "S") is None else (state["S"], state["y"])

            def fresh(n):
                return torch.zeros(n, H, K, K, device=x.device), torch.zeros(n, H, K, device=x.device)

            out, final = packed_scan(
                kernels.recurrent_delta,
                segments,
                (
                    self.q_proj(x).view(B, T, H, K),
                    self.k_proj(x).view(B, T, H, K),
                    self.v_proj(x).view(B, T, H, K),
                    self.b_proj(x),
                ),
                S0,
                fresh,
                return_state,
                r_q=self.r_q.to(x.dtype),
                r_k=self.r_k.to(x.dtype),
                r_v=self.r_v.to(x.dtype),
                r_b=self.r_b.to(x.dtype),
                backend=self.backend,
            )
            new_state = {"S": final[0], "y": final[1]} if return_state else None
        else:
            weights = (self.w_y, self.w_q, self.w_k, self.w_b)
            fresh = lambda n: tuple(broadcast_weights(w.float(), n) for w in weights)  # noqa: E731
            w_y, w_q, w_k, w_b = (w.to(x.dtype) for w in weights)
            out, final = packed_scan(
                kernels.srwm,
                segments,
                (self.in_proj(x).view(B, T, H, K),),
                get(state, "W"),
                fresh,
                return_state,
                w_y=w_y,
                w_q=w_q,
                w_k=w_k,
                w_b=w_b,
                backend=self.backend,
            )
            new_state = {"W": final} if return_state else None
        if self.o_norm is not None:
            out = self.o_norm(out)
        return self.o_proj(out.reshape(B, T, H * K)), new_state

    def init_state(self, batch_size, device=None, dtype=None):
        H, K = self.n_heads, self.head_dim
        if self.kind == "recurrent_delta":
            return {
                "S": torch.zeros(batch_size, H, K, K, device=device),
                "y": torch.zeros(batch_size, H, K, device=device),
            }
        weights = (self.w_y, self.w_q, self.w_k, self.w_b)
        return {"W": tuple(broadcast_weights(w.detach().float(), batch_size).clone().to(device) for w in weights)}
