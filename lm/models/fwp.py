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

The variant sets the option ``kind`` (``recurrent_delta`` | ``srwm``). Neither has a parallel form:
the kernels run a fused time loop (see kernels/README.md). The recurrences are those of the official
code (IDSIA/fwp-formal-lang: ``rec_update_fwm_tanh/`` and ``self_ref_v0/``); the layers around them
come in two definitions:

- ``recurrent_delta``, ``srwm`` (the project's layer): separate q/k/v projections and a beta
  projection with a bias (recurrent_delta), an input projection ``x_t = W_in x`` (srwm), a per-head
  RMS norm before W_o, the skeleton's normal(init_std) projections (W_o scaled by 1/sqrt(2L)),
  R_q, R_k, R_v, r_b ~ N(0, 0.02) and all four SRWM matrices ~ N(0, 1/sqrt(D)).
- ``recurrent_delta_paper`` follows ``layers.py: RecUpdateTanhFastFFlayer`` of the official code:
  one bias-free projection of x to q, k, v and beta per head (here four bias-free maps, the same
  parameters up to the order of their rows), no norm on the output, W_o without bias,
  every projection at PyTorch's nn.Linear default U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (the official
  code never re-initialises them), R_q, R_k, R_v, r_b ~ N(0, 1/sqrt(D)); S_0 = 0 and y_0 = 0.
- ``srwm_paper`` follows ``layers.py: SRWMlayer`` (defaults: no input softmax, beta_init -1): no
  input projection (x is split into heads as it is: x.view(B, T, H, D), needs H * D = d_model), no
  norm on the output, W_o at nn.Linear's default, initial weights W_y, W_k ~ N(0, 1/sqrt(D)),
  W_q ~ N(0, 0.01/sqrt(D)), w_b ~ N(-1, 1/sqrt(D)). Our matrices are the official ones transposed
  (y = W x here, x W there), the same distribution.

The paper variants are presets of the options below (``output_norm``, ``beta_bias``, ``in_proj``,
``proj_init``, ``recurrent_init``, ``srwm_q_init_scale``, ``srwm_beta_init_mean``, ``block_norm``),
whose defaults are the project's layer. The block: the skeleton's pre-norm ``h + W_o f(norm(h))``
(``block_norm: input``) is the official recurrent delta block too (with LayerNorm); the official
SRWM block is ``norm(h) + W_o srwm(h)`` (``block_norm: residual``, set by ``srwm_paper``): the SRWM
reads the un-normalised stream and the norm sits on the residual path (``lm/models/lm.py: Block``).
The model around the layers is the skeleton's (the official one: embedding N(0, 1), ReLU
feed-forward blocks with biases, no final norm).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Tuple

import torch
import torch.nn as nn

import kernels
from kernels.ops.srwm.reference import broadcast_weights
from lm.errors import ConfigError
from lm.models.layers import HeadNorm
from lm.models.mixer import TokenMixer, compute_dtype, get, packed_scan
from lm.models.registry import head_dim, register


@dataclass
class FWPOptions:
    kind: str = "recurrent_delta"  # recurrent_delta | srwm (set by the variant)
    output_norm: bool = True
    recurrent_init_std: float = 0.02  # R_q, R_k, R_v, r_b (recurrent_delta, recurrent_init: std)
    recurrent_init: str = "std"  # std: N(0, recurrent_init_std) | head_dim: N(0, 1/sqrt(head_dim)) (official)
    beta_bias: bool = True  # recurrent_delta: beta_t = sigmoid(w_b x_t + b + r_b . r); false: no b (official)
    in_proj: bool = True  # srwm: x_t = W_in x; false: x split into heads as it is (official)
    proj_init: str = "skeleton"  # skeleton: normal(init_std) | torch: nn.Linear's U(+-1/sqrt(fan_in)) (official)
    srwm_q_init_scale: float = 1.0  # srwm: W_q ~ N(0, scale / sqrt(D)) (official 0.01)
    srwm_beta_init_mean: float = 0.0  # srwm: w_b ~ N(mean, 1 / sqrt(D)) (official -1)
    block_norm: str = "input"  # input: h + W_o f(norm(h)) | residual: norm(h) + W_o f(h) (official SRWM block)


