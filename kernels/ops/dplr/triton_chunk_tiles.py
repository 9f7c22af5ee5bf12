"""Block sizes and tile loads of the chunked ``dplr`` Triton kernels.

Every kernel holds at most a bounded block of the head dimension: score and gradient kernels walk the
keys (and values) in blocks of at most ``_BLOCK`` = 64 with partial sums; the two state-passing loops,
whose solve needs the full key contraction S^T a, hold the state's column block [K, BV] with
K * BV <= ``_STATE_ELEMS`` (BV = 32, 16, 16 for K = 64, 128, 256). fp32 inputs take smaller tiles
(``_EXACT_*``).
"""

from __future__ import annotations

from dataclasses import dataclass

import triton
import triton.language as tl

from kernels.ops.common.tiles import block_size, chunk_length, load_tile

#: widest key / value block of the blocked kernels
_BLOCK = 64
#: sub-block of the score matrices (steps) and key slice of their diagonal sub-blocks
SUB = 16
KEY_SLICE = 8
#: elements of the [K, BV] state block held by the state-passing loops
_STATE_ELEMS = 64 * 32
#: elements of each [BT, BK] accumulator of the per-chunk gradient kernel
_GRAD_ELEMS = 32 * 64
#: the same for 64-step chunks (K = V <= 64, bf16): a key block of 32 spilled 1.5 KB on sm_80, 16 none
#: (at 32-step chunks a block of 32 spilled more than one of 64; ptxas -v, sm_80 / sm_90, bf16)
_GRAD_ELEMS_64 = 64 * 16
#: exact fp32 dots (``input_precision="ieee"``, fp32 inputs) are FMA loops in which each thread holds
#: its operands' whole reduction length: at the bf16 sizes they spilled kilobytes (sm_90, K = V = 64:
#: ``_solve_bwd`` 8.8 KB, the state loops 5.8 KB), so they take 32-step chunks, blocks of 32 and
#: [K, BV] state blocks of K * BV <= 1,024 elements, and the state loops contract the state with
#: W (Wz S, Wb dS) in key blocks of ``_EXACT_BLOCK`` re-read from the stored states when K is wider
#: than ``_EXACT_LOOP_KEYS``
_EXACT_CHUNK = 32
_EXACT_BLOCK = 32
_EXACT_STATE_ELEMS = 64 * 16
_EXACT_GRAD_ELEMS = 32 * 32
_EXACT_LOOP_KEYS = 64
#: widest head (keys or values) the chunked kernels take; wider heads use the PyTorch path
MAX_HEAD = 256
#: launch options of every dplr kernel: 8 warps keep the [BT, K] tiles of the state loops and the
#: score sub-blocks' address tiles in registers without spilling (ptxas -v, sm_80 / sm_90); one
#: pipeline stage keeps the loops' shared memory small
LAUNCH = dict(num_warps=8, num_stages=1)


@dataclass(frozen=True)
class Blocks:
    """Chunk length and tile widths for heads of K keys and V values."""

    BT: int  # chunk length
    BKF: int  # full key width of the state-passing loops
    BVS: int  # value block of the state-passing loops
    BK: int  # key block of the blocked kernels
    BV: int  # value block of the blocked kernels
    BKG: int  # key block of the per-chunk state-gradient kernel
    NC: int  # sub-blocks per chunk
    BKR: int  # key block of the state loops' W S contraction (BKF: one dot on the held state)


def blocks(K: int, V: int, exact: bool = False) -> Blocks:
    """Block sizes for K keys and V values; ``exact``: fp32 inputs (ieee dots), smaller tiles."""
    BT = chunk_length(K, V)
    BKF = block_size(K)
    blk, state, grad, BKR = _BLOCK, _STATE_ELEMS, (_GRAD_ELEMS if BT <= 32 else _GRAD_ELEMS_64), BKF
    if exact:
        BT = min(BT, _EXACT_CHUNK)
        blk, state, grad = _EXACT_BLOCK, _EXACT_STATE_ELEMS, _EXACT_GRAD_ELEMS
        BKR = BKF if BKF <= _EXACT_LOOP_KEYS else min(BKF, _EXACT_BLOCK)
    return Blocks(
        BT=BT,
        BKF=BKF,
        BVS=min(block_size(V), max(16, state // BKF)),
        BK=min(BKF, blk),
        BV=min(block_size(V), blk),
        BKG=min(BKF, max(16, grad // BT)),
        NC=BT // SUB,
        BKR=BKR,
    )


@triton.jit
def load_prev(ptr, row0, t_in, D, d0, BR: tl.constexpr, BD: tl.constexpr):
    """Rows t_in - 1.. of a chunk (chunk row 0 at buffer row row0; the row before the chunk reads 0):
    [BR, BD] from the row-major [*, D] fp32 buffer, features d0.."""
    rows = t_in + tl.arange(0, BR)
    cols = d0 + tl.arange(0, BD)
    offs = (row0 + rows[:, None] - 1).to(tl.int64) * D + cols[None, :]
    mask = (rows[:, None] >= 1) & (cols[None, :] < D)
    return tl.load(ptr + offs, mask=mask, other=0.0)


@triton.jit
def load_next(ptr, row0, t_in, BT, D, d0, BR: tl.constexpr, BD: tl.constexpr):
    """Rows t_in + 1.. of a chunk of BT rows (0 past the chunk's end): [BR, BD] of a [*, D] buffer."""
    rows = t_in + 1 + tl.arange(0, BR)
    cols = d0 + tl.arange(0, BD)
    offs = (row0 + rows[:, None]).to(tl.int64) * D + cols[None, :]
    mask = (rows[:, None] < BT) & (cols[None, :] < D)
    return tl.load(ptr + offs, mask=mask, other=0.0)


@triton.jit
def load_row(ptr, row, D, d0, BD: tl.constexpr):
    """Features d0.. of one row of a [*, D] fp32 buffer: [BD]."""
    cols = d0 + tl.arange(0, BD)
    return tl.load(ptr + row.to(tl.int64) * D + cols, mask=cols < D, other=0.0)


@triton.jit
def load_next_rows(ptr, bb, h, t, t_end, T, H, K, d0, BR: tl.constexpr, BK: tl.constexpr):
    """Steps t+1.. (the next steps'), features d0.. of a [B, T, H, K] input; zero from step t_end on."""
    rows = t + 1 + tl.arange(0, BR)
    cols = d0 + tl.arange(0, BK)
    offs = (bb.to(tl.int64) * T * H + h) * K + rows[:, None].to(tl.int64) * H * K + cols[None, :]
    mask = (rows[:, None] < T) & (rows[:, None] < t_end) & (cols[None, :] < K)
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def carry_over_chunk(S, G_ptr, row0, K, x_ptr, y, x2_ptr, y2, BT: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """The state (forward) or its gradient (backward) carried over the chunk at buffer row ``row0``:
    ``S e^{G_C} + X^T y + X2^T y2`` with X, X2 [BT, K] buffers and G_C the chunk's total log decay."""
    return (
        S * tl.exp(load_row(G_ptr, row0 + BT - 1, K, 0, BK))[:, None]
        + tl.dot(tl.trans(load_tile(x_ptr, row0, BT, K, 0, BT, BK)), y, input_precision=PREC)
        + tl.dot(tl.trans(load_tile(x2_ptr, row0, BT, K, 0, BT, BK)), y2, input_precision=PREC)
    )
