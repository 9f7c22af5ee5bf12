"""``linear_attention``: linear Transformers as fast weight programmers, on the ``gla`` and
``delta_rule`` kernels. Per head (q, k in R^K, v in R^V, state S in R^{K x V})::

    lsa                 S_t = S_{t-1} + k_t v_t^T,  o_t = scale S_t^T q_t   (linear self-attention)
    linear_transformer  S_t = S_{t-1} + phi(k_t) v_t^T,  o_t = S_t^T phi(q_t) / (phi(q_t) . sum_s phi(k_s)),
                        phi(x) = elu(x) + 1                                      (Katharopoulos et al.)
    linear_transformer_nonorm   the same without the denominator, o_t = S_t^T phi(q_t) (Irie et al., 2023)
    retnet              S_t = gamma_h S_{t-1} + k_t v_t^T,  gamma_h = 1 - 2^(-5-h) fixed per head
    gla                 S_t = diag(alpha_t) S_{t-1} + k_t v_t^T,
                        log alpha_t = logsigmoid(W_2 W_1 x_t + b) / tau  (per key, low rank)
    deltanet            S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T,  beta_t = sigmoid(w_b x_t),
                        q, k = L2norm(silu(conv(W x)))                       (Yang et al., 2024)
    deltanet_sumnorm    the same rule with q, k = phi(W x) / sum phi(W x), phi = elu + 1, no conv
                        (Schlag et al., 2021; Irie et al., 2023)
    gated_deltanet      S' = exp(g_t) S_{t-1};  S_t = S' + beta_t k_t (v_t - S'^T k_t)^T,
                        g_t = -exp(A_log) softplus(w_a x_t + dt_bias)        (per head)
    mamba2              S_t = exp(g_t) S_{t-1} + dt_t B_t x_t^T,  o_t = S_t^T C_t + D_h x_t     (Dao & Gu, 2024)
                        dt_t = softplus(w_a x_t + dt_bias), g_t = -exp(A_log) dt_t  (scalar per head),
                        C, B, x = silu(conv(W x)) (q, k, v: B and C shared by all heads, ngroups = 1),
                        y = W_o RMSnorm(o_t * silu(W_z x_t))       (the gated norm after the gate)

    o_t = scale S_t^T q_t  ->  per-head RMS norm (optional)  ->  * silu(W_g x_t) (optional)  ->  W_o
    (``norm_after_gate``: the gate first, then the norm, as Mamba-2's gated RMS norm)

Mamba-2 here differs from state-spaces/mamba in: the norm is per head (Mamba-2 normalises over the
whole inner width with ngroups = 1); the widths are the family's (key and value dim = head dim, no
inner expansion, the block keeps its MLP like every family here) rather than d_state 128 and expand 2;
dt is not clamped (Mamba-2's default dt_limit is (0, inf) too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from lm.errors import ConfigError
from lm.models.flops import kernel_chunk
from lm.models.layers import HeadNorm, ShortConv, l2_normalize
from lm.models.mixer import ImplicitAttention, TokenMixer, get, onehot_values, packed_scan
from lm.models.registry import register

FEATURE_MAPS = {
    "identity": lambda x: x,
    "elu1": lambda x: F.elu(x) + 1.0,
    # elu + 1 divided by its sum over the head (Schlag et al., 2021's DeltaNet): positive, sums to 1
    "elu1_sum": lambda x: (F.elu(x) + 1.0) / (F.elu(x) + 1.0).sum(-1, keepdim=True),
    "silu": F.silu,
    "relu": F.relu,
}


@dataclass
class LinearAttentionOptions:
    rule: str = "additive"  # additive (gla kernel) | delta (delta_rule kernel)
    gate: str = "none"  # none | fixed (RetNet) | per_key (GLA) | per_head (Mamba-2 style)
    expand_k: float = 1.0  # key dim per head = expand_k * head_dim
    expand_v: float = 1.0
    feature_map: str = "identity"  # identity | elu1 | silu | relu
    normalize_qk: bool = False
    short_conv: bool = False
    conv_size: int = 4
    denominator: bool = False  # divide by phi(q) . sum phi(k) (the original linear Transformer)
    output_norm: bool = True
    output_gate: bool = True
    gate_low_rank: int = 16
    gate_normalizer: float = 16.0
    qk_groups: int = 0  # heads of q and k (shared by n_heads / qk_groups value heads); 0: one per head
    input_dt: bool = False  # Mamba-2's discretisation: k_t scaled by dt_t (per-head gate only)
    d_skip: bool = False  # o_t += D_h v_t (Mamba-2's D)
    norm_after_gate: bool = False  # the output gate before the per-head norm (Mamba-2's gated norm)
    scale: float = 0.0  # o_t = scale S_t^T q_t; 0: 1 / sqrt(key dim)


VARIANTS = {
    # plain unnormalised linear self-attention, y_t = W_o sum_s v_s (k_s . q_t): the LSA layer
    "lsa": {"output_norm": False, "output_gate": False},
    "linear_transformer": {"feature_map": "elu1", "denominator": True, "output_norm": False, "output_gate": False},
    "retnet": {"gate": "fixed"},
    "gla": {"gate": "per_key"},
    "deltanet": {"rule": "delta", "short_conv": True, "normalize_qk": True, "output_gate": False},
    # the definitions of Irie et al. (2023)'s code (IDSIA/fwp-formal-lang): the linear Transformer with
    # elu + 1 features and no denominator, o_t = S_t^T phi(q_t); DeltaNet of Schlag et al. (2021) with
    # sum-normalised elu + 1 q and k and no short convolution; neither has the head norm or output gate
    "linear_transformer_nonorm": {"feature_map": "elu1", "output_norm": False, "output_gate": False, "scale": 1.0},
    "deltanet_sumnorm": {"rule": "delta", "feature_map": "elu1_sum", "output_norm": False, "output_gate": False},
    "gated_deltanet": {"rule": "delta", "gate": "per_head", "short_conv": True, "normalize_qk": True},
    "mamba2": {
        "gate": "per_head",
        "short_conv": True,
        "qk_groups": 1,
        "input_dt": True,
        "d_skip": True,
        "norm_after_gate": True,
        "scale": 1.0,
    },
}


@register("linear_attention", LinearAttentionOptions, variants=VARIANTS, default_variant="gla")
class LinearAttention(TokenMixer):
    """Linear attention / fast weight programmers with additive or delta-rule updates."""

    def __init__(self, cfg: Any, options: LinearAttentionOptions, layer_idx: int):
        super().__init__(cfg, options, layer_idx)
        o = options
        D, H = self.d_model, self.n_heads
        self.key_dim = K = int(self.head_dim * o.expand_k)
        self.value_dim = V = int(self.head_dim * o.expand_v)
        self.qk_heads = G = int(o.qk_groups) or H
        self.q_proj = nn.Linear(D, G * K, bias=False)
        self.k_proj = nn.Linear(D, G * K, bias=False)
        self.v_proj = nn.Linear(D, H * V, bias=False)
        self.o_proj = nn.Linear(H * V, D, bias=False)
        self.o_proj.is_residual_out = True
        if o.short_conv:
            self.conv_q = ShortConv(G * K, o.conv_size)
            self.conv_k = ShortConv(G * K, o.conv_size)
            self.conv_v = ShortConv(H * V, o.conv_size)
        if o.rule == "delta":
            self.b_proj = nn.Linear(D, H, bias=True)
        if o.gate == "fixed":
            gamma = 1.0 - torch.pow(2.0, -5.0 - torch.arange(H, dtype=torch.float64))
            self.register_buffer("log_gamma", torch.log(gamma).float(), persistent=False)
        elif o.gate == "per_key":
            self.g_down = nn.Linear(D, o.gate_low_rank, bias=False)
            self.g_up = nn.Linear(o.gate_low_rank, H * K, bias=True)
        elif o.gate == "per_head":
            self.a_proj = nn.Linear(D, H, bias=False)
            self.A_log = nn.Parameter(torch.zeros(H))
            self.dt_bias = nn.Parameter(torch.zeros(H))
        if o.d_skip:
            self.D = nn.Parameter(torch.ones(H))
        if o.output_norm:
            self.o_norm = HeadNorm(H, V, eps=float(cfg.norm_eps))
        if o.output_gate:
            self.gate_proj = nn.Linear(D, H * V, bias=False)
        self.reset_parameters()

    @staticmethod
    def check_config(cfg: Any, options: LinearAttentionOptions) -> None:
        choices = {
            "rule": ("additive", "delta"),
            "gate": ("none", "fixed", "per_key", "per_head"),
            "feature_map": tuple(FEATURE_MAPS),
        }
        for key, allowed in choices.items():
            if getattr(options, key) not in allowed:
                raise ConfigError(f"model.mixer.{key}: '{getattr(options, key)}' is not one of {', '.join(allowed)}")
        if options.rule == "delta" and options.gate in ("fixed", "per_key"):
            raise ConfigError("model.mixer.gate: the delta rule takes a per-head gate only (none | per_head)")
        if options.rule == "delta" and options.denominator:
            raise ConfigError("model.mixer.denominator: not defined for the delta rule")
        if options.input_dt and options.gate != "per_head":
            raise ConfigError("model.mixer.input_dt: needs the per-head gate (gate: per_head), whose dt it uses")
        if options.d_skip and options.denominator:
            raise ConfigError("model.mixer.d_skip: not defined with the denominator")
        if options.scale and options.rule == "delta":
            raise ConfigError("model.mixer.scale: the delta rule keeps its 1 / sqrt(key dim) (set 0)")
        if options.scale < 0:
            raise ConfigError(f"model.mixer.scale: {options.scale} must be > 0 (or 0 for 1 / sqrt(key dim))")
        groups = int(options.qk_groups)
        n_heads = int(cfg.n_heads)
        if groups < 0 or (groups and n_heads % groups != 0):
            raise ConfigError(
                f"model.mixer.qk_groups: {groups} must divide model.n_heads ({n_heads}) (or 0: one per head)"
            )

    def reset_parameters(self) -> None:
        o = self.options
        with torch.no_grad():
            if o.gate == "per_head":
                H = self.n_heads
                self.A_log.copy_(torch.log(torch.empty(H).uniform_(1.0, 16.0)))
                dt = torch.exp(torch.empty(H).uniform_(math.log(1e-3), math.log(0.1)))
                self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
            if o.d_skip:
                nn.init.ones_(self.D)
            if o.rule == "delta":
                nn.init.zeros_(self.b_proj.bias)

    # --------------------------------------------------------------------------------- pieces
    def log_decay(self, x: torch.Tensor):
        """Log decay per head [B, T, H] or per key [B, T, H, K]; None when there is no decay."""
        o = self.options
        B, T, _ = x.shape
        if o.gate == "fixed":
            return self.log_gamma.to(x.device).expand(B, T, self.n_heads)
        if o.gate == "per_key":
            g = F.logsigmoid(self.g_up(self.g_down(x)).float()) / o.gate_normalizer
            return g.view(B, T, self.n_heads, self.key_dim)
        if o.gate == "per_head":
            return -torch.exp(self.A_log.float()) * self.step_size(x)
        return None

    def step_size(self, x: torch.Tensor) -> torch.Tensor:
        """The per-head step dt_t = softplus(w_a x_t + dt_bias) [B, T, H] (fp32) of the per-head gate."""
        return F.softplus(self.a_proj(x).float() + self.dt_bias.float())

    def features(self, x: torch.Tensor, state=None, segments=None):
        """Kernel inputs q, k [B,T,H,K], v [B,T,H,V], log decay g, beta [B,T,H], and conv states
        (``segments``: the short convolutions reset at document starts)."""
        o = self.options
        B, T, _ = x.shape
        H, K, V = self.n_heads, self.key_dim, self.value_dim
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        conv_state = {}
        if o.short_conv:
            seg = {} if segments is None else {"segments": segments}
            q, conv_state["conv_q"] = self.conv_q(q, get(state, "conv_q"), **seg)
            k, conv_state["conv_k"] = self.conv_k(k, get(state, "conv_k"), **seg)
            v, conv_state["conv_v"] = self.conv_v(v, get(state, "conv_v"), **seg)
        G = self.qk_heads
        q = FEATURE_MAPS[o.feature_map](q.view(B, T, G, K))
        k = FEATURE_MAPS[o.feature_map](k.view(B, T, G, K))
        v = v.view(B, T, H, V)
        if o.normalize_qk:
            q, k = l2_normalize(q), l2_normalize(k)
        if G != H:  # grouped q and k: each serves H / G consecutive heads
            q, k = q.repeat_interleave(H // G, dim=2), k.repeat_interleave(H // G, dim=2)
        if o.input_dt:  # S += dt_t k_t v_t^T: the step folded into the key (Mamba-2's dt B_t x_t^T)
            k = (k.float() * self.step_size(x)[..., None]).to(k.dtype)
        g = self.log_decay(x)
        g = x.new_zeros(B, T, H) if g is None and o.rule != "delta" else g
        g = None if g is None else g.to(x.dtype)
        beta = torch.sigmoid(self.b_proj(x).float()).to(x.dtype) if o.rule == "delta" else None
        return q, k, v, g, beta, conv_state

    def mix(self, q, k, v, g, beta, S0=None, return_state=False, segments=None):
        """The kernel: o_t = scale S_t^T q_t (divided by the normaliser for the linear Transformer).
        With ``segments`` the kernels run the packed row with ``cu_seqlens`` (reset at document starts)."""
        o = self.options
        if segments is not None:
            return self._mix_segments(q, k, v, g, beta, S0, return_state, segments)
        if o.rule == "delta":
            return kernels.delta_rule(
                q, k, v, beta, g, initial_state=S0, output_final_state=return_state, backend=self.backend
            )
        if not o.denominator:
            if o.scale:
                return kernels.gla(
                    q, k, v, g, scale=o.scale, initial_state=S0, output_final_state=return_state, backend=self.backend
                )
            return kernels.gla(q, k, v, g, initial_state=S0, output_final_state=return_state, backend=self.backend)
        V = v.shape[-1]
        ones = torch.ones_like(v[..., :1])
        out, S = kernels.gla(
            q,
            k,
            torch.cat([v, ones], dim=-1),
            g,
            scale=1.0,
            initial_state=S0,
            output_final_state=return_state,
            backend=self.backend,
        )
        return out[..., :V] / (out[..., V:].float() + 1e-6).to(out.dtype), S

    def _mix_segments(self, q, k, v, g, beta, S0, return_state, segments):
        o = self.options
        H, K = self.n_heads, self.key_dim
        Vs = v.shape[-1] + (1 if o.denominator else 0)
        fresh = lambda n: torch.zeros(n, H, K, Vs, device=q.device)  # noqa: E731
        if o.rule == "delta":
            return packed_scan(
                kernels.delta_rule, segments, (q, k, v, beta, g), S0, fresh, return_state, backend=self.backend
            )
        if not o.denominator:
            extra = {"scale": o.scale} if o.scale else {}
            return packed_scan(
                kernels.gla, segments, (q, k, v, g), S0, fresh, return_state, backend=self.backend, **extra
            )
        V = v.shape[-1]
        ones = torch.ones_like(v[..., :1])
        out, S = packed_scan(
            kernels.gla,
            segments,
            (q, k, torch.cat([v, ones], dim=-1), g),
            S0,
            fresh,
            return_state,
            scale=1.0,
            backend=self.backend,
        )
        return out[..., :V] / (out[..., V:].float() + 1e-6).to(out.dtype), S

    def forward(self, x, state=None, return_state=False, segments=None):
        o = self.options
        B, T, _ = x.shape
        H, V = self.n_heads, self.value_dim
        if segments is None:
            q, k, v, g, beta, new_state = self.features(x, state)
            out, S = self.mix(q, k, v, g, beta, get(state, "S"), return_state)
        else:
            q, k, v, g, beta, new_state = self.features(x, state, segments)
            out, S = self.mix(q, k, v, g, beta, get(state, "S"), return_state, segments)
        if o.d_skip:
            out = out + v * self.D.to(v.dtype)[:, None]
        if o.output_norm and not o.norm_after_gate:
            out = self.o_norm(out)
        if o.output_gate:
            out = out * F.silu(self.gate_proj(x)).view(B, T, H, V)
        if o.output_norm and o.norm_after_gate:
            out = self.o_norm(out)
        y = self.o_proj(out.reshape(B, T, H * V))
        if not return_state:
            return y, None
        new_state["S"] = S
        return y, new_state

    def implicit_attention(self, x: torch.Tensor) -> ImplicitAttention:
        """Every variant is linear in v (S_0 = 0): running the kernel on one-hot values gives the
        weights (for DeltaNet this is the product form of the delta rule; the linear Transformer's
        rows are normalised by its denominator)."""
        q, k, v, g, beta, _ = self.features(x)
        B, T, H, _ = q.shape
        eye = onehot_values(B, T, H, x.device).to(v.dtype)
        out, _ = self.mix(q, k, v, g, beta)
        if self.options.denominator:
            num, _ = kernels.gla(q, k, eye, g, scale=1.0, backend=self.backend)
            weights = num / (num.sum(-1, keepdim=True).float() + 1e-6).to(num.dtype)
        else:
            weights, _ = self.mix(q, k, eye, g, beta)
        if self.options.d_skip:  # D_h v_t: the diagonal
            D = self.D.to(v.dtype)[:, None]
            out = out + v * D
            weights = weights + eye * D
        return ImplicitAttention(weights.permute(0, 2, 1, 3), v, out)

    def forward_flops(self, seq_len: int) -> float:
        """The chunked kernel per head (chunk C of :func:`~lm.models.flops.kernel_chunk`): intra-chunk
        ``2 C (K + V)`` and state read and write ``4 K V``; the delta rule adds the per-chunk WY
        transform ``2 C K + C^2``."""
        K, V = self.key_dim, self.value_dim
        delta = self.options.rule == "delta"
        C = kernel_chunk("delta_rule" if delta else "gla", K, V)
        per_head = 2 * C * (K + V) + 4 * K * V
        if delta:
            per_head += 2 * C * K + C * C
        return self.n_heads * float(per_head)

    def init_state(self, batch_size, device=None, dtype=None):
        o = self.options
        V = self.value_dim + (1 if o.denominator else 0)
        state = {"S": torch.zeros(batch_size, self.n_heads, self.key_dim, V, device=device)}
        if o.short_conv:
            pad = o.conv_size - 1
            HK, HV = self.qk_heads * self.key_dim, self.n_heads * self.value_dim
            state["conv_q"] = torch.zeros(batch_size, pad, HK, device=device, dtype=dtype)
            state["conv_k"] = torch.zeros(batch_size, pad, HK, device=device, dtype=dtype)
            state["conv_v"] = torch.zeros(batch_size, pad, HV, device=device, dtype=dtype)
        return state
