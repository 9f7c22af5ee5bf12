"""Probe 2, implicit attention: the T x T matrix A with ``y = A v`` that a token mixer applies
(closed forms in each family's ``implicit_attention``), and statistics of its rows.

Rows are turned into distributions ``p_t(s) = |A[t, s]| / sum_s |A[t, s]|``; per layer we report,
averaged over batch, heads and positions:

* ``recon_error``  max |A v - y| / max |y| (an exactness check of the closed form);
* ``entropy``      -sum_s p_t(s) log p_t(s) (nats);
* ``distance``     sum_s p_t(s) (t - s), the mean attended distance;
* ``prev_token``   p_t(t - 1);
* ``induction``    on a probe whose second half repeats the first (period L): p_t(t - L + 1), the
                   token after the previous occurrence of the current one (t in the second half).
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from lm.models.mixer import ImplicitAttention


def row_distributions(weights: torch.Tensor) -> torch.Tensor:
    """|A| normalised per row: [B, H, T, T] (rows of zeros stay zero)."""
    a = weights.abs().double()
    return a / a.sum(-1, keepdim=True).clamp_min(1e-30)


def attention_stats(
    ia: ImplicitAttention, period: Optional[int] = None, p: Optional[torch.Tensor] = None
) -> Dict[str, float]:
    """The statistics above; ``p`` is ``row_distributions(ia.weights)`` when already computed."""
    p = row_distributions(ia.weights) if p is None else p
    T = p.shape[-1]
    t = torch.arange(T, dtype=torch.float64)
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)  # [B, H, T]
    distance = (p * (t[:, None] - t[None, :]).clamp_min(0)).sum(-1)
    stats = {
        "recon_error": ia.reconstruction_error(),
        "entropy": float(entropy.mean()),
        "distance": float(distance.mean()),
    }
    if T > 1:
        stats["prev_token"] = float(torch.diagonal(p, offset=-1, dim1=-2, dim2=-1).mean())
    if period and T > period + 1:
        rows = torch.arange(period + 1, T)
        stats["induction"] = float(p[..., rows, rows - period + 1].mean())
    return stats
