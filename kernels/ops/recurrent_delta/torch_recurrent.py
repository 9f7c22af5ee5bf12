"""``recurrent_delta`` as a fused PyTorch time loop with a hand-written reverse-time backward.

Inside, tensors are time-major with batch and heads merged: ``N = B * H`` rows, a step's
vectors are ``[N, 1, n]`` rows so that every matrix-vector product is one ``bmm``. The four
recurrent matrices are stacked, ``R = [R_q; R_k; R_v; r_b]`` of shape ``[N, F, V]`` with
``F = 2K + V + 1``, and the input parts ``x_t = [q_t, k_t, v_t, beta_t]`` are one ``[N, 1, F]``
row, so a forward step is::

    r = tanh(y);  z = x_t + R r                       (one baddbmm)
    (q, k) = softmax(z_q, z_k);  v = z_v;  b = sigmoid(z_b)
    u = b (v - S^T k);  S <- S + k u^T;  y = S^T q    (three bmm)

Saved for the backward: ``y_t`` (fp32) and ``u_t`` per step, ``S_T``, and ``S`` every
:data:`CHECKPOINT` steps. The backward walks time in reverse and rebuilds ``S_{t-1}`` by inverting
the update, ``S_{t-1} = S_t - k_t u_t^T`` (exact given the saved ``u_t``: the rounding errors only
add up, never feed back, and are reset to the saved state at every checkpoint), so memory is
``O(T (V + K V / CHECKPOINT))`` per row instead of ``O(T K V)``. ``z_t`` is recomputed for all
steps at once from the saved ``y_{t-1}``. Adjoint of step t (``dS`` = dL/dS_t, ``dy`` = dL/dy_t)::

    dS += q dy^T;   dq = S_t dy;                       S_{t-1} = S_t - k u^T
    du = dS^T k;    dv = b du;   dz_b = (du . u)(1 - b)      (b (1 - b) du . (v - S^T k))
    dk = dS u - S_{t-1} dv;      dS <- dS - k dv^T           (dS_{t-1})
    dz_q = q * (dq - q . dq);    dz_k = k * (dk - k . dk)    (softmax Jacobians)
    dr = R^T dz;                 dy_{t-1} += dr * (1 - r^2)  (tanh Jacobian)

``dz`` is the gradient of the input parts (q, k, v, beta); ``dR = sum_{t, batch} dz_t r_t^T`` is one
matmul after the loop.

Rows and packed sequences: the rows are sorted by sequence length and the steps stored time-major,
step t holding only the rows still running (:mod:`kernels.ops.utils.step_rows`), so with
``cu_seqlens`` the N sequences run as N rows of the same loop: a row past its length is left alone in
both directions (its state stays its final state; the final state's gradient enters at its last
step), its initial state enters at its first step. Without ``cu_seqlens`` every row has length T.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from kernels.ops.utils.step_rows import StepRows, step_rows
from kernels._varlen import host_offsets, mark_varlen

#: steps between saved states in the forward (the backward resets its rebuilt state there)
CHECKPOINT = 64


def _stack_inputs(q, k, v, beta, rows: StepRows) -> torch.Tensor:
    """The input parts as fp32 time-major rows [steps H, 1, F], F = 2K + V + 1."""
    x = torch.cat([q.float(), k.float(), v.float(), beta.float().unsqueeze(-1)], -1)
    return rows.to_steps(x)


def _stack_recurrent(r_q, r_k, r_v, r_b) -> torch.Tensor:
    """R = [R_q; R_k; R_v; r_b]: fp32 [H, F, V]."""
    return torch.cat([r_q.float(), r_k.float(), r_v.float(), r_b.float().unsqueeze(1)], 1)


def _per_row(R: torch.Tensor, B: int) -> torch.Tensor:
    """[H, a, b] -> [B * H, a, b] (repeated over the batch, contiguous)."""
    return R.unsqueeze(0).expand(B, *R.shape).reshape(B * R.shape[0], *R.shape[1:])


def _forward(X: torch.Tensor, RT: torch.Tensor, S: torch.Tensor, y: torch.Tensor, K: int, counts):
    """Run the recurrence in place on ``S`` [N, K, V]; ``y`` [N, 1, V] is the previous output,
    ``RT`` [N, V, F] is ``R^T`` per row; step t updates the rows ``[:counts[t]]`` (see ``step_rows``).

    Returns Y [steps, 1, V] (all outputs), U [steps, 1, V] (all ``u_t``) and the checkpoints
    [ceil(len(counts) / CHECKPOINT), N, K, V] (``S`` before steps 0, CHECKPOINT, ...; active rows).
    """
    N, _, V = S.shape
    Y = X.new_empty(X.shape[0], 1, V)
    U = X.new_empty(X.shape[0], 1, V)
    ckpt = X.new_empty((len(counts) + CHECKPOINT - 1) // CHECKPOINT, N, K, V)
    bmm, baddbmm, tanh, softmax, sigmoid, mul, sub = (
        torch.bmm,
        torch.baddbmm,
        torch.tanh,
        torch.softmax,
        torch.sigmoid,
        torch.mul,
        torch.sub,
    )
    K2, KV = 2 * K, 2 * K + V
    for t, (n, x_t, u, y_out) in enumerate(zip(counts, X.split(counts), U.split(counts), Y.split(counts))):
        S_n = S if n == N else S[:n]
        if t % CHECKPOINT == 0:
            ckpt[t // CHECKPOINT, :n].copy_(S_n)
        z = baddbmm(x_t, tanh(y if y.shape[0] == n else y[:n]), RT if n == N else RT[:n])
        p = softmax(z[:, :, :K2].view(n, 2, K), -1)
        ks = p[:, 1:]
        mul(sub(z[:, :, K2:KV], bmm(ks, S_n)), sigmoid(z[:, :, KV:]), out=u)
        S_n.baddbmm_(ks.transpose(1, 2), u)
        y = bmm(p[:, :1], S_n, out=y_out)
    return Y, U, ckpt


def _backward(X, R, Y, U, ckpt, y0, S_T, dY, dS, dy, K: int, rows: StepRows):
    """Reverse-time adjoint loop (``R`` [H, F, V]) over the rows of ``rows.counts``. Returns
    dZ [steps, 1, F], dS_0 [N, K, V], dy_0 [N, 1, V] and r [steps, 1, V] (``tanh(y_{t-1})`` per step)."""
    counts = rows.counts
    T = len(counts)
    F = X.shape[-1]
    N, _, V = S_T.shape
    H = R.shape[0]
    r = torch.tanh(torch.cat([y0, Y], 0).index_select(0, rows.expand(rows.prev)))
    Z = X + torch.einsum("jhv,hfv->jhf", r.view(-1, H, V), R).reshape(-1, 1, F)
    P = torch.softmax(Z[..., : 2 * K].reshape(-1, 2, K), -1)
    b = torch.sigmoid(Z[..., F - 1 :])
    one_minus_b = (1.0 - b).split(counts)
    one_minus_r2 = (1.0 - r * r).split(counts)
    b = b.split(counts)
    q_col = P[:, 0].unsqueeze(-1).split(counts)  # [n, K, 1] each
    k_col = P[:, 1].unsqueeze(-1).split(counts)
    k_row = P[:, 1:].split(counts)  # [n, 1, K]
    u_row, u_col = U.split(counts), U.transpose(1, 2).split(counts)
    P = P.split(counts)
    dY = [None] * T if dY is None else dY.split(counts)
    R = _per_row(R, N // H)
    S = S_T.clone()
    if dy is None:
        dy = torch.zeros_like(y0)
    bmm, cat = torch.bmm, torch.cat
    dz_steps = []
    views = {}  # active rows n -> views of the state, its gradient, dy and R (few distinct n)
    for t in range(T - 1, -1, -1):
        n = counts[t]
        p, u = P[t], u_row[t]
        if n not in views:
            views[n] = (S[:n], dS[:n], S[:n].transpose(1, 2), dS[:n].transpose(1, 2), dy[:n], R[:n])
        S_n, dS_n, St, dSt, dy_rows, R_n = views[n]
        dy_n = dy_rows if dY[t] is None else dy_rows + dY[t]
        dS_n.baddbmm_(q_col[t], dy_n)
        dq = bmm(dy_n, St)  # S_t dy
        if t % CHECKPOINT == 0:
            S_n.copy_(ckpt[t // CHECKPOINT, :n])
        else:
            S_n.baddbmm_(k_col[t], u, alpha=-1.0)  # S_{t-1}
        du = bmm(k_row[t], dS_n)
        dv = du * b[t]
        dk = bmm(u, dSt).baddbmm_(dv, St, alpha=-1.0)  # dS u - S_{t-1} dv
        dS_n.baddbmm_(k_col[t], dv, alpha=-1.0)
        pg = p * cat([dq, dk], 1)
        dz = cat([(pg - p * pg.sum(-1, keepdim=True)).view(n, 1, 2 * K), dv, bmm(du, u_col[t]) * one_minus_b[t]], -1)
        dz_steps.append(dz)
        torch.mul(bmm(dz, R_n), one_minus_r2[t], out=dy_rows)
    return torch.cat(dz_steps[::-1], 0), dS, dy, r


class RecurrentDeltaLoop(torch.autograd.Function):
    """Autograd wrapper of the fused loop; see the module docstring for the equations."""

    @staticmethod
    def forward(ctx, q, k, v, beta, r_q, r_k, r_v, r_b, S0, y0, rows: StepRows):
        K = q.shape[-1]
        V = v.shape[-1]
        N = rows.n * rows.H
        with torch.no_grad():
            X = _stack_inputs(q, k, v, beta, rows)
            RT = _per_row(_stack_recurrent(r_q, r_k, r_v, r_b).transpose(1, 2), rows.n)
            S = (
                q.new_zeros(N, K, V, dtype=torch.float32)
                if S0 is None
                else rows.sort_state(S0.float()).clone(memory_format=torch.contiguous_format)
            )
            y_init = (
                q.new_zeros(N, 1, V, dtype=torch.float32)
                if y0 is None
                else rows.sort_state(y0.float()).reshape(N, 1, V).clone()
            )
            Y, U, ckpt = _forward(X, RT, S, y_init, K, rows.counts)
            o = rows.to_packed(Y, (*q.shape[:-1], V)).to(q.dtype)
            y_T = torch.cat([y_init, Y], 0).index_select(0, rows.expand(rows.last))
            S_final, y_final = rows.unsort_state(S), rows.unsort_state(y_T.view(N, V))
        ctx.save_for_backward(q, k, v, beta, r_q, r_k, r_v, r_b, Y, U, ckpt, y_init, S)
        ctx.rows = rows
        ctx.has_state = (S0 is not None, y0 is not None)
        ctx.set_materialize_grads(False)
        return o, S_final, y_final

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dS_T, dy_T):
        q, k, v, beta, r_q, r_k, r_v, r_b, Y, U, ckpt, y0, S_T = ctx.saved_tensors
        rows = ctx.rows
        K = q.shape[-1]
        V = v.shape[-1]
        N, H = rows.n * rows.H, rows.H
        dS = S_T.new_zeros(N, K, V) if dS_T is None else rows.sort_state(dS_T.float()).clone()
        dy = None if dy_T is None else rows.sort_state(dy_T.float()).reshape(N, 1, V).clone()
        if rows.steps == 0:
            dy = S_T.new_zeros(N, 1, V) if dy is None else dy
            grads_in = [torch.zeros_like(x) for x in (q, k, v, beta, r_q, r_k, r_v, r_b)]
        else:
            X = _stack_inputs(q, k, v, beta, rows)
            R = _stack_recurrent(r_q, r_k, r_v, r_b)
            dY = None if do is None else rows.to_steps(do)
            dZ, dS, dy, r = _backward(X, R, Y, U, ckpt, y0, S_T, dY, dS, dy, K, rows)
            dX = rows.to_packed(dZ, (*q.shape[:-1], -1))
            dR = torch.einsum("jhf,jhv->hfv", dZ.view(-1, H, dZ.shape[-1]), r.view(-1, H, V))
            grads_in = [
                dX[..., :K].to(q.dtype),
                dX[..., K : 2 * K].to(k.dtype),
                dX[..., 2 * K : 2 * K + V].to(v.dtype),
                dX[..., -1].to(beta.dtype),
                dR[:, :K].to(r_q.dtype),
                dR[:, K : 2 * K].to(r_k.dtype),
                dR[:, 2 * K : 2 * K + V].to(r_v.dtype),
                dR[:, -1].to(r_b.dtype),
            ]
        has_S0, has_y0 = ctx.has_state
        return (
            *grads_in,
            rows.unsort_state(dS) if has_S0 else None,
            rows.unsort_state(dy.view(N, V)) if has_y0 else None,
            None,
        )


def recurrent_delta_torch(
    q, k, v, beta, r_q, r_k, r_v, r_b, initial_state=None, output_final_state=False, cu_seqlens=None, offsets=None
):
    """Same contract as :func:`recurrent_delta_reference`; state (S [B,H,K,V], y [B,H,V]) in fp32.

    With ``cu_seqlens`` [N+1] (B = 1) the N sequences run as N rows of one batched loop (sorted by
    length, see :mod:`~kernels.ops.utils.step_rows`); states are [N, ...]. Reads ``cu_seqlens`` on
    the host unless ``offsets`` (the dispatcher's validated host copy) are given.
    """
    B, T, H, _ = q.shape
    offsets = None if cu_seqlens is None else host_offsets(cu_seqlens, offsets)
    rows = step_rows(B, T, H, offsets, q.device)
    S0, y0 = (None, None) if initial_state is None else initial_state
    o, S, y = RecurrentDeltaLoop.apply(q, k, v, beta, r_q, r_k, r_v, r_b, S0, y0, rows)
    return o, ((S, y) if output_final_state else None)


mark_varlen(recurrent_delta_torch, host_offsets=True)
