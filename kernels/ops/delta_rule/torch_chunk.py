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

from typing import Optional

import torch

from kernels._varlen import host_offsets, mark_varlen
from kernels.ops.utils.chunks import (
    causal_mask,
    chunk_length,
    default_segment,
    empty_result,
    masked_exp_diff,
    run_in_segments,
)
from kernels.ops.utils.chunks import from_chunks, per_chunk, to_chunks
from kernels.ops.utils import packed as varlen

#: tokens per chunked pass on CPU (see ``delta_rule_chunked``)
SEGMENT_CPU = 1024


def delta_rule_chunked(
    q,
    k,
    v,
    beta,
    g,
    scale,
    initial_state=None,
    output_final_state=False,
    chunk_size=64,
    segment=-1,
    cu_seqlens=None,
    offsets=None,
):
    """q, k: [B, T, H, K]; v: [B, T, H, V]; beta, g: [B, T, H]; state [B, H, K, V] (fp32).

    ``segment``: tokens per chunked pass, the state carried between passes (None: all at once;
    -1: the device default, ``SEGMENT_CPU`` on CPU so the temporaries stay cache-sized and the cost
    per token flat in T, one pass on GPU). ``cu_seqlens`` [N+1]: packed sequences (B = 1, states
    [N, H, K, V]), handled natively (``delta_rule_chunked_varlen``); ``offsets``: its validated host copy
    (the packed layout is built from it instead of reading ``cu_seqlens`` again).
    """
    if cu_seqlens is not None:
        return delta_rule_chunked_varlen(
            q,
            k,
            v,
            beta,
            g,
            scale,
            initial_state,
            output_final_state,
            host_offsets(cu_seqlens, offsets),
            chunk_size,
            segment,
        )
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


def delta_rule_chunked_varlen(
    q,
    k,
    v,
    beta,
    g,
    scale: float,
    initial_state,
    output_final_state: bool,
    cu_seqlens,
    chunk_size: int = 64,
    segment: Optional[int] = -1,
):
    """``delta_rule_chunked`` over packed sequences (B = 1; states [N, H, K, V]).

    As ``_chunked_pass`` with per-step sequence ids (the layout and state terms of
    :mod:`kernels.ops.utils.packed`, with the corrected values ``u`` in place of v): the in-chunk
    ``K K^T`` system and the scores only couple steps of one sequence (so the triangular system is
    block diagonal per sequence); the decays of the right-hand side ``W = T diag(beta gamma) K`` are
    taken from each sequence's first step in the chunk, ``gamma_t = exp(sum_{p <= s <= t} g_s)``; the
    entering state reaches (through W and the output) only the chunk's first sequence, and a sequence
    that begins inside the chunk gets ``u -= W h0`` and ``o += scale (q gamma)^T h0`` from its own
    initial state; the state is passed on only while the last sequence continues.
    """
    T, H = q.shape[1], q.shape[2]
    gate = g if g is not None else q.new_zeros(1, T, H, dtype=torch.float32)
    C = chunk_length(T, chunk_size)
    if segment == -1:
        segment = default_segment(q.device, SEGMENT_CPU)

    def one_pass(steps, S, seqc, flows, X, own):
        return _varlen_pass(*steps, scale, S, C, seqc, flows, X, own)

    return varlen.run_packed(
        one_pass,
        (q, k, v, beta, g),
        gate,
        scale,
        initial_state,
        output_final_state,
        cu_seqlens,
        C,
        segment,
        lambda steps, us: (steps[1], torch.cat(us, 1)),
    )


