"""Packed sequences (``cu_seqlens``) for the chunked PyTorch ``softmax_scan``: a segmented associative scan.

Same three stages as :mod:`kernels.ops.softmax_scan.torch_chunk`, with ``seq[t]`` the sequence of step t:
1. inside every chunk the pair (t, i), i <= t, counts only if ``seq[i] == seq[t]``; the local running max
   ``mu_t`` is the max over those pairs (a stabiliser, detached);
2. the chunk totals carry a reset flag (a sequence starts inside the chunk), and the scan across chunks is
   the segmented combine ``(f1, x1), (f2, x2) -> (f1 | f2, x2 if f2 else combine(x1, x2))``, where a
   flagged total already holds ``combine(h0[seq], local)`` of the chunk's last sequence;
3. step t combines its local prefix with the state entering its chunk when no sequence starts in
   (chunk start, t] (start inclusive), else with its own sequence's initial state ``h0[seq[t]]``.
Sequence n's final state is the state at its last step; ``m`` gets the reference's gradient (the tie
split of :func:`max_routing_weights`, per sequence). Empty sequences return their initial state.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from kernels.ops.utils.chunks import causal_mask, pad_to_multiple, split_chunks
from kernels._varlen import last_steps, mark_varlen, sequence_ids, start_mask
from kernels.ops.softmax_scan.torch_chunk import CHUNK, NEG_INF, combine, rescale, softmax_scan_chunked

State = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _segmented_exclusive_scan(flags: torch.Tensor, totals: State) -> State:
    """States entering every chunk (m, u: [H, Nc]; w: [H, Nc, V]) from the empty state, with resets."""
    H, Nc = flags.shape
    empty = (
        totals[0].new_full((H, 1), NEG_INF),
        totals[1].new_zeros(H, 1),
        totals[2].new_zeros(H, 1, totals[2].shape[-1]),
    )
    seq = [torch.cat([e, x[:, :-1]], 1) for e, x in zip(empty, totals)]
    f = torch.cat([flags.new_zeros(H, 1), flags[:, :-1]], 1)
    d = 1
    while d < Nc:  # Hillis–Steele: position i <- segmented combine(position i - d, position i)
        joined = combine(tuple(x[:, :-d] for x in seq), tuple(x[:, d:] for x in seq))
        keep = f[:, d:]
        tail = [torch.where(keep if x.dim() == 2 else keep[..., None], x[:, d:], j) for x, j in zip(seq, joined)]
        seq = [torch.cat([x[:, :d], t], 1) for x, t in zip(seq, tail)]
        f = torch.cat([f[:, :d], f[:, :-d] | f[:, d:]], 1)
        d *= 2
    return tuple(seq)


def routed_max(s: torch.Tensor, sid: torch.Tensor, cu: torch.Tensor, m0: Optional[torch.Tensor], N: int):
    """``m_n = max(m0[n], s over sequence n)`` [N, H], differentiable with the reference's tie split
    (see :func:`kernels.ops.softmax_scan.torch_chunk.max_routing_weights`; here per sequence)."""
    T, H = s.shape
    sd = s.detach()
    index = sid[:, None].expand(T, H)
    top = sd.new_full((N, H), NEG_INF).scatter_reduce(0, index, sd, "amax", include_self=True)
    if m0 is not None:
        top = torch.maximum(top, m0.detach())
    tied = sd == top[sid]
    tied_m0 = (m0.detach() == top) if m0 is not None else torch.zeros_like(top, dtype=torch.bool)
    n = torch.zeros(N, H, dtype=torch.long, device=s.device).scatter_add(0, index, tied.long()) + tied_m0.long()
    at_or_after = torch.cat([tied.long().flip(0).cumsum(0).flip(0), tied.new_zeros(1, H, dtype=torch.long)], 0)
    later = at_or_after[:T] - at_or_after[cu[1:].long()[sid]]  # ties at or after t within its sequence
    exponent = torch.minimum(later, (n - 1).clamp_min(0)[sid])
    w_s = torch.where(tied, torch.pow(0.5, exponent.float()), 0.0)
    m = torch.zeros(N, H, dtype=s.dtype, device=s.device).index_add(0, sid, w_s * torch.where(tied, s, 0.0))
    if m0 is not None:
        w_m0 = torch.where(tied_m0, torch.pow(0.5, (n - 1).clamp_min(0).float()), 0.0)
        m = m + w_m0 * torch.where(tied_m0, m0, 0.0)
    return m


def softmax_scan_chunked_packed(s, v, initial_state=None, output_final_state=False, cu_seqlens=None, chunk=CHUNK):
    """``softmax_scan_chunked`` with ``cu_seqlens`` (s [1, T, H], v [1, T, H, V]; states [N, ...])."""
    if cu_seqlens is None:
        return softmax_scan_chunked(s, v, initial_state, output_final_state, chunk)
    _, T, H = s.shape
    V = v.shape[-1]
    N = cu_seqlens.shape[0] - 1
    if initial_state is None:
        m0 = s.new_full((N, H), NEG_INF, dtype=torch.float32)
        init = (m0, torch.zeros_like(m0), s.new_zeros(N, H, V, dtype=torch.float32))
    else:
        init = tuple(x.float() for x in initial_state)
    if T == 0:
        return v.new_zeros(1, 0, H, V), (init if output_final_state else None)
    sid = sequence_ids(cu_seqlens, T)
    Tp = -(-T // chunk) * chunk
    sidc = torch.cat([sid, sid[-1:].expand(Tp - T)]).view(-1, chunk)  # padding joins the last sequence (u > 0)
    startc = torch.cat([start_mask(cu_seqlens, T), sid.new_zeros(Tp - T, dtype=torch.bool)]).view(-1, chunk)
    # heads first: [H, Nc, C] and [H, Nc, C, V]; padding s = -inf (weight 0)
    sc = split_chunks(pad_to_multiple(s[0].float().t(), chunk, 1, NEG_INF), chunk, 1)
    vc = split_chunks(pad_to_multiple(v[0].float().transpose(0, 1), chunk, 1, 0.0), chunk, 1)
    same = sidc[:, :, None] == sidc[:, None, :]
    valid = causal_mask(chunk, s.device) & same & (sc[..., None, :] > NEG_INF)  # [H, Nc, C(t), C(i)]
    mu = torch.where(valid, sc.detach()[..., None, :], NEG_INF).amax(-1)
    W = torch.exp(torch.where(valid, sc[..., None, :] - torch.where(mu > NEG_INF, mu, 0.0)[..., None], NEG_INF))
    u_loc, w_loc = W.sum(-1), W @ vc
    # the initial state of each step's sequence, and whether a sequence starts in [chunk start, t]
    h0 = (init[0].t()[:, sidc], init[1].t()[:, sidc], init[2].permute(1, 0, 2)[:, sidc])
    reset = (startc.cumsum(-1) > 0)[None].expand(H, -1, -1)
    # chunk totals: a chunk with a start holds its last sequence from that sequence's initial state
    last_local = (mu[..., -1], u_loc[..., -1], w_loc[..., -1, :])
    last_h0 = tuple(x[:, :, -1] for x in h0)
    with_h0 = combine(last_h0, last_local)
    flags = reset[..., -1]
    totals = tuple(torch.where(flags if a.dim() == 2 else flags[..., None], b, a) for a, b in zip(last_local, with_h0))
    m_in, u_in, w_in = _segmented_exclusive_scan(flags, totals)
    m_c = torch.where(reset, h0[0], m_in[..., None])
    u_c = torch.where(reset, h0[1], u_in[..., None])
    w_c = torch.where(reset[..., None], h0[2], w_in[:, :, None])
    m_t = torch.maximum(m_c, mu).detach()
    f_in, f_loc = rescale(m_c, m_t), rescale(mu, m_t)
    u_t = u_c * f_in + u_loc * f_loc
    w_t = w_c * f_in[..., None] + w_loc * f_loc[..., None]
    o = (w_t / u_t[..., None]).flatten(1, 2)[:, :T].transpose(0, 1)[None].to(v.dtype)
    if not output_final_state:
        return o, None
    last, nonempty = last_steps(cu_seqlens)
    m_val = m_t.flatten(1, 2)[:, last].t()  # [N, H] (values: stabilisers carry no gradient)
    u_T, w_T = u_t.flatten(1, 2)[:, last].t(), w_t.flatten(1, 2)[:, last].transpose(0, 1)
    m_T = routed_max(s[0].float(), sid, cu_seqlens, None if initial_state is None else init[0], N)
    keep = nonempty[:, None].expand(N, H)
    m_T = torch.where(keep, m_T, m_val)  # empty sequences: replaced by their initial state below
    shift = torch.exp(m_val - m_T)  # = 1, carries d/dm_T
    final = (m_T, u_T * shift, w_T * shift[..., None])
    final = tuple(torch.where(keep if a.dim() == 2 else keep[..., None], a, b) for a, b in zip(final, init))
    return o, final


mark_varlen(softmax_scan_chunked_packed)
