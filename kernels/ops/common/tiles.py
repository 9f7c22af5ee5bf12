"""Triton building blocks shared by the ``delta_rule`` and ``dplr`` kernels (tile loads/stores, the
unit-lower-triangular inverse) and the host-side helpers that size blocks and pick dot precision.

Only stable ``tl`` APIs are used (masked loads/stores, ``tl.dot``, ``tl.where``, ``tl.exp``, loops),
so the kernels run on Triton 3.6 through 3.9 and under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: chunk length of the chunked kernels; heads wider than WIDE_HEAD use CHUNK // 2, which keeps the
#: backward kernels' tiles within shared memory up to K = V = MAX_HEAD (checked by compiling for sm_90)
CHUNK = 64
WIDE_HEAD = 64
MAX_HEAD = 128
#: launch options of every kernel (what the sm_80 / sm_90 compile check uses; one pipeline stage keeps
#: the loops' shared memory small)
LAUNCH = dict(num_warps=4, num_stages=1)


def chunk_length(K: int, V: int) -> int:
    """Chunk length (kernel block BT) for heads of K keys and V values."""
    return CHUNK if max(K, V) <= WIDE_HEAD else CHUNK // 2


def block_size(n: int) -> int:
    """Power-of-two tile width >= n and >= 16 (tl.dot needs dims >= 16)."""
    return max(16, triton.next_power_of_2(n))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products (the fp32 contract is tight); low precision uses tf32."""
    return "ieee" if dtype == torch.float32 else "tf32"


