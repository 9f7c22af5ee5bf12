"""The [K, V] matrix state of the Triton kernels that hold it on chip while they walk time: the fused-recurrent
kernels of ``delta_rule`` and ``dplr`` (step by step) and the state-passing loops of their chunked kernels
(chunk by chunk). A program holds the block [BK, BV] of keys 0.. and values ``i_v BV..`` of the state of
batch x head ``i_bh``; states are row-major [K, V] matrices, matrix ``row`` of a buffer at ``row K V``
(an initial or final state: ``row = i_bh``; the state entering step / chunk n: ``row = i_bh N + n``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.ops.common.tiles import load_tile


@triton.jit
def state_block(i_v, i_bh, H, K, V, BK: tl.constexpr, BV: tl.constexpr):
    """(batch, head, key and value indices with their masks, offsets and mask of the [BK, BV] block in a
    row-major [K, V] state) of program (V block ``i_v``, batch x head ``i_bh``)."""
    b, h = i_bh // H, i_bh % H
    rk = tl.arange(0, BK)
    rv = i_v * BV + tl.arange(0, BV)
    mk, mv = rk < K, rv < V
    kv_offs = rk[:, None] * V + rv[None, :]
    kv_mask = mk[:, None] & mv[None, :]
    return b, h, rk, rv, mk, mv, kv_offs, kv_mask


@triton.jit
def load_state(ptr, row, K, V, kv_offs, kv_mask):
    """The state block of [K, V] matrix ``row`` (int64) of ``ptr``."""
    return tl.load(ptr + row * K * V + kv_offs, mask=kv_mask, other=0.0)


@triton.jit
def start_state(ptr, row, K, V, kv_offs, kv_mask, HAS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """The loop's first state block: zeros, plus [K, V] matrix ``row`` (int64) of ``ptr`` when ``HAS``
    (an initial state, or the final state's gradient)."""
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS:
        S += tl.load(ptr + row * K * V + kv_offs, mask=kv_mask, other=0.0)
    return S


@triton.jit
def store_state(ptr, S, row, K, V, kv_offs, kv_mask):
    """Store the state block into [K, V] matrix ``row`` (int64) of ``ptr``."""
    tl.store(ptr + row * K * V + kv_offs, S, mask=kv_mask)


@triton.jit
def add_w_state(
    acc,
    w_ptr,
    S,
    states_ptr,
    row0,
    srow,
    K,
    V,
    v0,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BKR: tl.constexpr,
    PREC: tl.constexpr,
):
    """``acc + W S`` in the state loops (Z = Zv + Wz S forward, dY = dYo + Wb dS backward): W [BT, K] of the
    chunk at buffer row ``row0``, S the held [BK, BV] block; BKR < BK: in key blocks of BKR read back from
    the state just stored at row ``srow`` of ``states_ptr`` (smaller dot operands for exact fp32 dots)."""
    if BKR < BK:
        tl.debug_barrier()
        return add_stored_state_product(acc, w_ptr, row0, states_ptr, srow, K, V, v0, BT, BKR, BV, PREC)
    return acc + tl.dot(load_tile(w_ptr, row0, BT, K, 0, BT, BK), S, input_precision=PREC)


@triton.jit
def add_stored_state_product(
    acc,
    a_ptr,
    row0,
    states_ptr,
    srow,
    K,
    V,
    v0,
    BT: tl.constexpr,
    BKR: tl.constexpr,
    BV: tl.constexpr,
    PREC: tl.constexpr,
):
    """``acc + A S`` in key blocks of BKR: A [BT, K] at buffer row ``row0`` of ``a_ptr``, S the stored [K, V]
    state whose first key is row ``srow`` (int64) of ``states_ptr``, value columns ``v0 + [0, BV)``."""
    k0 = 0
    while k0 < K:
        acc += tl.dot(
            load_tile(a_ptr, row0, BT, K, k0, BT, BKR),
            load_tile(states_ptr, srow + k0, K - k0, V, v0, BKR, BV),
            input_precision=PREC,
        )
        k0 += BKR
    return acc
