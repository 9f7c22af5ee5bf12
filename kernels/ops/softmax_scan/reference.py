"""Reference for ``softmax_scan`` (Aaren): attention of a fixed query as a recurrence::

m_t = max(m_{t-1}, s_t)
u_t = u_{t-1} exp(m_{t-1} - m_t) + exp(s_t - m_t)
w_t = w_{t-1} exp(m_{t-1} - m_t) + exp(s_t - m_t) v_t
o_t = w_t / u_t  =  sum_{i<=t} exp(s_i) v_i / sum_{i<=t} exp(s_i)
"""

from typing import Optional, Tuple

import torch

State = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def empty_state(B: int, H: int, V: int, device=None) -> State:
    """The state before any token: m = -inf, u = 0, w = 0."""
    m = torch.full((B, H), float("-inf"), device=device)
    return m, torch.zeros(B, H, device=device), torch.zeros(B, H, V, device=device)


def softmax_scan_reference(
    s: torch.Tensor,
    v: torch.Tensor,
    initial_state: Optional[State] = None,
    output_final_state: bool = False,
) -> Tuple[torch.Tensor, Optional[State]]:
    """s: [B, T, H] scores; v: [B, T, H, V]; state (m [B, H], u [B, H], w [B, H, V])."""
    B, T, H = s.shape
    V = v.shape[-1]
    if initial_state is None:
        m, u, w = empty_state(B, H, V, s.device)
    else:
        m, u, w = (x.float() for x in initial_state)
    out = []
    for t in range(T):
        s_t = s[:, t].float()
        m_new = torch.maximum(m, s_t)
        carry = torch.exp(m - m_new)
        p = torch.exp(s_t - m_new)
        u = u * carry + p
        w = w * carry[..., None] + p[..., None] * v[:, t].float()
        m = m_new
        out.append(w / u[..., None])
    o = torch.stack(out, 1) if out else v.new_zeros(B, 0, H, V, dtype=torch.float32)
    return o.to(v.dtype), ((m, u, w) if output_final_state else None)
