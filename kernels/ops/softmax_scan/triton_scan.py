"""Triton scan kernels for ``softmax_scan`` (s: [B, T, H], v: [B, T, H, V]).

Both passes walk T in tiles of BLOCK_T tokens, carrying the scan state between tiles; inside a
tile the scan is done in matrix form (tensor-core friendly, no per-element loop):

Forward (program: batch x head, block of V columns). With ``mu_t = max_{i<=t} s_i`` (a masked
row max over the tile) the local prefix states are ``u_t = sum_{i<=t} W_ti``,
``w_t = sum_{i<=t} W_ti v_i`` with ``W_ti = exp(s_i - mu_t)`` (exponents <= 0, ``tl.dot``); they are
combined with the carried ``(m, u, w)`` (both sides rescaled to the larger max, ``-inf`` guarded)
into ``o_t = w_t / u_t`` and the log normaliser ``l_t = m_t + log u_t`` (fp32, kept for backward).

Backward (program: batch x head, all V), with ``p_ti = exp(s_i - l_t)`` the weight of token i at
step t and ``l`` non-decreasing:

    R_i = sum_{t>=i} exp(l_i - l_t) do_t         (vector),   r_i = same sum of o_t . do_t
    dv_i = p_ii R_i,   ds_i = p_ii (v_i . R_i - r_i)

per tile ``R = L do + kappa R_next`` with ``L_it = exp(l_i - l_t)`` (t >= i, <= 1) and
``kappa_i = exp(l_i - l_next)``, tiles from last to first. Gradients of the final state
``(m_T, u_T, w_T)`` enter as the carries ``R = u_T dw_T``, ``r = -u_T du_T`` after the last token,
plus ``dm_T - du_T u_T - dw_T . w_T`` routed to the token (or initial state) holding the maximum
(split at ties like the reference). The initial state gets, with ``f = exp(m_0 - l_1)``:
``dw_0 = f R_1``, ``du_0 = -f r_1``, ``dm_0 = w_0 . dw_0 + u_0 du_0`` (plus its routed share).
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from kernels._varlen import mark_varlen
from kernels.ops.common.dot import dot, masked_exp
from kernels.ops.softmax_scan.torch_chunk import max_routing_weights

BLOCK_T = 32
MAX_BLOCK_V = 64

State = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@triton.jit
def _rescale(m_from, m_to):
    """exp(m_from - m_to) for m_to >= m_from; 0 when m_from = -inf (also when both are)."""
    return masked_exp(m_from - tl.where(m_to == float("-inf"), 0.0, m_to), m_from != float("-inf"))


@triton.jit
def _fwd_tile(s_ptr, v_ptr, o_ptr, ell_ptr, m_c, u_c, w_c, t0, T, i_b, i_h, cols, col_ok, H, V, rows, causal,
              is_last, LOWP, BLOCK_T):  # fmt: skip
    """One tile of the forward scan: steps t0.. (before T) of batch row i_b; returns the new carries
    (``rows``, ``causal``, ``is_last``: the tile's row indices, i <= t and the last row, built once by the
    caller)."""
    t = t0 + rows
    t_ok = t < T
    tok = (i_b.to(tl.int64) * T + t) * H + i_h  # token index into [B, T, H]
    ok = t_ok[:, None] & col_ok[None, :]
    s = tl.load(s_ptr + tok, mask=t_ok, other=float("-inf")).to(tl.float32)
    v = tl.load(v_ptr + tok[:, None] * V + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    mu = tl.max(tl.where(causal, s[None, :], float("-inf")), 1)  # running max in the tile
    mu_safe = tl.where(mu == float("-inf"), 0.0, mu)
    W = masked_exp(s[None, :] - mu_safe[:, None], causal & (s > float("-inf"))[None, :])
    u_l = tl.sum(W, 1)
    w_l = dot(W, v, LOWP)
    m = tl.maximum(mu, m_c)
    f_c = _rescale(m_c + tl.zeros([BLOCK_T], dtype=tl.float32), m)
    f_l = _rescale(mu, m)
    u = u_c * f_c + u_l * f_l
    w = w_c[None, :] * f_c[:, None] + w_l * f_l[:, None]
    u_safe = tl.where(u > 0, u, 1.0)
    tl.store(o_ptr + tok[:, None] * V + cols[None, :], (w / u_safe[:, None]).to(o_ptr.dtype.element_ty), mask=ok)
    # l_t is the same in every V block (each writes the same value)
    tl.store(ell_ptr + tok, m + tl.log(u_safe), mask=t_ok)
    m_c = tl.max(tl.where(is_last, m, float("-inf")), 0)  # padding rows repeat the last state
    u_c = tl.sum(tl.where(is_last, u, 0.0), 0)
    w_c = tl.sum(tl.where(is_last[:, None], w, 0.0), 0)
    return m_c, u_c, w_c


@triton.jit
def _softmax_scan_fwd_kernel(
    s_ptr,
    v_ptr,
    m0_ptr,
    u0_ptr,
    w0_ptr,
    o_ptr,
    ell_ptr,
    mT_ptr,
    uT_ptr,
    wT_ptr,
    cu_ptr,
    T,
    H,
    V,
    HAS_STATE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    LOWP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    i_bh = tl.program_id(0)
    i_v = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    cols = i_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    rows = tl.arange(0, BLOCK_T)
    causal = rows[:, None] >= rows[None, :]  # [t, i]: i <= t
    if HAS_STATE:
        m_c = tl.load(m0_ptr + i_bh).to(tl.float32)
        u_c = tl.load(u0_ptr + i_bh).to(tl.float32)
        w_c = tl.load(w0_ptr + i_bh * V + cols, mask=col_ok, other=0.0).to(tl.float32)
    else:
        m_c = tl.max(tl.full([BLOCK_T], float("-inf"), tl.float32), 0)  # fp32 scalars
        u_c = tl.sum(tl.zeros([BLOCK_T], dtype=tl.float32), 0)
        w_c = tl.zeros([BLOCK_V], dtype=tl.float32)
    is_last = rows == BLOCK_T - 1
    if IS_VARLEN:  # program (sequence i_bh // H, head): its steps cu[n]..cu[n+1] of batch row 0
        t0 = tl.load(cu_ptr + i_b)
        t_end = tl.load(cu_ptr + i_b + 1)
        while t0 < t_end:  # not range(): breaks the Triton 3.6 interpreter
            m_c, u_c, w_c = _fwd_tile(
                s_ptr, v_ptr, o_ptr, ell_ptr, m_c, u_c, w_c, t0, t_end, i_h * 0, i_h, cols, col_ok, H, V, rows, causal,
                is_last, LOWP, BLOCK_T,
            )  # fmt: skip
            t0 += BLOCK_T
    else:
        for t0 in range(0, T, BLOCK_T):
            m_c, u_c, w_c = _fwd_tile(
                s_ptr, v_ptr, o_ptr, ell_ptr, m_c, u_c, w_c, t0, T, i_b, i_h, cols, col_ok, H, V, rows, causal,
                is_last, LOWP, BLOCK_T,
            )  # fmt: skip
    tl.store(wT_ptr + i_bh * V + cols, w_c, mask=col_ok)
    tl.store(mT_ptr + i_bh, m_c)
    tl.store(uT_ptr + i_bh, u_c)


@triton.jit
def _bwd_tile(s_ptr, v_ptr, o_ptr, ell_ptr, do_ptr, ds_ptr, dv_ptr, R_c, r_c, t0, T, tok_base, cols, col_ok, H, V,
              rows, later, is_first, LOWP, BLOCK_T):  # fmt: skip
    """One tile of the backward scan: steps t0.. (before T) from ``tok_base`` (batch row, head); returns
    the carries entering the tile's first step (``rows``, ``later``, ``is_first``: the tile's row
    indices, t >= i and row 0, built once by the caller)."""
    t = t0 + rows
    t_ok = t < T
    tok = tok_base + t * H
    ok = t_ok[:, None] & col_ok[None, :]
    ell = tl.load(ell_ptr + tok, mask=t_ok, other=0.0)
    ell_next = tl.load(ell_ptr + tok_base + tl.minimum(t0 + BLOCK_T, T - 1) * H)
    L = masked_exp(ell[:, None] - ell[None, :], later & t_ok[None, :])  # exp(l_i - l_t) <= 1
    kappa = masked_exp(ell - ell_next, t_ok)
    vo = tok[:, None] * V + cols[None, :]
    do = tl.load(do_ptr + vo, mask=ok, other=0.0).to(tl.float32)
    o = tl.load(o_ptr + vo, mask=ok, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + vo, mask=ok, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + tok, mask=t_ok, other=float("-inf")).to(tl.float32)
    R = dot(L, do, LOWP) + kappa[:, None] * R_c[None, :]
    r = tl.sum(L * tl.sum(o * do, 1)[None, :], 1) + kappa * r_c
    p = masked_exp(s - ell, t_ok)  # weight of token t at its own step, <= 1
    tl.store(dv_ptr + vo, (p[:, None] * R).to(dv_ptr.dtype.element_ty), mask=ok)
    tl.store(ds_ptr + tok, p * (tl.sum(v * R, 1) - r), mask=t_ok)
    R_c = tl.sum(tl.where(is_first[:, None], R, 0.0), 0)
    r_c = tl.sum(tl.where(is_first, r, 0.0), 0)
    return R_c, r_c


@triton.jit
def _softmax_scan_bwd_kernel(
    s_ptr,
    v_ptr,
    o_ptr,
    ell_ptr,
    do_ptr,
    Rc_ptr,
    rc_ptr,
    ds_ptr,
    dv_ptr,
    R0_ptr,
    r0_ptr,
    cu_ptr,
    T,
    H,
    V,
    IS_VARLEN: tl.constexpr,
    LOWP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    i_bh = tl.program_id(0)
    i_b = i_bh // H
    i_h = i_bh % H
    cols = tl.arange(0, BLOCK_V)
    col_ok = cols < V
    rows = tl.arange(0, BLOCK_T)
    later = rows[None, :] >= rows[:, None]  # [i, t]: t >= i
    is_first = rows == 0
    # carries after the last token: the final-state gradients (see the module docstring)
    R_c = tl.load(Rc_ptr + i_bh * V + cols, mask=col_ok, other=0.0)
    r_c = tl.load(rc_ptr + i_bh)
    if IS_VARLEN:  # program (sequence i_bh // H, head): its steps cu[n]..cu[n+1] of batch row 0
        t_lo = tl.load(cu_ptr + i_b)
        t_end = tl.load(cu_ptr + i_b + 1)
        n_tiles = tl.cdiv(t_end - t_lo, BLOCK_T)
        i = 0
        while i < n_tiles:  # not range(): breaks the Triton 3.6 interpreter
            t0 = t_lo + (n_tiles - 1 - i) * BLOCK_T  # tiles from last to first
            R_c, r_c = _bwd_tile(
                s_ptr, v_ptr, o_ptr, ell_ptr, do_ptr, ds_ptr, dv_ptr, R_c, r_c, t0, t_end, i_h, cols, col_ok, H, V,
                rows, later, is_first, LOWP, BLOCK_T,
            )  # fmt: skip
            i += 1
    else:
        n_tiles = tl.cdiv(T, BLOCK_T)
        tok_base = i_b.to(tl.int64) * T * H + i_h
        for i in range(0, n_tiles):
            t0 = (n_tiles - 1 - i) * BLOCK_T  # tiles from last to first
            R_c, r_c = _bwd_tile(
                s_ptr, v_ptr, o_ptr, ell_ptr, do_ptr, ds_ptr, dv_ptr, R_c, r_c, t0, T, tok_base, cols, col_ok, H, V,
                rows, later, is_first, LOWP, BLOCK_T,
            )  # fmt: skip
    tl.store(R0_ptr + i_bh * V + cols, R_c, mask=col_ok)
    tl.store(r0_ptr + i_bh, r_c)


def _rescale_torch(m_from: torch.Tensor, m_to: torch.Tensor) -> torch.Tensor:
    """exp(m_from - m_to), 0 where m_from = -inf."""
    empty = m_from == float("-inf")
    return torch.where(empty, 0.0, torch.exp(torch.where(empty, 0.0, m_from - m_to)))


class _SoftmaxScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, v, m0, u0, w0, cu=None):
        s, v = s.contiguous(), v.contiguous()
        B, T, H = s.shape
        V = v.shape[-1]
        NS = B if cu is None else cu.shape[0] - 1  # states: per batch row, or per packed sequence
        has_state = m0 is not None
        if has_state:
            m0, u0, w0 = (x.float().contiguous() for x in (m0, u0, w0))
        o = torch.empty_like(v)
        ell = torch.empty(B, T, H, device=s.device, dtype=torch.float32)
        mT = torch.empty(NS, H, device=s.device, dtype=torch.float32)
        uT, wT = torch.empty_like(mT), torch.empty(NS, H, V, device=s.device, dtype=torch.float32)
        block_v = min(MAX_BLOCK_V, max(16, triton.next_power_of_2(V)))
        _softmax_scan_fwd_kernel[(NS * H, triton.cdiv(V, block_v))](
            s,
            v,
            m0 if has_state else mT,
            u0 if has_state else mT,
            w0 if has_state else wT,
            o,
            ell,
            mT,
            uT,
            wT,
            cu if cu is not None else mT,
            T,
            H,
            V,
            HAS_STATE=has_state,
            IS_VARLEN=cu is not None,
            LOWP=v.dtype != torch.float32,
            BLOCK_T=BLOCK_T,
            BLOCK_V=block_v,
        )
        ctx.save_for_backward(s, v, o, ell, mT, uT, wT, *((m0, u0, w0) if has_state else ()))
        ctx.has_state, ctx.cu = has_state, cu
        if cu is not None:  # m_T is a stabiliser here: its gradient is routed outside (_packed_final)
            ctx.mark_non_differentiable(mT)
        return o, mT, uT, wT

    @staticmethod
    def backward(ctx, do, dmT, duT, dwT):
        s, v, o, ell, mT, uT, wT, *init = ctx.saved_tensors
        B, T, H = s.shape
        V = v.shape[-1]
        cu = ctx.cu
        do = torch.zeros_like(o) if do is None else do.contiguous()
        dmT = torch.zeros_like(mT) if dmT is None else dmT.float()
        duT = torch.zeros_like(uT) if duT is None else duT.float()
        dwT = torch.zeros_like(wT) if dwT is None else dwT.float()
        R_c = (uT[..., None] * dwT).contiguous()
        r_c = (-uT * duT).contiguous()
        ds = torch.empty(B, T, H, device=s.device, dtype=torch.float32)
        dv = torch.empty_like(v)
        R0, r0 = torch.empty_like(wT), torch.empty_like(uT)
        block_v = max(16, triton.next_power_of_2(V))
        _softmax_scan_bwd_kernel[(mT.shape[0] * H,)](
            s,
            v,
            o,
            ell,
            do,
            R_c,
            r_c,
            ds,
            dv,
            R0,
            r0,
            cu if cu is not None else r0,
            T,
            H,
            V,
            IS_VARLEN=cu is not None,
            LOWP=v.dtype != torch.float32,
            BLOCK_T=BLOCK_T,
            BLOCK_V=block_v,
            num_warps=8 if block_v <= 128 else 16,  # [BLOCK_T, 256] fp32 tiles spill at 8 warps
        )
        if cu is not None:
            return _packed_initial_grads(ds, dv, s, ell, R0, r0, init, cu)
        # m_T = max(m_0, s_1..s_T): its gradient (u_T, w_T hold m_T fixed) goes to the maximum,
        # split between tied maxima exactly as the reference's chain of torch.maximum does
        dm_eff = dmT - duT * uT - (dwT * wT).sum(-1)
        route_s, route_m0 = max_routing_weights(s, init[0] if init else None)
        ds = ds + route_s * dm_eff[:, None]
        grads = [ds.to(s.dtype), dv, None, None, None]
        if init:
            m0, u0, w0 = init
            f = _rescale_torch(m0, ell[:, 0])
            dw0, du0 = f[..., None] * R0, -f * r0
            # the state's scale is redundant (m0 + c, u0 e^-c, w0 e^-c is the same state)
            dm0 = (w0 * dw0).sum(-1) + u0 * du0 + route_m0 * dm_eff
            grads[2:] = [dm0, du0, dw0]
        return (*grads, None)


def _packed_initial_grads(ds, dv, s, ell, R0, r0, init, cu):
    """Backward with packed sequences: the initial states' gradients from the carries R0, r0 [N, ...] at
    each sequence's first step (m_T's routing is autograd's, see :func:`_packed_final`)."""
    grads = [ds.to(s.dtype), dv, None, None, None, None]
    if init:
        m0, u0, w0 = init
        first = cu[:-1].long().clamp_max(s.shape[1] - 1)
        nonempty = (cu[1:] > cu[:-1])[:, None]
        f = _rescale_torch(m0, torch.where(nonempty, ell[0, first], m0))  # empty: no step, R0 = r0 = 0
        dw0, du0 = f[..., None] * R0, -f * r0
        grads[2:5] = [(w0 * dw0).sum(-1) + u0 * du0, du0, dw0]
    return tuple(grads)


