"""``rwkv``: RWKV-7 ("Goose") time mixing on the ``dplr`` kernel. Per head (K = V = head_dim)::

    x'_* = x_t + (x_{t-1} - x_t) * mu_*                          token shift, one lerp per branch
    r = W_r x'_r,  k = W_k x'_k,  v = W_v x'_v                   receptance, key, value
    log w_t = -e^{-1/2} sigmoid(w_0 + tanh(x'_w A_w) B_w)        data-dependent decay in (e^{-0.61}, 1)
    a_t = sigmoid(a_0 + x'_a A_a B_a)                            in-context learning rate
    kk = L2norm(k * k_k);  k = k * (1 + (a - 1) * k_a)           removal key, adjusted key
    S_t = (diag(w_t) - (a_t * kk_t) kk_t^T) S_{t-1} + k_t v_t^T   = dplr(a = -kk, b = a * kk)
    o_t = HeadNorm(S_t^T r_t) + (r_t . (r_k * k_t)) v_t           readout plus the current-token bonus
    y_t = W_o (o_t * (sigmoid(x'_g G_1) G_2))                    output gate

Left out from the reference model: the cross-layer value residual (v mixing with layer 0's v).
The channel mixer is RWKV's (``mlp: rwkv_cmix``, in :mod:`lm.models.layers`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

import kernels
from lm.models.layers import HeadNorm, l2_normalize, token_shift
from lm.models.mixer import ImplicitAttention, TokenMixer, get, onehot_values
from lm.models.registry import register

BRANCHES = ("r", "w", "k", "v", "a", "g")


@dataclass
class RWKV7Options:
    decay_low_rank: int = 32
    a_low_rank: int = 32
    gate_low_rank: int = 64


@register("rwkv", RWKV7Options, variants={"rwkv7": {}}, default_variant="rwkv7")
class RWKV7TimeMix(TokenMixer):
    """RWKV-7 time mixing: data-dependent decay and in-context learning rate on a DPLR state."""

    def __init__(self, cfg: Any, options: RWKV7Options, layer_idx: int):
        super().__init__(cfg, options, layer_idx)
        D, H, K = self.d_model, self.n_heads, self.head_dim
        HK = H * K
        self.mu = nn.Parameter(torch.zeros(len(BRANCHES), D))
        self.receptance = nn.Linear(D, HK, bias=False)
        self.key = nn.Linear(D, HK, bias=False)
        self.value = nn.Linear(D, HK, bias=False)
        self.output = nn.Linear(HK, D, bias=False)
        self.output.is_residual_out = True
        self.w0 = nn.Parameter(torch.zeros(HK))
        self.w_down = nn.Linear(D, options.decay_low_rank, bias=False)
        self.w_up = nn.Linear(options.decay_low_rank, HK, bias=False)
        self.a0 = nn.Parameter(torch.zeros(HK))
        self.a_down = nn.Linear(D, options.a_low_rank, bias=False)
        self.a_up = nn.Linear(options.a_low_rank, HK, bias=False)
        self.g_down = nn.Linear(D, options.gate_low_rank, bias=False)
        self.g_up = nn.Linear(options.gate_low_rank, HK, bias=False)
        self.k_k = nn.Parameter(torch.full((HK,), 0.85))
        self.k_a = nn.Parameter(torch.ones(HK))
        self.r_k = nn.Parameter(torch.zeros(H, K))
        self.o_norm = HeadNorm(H, K, eps=64e-5)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        D, HK = self.d_model, self.n_heads * self.head_dim
        n_layers = max(int(self.cfg.n_layers), 1)
        ratio_0_to_1 = self.layer_idx / max(n_layers - 1, 1)
        ratio_1_to_0 = 1.0 - self.layer_idx / n_layers
        with torch.no_grad():
            ddd = torch.arange(D, dtype=torch.float32) / D
            powers = {"r": 0.2, "w": 0.9, "k": 0.7, "v": 0.7, "a": 0.9, "g": 0.2}
            for i, name in enumerate(BRANCHES):
                self.mu[i].copy_(1.0 - torch.pow(ddd, powers[name] * ratio_1_to_0))
            n = torch.arange(HK, dtype=torch.float32)
            speed = -7.0 + 5.0 * (n / max(HK - 1, 1)) ** (0.85 + math.sqrt(ratio_0_to_1))
            self.w0.copy_(speed + 0.5)
            nn.init.zeros_(self.w_up.weight)
            nn.init.zeros_(self.a_up.weight)
            nn.init.zeros_(self.a0)
            nn.init.normal_(self.r_k, 0.0, 0.1)
            nn.init.ones_(self.k_a)
            self.k_k.fill_(0.85)

    def features(self, x: torch.Tensor, state=None):
        """r, k, v [B,T,H,K], the removal key kk, learning rate a, log decay, gate, last input."""
        B, T, D = x.shape
        H, K = self.n_heads, self.head_dim
        prev, last = token_shift(x, get(state, "shift"))
        mixed = x[:, :, None] + (prev - x)[:, :, None] * self.mu.to(x.dtype)  # [B, T, 6, D]
        xr, xw, xk, xv, xa, xg = mixed.unbind(2)
        r = self.receptance(xr).view(B, T, H, K)
        k = self.key(xk)
        v = self.value(xv).view(B, T, H, K)
        log_w = -math.exp(-0.5) * torch.sigmoid(self.w0 + self.w_up(torch.tanh(self.w_down(xw))).float())
        a = torch.sigmoid(self.a0 + self.a_up(self.a_down(xa))).to(x.dtype)
        gate = self.g_up(torch.sigmoid(self.g_down(xg)))
        kk = l2_normalize((k * self.k_k).view(B, T, H, K))
        k = (k * (1 + (a - 1) * self.k_a)).view(B, T, H, K)
        return r, k, v, kk, a.view(B, T, H, K), log_w.view(B, T, H, K).to(x.dtype), gate, last

    def forward(self, x, state=None, return_state=False):
        B, T, D = x.shape
        H, K = self.n_heads, self.head_dim
        r, k, v, kk, a, log_w, gate, last = self.features(x, state)
        out, S = kernels.dplr(r, k, v, -kk, kk * a, log_w, scale=1.0, initial_state=get(state, "S"),
                              output_final_state=return_state, backend=self.backend)
        out = self.o_norm(out) + (r * k * self.r_k).sum(-1, keepdim=True) * v
        y = self.output((out.reshape(B, T, H * K)) * gate)
        return y, ({"S": S, "shift": last} if return_state else None)

    def implicit_attention(self, x: torch.Tensor) -> ImplicitAttention:
        """The DPLR readout S_t^T r_t is linear in v: the kernel on one-hot values gives the weights
        (the current-token bonus is added after the head norm and is not part of them)."""
        r, k, v, kk, a, log_w, _, _ = self.features(x)
        B, T, H, _ = r.shape
        eye = onehot_values(B, T, H, x.device).to(v.dtype)
        out, _ = kernels.dplr(r, k, v, -kk, kk * a, log_w, scale=1.0, backend=self.backend)
        weights, _ = kernels.dplr(r, k, eye, -kk, kk * a, log_w, scale=1.0, backend=self.backend)
        return ImplicitAttention(weights.permute(0, 2, 1, 3), v, out)

    def init_state(self, batch_size, device=None, dtype=None):
        return {"S": torch.zeros(batch_size, self.n_heads, self.head_dim, self.head_dim, device=device),
                "shift": torch.zeros(batch_size, self.d_model, device=device, dtype=dtype)}
