"""Reference for ``recurrent_delta`` (the recurrent fast weight programmer "Recurrent Delta Net")::

r       = tanh(y_{t-1})
q_t     = softmax(q_t + R_q r)          k_t = softmax(k_t + R_k r)
v_t     = v_t + R_v r                   beta_t = sigmoid(beta_t + r_b . r)
S_t     = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T
y_t     = S_t^T q_t
"""

from typing import Optional, Tuple

import torch

State = Tuple[torch.Tensor, torch.Tensor]


def recurrent_delta_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    r_q: torch.Tensor,
    r_k: torch.Tensor,
    r_v: torch.Tensor,
    r_b: torch.Tensor,
    initial_state: Optional[State] = None,
    output_final_state: bool = False,
) -> Tuple[torch.Tensor, Optional[State]]:
    """q, k: [B,T,H,K]; v: [B,T,H,V]; beta: [B,T,H]; r_q, r_k: [H,K,V]; r_v: [H,V,V]; r_b: [H,V].

    State: (S [B, H, K, V], y [B, H, V]) with y the previous output.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    if initial_state is None:
        S = q.new_zeros(B, H, K, V, dtype=torch.float32)
        y = q.new_zeros(B, H, V, dtype=torch.float32)
    else:
        S, y = (x.float() for x in initial_state)
    r_q, r_k, r_v, r_b = (x.float() for x in (r_q, r_k, r_v, r_b))
    out = []
    for t in range(T):
        r = torch.tanh(y)
        q_t = torch.softmax(q[:, t].float() + torch.einsum("hkv,bhv->bhk", r_q, r), -1)
        k_t = torch.softmax(k[:, t].float() + torch.einsum("hkv,bhv->bhk", r_k, r), -1)
        v_t = v[:, t].float() + torch.einsum("hwv,bhv->bhw", r_v, r)
        b_t = torch.sigmoid(beta[:, t].float() + torch.einsum("hv,bhv->bh", r_b, r))
        prediction = torch.einsum("bhkv,bhk->bhv", S, k_t)
        S = S + k_t[..., None] * (b_t[..., None] * (v_t - prediction))[..., None, :]
        y = torch.einsum("bhkv,bhk->bhv", S, q_t)
        out.append(y)
    o = torch.stack(out, 1) if out else v.new_zeros(B, 0, H, V, dtype=torch.float32)
    return o.to(q.dtype), ((S, y) if output_final_state else None)
