"""``lstm``: an LSTM layer (``torch.nn.LSTM``, one layer) as a token mixer, the recurrent baseline of
the formal-language comparisons (Irie et al., 2023; Bhattamishra et al., 2020).

Per step (N hidden units; sigma the logistic function)::

    i_t, f_t, o_t = sigma(W_{i,f,o} x_t + U_{i,f,o} h_{t-1} + b_{i,f,o})
    g_t = tanh(W_g x_t + U_g h_{t-1} + b_g)
    c_t = f_t * c_{t-1} + i_t * g_t,    h_t = o_t * tanh(c_t)
    y_t = W_o h_t                                       (N -> d_model)

The state is (h, c), [B, N] each. Nonlinear in its inputs, so it has no implicit attention. With
document starts the documents of the window run as one packed batch (``pack_sequence``), each from
its own initial state.

``elstm`` (option ``cell: elstm``): the e-LSTM of Irie et al. (2023), ``layers.py: QuasiLSTMlayer``
and ``model.py: QuasiLSTMModel`` of IDSIA/fwp-formal-lang ("Quasi-LSTM" there), whose recurrent
weights are element-wise (v_z, v_f in R^N)::

    z_t = tanh(W_z x_t + v_z * c_{t-1} + b_z),   f_t = sigma(W_f x_t + v_f * c_{t-1} + b_f)
    c_t = f_t * c_{t-1} + (1 - f_t) * z_t
    h_t = c_t * sigma(W_g [x_t; c_t] + b_g)            (the output gate reads c_t, not c_{t-1})
    y_t = W_o h_t                                       (N -> d_model)

Initialisation as the official code: W_z, W_f, v_z, v_f, b_z, b_f ~ N(0, 0.1) (forget bias 0), W_g
and b_g at nn.Linear's default U(+-1/sqrt(d_model + N)); W_o, the readout to the residual stream
that the official one-layer model does not have (its output layer reads h_t), is the skeleton's.
The state is c [B, N] (fp32); a document start resets it to 0. The recurrence runs as a time loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_sequence, pad_packed_sequence

from lm.errors import ConfigError
from lm.models.mixer import TokenMixer, get
from lm.models.registry import register


@dataclass
class LSTMOptions:
    hidden_dim: int = 0  # N; 0: d_model
    cell: str = "lstm"  # lstm (torch.nn.LSTM) | elstm (element-wise recurrent weights, Irie et al. 2023)


CELLS = ("lstm", "elstm")
ELSTM_INIT_STD = 0.1  # the official QuasiLSTMlayer's normal(0, 0.1)


@register("lstm", LSTMOptions, variants={"lstm": {}, "elstm": {"cell": "elstm"}}, default_variant="lstm")
class LSTMMixer(TokenMixer):
    """LSTM (torch.nn.LSTM, one layer) or e-LSTM with a linear readout to d_model."""

    def __init__(self, cfg: Any, options: LSTMOptions, layer_idx: int):
        super().__init__(cfg, options, layer_idx)
        self.hidden_dim = N = options.hidden_dim or self.d_model
        self.cell = options.cell
        if self.cell == "lstm":
            self.lstm = nn.LSTM(self.d_model, N, num_layers=1, batch_first=True)
        else:
            self.w_zf = nn.Linear(self.d_model, 2 * N, bias=False)  # [W_z; W_f]
            self.v_z = nn.Parameter(torch.empty(N))
            self.v_f = nn.Parameter(torch.empty(N))
            self.b_z = nn.Parameter(torch.empty(N))
            self.b_f = nn.Parameter(torch.empty(N))
            self.w_gate = nn.Linear(self.d_model + N, N, bias=True)
        self.w_o = nn.Linear(N, self.d_model, bias=False)
        self.w_o.is_residual_out = True
        if self.cell == "elstm":
            self.reset_parameters()

    @staticmethod
    def check_config(cfg: Any, options: LSTMOptions) -> None:
        if options.hidden_dim < 0:
            raise ConfigError(f"model.mixer.hidden_dim: {options.hidden_dim} must be >= 0 (0: d_model)")
        if options.cell not in CELLS:
            raise ConfigError(f"model.mixer.cell: '{options.cell}' is not one of {', '.join(CELLS)}")

    def reset_parameters(self) -> None:
        if self.cell == "lstm":
            self.lstm.reset_parameters()  # PyTorch's own initialisation, U(-1/sqrt(N), 1/sqrt(N))
            return
        with torch.no_grad():
            for p in (self.w_zf.weight, self.v_z, self.v_f, self.b_z, self.b_f):
                nn.init.normal_(p, 0.0, ELSTM_INIT_STD)
            self.w_gate.reset_parameters()  # nn.Linear's own U(-1/sqrt(fan_in), 1/sqrt(fan_in))

    def forward_flops(self, seq_len: int) -> float:
        """The LSTM's own matrix products, ``2 * 4N (d_model + N)`` per token (its weights are not
        nn.Linear, so :func:`~lm.models.flops.matmul_parameters` does not count them); 0 for the
        e-LSTM, whose matrices are nn.Linear and whose recurrence is element-wise."""
        if self.cell == "elstm":
            return 0.0
        return 2.0 * 4 * self.hidden_dim * (self.d_model + self.hidden_dim)

    def _fresh(self, n: int, device) -> tuple:
        return (torch.zeros(n, self.hidden_dim, device=device), torch.zeros(n, self.hidden_dim, device=device))

    def forward(self, x, state=None, return_state=False, segments=None):
        if self.cell == "elstm":
            return self._elstm(x, state, return_state, segments)
        B, T, _ = x.shape
        h0, c0 = get(state, "h"), get(state, "c")
        if segments is None:
            hx = None if h0 is None else (h0[None].to(x.dtype), c0[None].to(x.dtype))
            out, (h, c) = self.lstm(x, hx)
            h, c = h[0], c[0]
        else:
            init = segments.initial_state(None if h0 is None else (h0, c0), lambda n: self._fresh(n, x.device))
            flat = segments.pack(x)[0]
            offsets = segments.offsets
            docs = [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
            packed_out, (h, c) = self.lstm(
                pack_sequence(docs, enforce_sorted=False), (init[0][None].to(x.dtype), init[1][None].to(x.dtype))
            )
            padded, lengths = pad_packed_sequence(packed_out, batch_first=True)
            out = segments.unpack(torch.cat([padded[i, :n] for i, n in enumerate(lengths.tolist())])[None])
            h, c = segments.final_state((h[0], c[0]))
        y = self.w_o(out)
        return y, ({"h": h, "c": c} if return_state else None)

    def _elstm(self, x, state, return_state, segments):
        """The e-LSTM over x [B, T, D] from ``state`` (c, fp32), reset to 0 at every document start."""
        B, T, _ = x.shape
        c = get(state, "c")
        c = x.new_zeros(B, self.hidden_dim, dtype=torch.float32) if c is None else c.float()
        zx, fx = self.w_zf(x).float().chunk(2, dim=-1)
        v_z, v_f, b_z, b_f = (p.float() for p in (self.v_z, self.v_f, self.b_z, self.b_f))
        cells = []
        for t in range(T):
            if segments is not None:
                c = c.masked_fill(segments.starts[:, t, None], 0.0)
            z = torch.tanh(zx[:, t] + v_z * c + b_z)
            f = torch.sigmoid(fx[:, t] + v_f * c + b_f)
            c = f * c + (1.0 - f) * z
            cells.append(c)
        cs = torch.stack(cells, 1).to(x.dtype) if cells else x.new_zeros(B, 0, self.hidden_dim)
        h = cs * torch.sigmoid(self.w_gate(torch.cat([x, cs], dim=-1)))
        return self.w_o(h), ({"c": c} if return_state else None)

    def init_state(self, batch_size, device=None, dtype=None):
        if self.cell == "elstm":
            return {"c": torch.zeros(batch_size, self.hidden_dim, device=device)}
        return {
            "h": torch.zeros(batch_size, self.hidden_dim, device=device, dtype=dtype),
            "c": torch.zeros(batch_size, self.hidden_dim, device=device, dtype=dtype),
        }
