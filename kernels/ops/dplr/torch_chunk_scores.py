"""Decay-weighted score matrices with per-key decays, without exp of a positive number.

    A[p, m][..., t, i] = sum_k x[p]_tk y[m]_ik exp(gx[p]_tk - gy_ik)   for i < t, plus i = t when
                                                                        ``diagonal[p]``; 0 above,

for P tensors x[p], gx[p] and M tensors y[m], all [..., C, K], and gy: [..., C, K]. ``gy`` = G is
a chunk-local cumulative log decay (never increasing); each ``gx[p]`` is G or its exclusive version
(gx_t = G_{t-1}), so every exponent that is used is <= 0; ``diagonal[p]`` requires gx[p] = G (the
diagonal's exponent is then exactly 0). Forming ``x exp(gx)`` and ``y exp(-gy)`` separately would
overflow for strong decays (exp(5 * 64) for g = -5 per step).

Instead every off-diagonal pair (t, i) is factored through a reference step e with i <= e < t:
exp(gx_t - gy_i) = exp(gx_t - G_e) * exp(G_e - gy_i), both factors <= 1. The pairs are arranged as
a binary tree of blocks (secondary chunking taken down to single steps): the lower-left quarter of
the chunk factors through the chunk's middle and is one matrix product, the lower-left quarter of
each half through that half's middle, and so on down to 1 x 1 blocks. Each of the log2(C) levels
costs O(C K) elementwise work plus batched products; no [C, C, K] or [C, 16, K] decay tensor is
formed. The diagonal (exponent exactly 0) is sum_k x_tk y_tk.

Backward (:class:`DecayedScores`, hand written): the products' gradients give dx and dy level by
level; since A depends on the decays only through gx_t - gy_i, the decay gradients follow as
dgx[p] = x[p] * dx[p] and dgy = -sum_m y[m] * dy[m] (over the off-diagonal parts), so the reference
steps need no gradient bookkeeping.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

#: products whose inner dimension is at most this many steps use broadcasting instead of BLAS
_SMALL = 2


def _blocks(z: torch.Tensor, size: int) -> torch.Tensor:
    """[..., C, K] -> [..., C / size, size, K] (a view)."""
    return z.view(*z.shape[:-2], z.shape[-2] // size, size, z.shape[-1])


def _lower_left(z: torch.Tensor, size: int) -> torch.Tensor:
    """View [..., C / size, size/2, size/2] of the lower-left quarters of the diagonal size-blocks of z [..., C, C]."""
    nb, h = z.shape[-1] // size, size // 2
    tiles = z.view(*z.shape[:-2], nb, size, nb, size)
    return torch.diagonal(tiles, dim1=-4, dim2=-2).movedim(-1, -3)[..., h:, :h]


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b; as a broadcast product for tiny a (batched BLAS is slow on 2 x 2 blocks)."""
    if a.shape[-1] <= _SMALL:
        return (a[..., :, :, None] * b[..., None, :, :]).sum(-2)
    return a @ b


class _Level:
    """One tree level: the decay factors of the rows after / columns up to each block's middle.

    Only the factors are kept (for backward); the scaled operands are rebuilt when needed."""

    def __init__(self, gxs, gy, size: int):
        h = size // 2
        self.size, self.h = size, h
        g_ref = _blocks(gy, size)[..., h - 1 : h, :]  # G_e, e = last step of each block's first half
        self.e_left = [torch.exp(_blocks(gx, size)[..., h:, :] - g_ref) for gx in gxs]
        self.e_right = torch.exp(g_ref - _blocks(gy, size)[..., :h, :])

    def operands(self, xs, ys):
        """(left [..., nb, P h, K], right [..., nb, M h, K]): the rows of all x[p] / y[m] stacked."""
        h, size = self.h, self.size
        lead, K = self.e_right.shape[:-2], self.e_right.shape[-1]  # [..., nb]
        left = self.e_right.new_empty(*lead, len(xs) * h, K)
        right = self.e_right.new_empty(*lead, len(ys) * h, K)
        for p, (x, e) in enumerate(zip(xs, self.e_left)):
            torch.mul(_blocks(x, size)[..., h:, :], e, out=left[..., p * h : (p + 1) * h, :])
        for m, y in enumerate(ys):
            torch.mul(_blocks(y, size)[..., :h, :], self.e_right, out=right[..., m * h : (m + 1) * h, :])
        return left, right

    def products(self, xs, ys) -> torch.Tensor:
        """[P, M, ..., nb, h, h] products of the level (the lower-left quarters)."""
        left, right = self.operands(xs, ys)
        rect = left @ right.transpose(-1, -2)  # [..., nb, P h, M h]
        h = self.h
        rect = rect.view(*rect.shape[:-2], len(xs), h, len(ys), h)
        return rect.permute(-4, -2, *range(rect.dim() - 4), -3, -1)


