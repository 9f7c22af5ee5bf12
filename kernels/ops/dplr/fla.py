"""``dplr`` on flash-linear-attention's Triton kernels (``pip install rnn-lm[fla]``).

``fla.ops.generalized_delta_rule.chunk_dplr_delta_rule(q, k, v, a, b, gk, ...)`` computes, per head
with state ``S [K, V]`` (its ``naive.dplr_recurrence``)::

    S_t = diag(exp(gk_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T,    o_t = scale S_t^T q_t

which is this package's ``S_t = (diag(exp(g_t)) + b_t a_t^T) S_{t-1} + k_t v_t^T`` with the same
``a``, ``b`` (no sign flip: RWKV-7 passes ``a = -kk``, ``b = kk * a`` to both) and ``gk = g``
(natural log). ``fla.ops.rwkv7.chunk_rwkv7`` is a thin wrapper over the same kernel that takes
``w`` in the same log space, so it adds nothing here. Initial states are passed in fp32; the
final state comes back in fp32 and the output in the input dtype.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from kernels._chunk_utils import empty_result


def dplr_fla(
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
    """q, k, a, b, g: [B, T, H, K] (g <= 0); v: [B, T, H, V]."""
    if q.shape[1] == 0:
        return empty_result(q, v, initial_state, output_final_state)
    from fla.ops.generalized_delta_rule import chunk_dplr_delta_rule

    h0 = None if initial_state is None else initial_state.float()
    o, S = chunk_dplr_delta_rule(q, k, v, a, b, g, scale=scale, initial_state=h0,
                                 output_final_state=output_final_state)
    return o.to(q.dtype), (S.float() if output_final_state else None)
