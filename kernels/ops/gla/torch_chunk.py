"""Chunked gated linear attention (PyTorch, any device; autograd differentiates it).

``S_t = exp(g_t)[:, None] * S_{t-1} + k_t v_t^T``, ``o_t = scale S_t^T q_t``, in chunks of C = 64.
With ``b_t`` the cumulative log decay inside the chunk (``b_t = g_1 + ... + g_t``, <= 0, decreasing):

- intra-chunk: ``o_t += sum_{s<=t} (sum_k q_tk k_sk exp(b_tk - b_sk)) v_s`` (a masked [C, C] matrix A);
- inter-chunk: ``o_t += (q_t * exp(b_t))^T S_prev``, and the state passed on is
  ``S_next = exp(b_last)[:, None] * S_prev + sum_s (k_s * exp(b_last - b_s)) v_s^T``.

Every exponential is of a number <= 0. For a per-head gate (``g``: [B, T, H]) the matrix A is
``(Q K^T) * exp(b_t - b_s)`` with the exponent masked to ``-inf`` above the diagonal. For a per-key
gate the factorisation ``(q e^b)(k e^-b)^T`` would overflow (``g = -5``: ``e^320``), so A is built
from 16 x 16 sub-blocks: an off-diagonal pair (later block i, earlier block j) uses the reference
point ``r = b`` at the last position of block j, ``(q * e^(b_t - r)) (k * e^(r - b_s))^T`` with both
factors <= 1; a diagonal sub-block forms the decays ``exp(b_t - b_s)`` of its [16, 16, K] tensor
explicitly, but only its lower triangle (s <= t, one sub-diagonal at a time), so no exponent is
positive and nothing needs masking (a custom autograd function recomputes them in backward).

The chunks are processed all at once (batched matmuls); only the state passing loops over the
T / 64 chunks. T is padded to a multiple of 64 with k = v = 0, g = 0 (the state is unchanged).
On CPU long sequences run in segments of ``SEGMENT_CPU`` tokens (state carried across), which
keeps the temporaries cache-sized and the cost per token flat in T.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from kernels.ops.utils import chunks
from kernels._varlen import host_offsets, mark_varlen
from kernels.ops.utils.chunks import (
    causal_mask,
    empty_result,
    masked_exp_diff,
    merge_chunks,
    pad_to_multiple,
    run_in_segments,
    split_chunks,
)

CHUNK = 64
SUB = 16
#: tokens per pass on CPU (see ``default_segment``)
SEGMENT_CPU = 1024


class _DiagonalBlockScores(torch.autograd.Function):
    """``A[n, t, s] = sum_k q_tk k_sk exp(b_tk - b_sk)`` for s <= t inside sub-blocks q, k, b [n, S, K].

    Evaluated one sub-diagonal ``d = t - s`` at a time, so only the ``S (S + 1) / 2`` pairs with
    ``s <= t`` are formed and every exponent ``b_t - b_s`` is <= 0 (no mask, nothing to overflow);
    the decays are recomputed in backward rather than stored.
    """

    @staticmethod
    def forward(ctx, q, k, b):
        n, S, _ = q.shape
        A = q.new_zeros(n, S, S)
        A.diagonal(0, 1, 2).copy_((q * k).sum(-1))
        for d in range(1, S):
            E = torch.sub(b[:, d:], b[:, :-d]).exp_()  # [n, S - d, K]: rows t = d.., columns s = t - d
            A.diagonal(-d, 1, 2).copy_(E.mul_(q[:, d:]).mul_(k[:, :-d]).sum(-1))
        ctx.save_for_backward(q, k, b)
        return A

    @staticmethod
    def backward(ctx, dA):
        q, k, b = ctx.saved_tensors
        S = q.shape[1]
        d0 = dA.diagonal(0, 1, 2)[..., None]
        dq, dk, db = d0 * k, d0 * q, torch.zeros_like(b)
        for d in range(1, S):
            M = torch.sub(b[:, d:], b[:, :-d]).exp_().mul_(dA.diagonal(-d, 1, 2)[..., None])  # dL/dA * E
            dk[:, :-d].addcmul_(M, q[:, d:])
            M.mul_(k[:, :-d])
            dq[:, d:].add_(M)
            M.mul_(q[:, d:])  # X = dA q_t k_s E: dA/db_t = +X, dA/db_s = -X
            db[:, d:].add_(M)
            db[:, :-d].sub_(M)
        return dq, dk, db


def intra_scores_per_key(q: torch.Tensor, k: torch.Tensor, b: torch.Tensor, sub: int = SUB) -> torch.Tensor:
    """Masked intra-chunk matrix A [.., C, C] for per-key cumulative log decays b [.., C, K].

    Sub-blocks of ``sub`` rows; ``r_j`` is b at the last position of block j. Column block j below
    the diagonal is ``(q_t e^(b_t - r_j)) (k_s e^(r_j - b_s))^T`` for all rows t after block j (both
    factors <= 1, one matmul); diagonal sub-blocks use the explicit decays (``_DiagonalBlockScores``).
    """
    C, K = q.shape[-2], q.shape[-1]
    nb = C // sub
    lead = q.shape[:-2]
    diag = _DiagonalBlockScores.apply(*(x.reshape(-1, sub, K) for x in (q, k, b)))
    diag = diag.reshape(*lead, nb, sub, sub).unbind(-3)
    # unbind/cat rather than slicing: their backward does not zero-fill a full-size tensor per slice
    q_blocks, k_blocks, b_blocks = (x.reshape(*lead, nb, sub, K).unbind(-3) for x in (q, k, b))
    columns = []
    for j in range(nb):
        parts = [q.new_zeros(*lead, j * sub, sub)] if j else []
        parts.append(diag[j])
        if j < nb - 1:
            r = b_blocks[j][..., -1:, :]
            k_j = k_blocks[j] * torch.exp(r - b_blocks[j])
            q_later = torch.cat(q_blocks[j + 1 :], -2) * torch.exp(torch.cat(b_blocks[j + 1 :], -2) - r)
            parts.append(q_later @ k_j.transpose(-1, -2))
        columns.append(torch.cat(parts, -2))
    return torch.cat(columns, -1)


def _heads_first_chunks(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """[B, T, H, ...] -> fp32 [B, H, N, C, ...], zero-padded in time."""
    return split_chunks(pad_to_multiple(x.float().transpose(1, 2), chunk, 2, 0.0).contiguous(), chunk, 2)


def _gla_pass(q, k, v, g, scale: float, S: torch.Tensor, chunk: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """One chunked pass from state S [B, H, K, V]: o (fp32, heads first [B, H, T, V]) and the final S."""
    T = q.shape[1]
    qc, kc, vc, gc = (_heads_first_chunks(x, chunk) for x in (q, k, v, g))
    if g.dim() == 3:  # per head: b [B, H, N, C]
        b = gc.cumsum(-1)
        A = (qc @ kc.transpose(-1, -2)) * masked_exp_diff(
            b[..., :, None], b[..., None, :], causal_mask(chunk, q.device)
        )
        b_last = b[..., -1]
        q_in = qc * torch.exp(b)[..., None]
        k_out = kc * torch.exp(b_last[..., None] - b)[..., None]
        decay = torch.exp(b_last)[..., None, None]  # [B, H, N, 1, 1]
    else:  # per key: b [B, H, N, C, K]
        b = gc.cumsum(-2)
        A = intra_scores_per_key(qc, kc, b)
        b_last = b[..., -1, :]
        q_in = qc * torch.exp(b)
        k_out = kc * torch.exp(b_last[..., None, :] - b)
        decay = torch.exp(b_last)[..., None]  # [B, H, N, K, 1]
    o = A @ vc
    updates = k_out.transpose(-1, -2) @ vc  # [B, H, N, K, V]
    entering = []
    for decay_n, update_n in zip(decay.unbind(2), updates.unbind(2)):  # unbind: O(1) backward per chunk
        entering.append(S)
        S = decay_n * S + update_n
    o = scale * (o + q_in @ torch.stack(entering, 2))
    return merge_chunks(o, 2)[:, :, :T], S


def _gla_pass_varlen(
    q,
    k,
    v,
    g,
    scale: float,
    S: torch.Tensor,
    chunk: int,
    seqc: torch.Tensor,
    flows: torch.Tensor,
    X: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``_gla_pass`` over packed sequences (B = 1), see :mod:`kernels.ops.utils.packed`: pairs masked to one sequence, the
    entering state only for the rows of the chunk's first sequence, the state passed on only when that
    sequence continues. ``seqc`` long [N, C]: sequence per step; ``flows`` bool [N]; ``X`` [H, N + 1, K, V]
    or None: initial states injected into the recurrence (``X[0]`` is ignored: S is the entering state).
    Returns o (fp32 [1, H, T, V]), the entering states of the chunks [H, N, K, V] and the state
    entering the chunk after the last one (the next pass's)."""
    T = q.shape[1]
    qc, kc, vc, gc = (_heads_first_chunks(x, chunk) for x in (q, k, v, g))
    same = seqc[:, :, None] == seqc[:, None, :]  # [N, C, C]
    first = (seqc == seqc[:, :1]).float()  # rows of the chunk's first sequence
    tail = (seqc == seqc[:, -1:]).float() * flows[:, None]  # rows whose state passes on
    carry = flows & (seqc[:, 0] == seqc[:, -1])  # the entering state itself passes on
    if g.dim() == 3:  # per head: b [1, H, N, C]
        b = gc.cumsum(-1)
        A = (qc @ kc.transpose(-1, -2)) * masked_exp_diff(
            b[..., :, None], b[..., None, :], causal_mask(chunk, q.device) & same
        )
        b_last = b[..., -1]
        q_in = qc * (torch.exp(b) * first)[..., None]
        k_out = kc * (torch.exp(b_last[..., None] - b) * tail)[..., None]
        decay = (torch.exp(b_last) * carry)[..., None, None]  # [1, H, N, 1, 1]
    else:  # per key: b [1, H, N, C, K]
        b = gc.cumsum(-2)
        A = intra_scores_per_key(qc, kc, b) * same
        b_last = b[..., -1, :]
        q_in = qc * torch.exp(b) * first[..., None]
        k_out = kc * torch.exp(b_last[..., None, :] - b) * tail[..., None]
        decay = (torch.exp(b_last) * carry[:, None])[..., None]  # [1, H, N, K, 1]
    o = A @ vc
    updates = k_out.transpose(-1, -2) @ vc  # [1, H, N, K, V]
    injected = X[None, :, 1:].unbind(2) if X is not None else [None] * qc.shape[2]
    entering = []
    for decay_n, update_n, x_n in zip(decay.unbind(2), updates.unbind(2), injected):
        entering.append(S)
        S = decay_n * S + update_n
        if x_n is not None:
            S = S + x_n
    entering = torch.stack(entering, 2)
    o = scale * (o + q_in @ entering)
    return merge_chunks(o, 2)[:, :, :T], entering[0], S


