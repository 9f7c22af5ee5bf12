"""Chunked PyTorch path of ``dplr`` (generalised WY representation), differentiable by autograd.

Per chunk of C steps with entering state S0 [K, V], per-key cumulative log decay G_t = sum_{s<=t} g_s
(chunk-local), G'_t = G_{t-1} (exclusive, G'_0 = 0), gamma = exp(G) and z_t := S_{t-1}^T a_t:

    (I - R) Z = A' S0 + P V,       A'_t = a_t * exp(G'_t)
    P[t, i] = sum_k a_tk k_ik exp(G'_tk - G_ik),  R[t, i] = same with b_i      (i < t)
    O = scale ((Q * gamma) S0 + Aqk V + Aqb Z),
    Aqk[t, i] = sum_k q_tk k_ik exp(G_tk - G_ik),  Aqb[t, i] = same with b_i   (i <= t)
    S_end = gamma_C * S0 + (K * exp(G_C - G))^T V + (B * exp(G_C - G))^T Z

The decay-weighted score matrices come from :mod:`kernels.ops.dplr.scores` (blocks factored through
reference steps, no exp of a positive number); P and R are row t-1 of the inclusive scores of
a_next[t] = a[t+1]. Everything but the state passing (a loop over T / C chunks) is batched over all
chunks.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from kernels._chunk_utils import chunk_length, empty_result
from kernels.ops.delta_rule._chunks import from_chunks, per_chunk, to_chunks
from kernels.ops.dplr.scores import decayed_scores


def _shift_down(x: torch.Tensor) -> torch.Tensor:
    """Rows moved down by one along dim -2 (row 0 becomes 0): y[t] = x[t - 1]."""
    return F.pad(x[..., :-1, :], (0, 0, 1, 0))


def dplr_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """q, k, a, b, g: [B, T, H, K]; v: [B, T, H, V]; state [B, H, K, V] (fp32)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    if T == 0:
        return empty_result(q, v, initial_state, output_final_state)
    S = q.new_zeros(B, H, K, V, dtype=torch.float32) if initial_state is None else initial_state.float()
    C = chunk_length(T, chunk_size, power_of_two=True)  # the score tree needs a power of two
    qc, kc, vc, ac, bc, gc = (to_chunks(x, C) for x in (q, k, v, a, b, g))  # [N, B, H, C, *]
    G = gc.cumsum(-2)
    G_excl = _shift_down(G)  # G'_t = G_{t-1}: a copy, so no gradient cancels through g_t
    G_last = G[..., -1:, :]  # [N, B, H, 1, K]

    # P[t, i] = sum_k a_tk k_ik e^{G_{t-1,k} - G_ik} (i < t) is row t-1 of the inclusive scores of
    # a_next[t] = a[t+1]; exponent-0 terms then sit on a diagonal that does not depend on the decays
    a_next = F.pad(ac[..., 1:, :], (0, 0, 0, 1))
    aqk, aqb, pn, rn = decayed_scores((qc, a_next), (G, G), (kc, bc), G, diagonal=(True, True))  # [N, B, H, C, C]
    p, r = _shift_down(pn), _shift_down(rn)

    eye = torch.eye(C, device=q.device)
    rhs = torch.cat([ac * torch.exp(G_excl), p @ vc], -1)
    sol = torch.linalg.solve_triangular(eye - r, rhs, upper=False, unitriangular=True)
    wz, zv = sol.split([K, V], -1)  # Z = zv + wz S0

    # exp(G_C - G_t); the last step's exponent is exactly 0 and kept out of the gradient (no rounding noise)
    not_last = (torch.arange(C, device=q.device) < C - 1).to(G.dtype)[:, None]
    to_end = torch.exp((G_last - G) * not_last)  # [N, B, H, C, K]
    kv_to_end = (kc * to_end).transpose(-1, -2) @ vc  # [N, B, H, K, V]
    b_to_end_t = (bc * to_end).transpose(-1, -2).contiguous()  # [N, B, H, K, C]
    gamma_last = torch.exp(G_last).transpose(-1, -2)  # [N, B, H, K, 1]

    N = qc.shape[0]
    states, zs = [], []
    S = S.reshape(B * H, K, V)
    for zv_n, wz_n, gamma_n, kv_n, b_n in zip(*map(per_chunk, (zv, wz, gamma_last, kv_to_end, b_to_end_t))):
        states.append(S)
        z = torch.baddbmm(zv_n, wz_n, S)
        zs.append(z)
        S = torch.baddbmm(torch.addcmul(kv_n, gamma_n, S), b_n, z)
    entering = torch.stack(states).view(N, B, H, K, V)
    z_all = torch.stack(zs).view(N, B, H, C, V)
    S = S.view(B, H, K, V)
    o = (qc * torch.exp(G)) @ entering + aqk @ vc + aqb @ z_all
    return from_chunks(o * scale, T).to(q.dtype), (S if output_final_state else None)
