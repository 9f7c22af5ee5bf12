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
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

#: steps between saved states in the forward (the backward resets its rebuilt state there)
CHECKPOINT = 64


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[B, T, H, n] -> fp32 [T, B*H, 1, n] (read only: may be a view of x)."""
    B, T, H, n = x.shape
    return x.float().transpose(0, 1).reshape(T, B * H, 1, n)


def _stack_inputs(q, k, v, beta) -> torch.Tensor:
    """The input parts as one fp32 [T, N, 1, F] tensor, F = 2K + V + 1."""
    B, T, H, _ = q.shape
    x = torch.cat([q.float(), k.float(), v.float(), beta.float().unsqueeze(-1)], -1)
    return x.transpose(0, 1).reshape(T, B * H, 1, x.shape[-1])


def _stack_recurrent(r_q, r_k, r_v, r_b) -> torch.Tensor:
    """R = [R_q; R_k; R_v; r_b]: fp32 [H, F, V]."""
    return torch.cat([r_q.float(), r_k.float(), r_v.float(), r_b.float().unsqueeze(1)], 1)


def _per_row(R: torch.Tensor, B: int) -> torch.Tensor:
    """[H, a, b] -> [B * H, a, b] (repeated over the batch, contiguous)."""
    return R.unsqueeze(0).expand(B, *R.shape).reshape(B * R.shape[0], *R.shape[1:])


def _forward(X: torch.Tensor, RT: torch.Tensor, S: torch.Tensor, y: torch.Tensor, K: int):
    """Run the recurrence in place on ``S`` [N, K, V]; ``y`` [N, 1, V] is the previous output,
    ``RT`` [N, V, F] is ``R^T`` per row.

    Returns Y [T, N, 1, V] (all outputs), U [T, N, 1, V] (all ``u_t``) and the checkpoints
    [ceil(T / CHECKPOINT), N, K, V] (``S`` before steps 0, CHECKPOINT, ...).
    """
    T, N, _, F = X.shape
    V = S.shape[-1]
    Y = X.new_empty(T, N, 1, V)
    U = X.new_empty(T, N, 1, V)
    ckpt = X.new_empty((T + CHECKPOINT - 1) // CHECKPOINT, N, K, V)
    bmm, baddbmm, tanh, softmax, sigmoid, mul, sub = (
        torch.bmm, torch.baddbmm, torch.tanh, torch.softmax, torch.sigmoid, torch.mul, torch.sub)
    K2, KV = 2 * K, 2 * K + V
    for t, (x_t, u, y_out) in enumerate(zip(X.unbind(0), U.unbind(0), Y.unbind(0))):
        if t % CHECKPOINT == 0:
            ckpt[t // CHECKPOINT].copy_(S)
        z = baddbmm(x_t, tanh(y), RT)
        p = softmax(z[:, :, :K2].view(N, 2, K), -1)
        ks = p[:, 1:]
        mul(sub(z[:, :, K2:KV], bmm(ks, S)), sigmoid(z[:, :, KV:]), out=u)
        S.baddbmm_(ks.transpose(1, 2), u)
        y = bmm(p[:, :1], S, out=y_out)
    return Y, U, ckpt


def _backward(X, R, Y, U, ckpt, y0, S_T, dY, dS, dy, K: int):
    """Reverse-time adjoint loop (``R`` [H, F, V]). Returns dZ [T, N, 1, F], dS_0 [N, K, V],
    dy_0 [N, 1, V] and r [T, N, 1, V] (the ``tanh(y_{t-1})`` of every step)."""
    T, N, _, F = X.shape
    V = S_T.shape[-1]
    H = R.shape[0]
    B = N // H
    r = torch.tanh(torch.cat([y0.unsqueeze(0), Y[:-1]], 0))
    Z = X + torch.einsum("tbhv,hfv->tbhf", r.view(T, B, H, V), R).reshape(T, N, 1, F)
    P = torch.softmax(Z[..., : 2 * K].reshape(T, N, 2, K), -1)
    b = torch.sigmoid(Z[..., F - 1:])
    one_minus_b = (1.0 - b).unbind(0)
    one_minus_r2 = (1.0 - r * r).unbind(0)
    b = b.unbind(0)
    q_col = P[:, :, 0].unsqueeze(-1).unbind(0)  # [N, K, 1] each
    k_col = P[:, :, 1].unsqueeze(-1).unbind(0)
    k_row = P[:, :, 1:].unbind(0)  # [N, 1, K]
    u_row, u_col = U.unbind(0), U.transpose(2, 3).unbind(0)
    P = P.unbind(0)
    dY = [None] * T if dY is None else dY.unbind(0)
    R = _per_row(R, B)
    S = S_T.clone()
    St, dSt = S.transpose(1, 2), dS.transpose(1, 2)
    if dy is None:
        dy = torch.zeros_like(y0)
    bmm, cat = torch.bmm, torch.cat
    dz_steps = []
    for t in range(T - 1, -1, -1):
        p, u = P[t], u_row[t]
        if dY[t] is not None:
            dy = dy + dY[t]
        dS.baddbmm_(q_col[t], dy)
        dq = bmm(dy, St)  # S_t dy
        if t % CHECKPOINT == 0:
            S.copy_(ckpt[t // CHECKPOINT])
        else:
            S.baddbmm_(k_col[t], u, alpha=-1.0)  # S_{t-1}
        du = bmm(k_row[t], dS)
        dv = du * b[t]
        dk = bmm(u, dSt).baddbmm_(dv, St, alpha=-1.0)  # dS u - S_{t-1} dv
        dS.baddbmm_(k_col[t], dv, alpha=-1.0)
        pg = p * cat([dq, dk], 1)
        dz = cat([(pg - p * pg.sum(-1, keepdim=True)).view(N, 1, 2 * K), dv,
                  bmm(du, u_col[t]) * one_minus_b[t]], -1)
        dz_steps.append(dz)
        dy = bmm(dz, R) * one_minus_r2[t]
    return torch.stack(dz_steps[::-1], 0), dS, dy, r


class RecurrentDeltaLoop(torch.autograd.Function):
    """Autograd wrapper of the fused loop; see the module docstring for the equations."""

    @staticmethod
    def forward(ctx, q, k, v, beta, r_q, r_k, r_v, r_b, S0, y0):
        B, T, H, K = q.shape
        V = v.shape[-1]
        N = B * H
        with torch.no_grad():
            X = _stack_inputs(q, k, v, beta)
            RT = _per_row(_stack_recurrent(r_q, r_k, r_v, r_b).transpose(1, 2), B)
            S_final = (q.new_zeros(B, H, K, V, dtype=torch.float32) if S0 is None
                       else S0.float().clone(memory_format=torch.contiguous_format))
            S = S_final.view(N, K, V)
            y_init = (q.new_zeros(N, 1, V, dtype=torch.float32) if y0 is None
                      else y0.float().reshape(N, 1, V).clone())
            Y, U, ckpt = _forward(X, RT, S, y_init, K)
            o = Y.view(T, B, H, V).transpose(0, 1).to(q.dtype, memory_format=torch.contiguous_format)
            y_T = Y[-1].view(B, H, V).clone() if T > 0 else y_init.view(B, H, V)
        ctx.save_for_backward(q, k, v, beta, r_q, r_k, r_v, r_b, Y, U, ckpt, y_init, S_final)
        ctx.has_state = (S0 is not None, y0 is not None)
        ctx.set_materialize_grads(False)
        return o, S_final, y_T

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dS_T, dy_T):
        q, k, v, beta, r_q, r_k, r_v, r_b, Y, U, ckpt, y0, S_T = ctx.saved_tensors
        B, T, H, K = q.shape
        V = v.shape[-1]
        N = B * H
        X = _stack_inputs(q, k, v, beta)
        R = _stack_recurrent(r_q, r_k, r_v, r_b)
        dS = (X.new_zeros(N, K, V) if dS_T is None else dS_T.float().reshape(N, K, V).clone())
        dy = None if dy_T is None else dy_T.float().reshape(N, 1, V)
        dY = None if do is None else _rows(do)
        if T == 0:
            dy = X.new_zeros(N, 1, V) if dy is None else dy
            grads_in = [torch.zeros_like(x) for x in (q, k, v, beta, r_q, r_k, r_v, r_b)]
        else:
            dZ, dS, dy, r = _backward(X, R, Y, U, ckpt, y0, S_T.reshape(N, K, V), dY, dS, dy, K)
            dX = dZ.view(T, B, H, -1).transpose(0, 1)
            dR = torch.einsum("tbhf,tbhv->hfv", dZ.view(T, B, H, -1), r.view(T, B, H, V))
            grads_in = [
                dX[..., :K].to(q.dtype), dX[..., K: 2 * K].to(k.dtype),
                dX[..., 2 * K: 2 * K + V].to(v.dtype), dX[..., -1].to(beta.dtype),
                dR[:, :K].to(r_q.dtype), dR[:, K: 2 * K].to(r_k.dtype),
                dR[:, 2 * K: 2 * K + V].to(r_v.dtype), dR[:, -1].to(r_b.dtype),
            ]
        has_S0, has_y0 = ctx.has_state
        return (*grads_in, dS.view(B, H, K, V) if has_S0 else None,
                dy.view(B, H, V) if has_y0 else None)


def recurrent_delta_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    r_q: torch.Tensor,
    r_k: torch.Tensor,
    r_v: torch.Tensor,
    r_b: torch.Tensor,
    initial_state: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    output_final_state: bool = False,
):
    """Same contract as :func:`recurrent_delta_reference`; state (S [B,H,K,V], y [B,H,V]) in fp32."""
    S0, y0 = (None, None) if initial_state is None else initial_state
    o, S, y = RecurrentDeltaLoop.apply(q, k, v, beta, r_q, r_k, r_v, r_b, S0, y0)
    return o, ((S, y) if output_final_state else None)