KINDS = ("recurrent_delta", "srwm")
#: options that only one kind reads: a non-default value with the other kind is a config error
KIND_OPTIONS = {
    "recurrent_init": "recurrent_delta",
    "beta_bias": "recurrent_delta",
    "in_proj": "srwm",
    "srwm_q_init_scale": "srwm",
    "srwm_beta_init_mean": "srwm",
}
#: the layer details of IDSIA/fwp-formal-lang's layers.py (see the module docstring)
PAPER = {"output_norm": False, "proj_init": "torch"}
VARIANTS = {
    "recurrent_delta": {"kind": "recurrent_delta"},
    "srwm": {"kind": "srwm"},
    "recurrent_delta_paper": {"kind": "recurrent_delta", **PAPER, "beta_bias": False, "recurrent_init": "head_dim"},
    "srwm_paper": {
        "kind": "srwm",
        **PAPER,
        "in_proj": False,
        "srwm_q_init_scale": 0.01,
        "srwm_beta_init_mean": -1.0,
        "block_norm": "residual",
    },
}


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
            self.b_proj = nn.Linear(D, H, bias=options.beta_bias)
            self.r_q = nn.Parameter(torch.empty(H, K, K))
            self.r_k = nn.Parameter(torch.empty(H, K, K))
            self.r_v = nn.Parameter(torch.empty(H, K, K))
            self.r_b = nn.Parameter(torch.empty(H, K))
        else:
            self.in_proj = nn.Linear(D, H * K, bias=False) if options.in_proj else None
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
        choices = {
            "kind": KINDS,
            "recurrent_init": ("std", "head_dim"),
            "proj_init": ("skeleton", "torch"),
            "block_norm": ("input", "residual"),
        }
        for key, allowed in choices.items():
            if getattr(options, key) not in allowed:
                raise ConfigError(f"model.mixer.{key}: '{getattr(options, key)}' is not one of {', '.join(allowed)}")
        defaults = FWPOptions()
        for key, kind in KIND_OPTIONS.items():
            if options.kind != kind and getattr(options, key) != getattr(defaults, key):
                raise ConfigError(f"model.mixer.{key}: only the {kind} layer has it (this one is {options.kind})")
        for key in ("recurrent_init_std", "srwm_q_init_scale"):
            if getattr(options, key) < 0:
                raise ConfigError(f"model.mixer.{key}: {getattr(options, key)} must be >= 0")
        H, K, D = int(cfg.n_heads), head_dim(cfg), int(cfg.d_model)
        if options.kind == "srwm" and not options.in_proj and H * K != D:
            raise ConfigError(
                f"model.mixer.in_proj: false splits x into heads as it is and needs n_heads * head_dim "
                f"({H} * {K}) == d_model ({D})"
            )

    def forward_flops(self, seq_len: int) -> float:
        """The fused recurrence per head: ``~12 K V`` per step (read, update and readout; K = V = head_dim)."""
        return self.n_heads * 12.0 * self.head_dim * self.head_dim

    def reset_parameters(self) -> None:
        """R_q, R_k, R_v, r_b (recurrent_delta) or the four initial SRWM matrices; with ``proj_init:
        torch`` also every projection (nn.Linear's own U(-1/sqrt(fan_in), 1/sqrt(fan_in)))."""
        o, K = self.options, self.head_dim
        with torch.no_grad():
            if o.proj_init == "torch":
                for m in self.modules():
                    if isinstance(m, nn.Linear):
                        m.reset_parameters()
            if self.kind == "recurrent_delta":
                std = K**-0.5 if o.recurrent_init == "head_dim" else o.recurrent_init_std
                for p in (self.r_q, self.r_k, self.r_v, self.r_b):
                    nn.init.normal_(p, 0.0, std)
            else:
                nn.init.normal_(self.w_y, 0.0, K**-0.5)
                nn.init.normal_(self.w_q, 0.0, o.srwm_q_init_scale * K**-0.5)
                nn.init.normal_(self.w_k, 0.0, K**-0.5)
                nn.init.normal_(self.w_b, o.srwm_beta_init_mean, K**-0.5)

    def srwm_input(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, D] -> the SRWM's input per head [B, T, H, K]: ``W_in x``, or x split into heads
        (in :func:`compute_dtype`)."""
        B, T, _ = x.shape
        h = self.in_proj(x) if self.in_proj is not None else x
        return h.reshape(B, T, self.n_heads, self.head_dim).to(compute_dtype(x))

    def recurrent_delta_inputs(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """x [B, T, D] -> q, k, v [B, T, H, K] and the learning-rate logits [B, T, H] (in
        :func:`compute_dtype`)."""
        B, T, _ = x.shape
        H, K, dt = self.n_heads, self.head_dim, compute_dtype(x)
        q, k, v = (proj(x).view(B, T, H, K).to(dt) for proj in (self.q_proj, self.k_proj, self.v_proj))
        return q, k, v, self.b_proj(x).to(dt)

    def recurrent_weights(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """R_q, R_k, R_v, r_b in the kernels' dtype (:func:`compute_dtype`)."""
        return tuple(p.to(compute_dtype(x)) for p in (self.r_q, self.r_k, self.r_v, self.r_b))

    def srwm_weights(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """The initial W_y, W_q, W_k, w_b in the kernels' dtype (:func:`compute_dtype`)."""
        return tuple(w.to(compute_dtype(x)) for w in (self.w_y, self.w_q, self.w_k, self.w_b))

    def forward(self, x, state=None, return_state=False, segments=None):
        if segments is not None:
            return self._forward_segments(x, state, return_state, segments)
        B, T, _ = x.shape
        H, K = self.n_heads, self.head_dim
        if self.kind == "recurrent_delta":
            S0 = None if get(state, "S") is None else (state["S"], state["y"])
            out, final = kernels.recurrent_delta(
                *self.recurrent_delta_inputs(x),
                *self.recurrent_weights(x),
                initial_state=S0,
                output_final_state=return_state,
                backend=self.backend,
            )
            new_state = {"S": final[0], "y": final[1]} if return_state else None
        else:
            W0 = get(state, "W")
            out, final = kernels.srwm(
                self.srwm_input(x),
                *self.srwm_weights(x),
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
                self.recurrent_delta_inputs(x),
                S0,
                fresh,
                return_state,
                **dict(zip(("r_q", "r_k", "r_v", "r_b"), self.recurrent_weights(x))),
                backend=self.backend,
            )
            new_state = {"S": final[0], "y": final[1]} if return_state else None
        else:
            weights = (self.w_y, self.w_q, self.w_k, self.w_b)
            fresh = lambda n: tuple(broadcast_weights(w.float(), n) for w in weights)  # noqa: E731
            w_y, w_q, w_k, w_b = self.srwm_weights(x)
            out, final = packed_scan(
                kernels.srwm,
                segments,
                (self.srwm_input(x),),
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
