"""The call of a flash-linear-attention op under this package's contract (the ``fla`` backends,
``kernels/ops/<op>/fla.py``): a length-0 sequence passes its state through without calling fla, the
initial state goes in as fp32 (fla's GLA asserts it), the output comes back in the input dtype and the
final state in fp32 (None unless requested)."""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch

from kernels.ops.utils.chunks import empty_result


def call_fla(
    fn: Callable,
    args: Sequence[torch.Tensor],
    v: torch.Tensor,
    scale: float,
    initial_state: Optional[torch.Tensor],
    output_final_state: bool,
    **kwargs,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``fn(*args, scale=, initial_state=, output_final_state=, **kwargs)``; ``args[0]`` is q, ``v`` the
    values (for the shape of an empty result)."""
    q = args[0]
    if q.shape[1] == 0:
        return empty_result(q, v, initial_state, output_final_state)
    h0 = None if initial_state is None else initial_state.float()
    o, S = fn(*args, scale=scale, initial_state=h0, output_final_state=output_final_state, **kwargs)
    return o.to(q.dtype), (S.float() if output_final_state else None)
