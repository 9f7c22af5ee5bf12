"""Chunked PyTorch path of ``dplr`` (generalised WY representation), differentiable by autograd.

Per chunk of C steps with entering state S0 [K, V], per-key cumulative log decay G_t = sum_{s<=t} g_s
(chunk-local), G'_t = G_{t-1} (exclusive, G'_0 = 0), gamma = exp(G) and z_t := S_{t-1}^T a_t:

    (I - R) Z = A' S0 + P V,       A'_t = a_t * exp(G'_t)
    P[t, i] = sum_k a_tk k_ik exp(G'_tk - G_ik),  R[t, i] = same with b_i      (i < t)
    O = scale ((Q * gamma) S0 + Aqk V + Aqb Z),
    Aqk[t, i] = sum_k q_tk k_ik exp(G_tk - G_ik),  Aqb[t, i] = same with b_i   (i <= t)
    S_end = gamma_C * S0 + (K * exp(G_C - G))^T V + (B * exp(G_C - G))^T Z

The decay-weighted score matrices come from :mod:`kernels.ops.dplr.torch_chunk_scores` (blocks factored through
reference steps, no exp of a positive number); P and R are row t-1 of the inclusive scores of
a_next[t] = a[t+1]. Everything but the state passing (a loop over T / C chunks) is batched over all
chunks.

Packed sequences (``cu_seqlens``, :func:`dplr_chunked_varlen`) run the same pass over the packed row with
per-step sequence ids and the state terms of :mod:`kernels.ops.utils.packed` (z in the role of a second
value: each step adds ``k_t v_t^T + b_t z_t^T``): the score matrices P, R, Aqk, Aqb only couple steps of one
sequence (so I - R is block diagonal per sequence); A' takes its decays from each sequence's first step in
the chunk, ``A'_t = a_t exp(G'_t - G_{p-1})``; the entering state reaches (through A' and the output) only
the chunk's first sequence, and a sequence that begins inside the chunk gets ``Z += W h0`` (``W`` the A'
part of the solution) and ``o += scale (q gamma)^T h0`` from its own initial state; the state passes on
only while the chunk's last sequence continues.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from kernels._varlen import host_offsets, mark_varlen
from kernels.ops.utils.chunks import chunk_length, empty_result
from kernels.ops.utils.chunks import from_chunks, per_chunk, to_chunks
from kernels.ops.dplr.torch_chunk_scores import decayed_scores
from kernels.ops.utils import packed as varlen


def _shift_down(x: torch.Tensor) -> torch.Tensor:
    """Rows moved down by one along dim -2 (row 0 becomes 0): y[t] = x[t - 1]."""
    return F.pad(x[..., :-1, :], (0, 0, 1, 0))


def dplr_chunked(
    q, k, v, a, b, g, scale, initial_state=None, output_final_state=False, chunk_size=64, cu_seqlens=None, offsets=None
):
    """q, k, a, b, g: [B, T, H, K]; v: [B, T, H, V]; state [B, H, K, V] (fp32). ``cu_seqlens`` [N+1]: packed
    sequences (B = 1, states [N, H, K, V]), handled natively (:func:`dplr_chunked_varlen`); ``offsets``: its
    validated host copy (the packed layout is built from it instead of reading ``cu_seqlens`` again)."""
    if cu_seqlens is not None:
        packed = host_offsets(cu_seqlens, offsets)
        return dplr_chunked_varlen(q, k, v, a, b, g, scale, initial_state, output_final_state, packed, chunk_size)
    B, T, H, K = q.shape
    V = v.shape[-1]
    if T == 0:
        return empty_result(q, v, initial_state, output_final_state)
    S = q.new_zeros(B, H, K, V, dtype=torch.float32) if initial_state is None else initial_state.float()
    C = chunk_length(T, chunk_size, power_of_two=True)  # the score tree needs a power of two
    o, _, _, S = _chunked_pass(q, k, v, a, b, g, scale, S, C)
    return from_chunks(o, T).to(q.dtype), (S if output_final_state else None)


def dplr_chunked_varlen(
    q, k, v, a, b, g, scale: float, initial_state, output_final_state: bool, cu_seqlens, chunk_size: int = 64
):
    """``dplr_chunked`` over packed sequences (B = 1; states [N, H, K, V]): one pass over the row (see the
    module doc)."""
    T = q.shape[1]
    C = chunk_length(T, chunk_size, power_of_two=True)

    def one_pass(steps, S, seqc, flows, X, own):
        o, z, entering, S = _chunked_pass(*steps, scale, S, C, (seqc, flows, X, own))
        return from_chunks(o, T), z, entering[:, 0].transpose(0, 1), S

    def updates(steps, zs):  # every step's state update is k v^T + b z^T (one pass: zs holds its Z)
        return (steps[1], steps[4]), (steps[2], from_chunks(zs[0], T))

    return varlen.run_packed(
        one_pass, (q, k, v, a, b, g), g, scale, initial_state, output_final_state, cu_seqlens, C, None, updates
    )


def _chunked_pass(q, k, v, a, b, g, scale: float, S: torch.Tensor, C: int, packed: Optional[tuple] = None):
    """The chunked pass from state S [B, H, K, V] (fp32): (o * scale, Z) [N, B, H, C, V], the entering states
    [N, B, H, K, V] and the final state [B, H, K, V].

    ``packed`` (B = 1): None, or (seqc long [N, C], flows bool [N], X [H, N + 1, K, V] or None, own) as
    :func:`kernels.ops.utils.packed.run_packed` hands them to a pass; o then lacks the
    ``varlen.initial_state_output`` term."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    qc, kc, vc, ac, bc, gc = (to_chunks(x, C) for x in (q, k, v, a, b, g))  # [N, B, H, C, *]
    G = gc.cumsum(-2)
    G_excl = _shift_down(G)  # G'_t = G_{t-1}: a copy, so no gradient cancels through g_t
    G_last = G[..., -1:, :]  # [N, B, H, 1, K]

    # P[t, i] = sum_k a_tk k_ik e^{G_{t-1,k} - G_ik} (i < t) is row t-1 of the inclusive scores of
    # a_next[t] = a[t+1]; exponent-0 terms then sit on a diagonal that does not depend on the decays
    a_next = F.pad(ac[..., 1:, :], (0, 0, 0, 1))
    aqk, aqb, pn, rn = decayed_scores((qc, a_next), (G, G), (kc, bc), G, diagonal=(True, True))  # [N, B, H, C, C]
    p, r = _shift_down(pn), _shift_down(rn)
    q_gamma = qc * torch.exp(G)
    # exp(G_C - G_t); the last step's exponent is exactly 0 and kept out of the gradient (no rounding noise)
    not_last = (torch.arange(C, device=q.device) < C - 1).to(G.dtype)[:, None]
    to_end = torch.exp((G_last - G) * not_last)  # [N, B, H, C, K]
    gamma_last = torch.exp(G_last).transpose(-1, -2)  # [N, B, H, K, 1]
    injected = own = None
    if packed is not None:  # pairs within one sequence; the entering state reaches the first, passes on the last
        seqc, flows, X, own = packed
        same, first, tail, carry = varlen.chunk_masks(seqc, flows)
        same = same[:, None, None].to(G.dtype)  # [N, 1, 1, C, C]
        aqk, aqb, p, r = (x * same for x in (aqk, aqb, p, r))
        first, tail = (m[:, None, None, :, None].to(G.dtype) for m in (first, tail))  # [N, 1, 1, C, 1]
        q_gamma = q_gamma * first
        G_excl = G_excl - varlen.before_start(G, seqc, -2)  # A' decays from the sequence's first step
        to_end = to_end * tail
        gamma_last = gamma_last * carry.to(G.dtype)[:, None, None, None, None]
        injected = X[None, :, 1:].unbind(2) if X is not None else None

    eye = torch.eye(C, device=q.device)
    rhs = torch.cat([ac * torch.exp(G_excl), p @ vc], -1)
    sol = torch.linalg.solve_triangular(eye - r, rhs, upper=False, unitriangular=True)
    wz, zv = sol.split([K, V], -1)  # Z = zv + wz S0
    if own is not None:  # Z += W h0 on the rows of sequences beginning inside a chunk
        idx, rows, h0 = own
        w_own = wz[idx, 0] * rows[:, None, :, None]  # [M', H, C, K]
        zv = zv.index_add(0, idx, torch.einsum("mhck,mhkv->mhcv", w_own, h0)[:, None])
    if packed is not None:
        wz = wz * first

    kv_to_end = (kc * to_end).transpose(-1, -2) @ vc  # [N, B, H, K, V]
    b_to_end_t = (bc * to_end).transpose(-1, -2).contiguous()  # [N, B, H, K, C]

    N = qc.shape[0]
    states, zs = [], []
    S = S.reshape(B * H, K, V)
    injected = injected or [None] * N
    for zv_n, wz_n, gamma_n, kv_n, b_n, x_n in zip(
        *map(per_chunk, (zv, wz, gamma_last, kv_to_end, b_to_end_t)), injected
    ):
        states.append(S)
        z = torch.baddbmm(zv_n, wz_n, S)
        zs.append(z)
        S = torch.baddbmm(torch.addcmul(kv_n, gamma_n, S), b_n, z)
        if x_n is not None:  # an initial state entering at the next chunk
            S = S + x_n[0]
    entering = torch.stack(states).view(N, B, H, K, V)
    z_all = torch.stack(zs).view(N, B, H, C, V)
    o = q_gamma @ entering + aqk @ vc + aqb @ z_all
    return o * scale, z_all, entering, S.view(B, H, K, V)


mark_varlen(dplr_chunked, host_offsets=True)
