"""Probe 3, linear-self-attention fit: how much of a token mixer's input->output map one linear
self-attention layer explains.

Any LSA layer (any heads) is ``y_t = sum_{s<=t} W (x_s (x)  x_s (x) x_t)`` — linear in the features
``phi_t[a, b, c] = C_t[a, b] x_t[c]`` with ``C_t = sum_{s<=t} x_s x_s^T`` (symmetric: a <= b). So the
best LSA fit is least squares on phi. To scale to any width, inputs and outputs are first mapped
to ``r`` dims by fixed random projections (lossless when the inputs span at most r dims). The fit
uses half of the sequences (ridge strength chosen by a split inside that half) and R^2 is measured
on the other half (held out), so it cannot be inflated by having more features than samples; a
held-out R^2 below 0 means no better than the mean.
"""

from __future__ import annotations

import torch


def lsa_features(x: torch.Tensor) -> torch.Tensor:
    """x [B, T, r] -> phi [B, T, r(r+1)/2 * r]."""
    B, T, r = x.shape
    outer = x[..., :, None] * x[..., None, :]  # [B, T, r, r]
    C = torch.cumsum(outer, dim=1)
    iu = torch.triu_indices(r, r)
    C = C[..., iu[0], iu[1]]  # [B, T, r(r+1)/2]
    return (C[..., :, None] * x[..., None, :]).reshape(B, T, -1)


RIDGES = (1e-8, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def _ridge_fit(A: torch.Tensor, Y: torch.Tensor, ridge: float) -> torch.Tensor:
    gram = A.T @ A + ridge * A.shape[0] * torch.eye(A.shape[1], dtype=A.dtype)
    return torch.linalg.solve(gram, A.T @ Y)


def _r2(Y: torch.Tensor, pred: torch.Tensor) -> float:
    residual = ((Y - pred) ** 2).sum()
    total = ((Y - Y.mean(0)) ** 2).sum().clamp_min(1e-30)
    return float(1.0 - residual / total)


def lsa_r2(x: torch.Tensor, y: torch.Tensor, rank: int = 6, seed: int = 0) -> float:
    """Held-out R^2 of the best LSA fit of y [B, T, D_out] from x [B, T, D_in] (B >= 4)."""
    B = x.shape[0]
    if B < 4:
        raise ValueError("the LSA fit needs at least 4 sequences (fit, ridge selection and test)")
    gen = torch.Generator().manual_seed(seed)
    x, y = x.double().cpu(), y.double().cpu()
    r_in, r_out = min(rank, x.shape[-1]), min(rank, y.shape[-1])
    P_in = torch.randn(x.shape[-1], r_in, generator=gen, dtype=torch.float64) / x.shape[-1] ** 0.5
    P_out = torch.randn(y.shape[-1], r_out, generator=gen, dtype=torch.float64) / y.shape[-1] ** 0.5
    xp = x @ P_in
    xp = xp / xp.std().clamp_min(1e-12)
    yp = y @ P_out
    phi = lsa_features(xp)
    half, quarter = B // 2, max(1, B // 4)

    def rows(t: torch.Tensor, a: int, b: int) -> torch.Tensor:
        return t[a:b].reshape(-1, t.shape[-1])

    scale = rows(phi, 0, half).std(0).clamp_min(1e-12)
    fit_a, fit_b, test = rows(phi, 0, quarter) / scale, rows(phi, quarter, half) / scale, rows(phi, half, B) / scale
    y_a, y_b, y_test = rows(yp, 0, quarter), rows(yp, quarter, half), rows(yp, half, B)
    best = max(RIDGES, key=lambda r: _r2(y_b, fit_b @ _ridge_fit(fit_a, y_a, r)))
    W = _ridge_fit(torch.cat([fit_a, fit_b]), torch.cat([y_a, y_b]), best)
    return _r2(y_test, test @ W)