def _packed_final(s, m_val, u, w, init: State, m0, cu) -> State:
    """Final states of packed sequences: ``m_T = max(m_0[n], s over sequence n)`` differentiable with the
    reference's tie split (:func:`~kernels.ops.softmax_scan.torch_chunk_varlen.routed_max`), u and w
    rescaled to it by ``exp(m_val - m_T) = 1`` (which carries their dependence on m_T); empty sequences
    keep ``init`` (``m0``: the initial states' m, or None)."""
    from kernels._varlen import sequence_ids
    from kernels.ops.softmax_scan.torch_chunk_varlen import routed_max

    N, T = m_val.shape[0], s.shape[1]
    nonempty = (cu[1:] > cu[:-1])[:, None].expand_as(m_val)
    m_T = routed_max(s[0].float(), sequence_ids(cu, T), cu, m0, N)
    m_T = torch.where(nonempty, m_T, m_val)
    shift = torch.exp(m_val - m_T)
    final = (m_T, u * shift, w * shift[..., None])
    return tuple(torch.where(nonempty if a.dim() == 2 else nonempty[..., None], a, b) for a, b in zip(final, init))


def _empty_state(s, NS: int, V: int) -> State:
    m = s.new_full((NS, s.shape[2]), float("-inf"), dtype=torch.float32)
    return m, torch.zeros_like(m), s.new_zeros(NS, s.shape[2], V, dtype=torch.float32)


def softmax_scan_triton(s, v, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Same contract as ``softmax_scan_reference`` (Triton kernels, fwd + bwd). ``cu_seqlens`` [N+1]:
    packed sequences natively (B = 1, states [N, H, ...]): one program per (sequence, head) scans its own
    steps of the packed row; one launch, no host read."""
    B, T, H = s.shape
    V = v.shape[-1]
    NS = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    cu = cu_seqlens.to(torch.int32).contiguous() if cu_seqlens is not None else None
    if T == 0:
        state = _empty_state(s, NS, V) if initial_state is None else tuple(x.float() for x in initial_state)
        return v.new_zeros(B, 0, H, V), (state if output_final_state else None)
    init = (None, None, None) if initial_state is None else tuple(initial_state)
    o, m, u, w = _SoftmaxScanTriton.apply(s, v, *init, cu)
    if not output_final_state:
        return o, None
    if cu is not None:
        full = _empty_state(s, NS, V) if initial_state is None else tuple(x.float() for x in initial_state)
        m0 = initial_state[0].float() if initial_state is not None else None
        return o, _packed_final(s, m, u, w, full, m0, cu)
    return o, (m, u, w)


mark_varlen(softmax_scan_triton)
