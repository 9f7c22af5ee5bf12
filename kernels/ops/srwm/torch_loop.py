"""``srwm`` as a fused PyTorch time loop with a hand-written reverse-time backward.

Batch and heads are merged (``N = B * H`` rows) and the four weight matrices are stacked into one
state ``W = [W_y; W_q; W_k; w_b]`` of shape ``[N, R, D]`` with ``R = V + 2D + 4`` rows, kept
transposed (``W^T`` [N, D, R], contiguous) so that each product is a row vector ``[N, 1, n]``
times a matrix, the fast ``bmm`` path. ``beta_rows`` repeats each matrix's
beta over its rows (``[b0]*V + [b1]*D + [b2]*D + [b3]*4``). A forward step is::

    z = W x_t                              (one bmm; z = [y_t; z_q; z_k; z_b], y_t is the output)
    (q, k) = softmax(z_q, z_k);  b = sigmoid(z_b)
    d = W (q - k);  W <- W + (beta_rows * d) k^T      (one bmm, one baddbmm)

Saved for the backward: ``z_t`` and ``d_t`` per step (``R`` numbers each), ``W_T``, and ``W`` every
:data:`CHECKPOINT` steps. The backward walks time in reverse and rebuilds ``W_{t-1}`` by inverting
the update, ``W_{t-1} = W_t - s_t k_t^T`` with ``s_t = beta_rows * d_t`` (exact given the saved
``d_t``; rounding errors only add up, and are reset at every checkpoint). Adjoint of step t
(``dW`` = dL/dW_t, ``c = q - k``, ``dz_y`` = the output's gradient)::

    ds = dW k;   dk_a = dW^T s;                        W_{t-1} = W_t - s k^T
    dd = beta_rows * ds;  db_i = sum over matrix i's rows of ds * d;   dz_b = db * b (1 - b)
    dc = W_{t-1}^T dd;    dz_q = softmax'(q) dc;   dz_k = softmax'(k) (dk_a - dc)
    dx_t = W_{t-1}^T dz;  dW <- dW + dd c^T + dz x_t^T                  (dW_{t-1})

After the loop ``dW`` is the gradient of the initial weights; parameters shared by the batch
(``[H, ...]``) get its sum over the batch.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from kernels.ops.srwm.reference import broadcast_weights

#: steps between saved states in the forward (the backward resets its rebuilt state there)
CHECKPOINT = 64


def beta_row_index(V: int, D: int, device) -> torch.Tensor:
    """Which of the 4 betas scales each of the R = V + 2D + 4 stacked rows."""
    sizes = torch.tensor([V, D, D, 4], device=device)
    return torch.repeat_interleave(torch.arange(4, device=device), sizes)


def stack_weights(weights, B: int) -> torch.Tensor:
    """(W_y, W_q, W_k, w_b), each [H, r, D] or [B, H, r, D] -> fp32 [B, H, R, D] (a new tensor)."""
    return torch.cat([broadcast_weights(w, B).float() for w in weights], -2)


def _forward(X: torch.Tensor, WT: torch.Tensor, V: int):
    """Run the recurrence in place on the transposed state ``WT`` [N, D, R] for X [T, N, 1, D].

    Returns Z [T, N, 1, R] (pre-activations, ``y_t`` first), Dd [T, N, 1, R] (``d_t``) and the
    checkpoints [ceil(T / CHECKPOINT), N, D, R] (``W^T`` before steps 0, CHECKPOINT, ...).
    """
    T, N, _, D = X.shape
    R = WT.shape[-1]
    rows = beta_row_index(V, D, WT.device)
    Z = X.new_empty(T, N, 1, R)
    Dd = X.new_empty(T, N, 1, R)
    ckpt = X.new_empty((T + CHECKPOINT - 1) // CHECKPOINT, N, D, R)
    bmm, softmax, sigmoid, index_select = torch.bmm, torch.softmax, torch.sigmoid, torch.index_select
    V2D = V + 2 * D
    for t, (x, z, d) in enumerate(zip(X.unbind(0), Z.unbind(0), Dd.unbind(0))):
        if t % CHECKPOINT == 0:
            ckpt[t // CHECKPOINT].copy_(WT)
        bmm(x, WT, out=z)
        p = softmax(z[:, :, V:V2D].view(N, 2, D), -1)
        k = p[:, 1:]
        bmm(p[:, :1] - k, WT, out=d)
        WT.baddbmm_(k.transpose(1, 2), d * index_select(sigmoid(z[:, :, V2D:]), 2, rows))
    return Z, Dd, ckpt


def _backward(X, Z, Dd, ckpt, WT_T, dY, dWT, V: int):
    """Reverse-time adjoint loop on transposed states. Returns dX [T, N, 1, D] and dW_0^T."""
    T, N, _, D = X.shape
    V2D = V + 2 * D
    rows = beta_row_index(V, D, WT_T.device)
    # [R, 4]: sums the rows of each matrix
    segment = (rows.unsqueeze(1) == torch.arange(4, device=rows.device).unsqueeze(0)).float()
    P = torch.softmax(Z[:, :, 0, V:V2D].reshape(T, N, 2, D), -1)
    b = torch.sigmoid(Z[:, :, :, V2D:])
    dsig = (b * (1.0 - b)).unbind(0)
    beta_rows = b[:, :, :, rows]  # [T, N, 1, R]
    s_row = (Dd * beta_rows).unbind(0)
    c_col = (P[:, :, 0] - P[:, :, 1]).unsqueeze(-1).unbind(0)  # [N, D, 1]
    k_row = P[:, :, 1:].unbind(0)  # [N, 1, D]
    k_col = P[:, :, 1].unsqueeze(-1).unbind(0)
    P, beta_rows, Dd = P.unbind(0), beta_rows.unbind(0), Dd.unbind(0)
    x_col = X.transpose(2, 3).unbind(0)
    dY = [None] * T if dY is None else dY.unbind(0)
    WT = WT_T.clone()
    W, dW = WT.transpose(1, 2), dWT.transpose(1, 2)
    zeros_y = X.new_zeros(N, 1, V)
    bmm, cat, matmul = torch.bmm, torch.cat, torch.matmul
    dx_steps = []
    for t in range(T - 1, -1, -1):
        p, k, s = P[t], k_row[t], s_row[t]
        ds = bmm(k, dWT)  # dW k
        dk = bmm(s, dW)  # dW^T s
        if t % CHECKPOINT == 0:
            WT.copy_(ckpt[t // CHECKPOINT])
        else:
            WT.baddbmm_(k_col[t], s, alpha=-1.0)  # W_{t-1}
        dd = ds * beta_rows[t]
        dc = bmm(dd, W)  # W_{t-1}^T dd
        pg = p * cat([dc, dk - dc], 1)
        dz = cat([zeros_y if dY[t] is None else dY[t],
                  (pg - p * pg.sum(-1, keepdim=True)).view(N, 1, 2 * D),
                  matmul(ds * Dd[t], segment) * dsig[t]], -1)
        dx_steps.append(bmm(dz, W))  # W_{t-1}^T dz
        dWT.baddbmm_(c_col[t], dd).baddbmm_(x_col[t], dz)
    return torch.stack(dx_steps[::-1], 0), dWT


class SrwmLoop(torch.autograd.Function):
    """Autograd wrapper of the fused loop; see the module docstring for the equations."""

    @staticmethod
    def forward(ctx, x, V, w_y, w_q, w_k, w_b):
        B, T, H, D = x.shape
        N = B * H
        with torch.no_grad():
            W_final = stack_weights((w_y, w_q, w_k, w_b), B)
            WT = W_final.view(N, -1, D).transpose(1, 2).contiguous()
            X = x.float().transpose(0, 1).reshape(T, N, 1, D)
            Z, Dd, ckpt = _forward(X, WT, V)
            W_final.view(N, -1, D).copy_(WT.transpose(1, 2))
            o = Z[:, :, 0, :V].view(T, B, H, V).transpose(0, 1).to(
                x.dtype, memory_format=torch.contiguous_format)
        ctx.save_for_backward(x, Z, Dd, ckpt, WT)
        ctx.V = V
        ctx.shapes = [(w.dim(), w.dtype) for w in (w_y, w_q, w_k, w_b)]
        ctx.set_materialize_grads(False)
        return o, W_final

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dW_T):
        x, Z, Dd, ckpt, WT_T = ctx.saved_tensors
        V = ctx.V
        B, T, H, D = x.shape
        N = B * H
        R = WT_T.shape[-1]
        dWT = (WT_T.new_zeros(N, D, R) if dW_T is None
               else dW_T.float().reshape(N, R, D).transpose(1, 2).contiguous())
        if T == 0:
            dx = torch.zeros_like(x)
        else:
            X = x.float().transpose(0, 1).reshape(T, N, 1, D)
            dY = None if do is None else do.float().transpose(0, 1).reshape(T, N, 1, V)
            dX, dWT = _backward(X, Z, Dd, ckpt, WT_T, dY, dWT, V)
            dx = dX.view(T, B, H, D).transpose(0, 1).to(x.dtype)
        dW = dWT.transpose(1, 2)
        dW = dW.view(B, H, R, D)
        grads = []
        for (dim, dtype), lo, hi in zip(ctx.shapes, (0, V, V + D, V + 2 * D), (V, V + D, V + 2 * D, R)):
            g = dW[:, :, lo:hi]
            grads.append((g.sum(0) if dim == 3 else g).to(dtype))
        return (dx, None, *grads)


def srwm_torch(
    x: torch.Tensor,
    w_y: torch.Tensor,
    w_q: torch.Tensor,
    w_k: torch.Tensor,
    w_b: torch.Tensor,
    initial_state: Optional[Tuple[torch.Tensor, ...]] = None,
    output_final_state: bool = False,
):
    """Same contract as :func:`srwm_reference`; the final weights are returned in fp32."""
    weights = tuple(initial_state) if initial_state is not None else (w_y, w_q, w_k, w_b)
    V = weights[0].shape[-2]
    o, W = SrwmLoop.apply(x, V, *weights)
    if not output_final_state:
        return o, None
    D = x.shape[-1]
    return o, (W[:, :, :V], W[:, :, V: V + D], W[:, :, V + D: V + 2 * D], W[:, :, V + 2 * D:])
