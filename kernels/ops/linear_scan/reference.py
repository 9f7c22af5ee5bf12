"""Reference for ``linear_scan``: the step-by-step recurrence ``h_t = a_t * h_{t-1} + b_t``."""

from typing import Optional, Tuple

import torch


def linear_scan_reference(
    a: torch.Tensor,
    b: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """a, b: [B, T, D] (linear-space coefficients, any sign); initial_state: [B, D].

    Returns all h_t [B, T, D] (input dtype) and h_T [B, D] (fp32) if requested.
    """
    B, T, D = a.shape
    h = a.new_zeros(B, D, dtype=torch.float32) if initial_state is None else initial_state.float()
    out = []
    for t in range(T):
        h = a[:, t].float() * h + b[:, t].float()
        out.append(h)
    o = torch.stack(out, 1) if out else a.new_zeros(B, 0, D, dtype=torch.float32)
    return o.to(a.dtype), (h if output_final_state else None)
