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

Rows and packed sequences: as in :mod:`kernels.ops.recurrent_delta.torch_recurrent`, the rows are sorted by
sequence length and the steps stored time-major with only the rows still running
(:mod:`kernels.ops.utils.step_rows`); with ``cu_seqlens`` the N sequences are N rows of one
loop, a row past its length is left alone (its weights stay its final weights).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from kernels.ops.utils.step_rows import StepRows, step_rows
from kernels.ops.srwm.reference import broadcast_weights
from kernels._varlen import host_offsets, mark_varlen

#: steps between saved states in the forward (the backward resets its rebuilt state there)
CHECKPOINT = 64


def beta_row_index(V: int, D: int, device) -> torch.Tensor:
    """Which of the 4 betas scales each of the R = V + 2D + 4 stacked rows."""
    sizes = torch.tensor([V, D, D, 4], device=device)
    return torch.repeat_interleave(torch.arange(4, device=device), sizes)


def stack_weights(weights, B: int) -> torch.Tensor:
    """(W_y, W_q, W_k, w_b), each [H, r, D] or [B, H, r, D] -> fp32 [B, H, R, D] (a new tensor)."""
    return torch.cat([broadcast_weights(w, B).float() for w in weights], -2)


def _forward(X: torch.Tensor, WT: torch.Tensor, V: int, counts):
    """Run the recurrence in place on the transposed state ``WT`` [N, D, R] for the time-major rows
    X [steps, 1, D]; step t updates the rows ``[:counts[t]]`` (see ``step_rows``).

    Returns Z [steps, 1, R] (pre-activations, ``y_t`` first), Dd [steps, 1, R] (``d_t``) and the
    checkpoints [ceil(len(counts) / CHECKPOINT), N, D, R] (``W^T`` before steps 0, CHECKPOINT, ...; active rows).
    """
    N, D, R = WT.shape
    rows = beta_row_index(V, D, WT.device)
    Z = X.new_empty(X.shape[0], 1, R)
    Dd = X.new_empty(X.shape[0], 1, R)
    ckpt = X.new_empty((len(counts) + CHECKPOINT - 1) // CHECKPOINT, N, D, R)
    bmm, softmax, sigmoid, index_select = torch.bmm, torch.softmax, torch.sigmoid, torch.index_select
    V2D = V + 2 * D
    for t, (n, x, z, d) in enumerate(zip(counts, X.split(counts), Z.split(counts), Dd.split(counts))):
        W_n = WT if n == N else WT[:n]
        if t % CHECKPOINT == 0:
            ckpt[t // CHECKPOINT, :n].copy_(W_n)
        bmm(x, W_n, out=z)
        p = softmax(z[:, :, V:V2D].view(n, 2, D), -1)
        k = p[:, 1:]
        bmm(p[:, :1] - k, W_n, out=d)
        W_n.baddbmm_(k.transpose(1, 2), d * index_select(sigmoid(z[:, :, V2D:]), 2, rows))
    return Z, Dd, ckpt


def _backward(X, Z, Dd, ckpt, WT_T, dY, dWT, V: int, counts):
    """Reverse-time adjoint loop on transposed states over the rows of ``counts``. Returns
    dX [steps, 1, D] and dW_0^T [N, D, R]."""
    T = len(counts)
    D = X.shape[-1]
    V2D = V + 2 * D
    rows = beta_row_index(V, D, WT_T.device)
    # [R, 4]: sums the rows of each matrix
    segment = (rows.unsqueeze(1) == torch.arange(4, device=rows.device).unsqueeze(0)).float()
    P = torch.softmax(Z[:, 0, V:V2D].reshape(-1, 2, D), -1)
    b = torch.sigmoid(Z[:, :, V2D:])
    dsig = (b * (1.0 - b)).split(counts)
    beta_rows = b[:, :, rows]  # [steps, 1, R]
    s_row = (Dd * beta_rows).split(counts)
    c_col = (P[:, 0] - P[:, 1]).unsqueeze(-1).split(counts)  # [n, D, 1]
    k_row = P[:, 1:].split(counts)  # [n, 1, D]
    k_col = P[:, 1].unsqueeze(-1).split(counts)
    P, beta_rows, Dd = P.split(counts), beta_rows.split(counts), Dd.split(counts)
    x_col = X.transpose(1, 2).split(counts)
    dY = [None] * T if dY is None else dY.split(counts)
    WT = WT_T.clone()
    bmm, cat, matmul = torch.bmm, torch.cat, torch.matmul
    dx_steps = []
    views = {}  # active rows n -> views of the state and its gradient (few distinct n)
    for t in range(T - 1, -1, -1):
        n = counts[t]
        p, k, s = P[t], k_row[t], s_row[t]
        if n not in views:
            views[n] = (WT[:n], dWT[:n], WT[:n].transpose(1, 2), dWT[:n].transpose(1, 2))
        WT_n, dWT_n, W, dW = views[n]
        ds = bmm(k, dWT_n)  # dW k
        dk = bmm(s, dW)  # dW^T s
        if t % CHECKPOINT == 0:
            WT_n.copy_(ckpt[t // CHECKPOINT, :n])
        else:
            WT_n.baddbmm_(k_col[t], s, alpha=-1.0)  # W_{t-1}
        dd = ds * beta_rows[t]
        dc = bmm(dd, W)  # W_{t-1}^T dd
        pg = p * cat([dc, dk - dc], 1)
        dz = cat(
            [
                X.new_zeros(n, 1, V) if dY[t] is None else dY[t],
                (pg - p * pg.sum(-1, keepdim=True)).view(n, 1, 2 * D),
                matmul(ds * Dd[t], segment) * dsig[t],
            ],
            -1,
        )
        dx_steps.append(bmm(dz, W))  # W_{t-1}^T dz
        dWT_n.baddbmm_(c_col[t], dd).baddbmm_(x_col[t], dz)
    return torch.cat(dx_steps[::-1], 0), dWT


class SrwmLoop(torch.autograd.Function):
    """Autograd wrapper of the fused loop; see the module docstring for the equations."""

    @staticmethod
    def forward(ctx, x, V, rows: StepRows, w_y, w_q, w_k, w_b):
        with torch.no_grad():
            W0 = stack_weights((w_y, w_q, w_k, w_b), rows.n)  # [n, H, R, D]
            WT = rows.sort_state(W0).transpose(1, 2).contiguous()  # [N, D, R]
            X = rows.to_steps(x)
            Z, Dd, ckpt = _forward(X, WT, V, rows.counts)
            W_final = rows.unsort_state(WT.transpose(1, 2))
            o = rows.to_packed(Z[..., :V].contiguous(), (*x.shape[:-1], V)).to(x.dtype)
        ctx.save_for_backward(x, Z, Dd, ckpt, WT)
        ctx.V, ctx.rows = V, rows
        ctx.shapes = [(w.dim(), w.dtype) for w in (w_y, w_q, w_k, w_b)]
        ctx.set_materialize_grads(False)
        return o, W_final

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dW_T):
        x, Z, Dd, ckpt, WT_T = ctx.saved_tensors
        V, rows = ctx.V, ctx.rows
        D = x.shape[-1]
        N, _, R = WT_T.shape
        dWT = WT_T.new_zeros(N, D, R) if dW_T is None else rows.sort_state(dW_T.float()).transpose(1, 2).contiguous()
        if rows.steps == 0:
            dx = torch.zeros_like(x)
        else:
            X = rows.to_steps(x)
            dY = None if do is None else rows.to_steps(do)
            dX, dWT = _backward(X, Z, Dd, ckpt, WT_T, dY, dWT, V, rows.counts)
            dx = rows.to_packed(dX, x.shape).to(x.dtype)
        dW = rows.unsort_state(dWT.transpose(1, 2))  # [n, H, R, D]
        grads = []
        for (dim, dtype), lo, hi in zip(ctx.shapes, (0, V, V + D, V + 2 * D), (V, V + D, V + 2 * D, R)):
            g = dW[:, :, lo:hi]
            grads.append((g.sum(0) if dim == 3 else g).to(dtype))
        return (dx, None, None, *grads)


def srwm_torch(x, w_y, w_q, w_k, w_b, initial_state=None, output_final_state=False, cu_seqlens=None, offsets=None):
    """Same contract as :func:`srwm_reference`; the final weights are returned in fp32.

    With ``cu_seqlens`` [N+1] (B = 1) the N sequences run as N rows of one batched loop (sorted by
    length, see :mod:`~kernels.ops.utils.step_rows`): shared [H, ...] weights start every
    sequence (their gradient summed over the sequences), batched ones are [N, ...]; final weights
    [N, ...]. Reads ``cu_seqlens`` on the host unless ``offsets`` (the dispatcher's validated host copy)
    are given.
    """
    weights = tuple(initial_state) if initial_state is not None else (w_y, w_q, w_k, w_b)
    V = weights[0].shape[-2]
    B, T, H, D = x.shape
    rows = step_rows(B, T, H, None if cu_seqlens is None else host_offsets(cu_seqlens, offsets), x.device)
    o, W = SrwmLoop.apply(x, V, rows, *weights)
    if not output_final_state:
        return o, None
    return o, (W[:, :, :V], W[:, :, V : V + D], W[:, :, V + D : V + 2 * D], W[:, :, V + 2 * D :])


mark_varlen(srwm_torch, host_offsets=True)
