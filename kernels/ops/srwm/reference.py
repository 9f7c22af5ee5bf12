"""Reference for ``srwm`` (self-referential weight matrix). Per head the state is the weights::

    y_t = W_y x_t,  q_t = softmax(W_q x_t),  k_t = softmax(W_k x_t),  beta_t = sigmoid(w_b x_t)  (4)
    for (M, beta) in ((W_y, beta_t[0]), (W_q, beta_t[1]), (W_k, beta_t[2]), (w_b, beta_t[3])):
        M <- M + beta (M q_t - M k_t) k_t^T

``y_t`` is computed with the weights before the update.
"""

from typing import Optional, Tuple

import torch

State = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def broadcast_weights(w: torch.Tensor, B: int) -> torch.Tensor:
    """[H, R, D] parameters -> [B, H, R, D] (a batched tensor passes through)."""
    return w.unsqueeze(0).expand(B, *w.shape) if w.dim() == 3 else w


def srwm_reference(
    x: torch.Tensor,
    w_y: torch.Tensor,
    w_q: torch.Tensor,
    w_k: torch.Tensor,
    w_b: torch.Tensor,
    initial_state: Optional[State] = None,
    output_final_state: bool = False,
) -> Tuple[torch.Tensor, Optional[State]]:
    """x: [B, T, H, D]; w_y: [(B,) H, V, D]; w_q, w_k: [(B,) H, D, D]; w_b: [(B,) H, 4, D]."""
    B, T, H, D = x.shape
    weights = initial_state if initial_state is not None else (w_y, w_q, w_k, w_b)
    Wy, Wq, Wk, Wb = (broadcast_weights(w, B).float() for w in weights)
    V = Wy.shape[-2]
    out = []
    for t in range(T):
        x_t = x[:, t].float()
        y = torch.einsum("bhrd,bhd->bhr", Wy, x_t)
        q_t = torch.softmax(torch.einsum("bhrd,bhd->bhr", Wq, x_t), -1)
        k_t = torch.softmax(torch.einsum("bhrd,bhd->bhr", Wk, x_t), -1)
        beta = torch.sigmoid(torch.einsum("bhrd,bhd->bhr", Wb, x_t))
        updated = []
        for i, M in enumerate((Wy, Wq, Wk, Wb)):
            diff = torch.einsum("bhrd,bhd->bhr", M, q_t - k_t)
            updated.append(M + beta[..., i, None, None] * diff[..., None] * k_t[..., None, :])
        Wy, Wq, Wk, Wb = updated
        out.append(y)
    o = torch.stack(out, 1) if out else x.new_zeros(B, 0, H, V, dtype=torch.float32)
    return o.to(x.dtype), ((Wy, Wq, Wk, Wb) if output_final_state else None)