class DecayedScores(torch.autograd.Function):
    """forward(diagonal, P, *xs, *gxs, *ys, gy) -> P * M score matrices [..., C, C], index p * M + m.

    Separate outputs (not one stacked tensor) so that no stack / unbind copies them in backward."""

    @staticmethod
    def forward(ctx, diagonal, P, *tensors):
        xs, gxs = tensors[:P], tensors[P : 2 * P]
        ys, gy = tensors[2 * P : -1], tensors[-1]
        M = len(ys)
        C = gy.shape[-2]
        outs = [gy.new_zeros(*gy.shape[:-2], C, C) for _ in range(P * M)]
        for p in range(P):
            if diagonal[p]:
                for m in range(M):
                    outs[p * M + m].diagonal(dim1=-2, dim2=-1).copy_((xs[p] * ys[m]).sum(-1))
        levels = []
        size = C
        while size > 1:
            level = _Level(gxs, gy, size)
            rect = level.products(xs, ys)  # [P, M, ..., nb, h, h]
            for p in range(P):
                for m in range(M):
                    _lower_left(outs[p * M + m], size).copy_(rect[p, m])
            levels.append(level)
            size //= 2
        ctx.diagonal, ctx.P, ctx.M, ctx.levels = diagonal, P, M, levels
        ctx.save_for_backward(*xs, *ys)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *d_outs):
        P, M, diagonal = ctx.P, ctx.M, ctx.diagonal
        saved = ctx.saved_tensors
        xs, ys = saved[:P], saved[P:]
        d_outs = [d.contiguous() if d is not None else None for d in d_outs]
        d_xs: List[torch.Tensor] = [torch.zeros_like(x) for x in xs]  # off-diagonal parts first
        d_ys: List[torch.Tensor] = [torch.zeros_like(y) for y in ys]
        for level in ctx.levels:
            size, h = level.size, level.h
            d_rect = xs[0].new_zeros(*level.e_right.shape[:-2], P * h, M * h)  # [..., nb, P h, M h]
            for p in range(P):
                for m in range(M):
                    if d_outs[p * M + m] is not None:
                        d_rect[..., p * h : (p + 1) * h, m * h : (m + 1) * h] = _lower_left(d_outs[p * M + m], size)
            left, right = level.operands(xs, ys)
            d_left = _matmul(d_rect, right)  # [..., nb, P h, K]
            d_right = _matmul(d_rect.transpose(-1, -2), left)  # [..., nb, M h, K]
            for p in range(P):
                _blocks(d_xs[p], size)[..., h:, :].addcmul_(d_left[..., p * h : (p + 1) * h, :], level.e_left[p])
            for m in range(M):
                _blocks(d_ys[m], size)[..., :h, :].addcmul_(d_right[..., m * h : (m + 1) * h, :], level.e_right)
        d_gxs = [x * dx for x, dx in zip(xs, d_xs)]
        d_gy = ys[0] * d_ys[0]
        for y, dy in zip(ys[1:], d_ys[1:]):
            d_gy.addcmul_(y, dy)
        d_gy.neg_()
        for p in range(P):  # the diagonal does not depend on the decays
            if diagonal[p]:
                for m in range(M):
                    if d_outs[p * M + m] is None:
                        continue
                    d_diag = torch.diagonal(d_outs[p * M + m], dim1=-2, dim2=-1)[..., None]  # [..., C, 1]
                    d_xs[p].addcmul_(d_diag, ys[m])
                    d_ys[m].addcmul_(d_diag, xs[p])
        ctx.levels = None
        return (None, None, *d_xs, *d_gxs, *d_ys, d_gy)


def decayed_scores(
    xs: Sequence[torch.Tensor],
    gxs: Sequence[torch.Tensor],
    ys: Sequence[torch.Tensor],
    gy: torch.Tensor,
    diagonal: Sequence[bool],
) -> Tuple[torch.Tensor, ...]:
    """xs, gxs (P each), ys (M), gy: [..., C, K] with C a power of two -> P * M score matrices
    [..., C, C] (x[p] against y[m] at index p * M + m)."""
    C = gy.shape[-2]
    if C & (C - 1):
        raise ValueError(f"chunk length {C} must be a power of two")
    if not len(xs) == len(gxs) == len(diagonal):
        raise ValueError("xs, gxs and diagonal must have one entry per score row-operand")
    tensors = [z.contiguous() for z in (*xs, *gxs, *ys, gy)]
    return DecayedScores.apply(tuple(bool(d) for d in diagonal), len(xs), *tensors)
