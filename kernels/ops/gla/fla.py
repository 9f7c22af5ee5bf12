"""``gla`` on flash-linear-attention's Triton kernels (``pip install rnn-lm[fla]``).

Maps this package's contract onto fla >= 0.6 (``[B, T, H, *]`` inputs, no ``head_first``):

* per-key decays ``g [B, T, H, K]`` -> ``fla.ops.gla.chunk_gla(q, k, v, g, ...)``;
* per-head decays ``g [B, T, H]`` -> ``fla.ops.simple_gla.chunk_simple_gla(q, k, v, g, ...)``.

Both take natural-log decays (``exp(g)``, our convention), the same ``scale`` and the state as
``[B, H, K, V]`` (``state_v_first=False``). fla asserts an fp32 initial state, so it is cast (the
gradient flows back to the caller's dtype); the final state is returned in fp32 and the output in
the input dtype, as the contract asks.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from kernels._chunk_utils import empty_result


def gla_fla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """q, k: [B, T, H, K]; v: [B, T, H, V]; g: [B, T, H, K] or [B, T, H] (log decays <= 0)."""
    if q.shape[1] == 0:
        return empty_result(q, v, initial_state, output_final_state)
    h0 = None if initial_state is None else initial_state.float()
    if g.dim() == 3:
        from fla.ops.simple_gla import chunk_simple_gla

        o, S = chunk_simple_gla(q, k, v, g=g, scale=scale, initial_state=h0, output_final_state=output_final_state)
    else:
        from fla.ops.gla import chunk_gla

        o, S = chunk_gla(q, k, v, g, scale=scale, initial_state=h0, output_final_state=output_final_state)
    return o.to(q.dtype), (S.float() if output_final_state else None)
