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


@register("lstm", LSTMOptions, variants={"lstm": {}}, default_variant="lstm")
class LSTMMixer(TokenMixer):
    """LSTM (torch.nn.LSTM, one layer) with a linear readout to d_model."""

    def __init__(self, cfg: Any, options: LSTMOptions, layer_idx: int):
        super().__init__(cfg, options, layer_idx)
        self.hidden_dim = N = options.hidden_dim or self.d_model
        self.lstm = nn.LSTM(self.d_model, N, num_layers=1, batch_first=True)
        self.w_o = nn.Linear(N, self.d_model, bias=False)
        self.w_o.is_residual_out = True

    @staticmethod
    def check_config(cfg: Any, options: LSTMOptions) -> None:
        if options.hidden_dim < 0:
            raise ConfigError(f"model.mixer.hidden_dim: {options.hidden_dim} must be >= 0 (0: d_model)")

    def reset_parameters(self) -> None:
        self.lstm.reset_parameters()  # PyTorch's own initialisation, U(-1/sqrt(N), 1/sqrt(N))

    def forward_flops(self, seq_len: int) -> float:
        """The LSTM's own matrix products, ``2 * 4N (d_model + N)`` per token (its weights are not
        nn.Linear, so :func:`~lm.models.flops.matmul_parameters` does not count them)."""
        return 2.0 * 4 * self.hidden_dim * (self.d_model + self.hidden_dim)

    def _fresh(self, n: int, device) -> tuple:
        return (torch.zeros(n, self.hidden_dim, device=device), torch.zeros(n, self.hidden_dim, device=device))

    def forward(self, x, state=None, return_state=False, segments=None):
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

    def init_state(self, batch_size, device=None, dtype=None):
        return {
            "h": torch.zeros(batch_size, self.hidden_dim, device=device, dtype=dtype),
            "c": torch.zeros(batch_size, self.hidden_dim, device=device, dtype=dtype),
        }
