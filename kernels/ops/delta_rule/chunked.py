"""Chunked PyTorch path of ``delta_rule`` (WY / UT representation), differentiable by autograd.

Per chunk of C steps with entering state S0 [K, V], b = cumsum(g) inside the chunk (0 without g),
gamma_t = exp(b_t):

    L[i, j] = exp(b_i - b_j) k_i . k_j            (j < i, strictly lower)
    (I + diag(beta) L) U = diag(beta) (V - diag(gamma) K S0)
    W = T diag(beta gamma) K,  U~ = T diag(beta) V,  T = (I + diag(beta) L)^-1,  so U = U~ - W S0
    O = scale (diag(gamma) Q S0 + (M * Q K^T) U),  M[t, i] = exp(b_t - b_i) for i <= t
    S_end = gamma_C S0 + (K * exp(b_C - b))^T U

Everything but the state passing (a loop over T / C chunks) is batched over all chunks. Every
exponent is masked to <= 0 before ``exp``. On CPU long inputs run in passes of ``SEGMENT_CPU``
tokens with the state carried, which keeps the temporaries cache-sized (cost per token flat in T).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from kernels._chunk_utils import (causal_mask, chunk_length, default_segment, empty_result, masked_exp_diff,
                                  run_in_segments)
from kernels.ops.delta_rule._chunks import from_chunks, per_chunk, to_chunks

#: tokens per chunked pass on CPU (see ``delta_rule_chunked``)
SEGMENT_CPU = 1024


def delta_rule_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: Optional[torch.Tensor],
    scale: float,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    segment: Optional[int] = -1,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """q, k: [B, T, H, K]; v: [B, T, H, V]; beta, g: [B, T, H]; state [B, H, K, V] (fp32).

    ``segment``: tokens per chunked pass, the state carried between passes (None: all at once;
    -1: the device default, ``SEGMENT_CPU`` on CPU so the temporaries stay cache-sized and the cost
    per token flat in T, one pass on GPU).
    """
    if q.shape[1] == 0:
        return empty_result(q, v, initial_state, output_final_state)
    B, _, H, K = q.shape
    V = v.shape[-1]
    S = q.new_zeros(B, H, K, V, dtype=torch.float32) if initial_state is None else initial_state.float()
    if segment == -1:
        segment = default_segment(q.device, SEGMENT_CPU)

    def one_pass(q, k, v, beta, g, S):
        return _chunked_pass(q, k, v, beta, g, scale, S, chunk_size)

    o, S = run_in_segments(one_pass, (q, k, v, beta, g), S, segment, time_dim=1, out_dim=1)
    return o, (S if output_final_state else None)


def _chunked_pass(q, k, v, beta, g, scale: float, S: torch.Tensor, chunk_size: int):
    """One chunked pass from state S [B, H, K, V] (fp32): o [B, T, H, V] in q's dtype and the final S."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_length(T, chunk_size)
    qc, kc, vc, bc = (to_chunks(x, C) for x in (q, k, v, beta))  # [N, B, H, C, (K|V)]
    strict = causal_mask(C, q.device, diagonal=-1)  # i < t

    if g is not None:
        bcum = to_chunks(g, C).cumsum(-1)  # [N, B, H, C]
        # M, inclusive lower; the diagonal (exponent exactly 0) is a constant, so no gradient cancels
        decay = masked_exp_diff(bcum[..., :, None], bcum[..., None, :], strict) + torch.eye(C, device=q.device)
        gamma = bcum.exp()
        gamma_last = gamma[..., -1, None, None]  # [N, B, H, 1, 1]
        # exp(b_C - b_t); the last step's exponent is exactly 0 and kept out of the gradient
        not_last = torch.arange(C, device=q.device) < C - 1
        k_to_end = kc * torch.exp((bcum[..., -1:] - bcum) * not_last)[..., None]
        q_in = qc * (scale * gamma)[..., None]
        rhs_k = kc * (bc * gamma)[..., None]
    else:
        decay = causal_mask(C, q.device).to(qc.dtype)  # i <= t
        gamma_last = None
        k_to_end = kc
        q_in = qc * scale
        rhs_k = kc * bc[..., None]

    system = (kc @ kc.transpose(-1, -2)) * decay
    system = (bc[..., None] * system).masked_fill(~strict, 0.0) + torch.eye(C, device=q.device)
    rhs = torch.cat([rhs_k, vc * bc[..., None]], -1)
    sol = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    w, u_tilde = sol.split([K, V], -1)  # [N, B, H, C, K], [N, B, H, C, V]
    scores = (qc @ kc.transpose(-1, -2)) * (decay * scale)  # [N, B, H, C, C]

    N = qc.shape[0]
    decays = per_chunk(gamma_last) if gamma_last is not None else [None] * N
    states, us = [], []
    S = S.reshape(B * H, K, V)
    for w_n, u_tilde_n, k_n, gamma_n in zip(*map(per_chunk, (w, u_tilde, k_to_end.transpose(-1, -2))), decays):
        states.append(S)
        u = torch.baddbmm(u_tilde_n, w_n, S, alpha=-1.0)
        us.append(u)
        S = torch.baddbmm(S if gamma_n is None else gamma_n * S, k_n, u)
    entering = torch.stack(states).view(N, B, H, K, V)
    o = q_in @ entering + scores @ torch.stack(us).view(N, B, H, C, V)
    return from_chunks(o, T).to(q.dtype), S.view(B, H, K, V)
