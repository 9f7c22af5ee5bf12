"""Chunked associative scan for ``softmax_scan`` (PyTorch, any device; autograd differentiates it).

The state after a set of tokens is ``(m, u, w)``: running max ``m``, normaliser
``u = sum exp(s_i - m)`` and weighted sum ``w = sum exp(s_i - m) v_i``. Two states combine by

    combine((m1, u1, w1), (m2, u2, w2)) = (m, u1 e^(m1-m) + u2 e^(m2-m), w1 e^(m1-m) + w2 e^(m2-m)),
    m = max(m1, m2),

an associative operation with identity ``(-inf, 0, 0)``. With chunks of C = 64 tokens:
1. inside every chunk (all at once): the local running max ``mu_t = max_{i<=t} s_i`` and the
   masked weights ``W[t, i] = exp(s_i - mu_t)`` for ``i <= t`` (exponents <= 0), giving the local
   prefix states ``(mu_t, W 1, W v)``;
2. the chunk totals are scanned across chunks (Hillis–Steele over the N chunks), starting from the
   initial state, which gives the state entering every chunk;
3. each position combines the entering state with its local prefix (both rescaled by
   ``exp(. - max) <= 1``) and outputs ``o_t = w_t / u_t``.
The maxima are stabilisers: ``o`` does not depend on them, so they are detached, and the final
``m_T`` gets the reference's gradient explicitly (``max_routing_weights``, ties split as
``torch.maximum`` does), with ``u_T, w_T`` depending on it through ``exp(-m_T)``.
Every exponent is <= 0, so scores of any magnitude are safe; ``-inf`` (the empty state, padding)
is guarded so that ``-inf - (-inf)`` never reaches ``exp``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from kernels.ops.utils.chunks import causal_mask, pad_to_multiple, split_chunks

CHUNK = 64
NEG_INF = float("-inf")

State = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def rescale(m_from: torch.Tensor, m_to: torch.Tensor) -> torch.Tensor:
    """``exp(m_from - m_to)`` for ``m_to >= m_from``; 0 when ``m_from = -inf`` (also if both are)."""
    empty = m_from == NEG_INF
    diff = torch.where(empty, torch.zeros_like(m_from), m_from - m_to)
    return torch.where(empty, torch.zeros_like(diff), torch.exp(diff))


def max_routing_weights(s: torch.Tensor, m0: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """How the gradient of ``m_T = max(m_0, s_1, ..., s_T)`` is split (weights sum to 1).

    Matches the reference's chain ``m_t = maximum(m_{t-1}, s_t)``, whose backward halves the
    gradient at a tie: with n tied maxima in time order (``m_0`` first), the last gets 1/2, the
    one before 1/4, ..., the first two 1/2^(n-1) (a single maximum gets 1).
    Returns weights for s [B, T, H] and for m_0 [B, H] (zeros when ``m0`` is None). No autograd.
    """
    s = s.detach().float()
    top = s.amax(1)
    if m0 is not None:
        top = torch.maximum(top, m0.detach().float())
    tied = s == top[:, None]
    tied_m0 = (m0.detach().float() == top) if m0 is not None else torch.zeros_like(top, dtype=torch.bool)
    n = tied.sum(1) + tied_m0.long()  # [B, H]
    later = tied.flip(1).cumsum(1).flip(1)  # ties at or after t
    exponent = torch.minimum(later, (n - 1).clamp_min(0)[:, None])
    w_s = torch.where(tied, torch.pow(0.5, exponent.float()), 0.0)
    w_m0 = torch.where(tied_m0, torch.pow(0.5, (n - 1).clamp_min(0).float()), 0.0)
    return w_s, w_m0


def combine(first: State, second: State) -> State:
    """State of the concatenation ``first`` then ``second`` (m, u: [...]; w: [..., V])."""
    m1, u1, w1 = first
    m2, u2, w2 = second
    m = torch.maximum(m1, m2).detach()  # a stabiliser: see softmax_scan_chunked on gradients
    f1, f2 = rescale(m1, m), rescale(m2, m)
    return m, u1 * f1 + u2 * f2, w1 * f1[..., None] + w2 * f2[..., None]


def exclusive_chunk_scan(init: State, totals: State) -> State:
    """States entering each chunk and the final one: [N + 1] along axis 2 (m, u: [B,H,N+1])."""
    seq = [torch.cat([x0.unsqueeze(2), x], 2) for x0, x in zip(init, totals)]
    n = seq[0].shape[2]
    d = 1
    while d < n:  # Hillis–Steele: position i <- combine(position i - d, position i)
        head = [x[:, :, :d] for x in seq]
        tail = combine(tuple(x[:, :, :-d] for x in seq), tuple(x[:, :, d:] for x in seq))
        seq = [torch.cat([h, t], 2) for h, t in zip(head, tail)]
        d *= 2
    return tuple(seq)


def softmax_scan_chunked(s, v, initial_state=None, output_final_state=False, chunk=CHUNK):
    """Same contract as ``softmax_scan_reference``: s [B, T, H], v [B, T, H, V] -> o [B, T, H, V]."""
    B, T, H = s.shape
    V = v.shape[-1]
    if initial_state is None:
        m0 = s.new_full((B, H), NEG_INF, dtype=torch.float32)
        init = (m0, torch.zeros_like(m0), s.new_zeros(B, H, V, dtype=torch.float32))
    else:
        init = tuple(x.float() for x in initial_state)
    if T == 0:
        return v.new_zeros(B, 0, H, V), (init if output_final_state else None)
    # heads first, time padded with s = -inf (weight 0), v = 0: [B, H, N, C] and [B, H, N, C, V]
    sc = split_chunks(pad_to_multiple(s.float().transpose(1, 2), chunk, 2, NEG_INF), chunk, 2)
    vc = split_chunks(pad_to_multiple(v.float().transpose(1, 2), chunk, 2, 0.0), chunk, 2)
    mu = torch.cummax(sc.detach(), -1).values  # local running max (a stabiliser, no gradient)
    valid = causal_mask(chunk, s.device) & (sc[..., None, :] > NEG_INF)  # [B, H, N, C(t), C(i)]
    W = torch.exp(torch.where(valid, sc[..., None, :] - mu[..., None], NEG_INF))
    u_loc = W.sum(-1)
    w_loc = W @ vc
    totals = (mu[..., -1], u_loc[..., -1], w_loc[..., -1, :])
    m_in, u_in, w_in = exclusive_chunk_scan(init, totals)
    # combine the state entering each chunk with every local prefix
    m_c, u_c, w_c = (x[:, :, :-1, None] for x in (m_in, u_in, w_in))
    m_t = torch.maximum(m_c, mu).detach()
    f_in, f_loc = rescale(m_c, m_t), rescale(mu, m_t)
    u_t = u_c * f_in + u_loc * f_loc
    w_t = w_c * f_in[..., None] + w_loc * f_loc[..., None]
    o = (w_t / u_t[..., None]).flatten(2, 3)[:, :, :T].transpose(1, 2).to(v.dtype)
    if not output_final_state:
        return o, None
    # m_T = max(m_0, s_1..s_T) with the reference's gradient (split at ties); u_T, w_T were
    # computed for a fixed m_T and depend on it as u_T e^(m_T_value - m_T)
    m_val, u_T, w_T = m_in[:, :, -1], u_in[:, :, -1], w_in[:, :, -1]
    route_s, route_m0 = max_routing_weights(s, None if initial_state is None else init[0])
    m_T = (route_s * torch.where(route_s > 0, s.float(), 0.0)).sum(1)
    if initial_state is not None:
        m_T = m_T + route_m0 * torch.where(route_m0 > 0, init[0], 0.0)
    else:  # no tokens can only happen with T = 0 (handled above); keep the exact value
        m_T = m_T + (m_val - m_T).detach()
    shift = torch.exp(m_val - m_T)  # = 1, carries d/dm_T
    return o, (m_T, u_T * shift, w_T * shift[..., None])
