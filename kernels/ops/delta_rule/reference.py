"""Reference for ``delta_rule`` (and the gated delta rule when ``g`` is given)::

S' = exp(g_t) S_{t-1}
S_t = S' + beta_t k_t (v_t - S'^T k_t)^T
o_t = scale S_t^T q_t
"""

from typing import Optional, Tuple

import torch


def delta_rule_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: Optional[torch.Tensor],
    scale: float,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """q, k: [B, T, H, K]; v: [B, T, H, V]; beta, g: [B, T, H]."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    S = q.new_zeros(B, H, K, V, dtype=torch.float32) if initial_state is None else initial_state.float()
    out = []
    for t in range(T):
        if g is not None:
            S = torch.exp(g[:, t].float())[..., None, None] * S
        k_t, v_t = k[:, t].float(), v[:, t].float()
        prediction = torch.einsum("bhkv,bhk->bhv", S, k_t)
        delta = beta[:, t].float()[..., None] * (v_t - prediction)
        S = S + k_t[..., None] * delta[..., None, :]
        out.append(scale * torch.einsum("bhkv,bhk->bhv", S, q[:, t].float()))
    o = torch.stack(out, 1) if out else q.new_zeros(B, 0, H, V, dtype=torch.float32)
    return o.to(q.dtype), (S if output_final_state else None)