def _varlen_pass(q, k, v, beta, g, scale: float, S, C: int, seqc, flows, X, own):
    """One chunked pass over packed sequences from the entering state S [1, H, K, V].

    ``seqc`` long [N, C] (sequence per step), ``flows`` bool [N], ``X`` [H, N + 1, K, V] or None
    (injected initial states, X[0] ignored), ``own`` None or (chunk index [M'], rows bool [M', C],
    h0 [M', H, K, V]) for sequences beginning strictly inside a chunk. Returns o (fp32 [1, T, H, V],
    without those sequences' ``scale (q gamma)^T h0`` term), u [1, T, H, V], the entering states
    [H, N, K, V] and the state entering the next pass."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    qc, kc, vc, bc = (to_chunks(x, C) for x in (q, k, v, beta))  # [N, 1, H, C, (K|V)]
    N = qc.shape[0]
    eye = torch.eye(C, device=q.device)
    same, first, tail, carry = varlen.chunk_masks(seqc, flows)
    strict = causal_mask(C, q.device, diagonal=-1) & same[:, None, None]  # [N, 1, 1, C, C]
    first = first.float()[:, None, None]  # [N, 1, 1, C]: the chunk's first sequence
    tail = tail.float()[:, None, None]  # rows whose state passes on
    carry = carry.float()[:, None, None, None, None]
    if g is not None:
        bcum = to_chunks(g, C).cumsum(-1)  # [N, 1, H, C]
        decay = masked_exp_diff(bcum[..., :, None], bcum[..., None, :], strict) + eye
        # each row's decay since its sequence's first step in the chunk (b is monotone: exponent <= 0)
        gamma_seg = torch.exp(bcum - varlen.before_start(bcum, seqc, -1))
        gamma_last = bcum[..., -1, None, None].exp() * carry
        not_last = torch.arange(C, device=q.device) < C - 1
        k_to_end = kc * (torch.exp((bcum[..., -1:] - bcum) * not_last) * tail)[..., None]
        q_in = qc * (scale * bcum.exp() * first)[..., None]
    else:
        decay = (causal_mask(C, q.device) & same[:, None, None]).to(qc.dtype)
        gamma_seg = torch.ones_like(bc)
        gamma_last = carry
        k_to_end = kc * tail[..., None]
        q_in = qc * (scale * first)[..., None]
    system = (kc @ kc.transpose(-1, -2)) * decay
    system = (bc[..., None] * system).masked_fill(~strict, 0.0) + eye
    rhs = torch.cat([kc * (bc * gamma_seg)[..., None], vc * bc[..., None]], -1)
    sol = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    w, u_tilde = sol.split([K, V], -1)  # [N, 1, H, C, K], [N, 1, H, C, V]
    if own is not None:  # u -= W h0 on the rows of sequences beginning inside a chunk
        idx, rows, h0 = own
        w_own = w[idx, 0] * rows[:, None, :, None]  # [M', H, C, K]
        u_tilde = u_tilde.index_add(0, idx, -torch.einsum("mhck,mhkv->mhcv", w_own, h0)[:, None])
    w = w * first[..., None]
    scores = (qc @ kc.transpose(-1, -2)) * (decay * scale)  # [N, 1, H, C, C]

    injected = X[None, :, 1:].unbind(2) if X is not None else [None] * N
    states, us = [], []
    S = S.reshape(H, K, V)
    for w_n, u_tilde_n, k_n, gamma_n, x_n in zip(
        *map(per_chunk, (w, u_tilde, k_to_end.transpose(-1, -2), gamma_last.expand(N, 1, H, 1, 1))), injected
    ):
        states.append(S)
        u = torch.baddbmm(u_tilde_n, w_n, S, alpha=-1.0)
        us.append(u)
        S = torch.baddbmm(gamma_n * S, k_n, u)
        if x_n is not None:
            S = S + x_n[0]
    entering = torch.stack(states).view(N, 1, H, K, V)
    u_all = torch.stack(us).view(N, 1, H, C, V)
    o = q_in @ entering + scores @ u_all
    return from_chunks(o, T), from_chunks(u_all, T), entering[:, 0].transpose(0, 1), S.view(1, H, K, V)


mark_varlen(delta_rule_chunked, host_offsets=True)