def chunk_cumsum(x: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """Chunk-local inclusive cumsum along time of x [B, T, H, *rest] -> fp32 [B, H, Tp, *rest].

    Tp = T rounded up to a multiple of ``chunk``; the padded steps repeat the last cumulative value
    (their log decay is 0), so row ``chunk - 1`` of every chunk holds the chunk's total decay.
    """
    B, T, H = x.shape[:3]
    rest = tuple(x.shape[3:])
    Tp = -(-T // chunk) * chunk
    xp = x.float().transpose(1, 2)
    if Tp != T:
        xp = torch.nn.functional.pad(xp, (0, 0) * len(rest) + (0, Tp - T))
    return xp.reshape(B, H, Tp // chunk, chunk, *rest).cumsum(3).reshape(B, H, Tp, *rest).contiguous()


def chunk_reverse_cumsum(d: torch.Tensor, T: int, chunk: int = CHUNK) -> torch.Tensor:
    """Adjoint of :func:`chunk_cumsum`: d [B, H, Tp, *rest] -> [B, T, H, *rest] (fp32)."""
    B, H, Tp = d.shape[:3]
    rest = tuple(d.shape[3:])
    d = d.reshape(B, H, Tp // chunk, chunk, *rest).flip(3).cumsum(3).flip(3).reshape(B, H, Tp, *rest)
    return d[:, :, :T].transpose(1, 2)


@triton.jit
def chunk_start(i_n, i_bh, H, Tp, BT: tl.constexpr):
    """(batch, head, first step t0, buffer row of t0) of chunk ``i_n`` of batch x head ``i_bh``: the
    chunked kernels' per-chunk fp32 buffers are row-major [B * H * Tp, *] (Tp = T padded to chunks)."""
    t0 = i_n * BT
    return i_bh // H, i_bh % H, t0, i_bh * Tp + t0


@triton.jit
def chunk_span(spans_ptr, c, t0, T, IS_VARLEN: tl.constexpr):
    """(first step, end step) of chunk ``c``: ``(t0, T)`` as given, or with packed sequences (``IS_VARLEN``,
    B = 1; :class:`kernels.ops.utils.chunk_table.ChunkTable`) row c of ``spans`` [NT, 2]: the chunk's
    first step and the end of its sequence, which takes T's place in the loads and stores (they mask the
    steps past it; the batch offset b T H is 0)."""
    if IS_VARLEN:
        t0 = tl.load(spans_ptr + 2 * c)
        T = tl.load(spans_ptr + 2 * c + 1)
    return t0, T


@triton.jit
def sequence_chunks(first_ptr, i_bh, b, H, NT, IS_VARLEN: tl.constexpr):
    """(first chunk, end chunk, batch, buffer (batch x head) index) of the chunks that the state-passing
    loop of program ``i_bh`` walks: all NT of batch x head ``i_bh``, or with packed sequences
    (``IS_VARLEN``: one program per (sequence, head), ``first`` [N+1] = each sequence's first chunk) the
    chunks of sequence ``i_bh // H``, in batch 0 and the buffers of head ``i_bh % H``."""
    if IS_VARLEN:
        n = i_bh // H
        c_lo = tl.load(first_ptr + n)
        c_hi = tl.load(first_ptr + n + 1)
        i_buf = i_bh % H
        b = i_buf * 0
    else:
        c_lo = 0
        c_hi = NT
        i_buf = i_bh
    return c_lo, c_hi, b, i_buf


@triton.jit
def load_rows(ptr, b, h, t0, T, H, D, d0, BT: tl.constexpr, BD: tl.constexpr):
    """fp32 tile [BT, BD] of a [B, T, H, D] tensor: steps t0.., features d0..; zero outside."""
    rows = t0 + tl.arange(0, BT)
    cols = d0 + tl.arange(0, BD)
    base = (b.to(tl.int64) * T * H + h) * D
    offs = base + rows[:, None].to(tl.int64) * H * D + cols[None, :]
    mask = (rows[:, None] < T) & (cols[None, :] < D)
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def store_rows(ptr, x, b, h, t0, T, H, D, d0, BT: tl.constexpr, BD: tl.constexpr):
    """Store tile x [BT, BD] into a [B, T, H, D] tensor at steps t0.., features d0.. (masked)."""
    rows = t0 + tl.arange(0, BT)
    cols = d0 + tl.arange(0, BD)
    base = (b.to(tl.int64) * T * H + h) * D
    offs = base + rows[:, None].to(tl.int64) * H * D + cols[None, :]
    mask = (rows[:, None] < T) & (cols[None, :] < D)
    tl.store(ptr + offs, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def load_steps(ptr, b, h, t0, T, H, BT: tl.constexpr):
    """fp32 vector [BT] of a [B, T, H] tensor at steps t0..; zero outside."""
    rows = t0 + tl.arange(0, BT)
    offs = (b.to(tl.int64) * T + rows) * H + h
    return tl.load(ptr + offs, mask=rows < T, other=0.0).to(tl.float32)


@triton.jit
def store_steps(ptr, x, b, h, t0, T, H, BT: tl.constexpr):
    rows = t0 + tl.arange(0, BT)
    offs = (b.to(tl.int64) * T + rows) * H + h
    tl.store(ptr + offs, x.to(ptr.dtype.element_ty), mask=rows < T)


@triton.jit
def load_tile(ptr, row0, R, D, d0, BR: tl.constexpr, BD: tl.constexpr):
    """fp32 tile [BR, BD] of a row-major [*, D] fp32 buffer at rows row0.. (R valid rows from row0)."""
    rows = tl.arange(0, BR)
    cols = d0 + tl.arange(0, BD)
    offs = (row0 + rows[:, None]).to(tl.int64) * D + cols[None, :]
    mask = (rows[:, None] < R) & (cols[None, :] < D)
    return tl.load(ptr + offs, mask=mask, other=0.0)


@triton.jit
def store_tile(ptr, x, row0, R, D, d0, BR: tl.constexpr, BD: tl.constexpr):
    rows = tl.arange(0, BR)
    cols = d0 + tl.arange(0, BD)
    offs = (row0 + rows[:, None]).to(tl.int64) * D + cols[None, :]
    mask = (rows[:, None] < R) & (cols[None, :] < D)
    tl.store(ptr + offs, x, mask=mask)


@triton.jit
def _merge_inverse(inv, A, rows, S: tl.constexpr, PREC: tl.constexpr):
    """Given inv = the inverses of the diagonal S-blocks of (I + A), return those of the 2S-blocks:
    [[X1, 0], [C, X2]]^-1 = [[X1, 0], [-X2 C X1, X2]], i.e. inv - inv C inv."""
    pair = (rows[:, None] // (2 * S)) == (rows[None, :] // (2 * S))
    other = (rows[:, None] // S) != (rows[None, :] // S)
    c = tl.where(pair & other, A, 0.0)
    return inv - tl.dot(tl.dot(inv, c, input_precision=PREC), inv, input_precision=PREC)


@triton.jit
def unit_lower_inverse(A, BT: tl.constexpr, PREC: tl.constexpr):
    """(I + A)^-1 for a strictly lower triangular fp32 tile A [BT, BT] (BT in 16, 32, 64).

    Forward substitution inside the 16-step diagonal blocks (all blocks at once: row i of every
    block is e_i - sum_{j < i} A[i, j] (row j of the inverse)), then blocks merged pairwise."""
    rows = tl.arange(0, BT)
    same = (rows[:, None] // 16) == (rows[None, :] // 16)
    a_diag = tl.where(same, A, 0.0)
    inv = (rows[:, None] == rows[None, :]).to(tl.float32)
    for i in range(1, 16):
        sel = (rows % 16 == i)[:, None]
        update = tl.dot(tl.where(sel, a_diag, 0.0), inv, input_precision=PREC)
        inv = tl.where(sel, inv - update, inv)
    if BT > 16:
        inv = _merge_inverse(inv, A, rows, 16, PREC)
    if BT > 32:
        inv = _merge_inverse(inv, A, rows, 32, PREC)
    return inv