def gla_chunked_varlen(
    q,
    k,
    v,
    g,
    scale: float,
    initial_state,
    output_final_state: bool,
    cu_seqlens,
    chunk: int = CHUNK,
    segment: Optional[int] = -1,
    offsets=None,
):
    """``gla_chunked`` over packed sequences: q, k, v, g [1, T, ...]; initial/final states [N, H, K, V]."""
    from kernels.ops.utils import packed as varlen

    T, H, K, V = q.shape[1], q.shape[2], q.shape[3], v.shape[-1]
    L = varlen.Layout(host_offsets(cu_seqlens, offsets), T, chunk, q.device)
    if T == 0:
        return empty_result(q, v, initial_state, output_final_state, n_states=L.N)
    h0 = L.select(initial_state)
    X = varlen.injection(g, h0, L)
    seqc, flows = L.seq_chunks(), L.flows()
    S = X[:, 0][None] if X is not None else q.new_zeros(1, H, K, V, dtype=torch.float32)
    if segment == -1:
        segment = default_segment(q.device)
    step = T if segment is None else segment
    outs, entering = [], []
    for a in range(0, T, step):  # passes of ``segment`` steps (a multiple of chunk), state carried
        n0, n1 = a // chunk, -(-min(a + step, T) // chunk)
        x = X[:, n0 : n1 + 1] if X is not None else None
        o, ent, S = _gla_pass_varlen(
            q[:, a : a + step],
            k[:, a : a + step],
            v[:, a : a + step],
            g[:, a : a + step],
            scale,
            S,
            chunk,
            seqc[n0:n1],
            flows[n0:n1],
            x,
        )
        outs.append(o)
        entering.append(ent)
    o = torch.cat(outs, 2).transpose(1, 2)[0]  # [T, H, V]
    extra = varlen.initial_state_output(q, g, h0, L, scale)
    if extra is not None:
        o = o + extra
    o = o[None].to(q.dtype)
    if not output_final_state:
        return o, None
    finals = varlen.final_states(k, v, g, torch.cat(entering, 1), h0, L)
    return o, varlen.assemble_finals(finals, initial_state, L)


