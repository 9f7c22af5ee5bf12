"""``rwkv``: RWKV-7 ("Goose") time mixing on the ``dplr`` kernel. Per head (K = V = head_dim)::

    x'_* = x_t + (x_{t-1} - x_t) * mu_*                          token shift, one lerp per branch
    r = W_r x'_r,  k = W_k x'_k,  v = W_v x'_v                   receptance, key, value
    log w_t = -e^{-1/2} sigmoid(w_0 + tanh(x'_w A_w) B_w)        data-dependent decay in (e^{-0.61}, 1)
    a_t = sigmoid(a_0 + x'_a A_a B_a)                            in-context learning rate
    v = v + (v_1 - v) * sigmoid(v_0 + x'_v A_v B_v)              value residual (layers > 0; v_1: layer 0's v)
    kk = L2norm(k * k_k);  k = k * (1 + (a - 1) * k_a)           removal key, adjusted key
    S_t = (diag(w_t) - (a_t * kk_t) kk_t^T) S_{t-1} + k_t v_t^T   = dplr(a = -kk, b = a * kk)
    o_t = GroupNorm_h(S_t^T r_t) + (r_t . (r_k * k_t)) v_t        readout plus the current-token bonus
    y_t = W_o (o_t * (sigmoid(x'_g G_1) G_2))                    output gate

Against the reference (BlinkDL/RWKV-LM ``RWKV-v7``, ``rwkv_v7_demo.py`` and
``train_temp/src/model.py``; fla's ``RWKV7Attention``), with ``model.norm: layernorm`` and
``model.mlp: rwkv_cmix`` as in ``configs/model/rwkv7``:

* the same by default: token shift and its six lerps, the decay
  ``exp(-e^{-1/2} sigmoid(.))`` (BlinkDL writes ``w = -softplus(-(.)) - 0.5`` and ``exp(-exp(w))``:
  equal), the low-rank maps (``w1/w2`` -> ``w_down/w_up``, ``a1/a2``, ``v1/v2``, ``g1/g2``), ``k_k``,
  ``k_a``, ``r_k``; the **value residual** (``value_residual``, source layer 0: on by default so that ``rwkv7`` configs
  are the reference design, whose published checkpoints all have it and import as they are; off
  gives the earlier, per-layer-only values);
  the per-head **GroupNorm** ``ln_x`` (mean-centred, weight and bias, eps 64e-5 = 1e-5 * head size
  64; ``head_norm: rms`` is the earlier RMS-only norm); **ln0**, a LayerNorm on the embedding before
  block 0 (``embed_norm``, held by block 0 as ``norm0``); pre-LayerNorms ``ln1``/``ln2`` and
  ``ln_out`` (``norm1``/``norm2``/``norm_f``); the channel mixer ``value(relu(key(lerp(x, x_{t-1},
  x_k)))^2)``.
* different: the channel mixer's hidden width is rounded up to a multiple of 64 (the reference: 4x
  or 3.5x of the width, a multiple of 32; an importer maps only widths that are multiples of 64);
  one head width for keys and values (fla's ``value_dim`` above ``hidden_size`` is refused on
  import); no lower clamp on the decay (fla's ``safe_gate`` is a kernel bound, not a model change).
* initialisation (``init: reference``, the default; ``init: simple`` is the earlier one, kept to compare):
  BlinkDL's trainer builds a new model's weights in two passes, the modules' own init and then
  ``generate_init_weight`` over every 2-D ``.weight``; the result is what this recipe reproduces. With
  ``n`` the channel (0..C-1, C = H*K), ``linear = n/(C-1) - 0.5``, ``z = ((n mod K) - (K-1)/2) / ((K-1)/2)``,
  ``zigzag = z |z|``, ``l`` the layer and ``L`` the depth:
  ``w0 = -6 + 6 (n/(C-1))^(1 + (l/(L-1))^0.3) + 0.5 + 2.5 zigzag``, ``a0 = -0.19 + 0.3 zigzag + 0.4 linear``,
  ``v0 = 0.73 - 0.4 linear``, ``k_k = 0.71 - 0.1 linear``, ``k_a = 1.02``, ``r_k = -0.04``; the
  six lerps ``1 - (d/D)^(p (1 - l/L))`` (p: r 0.2, w 0.9, k 0.7, v 0.7, a 0.9, g 0.2); each low-rank
  map (``w/a/v/g``) zero down and orthogonal up with gain ``0.1`` (times ``sqrt(rank/C)`` when the rank
  exceeds C); ``receptance``/``value`` orthogonal, ``key`` orthogonal * 0.1, ``output`` zero;
  ``ln_x`` weight ``((l+1)/L)^0.7``, bias 0; around the mixer (:meth:`RWKV7TimeMix.reset_around`): the
  channel mixer's lerp ``1 - (d/D)^((1 - l/L)^4)``, key orthogonal, value zero; the embedding
  uniform(+-1e-4) and an untied head orthogonal with gain ``0.5 sqrt(V/D)`` (0.5 if V <= D); a tied
  head and embedding keep the skeleton's normal(init_std) (see the differences below).
  ``init: simple``: ``w0 = -7 + 5 (n/(C-1))^(0.85 + sqrt(l/(L-1))) + 0.5``, ``k_k`` 0.85, ``k_a`` 1,
  ``r_k`` N(0, 0.1), ``a0`` 0, the ``w``/``a`` up maps zero and down maps, gate maps, projections,
  channel mixer and embedding normal(init_std) (residual outputs scaled by ``1/sqrt(2L)``), channel
  mixer lerp 0.5, ``ln_x`` 1 (lerps and value residual as the reference).
* training recipe (``train.weight_decay_groups: family``, ``train.lr_multipliers: true``, the
  defaults): as BlinkDL's ``configure_optimizers``, only the projections decay (receptance, key, value,
  output here; the channel mixer's key/value, the embedding and the head by the skeleton's rule), the
  low-rank maps, lerps, ``w0/a0/v0``, ``k_k/k_a/r_k`` and ``ln_x`` do not, and ``w0`` trains at 2x
  the learning rate (:meth:`RWKV7TimeMix.no_weight_decay`, :meth:`RWKV7TimeMix.lr_multipliers`).
* remaining differences from the reference recipe: the low-rank widths are options
  (``decay_low_rank`` 32, ``a_low_rank`` 32, ``v_low_rank`` 32, ``gate_low_rank`` 64; the reference
  suggests ``max(32, round(c sqrt(C) / 32) 32)`` with c = 2.5, 2.5, 1.7, 5: the same at C = 256 (the
  small config), gate 32 at C = 64 (tiny), 64/64/32/128 at C = 768 (125m)); ``configs/model/rwkv7`` tie the head to the embedding (the skeleton's default; the
  reference unties it: ``model.tie_embeddings=false``), and the tied matrix keeps normal(init_std):
  the reference's uniform(+-1e-4) embedding, as the output layer too, left ``rwkv7/small`` far behind
  at the demo budget (docs/recipes.md); no L2Wrap (the reference adds ``1e-4 / (B T)`` times the largest logit to its
  gradient); the optimizer's own settings are the run's ``train.*`` (the reference's demo: betas
  0.9/0.99, eps 1e-18, weight decay 0.001, warmup from 0.01 lr over 10 steps, cosine to lr/10 by tokens);
  the LayerNorms' eps is ``model.norm_eps`` (the reference: torch's 1e-5, the default here too);
  orthogonal matrices are drawn for our ``[out, in]`` layout (the same distribution, other values).
* a hybrid whose layer 0 is not RWKV: its first RWKV layer is the value-residual source (its own
  ``v0/v_down/v_up`` then go unused).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Set

import torch
import torch.nn as nn

import kernels
from lm.errors import ConfigError, did_you_mean
from lm.models.flops import kernel_chunk
from lm.models.layers import HeadNorm, RWKVChannelMix, l2_normalize, token_shift
from lm.models.mixer import ImplicitAttention, TokenMixer, compute_dtype, get, onehot_values, packed_scan
from lm.models.registry import register

BRANCHES = ("r", "w", "k", "v", "a", "g")
#: the exponent of each branch's token-shift lerp profile (both inits)
LERP_POWERS = {"r": 0.2, "w": 0.9, "k": 0.7, "v": 0.7, "a": 0.9, "g": 0.2}
#: the parameters that decay under the reference recipe (the rest: no_weight_decay)
DECAYED = ("receptance.weight", "key.weight", "value.weight", "output.weight")
INITS = ("reference", "simple")


def low_rank_orthogonal_(weight: torch.Tensor, scale: float) -> None:
    """The reference's ``ortho_init`` of an up map: it stores the map as ``[rank, out]`` (used as
    ``x @ W``), ours as the Linear weight ``[out, rank]``; gain ``scale * sqrt(rank / out)`` when
    rank > out, else ``scale``."""
    out, rank = weight.shape
    gain = math.sqrt(rank / out) if rank > out else 1.0
    nn.init.orthogonal_(weight, gain=gain * scale)


@dataclass
class RWKV7Options:
    decay_low_rank: int = 32
    a_low_rank: int = 32
    gate_low_rank: int = 64
    value_residual: bool = True  # v mixed with layer 0's v (the reference design)
    v_low_rank: int = 32
    head_norm: str = "groupnorm"  # groupnorm (the reference's ln_x: centred, with bias) | rms
    head_norm_eps: float = 64e-5
    embed_norm: bool = True  # ln0: a norm on the embedding before block 0 (held by the Block)
    # reference: BlinkDL's RWKV-LM initialisation (this mixer, the rwkv_cmix channel mixer, the embedding
    # and head; see the module docstring); simple: the earlier init (normal(init_std) projections, ...)
    init: str = "reference"


class HeadGroupNorm(nn.Module):
    """GroupNorm with one group per head over ``[..., H, K]``: ``(x - mean) / sqrt(var + eps) * w + b``
    (biased variance, per head), weights and biases ``[H, K]``."""

    is_norm = True  # its [H, K] gain and bias stay out of weight decay (lm.models.mixer.norm_parameter_names)

    def __init__(self, n_heads: int, head_dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(n_heads, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xc = xf - xf.mean(-1, keepdim=True)
        y = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float() + self.bias.float()).to(x.dtype)


@register("rwkv", RWKV7Options, variants={"rwkv7": {}}, default_variant="rwkv7")
class RWKV7TimeMix(TokenMixer):
    """RWKV-7 time mixing: data-dependent decay and in-context learning rate on a DPLR state."""

    uses_shared = True  # the value residual reads layer 0's v from the pass's ``shared`` dict

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
        if options.value_residual and layer_idx > 0:
            self.v0 = nn.Parameter(torch.zeros(HK))
            self.v_down = nn.Linear(D, options.v_low_rank, bias=False)
            self.v_up = nn.Linear(options.v_low_rank, HK, bias=False)
        if options.head_norm == "groupnorm":
            self.o_norm: nn.Module = HeadGroupNorm(H, K, eps=options.head_norm_eps)
        else:
            self.o_norm = HeadNorm(H, K, eps=options.head_norm_eps)
        self.reset_parameters()

    @staticmethod
    def check_config(cfg: Any, options: RWKV7Options) -> None:
        if options.head_norm not in ("groupnorm", "rms"):
            raise ConfigError(f"model.mixer.head_norm: '{options.head_norm}' is not one of groupnorm, rms")
        if options.init not in INITS:
            raise ConfigError(
                f"model.mixer.init: '{options.init}' is not one of {', '.join(INITS)}{did_you_mean(options.init, INITS)}"
            )

    # ---------------------------------------------------------------------------- the recipe
    def no_weight_decay(self) -> Set[str]:
        """The reference's groups: only the four projections decay (BlinkDL decays the 2-D ``.weight``
        tensors of ``att``; the low-rank maps, lerps, ``w0/a0/v0``, ``k_k/k_a/r_k`` and ``ln_x`` do not)."""
        return {name for name, _ in self.named_parameters()} - set(DECAYED)

    def lr_multipliers(self) -> Dict[str, float]:
        """The reference trains the decay base ``w0`` at twice the learning rate (its ``lr_2x`` group)."""
        return {"w0": 2.0}

    def reset_parameters(self) -> None:
        if self.options.init == "reference":
            self.reset_reference()
        else:
            self.reset_simple()

    def reset_reference(self) -> None:
        """BlinkDL's initialisation (formulas in the module docstring): per-channel ``linear`` and
        per-head ``zigzag`` profiles set w0/a0/v0/k_k, the low-rank maps start as zero down and
        orthogonal * 0.1 up, the projections orthogonal (key * 0.1, output zero), ``ln_x`` ((l+1)/L)^0.7."""
        HK, K = self.n_heads * self.head_dim, self.head_dim
        n_layers = max(int(self.cfg.n_layers), 1)
        ratio_0_to_1 = self.layer_idx / max(n_layers - 1, 1)
        with torch.no_grad():
            self._reset_lerps()
            n = torch.arange(HK, dtype=torch.float32)
            linear = n / max(HK - 1, 1) - 0.5
            zigzag = ((n % K) - (K - 1) / 2) / max((K - 1) / 2, 1e-9) if K > 1 else torch.zeros(HK)
            zigzag = zigzag * zigzag.abs()
            decay_speed = -6.0 + 6.0 * (n / max(HK - 1, 1)) ** (1.0 + ratio_0_to_1**0.3)
            self.w0.copy_(decay_speed + 0.5 + 2.5 * zigzag)
            self.a0.copy_(-0.19 + 0.3 * zigzag + 0.4 * linear)
            self.k_k.copy_(0.71 - 0.1 * linear)
            self.k_a.fill_(1.02)
            self.r_k.fill_(-0.04)
            maps = [("w_down", "w_up"), ("a_down", "a_up"), ("g_down", "g_up")]
            if hasattr(self, "v0"):
                self.v0.copy_(0.73 - 0.4 * linear)
                maps.append(("v_down", "v_up"))
            for down, up in maps:
                nn.init.zeros_(getattr(self, down).weight)
                low_rank_orthogonal_(getattr(self, up).weight, 0.1)
            nn.init.orthogonal_(self.receptance.weight, gain=1.0)
            nn.init.orthogonal_(self.key.weight, gain=0.1)
            nn.init.orthogonal_(self.value.weight, gain=1.0)
            nn.init.zeros_(self.output.weight)
            self.o_norm.weight.fill_(((self.layer_idx + 1) / n_layers) ** 0.7)
            if getattr(self.o_norm, "bias", None) is not None:
                nn.init.zeros_(self.o_norm.bias)

    def reset_around(self, block: nn.Module, model: nn.Module) -> None:
        """The reference's channel mixer (``rwkv_cmix``: lerp ``1 - (n/D)^((1 - l/L)^4)``, key
        orthogonal, value zero) and, for the first block of a model with an untied head, embedding
        uniform(+-1e-4) and the head orthogonal with gain ``0.5 sqrt(V/D)`` (0.5 when V <= D). A head tied
        to the embedding keeps the skeleton's normal(init_std) for both: the reference never ties, and
        its tiny embedding as the output layer too trained far worse (docs/recipes.md). ``init:
        simple``: nothing."""
        if self.options.init != "reference":
            return
        D = self.d_model
        with torch.no_grad():
            mlp = getattr(block, "mlp", None)
            if isinstance(mlp, RWKVChannelMix):
                ratio_1_to_0 = 1.0 - self.layer_idx / max(int(self.cfg.n_layers), 1)
                mlp.mu.copy_(1.0 - torch.pow(torch.arange(D, dtype=torch.float32) / D, ratio_1_to_0**4))
                nn.init.orthogonal_(mlp.key.weight, gain=1.0)
                nn.init.zeros_(mlp.value.weight)
            if block is not model.blocks[0]:
                return
            head = getattr(model, "head", None)
            if not isinstance(head, nn.Linear):  # tied: the embedding is the output layer too (see above)
                return
            if isinstance(model.embed, nn.Embedding):
                nn.init.uniform_(model.embed.weight, -1e-4, 1e-4)
            V = head.weight.shape[0]
            nn.init.orthogonal_(head.weight, gain=0.5 * math.sqrt(V / D) if V > D else 0.5)

    def _reset_lerps(self) -> None:
        """The six token-shift lerps, shared by both inits: ``mu_* = 1 - (n/D)^(p_* (1 - l/L))``."""
        D = self.d_model
        ratio_1_to_0 = 1.0 - self.layer_idx / max(int(self.cfg.n_layers), 1)
        ddd = torch.arange(D, dtype=torch.float32) / D
        for i, name in enumerate(BRANCHES):
            self.mu[i].copy_(1.0 - torch.pow(ddd, LERP_POWERS[name] * ratio_1_to_0))

    def reset_simple(self) -> None:
        """The earlier init (``init: simple``): the skeleton's normal(init_std) projections and maps,
        the lerps and value-residual parameters as the reference, the rest in the module docstring."""
        HK = self.n_heads * self.head_dim
        ratio_0_to_1 = self.layer_idx / max(int(self.cfg.n_layers) - 1, 1)
        with torch.no_grad():
            self._reset_lerps()
            n = torch.arange(HK, dtype=torch.float32)
            speed = -7.0 + 5.0 * (n / max(HK - 1, 1)) ** (0.85 + math.sqrt(ratio_0_to_1))
            self.w0.copy_(speed + 0.5)
            nn.init.zeros_(self.w_up.weight)
            nn.init.zeros_(self.a_up.weight)
            nn.init.zeros_(self.a0)
            nn.init.normal_(self.r_k, 0.0, 0.1)
            nn.init.ones_(self.k_a)
            self.k_k.fill_(0.85)
            if hasattr(self, "v0"):  # reference: v0 = 0.73 - 0.4 * linear, v1 = 0, v2 orthogonal * 0.1
                self.v0.copy_(0.73 - 0.4 * (n / max(HK - 1, 1) - 0.5))
                nn.init.zeros_(self.v_down.weight)
                nn.init.orthogonal_(self.v_up.weight, gain=0.1)

    def value_residual(self, v: torch.Tensor, xv: torch.Tensor, shared: Optional[Dict[str, Any]]) -> torch.Tensor:
        """``v + (v_1 - v) * sigmoid(v0 + B_v A_v x'_v)`` with v_1 = ``shared["v_first"]`` (layer 0's v,
        [B, T, H*K]); the first RWKV layer of a pass writes its own v there and returns it unchanged."""
        if not self.options.value_residual:
            return v
        first = None if shared is None else shared.get("v_first")
        if first is None or not hasattr(self, "v0"):  # layer 0 (also when checkpointing recomputes it)
            if shared is None and self.layer_idx > 0:
                raise ValueError(
                    f"RWKV-7 layer {self.layer_idx}: the value residual needs layer 0's values "
                    "(pass the model's shared dict: shared=...)"
                )
            if shared is not None:
                shared["v_first"] = v
            return v
        mix = torch.sigmoid(self.v0 + self.v_up(self.v_down(xv))).to(v.dtype)
        return v + (first.to(v.dtype) - v) * mix

    def features(self, x: torch.Tensor, state=None, shared: Optional[Dict[str, Any]] = None, segments=None):
        """r, k, v [B,T,H,K], the removal key kk, learning rate a, log decay, gate, last input
        (``segments``: the token shift resets at document starts; the value residual is per token)."""
        B, T, D = x.shape
        H, K = self.n_heads, self.head_dim
        dt = compute_dtype(x)  # the kernels' dtype (autocast's in mixed precision)
        prev, last = token_shift(x, get(state, "shift"), segments)
        mixed = x[:, :, None] + (prev - x)[:, :, None] * self.mu.to(x.dtype)  # [B, T, 6, D]
        xr, xw, xk, xv, xa, xg = mixed.unbind(2)
        r = self.receptance(xr).view(B, T, H, K).to(dt)
        k = self.key(xk)
        v = self.value_residual(self.value(xv), xv, shared).view(B, T, H, K).to(dt)
        log_w = -math.exp(-0.5) * torch.sigmoid(self.w0 + self.w_up(torch.tanh(self.w_down(xw))).float())
        a = torch.sigmoid(self.a0 + self.a_up(self.a_down(xa))).to(dt)
        gate = self.g_up(torch.sigmoid(self.g_down(xg)))
        kk = l2_normalize((k * self.k_k).view(B, T, H, K)).to(dt)
        k = (k * (1 + (a - 1) * self.k_a)).view(B, T, H, K).to(dt)
        return r, k, v, kk, a.view(B, T, H, K), log_w.view(B, T, H, K).to(dt), gate, last

    def forward(self, x, state=None, return_state=False, shared=None, segments=None):
        B, T, D = x.shape
        H, K = self.n_heads, self.head_dim
        r, k, v, kk, a, log_w, gate, last = self.features(x, state, shared, segments)
        if segments is None:
            out, S = kernels.dplr(
                r,
                k,
                v,
                -kk,
                kk * a,
                log_w,
                scale=1.0,
                initial_state=get(state, "S"),
                output_final_state=return_state,
                backend=self.backend,
            )
        else:
            out, S = packed_scan(
                kernels.dplr,
                segments,
                (r, k, v, -kk, kk * a, log_w),
                get(state, "S"),
                lambda n: torch.zeros(n, H, K, K, device=x.device),
                return_state,
                scale=1.0,
                backend=self.backend,
            )
        out = self.o_norm(out) + (r * k * self.r_k).sum(-1, keepdim=True) * v
        y = self.output((out.reshape(B, T, H * K)) * gate)
        return y, ({"S": S, "shift": last} if return_state else None)

    def implicit_attention(self, x: torch.Tensor, shared=None) -> ImplicitAttention:
        """The DPLR readout S_t^T r_t is linear in v: the kernel on one-hot values gives the weights
        (the current-token bonus is added after the head norm and is not part of them). The values
        are after the value residual (``shared``: as in ``forward``)."""
        r, k, v, kk, a, log_w, _, _ = self.features(x, shared=shared)
        B, T, H, _ = r.shape
        eye = onehot_values(B, T, H, x.device).to(v.dtype)
        out, _ = kernels.dplr(r, k, v, -kk, kk * a, log_w, scale=1.0, backend=self.backend)
        weights, _ = kernels.dplr(r, k, eye, -kk, kk * a, log_w, scale=1.0, backend=self.backend)
        return ImplicitAttention(weights.permute(0, 2, 1, 3), v, out)

    def forward_flops(self, seq_len: int) -> float:
        """The chunked DPLR kernel per head (K = V = head_dim, chunk C of
        :func:`~lm.models.flops.kernel_chunk`): ``2 C (2K + V) + C^2 + 6 K V``."""
        K = V = self.head_dim
        C = kernel_chunk("dplr", K, V)
        return self.n_heads * float(2 * C * (2 * K + V) + C * C + 6 * K * V)

    def init_state(self, batch_size, device=None, dtype=None):
        return {
            "S": torch.zeros(batch_size, self.n_heads, self.head_dim, self.head_dim, device=device),
            "shift": torch.zeros(batch_size, self.d_model, device=device, dtype=dtype),
        }
