"""``gated_rnn``: gated linear RNNs after "Gated recurrent neural networks discover attention"
(Zucchet et al., 2023): a diagonal linear recurrence between multiplicative (GLU-like) gates.

Two output gates (``model.mixer.output_gate``)::

    u_t = (W_v x_t + b_v) * act_in(W_g x_t + b_g)      multiplicative input gating (GLU); the biases
                                                       only with constant_input (= a constant-1 channel)
    lambda_t = exp(-exp(nu))                           static: learned per unit, lambda in [0, 1]
             = exp(-c softplus(Lambda) sigmoid(W_r x_t))   input-dependent (RG-LRU), c = 8
    h_t = lambda_t * h_{t-1} + s_t * u_t               s_t = sqrt(1 - lambda_t^2) if normalize_input else 1

    output_gate: state  (the paper's layer, variant ``state_gated``)
        y_t = W_o ((W_m h_t) * (W_q h_t))              gate on the recurrent state, linear readout
    output_gate: input  (variants ``x_gated``, ``input_dependent``, ``ungated``)
        y_t = W_o (act_out(W_q x_t) * h_t)             gate from a projection of the layer's input

In the paper both gates are multiplicative and the output gate acts on the recurrent state; the
query of linear self-attention is then carried by recurrent neurons of decay 0 fed through the
constant input channel (:func:`set_lsa_construction_state_gated`: H (dk dv + dk) neurons). The
``x_gated`` layer reads the query straight from x_t, so H dk dv neurons suffice
(:func:`set_lsa_construction`); it is an easier architecture than the paper's (it was called
``static`` before issue #21, a name kept as an alias so old configs and checkpoints load). The
ungated variant (no multiplicative gates) can compute neither.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from kernels.ops.utils import causal_mask, masked_exp_diff
from lm.errors import ConfigError
from lm.models.mixer import ImplicitAttention, TokenMixer, get, packed_scan
from lm.models.registry import register

ACTIVATIONS = {"identity": lambda x: x, "sigmoid": torch.sigmoid, "silu": F.silu}


@dataclass
class GatedRNNOptions:
    state_dim: int = 0  # hidden units N; 0: state_expand * d_model
    state_expand: float = 1.0
    recurrence: str = "static"  # static | input_dependent
    input_gating: bool = True
    output_gating: bool = True
    input_activation: str = "identity"  # identity | sigmoid | silu (the gate branch)
    output_activation: str = "identity"
    normalize_input: bool = False
    lambda_min: float = 0.9  # init range of the static lambda
    lambda_max: float = 0.999
    rg_lru_c: float = 8.0
    output_gate: str = "input"  # input: act_out(W_q x_t) * h_t | state: (W_m h_t) * (W_q h_t)
    gate_dim: int = 0  # output gate width M (output_gate: state); 0: state_dim
    constant_input: bool = False  # a constant-1 input channel for the input gate (biases b_v, b_g)


VARIANTS = {
    # linear gates, static recurrence, output gate from the layer's input x_t
    "x_gated": {},
    # the paper's layer: linear gates, static recurrence in [0, 1] initialised across the range,
    # output gate on the recurrent state, a constant input channel (for decay-0 query neurons)
    "state_gated": {"output_gate": "state", "constant_input": True, "lambda_min": 0.05, "lambda_max": 0.95},
    # RG-LRU / HGRN style: input-dependent decay, sigmoid-gated input, normalised input
    "input_dependent": {"recurrence": "input_dependent", "input_activation": "sigmoid", "normalize_input": True},
    # the ablation without multiplicative gating (a plain diagonal linear RNN)
    "ungated": {"input_gating": False, "output_gating": False},
    # the name of x_gated before issue #21, kept so that configs and checkpoints that say it load
    "static": {},
}


@register("gated_rnn", GatedRNNOptions, variants=VARIANTS, default_variant="x_gated")
class GatedRNN(TokenMixer):
    """Gated linear RNN: GLU input gating, diagonal linear recurrence, multiplicative output gating."""

    def __init__(self, cfg: Any, options: GatedRNNOptions, layer_idx: int):
        super().__init__(cfg, options, layer_idx)
        o = options
        D = self.d_model
        self.state_dim = N = o.state_dim or int(round(o.state_expand * D))
        self.state_gated = o.output_gate == "state"
        bias = o.constant_input
        self.w_v = nn.Linear(D, N, bias=bias)
        self.w_g = nn.Linear(D, N, bias=bias) if o.input_gating else None
        if self.state_gated:
            self.gate_dim = M = o.gate_dim or N
            self.w_m = nn.Linear(N, M, bias=False)
            self.w_q = nn.Linear(N, M, bias=False)
        else:
            self.gate_dim = M = N
            self.w_m = None
            self.w_q = nn.Linear(D, N, bias=False) if o.output_gating else None
        self.w_o = nn.Linear(M, D, bias=False)
        self.w_o.is_residual_out = True
        self.nu = nn.Parameter(torch.zeros(N))  # static: lambda = exp(-exp(nu))
        if o.recurrence == "input_dependent":
            self.w_r = nn.Linear(D, N, bias=True)
        else:
            self.w_r = None
        self.reset_parameters()

    @staticmethod
    def check_config(cfg: Any, options: GatedRNNOptions) -> None:
        if options.recurrence not in ("static", "input_dependent"):
            raise ConfigError(f"model.mixer.recurrence: '{options.recurrence}' is not static|input_dependent")
        for key in ("input_activation", "output_activation"):
            if getattr(options, key) not in ACTIVATIONS:
                raise ConfigError(
                    f"model.mixer.{key}: '{getattr(options, key)}' is not one of {', '.join(ACTIVATIONS)}"
                )
        if not 0 < options.lambda_min <= options.lambda_max < 1:
            raise ConfigError("model.mixer.lambda_min/lambda_max: need 0 < lambda_min <= lambda_max < 1")
        if options.output_gate not in ("input", "state"):
            raise ConfigError(f"model.mixer.output_gate: '{options.output_gate}' is not input|state")
        if options.output_gate == "state" and not options.output_gating:
            raise ConfigError("model.mixer.output_gate: 'state' needs model.mixer.output_gating: true")
        if options.gate_dim < 0:
            raise ConfigError(f"model.mixer.gate_dim: {options.gate_dim} must be >= 0 (0: state_dim)")

    def reset_parameters(self) -> None:
        o = self.options
        with torch.no_grad():
            # LRU init: lambda uniform in [lambda_min, lambda_max] -> nu = log(-log(lambda))
            lam = torch.empty_like(self.nu).uniform_(o.lambda_min, o.lambda_max)
            if self.w_r is None:
                self.nu.copy_(torch.log(-torch.log(lam)))
            else:  # softplus(-nu) = -log(lambda) / c, so that lambda_t = lambda at full gate
                rate = -torch.log(lam) / o.rg_lru_c
                self.nu.copy_(-torch.log(torch.expm1(rate)))
            if self.w_r is not None:
                nn.init.zeros_(self.w_r.bias)
            for lin in (self.w_v, self.w_g):
                if lin is not None and lin.bias is not None:
                    nn.init.zeros_(lin.bias)

    def log_lambda(self, x: torch.Tensor) -> torch.Tensor:
        """log lambda_t: [N] (static) or [B, T, N] (input-dependent), always <= 0."""
        if self.w_r is None:
            return -torch.exp(self.nu)
        rate = F.softplus(-self.nu)  # positive per unit
        return -self.options.rg_lru_c * rate * torch.sigmoid(self.w_r(x).float())

    def scan(self, x: torch.Tensor, h0=None, return_state: bool = False, segments=None):
        """The hidden states [B, T, N], output-gated by x (act_out(W_q x_t) * h_t) for
        ``output_gate: input`` and as they are for ``state``, and h_T (with ``segments``: reset at
        document starts, each row's state after its last document)."""
        o = self.options
        B, T, _ = x.shape
        u = self.w_v(x)
        if self.w_g is not None:
            u = u * ACTIVATIONS[o.input_activation](self.w_g(x))
        log_lam = self.log_lambda(x)
        lam = torch.exp(log_lam).to(u.dtype)
        if o.normalize_input:
            u = u * torch.sqrt(-torch.expm1(2 * log_lam)).to(u.dtype)
        a = lam.expand(B, T, self.state_dim) if lam.dim() == 1 else lam
        if segments is None:
            h, h_last = kernels.linear_scan(
                a, u, initial_state=h0, output_final_state=return_state, backend=self.backend
            )
        else:
            h, h_last = packed_scan(
                kernels.linear_scan,
                segments,
                (a, u),
                h0,
                lambda n: torch.zeros(n, self.state_dim, device=x.device),
                return_state,
                backend=self.backend,
            )
        if self.w_q is not None and not self.state_gated:
            h = h * ACTIVATIONS[o.output_activation](self.w_q(x))
        return h, h_last

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        """y from :meth:`scan`'s states: W_o h, or W_o ((W_m h) * act_out(W_q h)) when state-gated."""
        if self.state_gated:
            h = self.w_m(h) * ACTIVATIONS[self.options.output_activation](self.w_q(h))
        return self.w_o(h)

    def forward(self, x, state=None, return_state=False, segments=None):
        h, h_last = self.scan(x, get(state, "h"), return_state, segments)
        return self.readout(h), ({"h": h_last} if return_state else None)

    def init_state(self, batch_size, device=None, dtype=None):
        return {"h": torch.zeros(batch_size, self.state_dim, device=device)}

    def implicit_attention(self, x: torch.Tensor) -> ImplicitAttention:
        """Per unit n (a "head" of width 1): ``q_t,n h_t,n = sum_s A_n[t, s] v_s,n`` with
        ``A_n[t, s] = act_out(q_t,n) * prod_{r=s+1..t} lambda_r,n * s_s,n * act_in(g_s,n)`` and
        values ``v = W_v x (+ b_v)``; the decay product is formed as exp of a masked difference of
        cumulative log-lambdas (never a positive exponent). State-gated: the row factor is 1 and the
        output is h_t itself (the output gate multiplies two readouts of the state afterwards, a
        per-token post-processing)."""
        o = self.options
        B, T, _ = x.shape
        N = self.state_dim
        v = self.w_v(x)
        log_lam = self.log_lambda(x)
        ll = (log_lam.expand(B, T, N) if log_lam.dim() == 1 else log_lam).double().clamp_min(-1e4)
        cum = torch.cumsum(ll, 1).transpose(1, 2)  # [B, N, T]
        decay = masked_exp_diff(cum[..., :, None], cum[..., None, :], causal_mask(T, x.device)).float()
        col = torch.ones(B, T, N, device=x.device)
        if self.w_g is not None:
            col = col * ACTIVATIONS[o.input_activation](self.w_g(x)).float()
        if o.normalize_input:
            col = col * torch.sqrt(-torch.expm1(2 * ll)).float()
        row = (
            ACTIVATIONS[o.output_activation](self.w_q(x)).float()
            if self.w_q is not None and not self.state_gated
            else torch.ones(B, T, N, device=x.device)
        )
        weights = row.transpose(1, 2)[..., :, None] * decay * col.transpose(1, 2)[..., None, :]
        out, _ = self.scan(x)
        return ImplicitAttention(weights, v.float()[..., None], out.float()[..., None])


# ------------------------------------------------------------------ the explicit construction


def linear_self_attention(x: torch.Tensor, W_Q, W_K, W_V, W_O) -> torch.Tensor:
    """Causal linear self-attention, unnormalised: ``y_t = W_O sum_{s<=t} v_s (k_s . q_t)`` per head.

    x: [B, T, D]; W_Q, W_K: [H, dk, D]; W_V: [H, dv, D]; W_O: [D_out, H * dv].
    """
    q = torch.einsum("hkd,btd->bthk", W_Q, x)
    k = torch.einsum("hkd,btd->bthk", W_K, x)
    v = torch.einsum("hvd,btd->bthv", W_V, x)
    scores = torch.einsum("bthk,bshk->bhts", q, k)
    T = x.shape[1]
    scores = scores.masked_fill(~causal_mask(T, x.device), 0.0)
    heads = torch.einsum("bhts,bshv->bthv", scores, v)
    return heads.reshape(*heads.shape[:2], -1) @ W_O.t()


@torch.no_grad()
def set_lsa_construction(layer: GatedRNN, W_Q, W_K, W_V, W_O) -> None:
    """Set ``layer``'s weights so that it computes :func:`linear_self_attention` exactly.

    Needs the ``x_gated`` layer: identity gate activations, both gates, a static recurrence without input
    normalisation, and ``state_dim == H * dv * dk``. Unit (h, i, j) receives v_i k_j (input
    gate), keeps it forever (lambda = 1), is multiplied by q_j (output gate) and W_o sums the
    units of (h, i) into output column i of head h.
    """
    o = layer.options
    if not (
        o.input_gating
        and o.output_gating
        and not layer.state_gated
        and not o.constant_input
        and o.recurrence == "static"
        and not o.normalize_input
        and o.input_activation == "identity"
        and o.output_activation == "identity"
    ):
        raise ValueError("the construction needs the 'x_gated' variant with identity gates and no input normalisation")
    H, dk, D = W_Q.shape
    dv = W_V.shape[1]
    if layer.state_dim != H * dv * dk:
        raise ValueError(f"state_dim must be H*dv*dk = {H * dv * dk}, got {layer.state_dim}")
    if W_O.shape != (layer.d_model, H * dv):
        raise ValueError(f"W_O: expected shape ({layer.d_model}, {H * dv}), got {tuple(W_O.shape)}")
    # unit index n = (h * dv + i) * dk + j
    value_rows = W_V[:, :, None, :].expand(H, dv, dk, D).reshape(-1, D)
    key_rows = W_K[:, None, :, :].expand(H, dv, dk, D).reshape(-1, D)
    query_rows = W_Q[:, None, :, :].expand(H, dv, dk, D).reshape(-1, D)
    layer.w_v.weight.copy_(value_rows)
    layer.w_g.weight.copy_(key_rows)
    layer.w_q.weight.copy_(query_rows)
    layer.w_o.weight.copy_(W_O.repeat_interleave(dk, dim=1))
    layer.nu.fill_(-math.inf)  # lambda = exp(-exp(-inf)) = 1 exactly


def state_gated_neurons(heads: int, dk: int, dv: int) -> Tuple[int, int]:
    """(recurrent neurons N, output-gate width M) of :func:`set_lsa_construction_state_gated`:
    N = H (dk dv + dk) (key-value neurons plus query neurons), M = H dk dv."""
    return heads * (dk * dv + dk), heads * dk * dv


@torch.no_grad()
def set_lsa_construction_state_gated(layer: GatedRNN, W_Q, W_K, W_V, W_O) -> None:
    """Set a ``state_gated`` layer (the paper's) so that it computes :func:`linear_self_attention`.

    Recurrent neurons, with N = H (dk dv + dk) (:func:`state_gated_neurons`):

    * key-value neuron (h, i, j), n = (h dv + i) dk + j: input gate (W_V x)_hi * (W_K x)_hj, decay
      lambda = 1, so h_t,n = sum_{s<=t} v_s,hi k_s,hj;
    * query neuron (h, j), n = H dv dk + h dk + j: input gate (W_Q x)_hj * 1 (the constant channel,
      i.e. the bias of W_g), decay lambda = 0, so h_t,n = q_t,hj.

    Output gate unit (h, i, j) (M = H dk dv): W_m picks key-value neuron (h, i, j), W_q picks query
    neuron (h, j); their product summed over j by the readout (W_O with every column repeated dk
    times) is ``W_O sum_s v_s (k_s . q_t)``. The paper's Section 3 counts the same neurons for one
    head (d^2 + d with dk = dv = d); :func:`set_lsa_construction` (``x_gated``) needs no query
    neurons because its output gate reads x_t.
    """
    o = layer.options
    if not (
        layer.state_gated
        and o.constant_input
        and o.input_gating
        and o.recurrence == "static"
        and not o.normalize_input
        and o.input_activation == "identity"
        and o.output_activation == "identity"
    ):
        raise ValueError(
            "the construction needs the 'state_gated' variant with identity gates and no input normalisation"
        )
    H, dk, D = W_Q.shape
    dv = W_V.shape[1]
    N, M = state_gated_neurons(H, dk, dv)
    if layer.state_dim != N or layer.gate_dim != M:
        raise ValueError(
            f"state_dim/gate_dim must be H(dk dv + dk) = {N} and H dk dv = {M}, got {layer.state_dim}/{layer.gate_dim}"
        )
    if W_O.shape != (layer.d_model, H * dv):
        raise ValueError(f"W_O: expected shape ({layer.d_model}, {H * dv}), got {tuple(W_O.shape)}")
    kv = H * dv * dk
    zeros = torch.zeros(N - kv, D, dtype=W_Q.dtype, device=W_Q.device)
    value_rows = W_V[:, :, None, :].expand(H, dv, dk, D).reshape(-1, D)
    key_rows = W_K[:, None, :, :].expand(H, dv, dk, D).reshape(-1, D)
    layer.w_v.weight.copy_(torch.cat([value_rows, W_Q.reshape(-1, D)]))
    layer.w_v.bias.zero_()
    layer.w_g.weight.copy_(torch.cat([key_rows, zeros]))
    layer.w_g.bias.copy_(torch.cat([torch.zeros(kv), torch.ones(N - kv)]))
    # output gate: unit (h, i, j) = kv neuron (h, i, j) times query neuron (h, j)
    unit = torch.arange(M)
    h_idx, j_idx = unit // (dv * dk), unit % dk
    layer.w_m.weight.zero_()
    layer.w_m.weight[unit, unit] = 1.0
    layer.w_q.weight.zero_()
    layer.w_q.weight[unit, kv + h_idx * dk + j_idx] = 1.0
    layer.w_o.weight.copy_(W_O.repeat_interleave(dk, dim=1))
    layer.nu[:kv] = -math.inf  # lambda = exp(-exp(-inf)) = 1 exactly
    layer.nu[kv:] = math.inf  # lambda = exp(-exp(inf)) = 0 exactly