def default_segment(device: torch.device) -> Optional[int]:
    """Tokens per pass: on CPU long sequences go in cache-sized segments (state carried between
    them), which keeps the cost per token flat in T; on GPU one pass."""
    return chunks.default_segment(device, SEGMENT_CPU)


def gla_chunked(
    q,
    k,
    v,
    g,
    scale,
    initial_state=None,
    output_final_state=False,
    chunk=CHUNK,
    segment=-1,
    cu_seqlens=None,
    offsets=None,
):
    """Same contract as ``gla_reference``: q, k [B,T,H,K], v [B,T,H,V], g [B,T,H,K] or [B,T,H].

    ``segment``: tokens per chunked pass (a multiple of ``chunk``; None: all at once; -1: the
    device default, see ``default_segment``). ``cu_seqlens`` [N+1]: packed sequences (B = 1, states
    [N, H, K, V]), handled natively (``gla_chunked_varlen``; ``offsets``: their validated host copy).
    """
    if cu_seqlens is not None:
        return gla_chunked_varlen(
            q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, chunk, segment, offsets
        )
    B, T, H, K = q.shape
    V = v.shape[-1]
    if T == 0:
        return empty_result(q, v, initial_state, output_final_state)
    S = q.new_zeros(B, H, K, V, dtype=torch.float32) if initial_state is None else initial_state.float()
    if segment == -1:
        segment = default_segment(q.device)

    def one_pass(q, k, v, g, S):
        return _gla_pass(q, k, v, g, scale, S, chunk)

    # the passes return heads-first outputs [B, H, T, V]: concatenated along dim 2
    o, S = run_in_segments(one_pass, (q, k, v, g), S, segment, time_dim=1, out_dim=2)
    return o.transpose(1, 2).to(q.dtype), (S if output_final_state else None)


mark_varlen(gla_chunked, host_offsets=True)
