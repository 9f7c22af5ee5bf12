"""Reference for ``gla``: ``S_t = exp(g_t)[:, None] * S_{t-1} + k_t v_t^T``, ``o_t = scale S_t^T q_t``."""

from typing import Optional, Tuple

import torch


def gla_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """q, k: [B, T, H, K]; v: [B, T, H, V]; g: [B, T, H, K] or [B, T, H] (log decay <= 0)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    if g.dim() == 3:
        g = g.unsqueeze(-1).expand(B, T, H, K)
    S = q.new_zeros(B, H, K, V, dtype=torch.float32) if initial_state is None else initial_state.float()
    out = []
    for t in range(T):
        S = torch.exp(g[:, t].float())[..., None] * S + k[:, t].float()[..., None] * v[:, t].float()[..., None, :]
        out.append(scale * torch.einsum("bhkv,bhk->bhv", S, q[:, t].float()))
    o = torch.stack(out, 1) if out else q.new_zeros(B, 0, H, V, dtype=torch.float32)
    return o.to(q.dtype), (S if output_final_state else None)
