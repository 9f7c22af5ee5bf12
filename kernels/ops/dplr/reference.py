"""Reference for ``dplr`` (diagonal plus low-rank transition, the RWKV-7 family)::

S_t = (diag(exp(g_t)) + b_t a_t^T) S_{t-1} + k_t v_t^T
o_t = scale S_t^T q_t
"""

from typing import Optional, Tuple

import torch


def dplr_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """q, k, a, b, g: [B, T, H, K]; v: [B, T, H, V]."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    S = q.new_zeros(B, H, K, V, dtype=torch.float32) if initial_state is None else initial_state.float()
    out = []
    for t in range(T):
        a_t, b_t = a[:, t].float(), b[:, t].float()
        low_rank = b_t[..., None] * torch.einsum("bhk,bhkv->bhv", a_t, S)[..., None, :]
        S = torch.exp(g[:, t].float())[..., None] * S + low_rank
        S = S + k[:, t].float()[..., None] * v[:, t].float()[..., None, :]
        out.append(scale * torch.einsum("bhkv,bhk->bhv", S, q[:, t].float()))
    o = torch.stack(out, 1) if out else q.new_zeros(B, 0, H, V, dtype=torch.float32)
    return o.to(q.dtype), (S if output_final_state else None)
