"""``delta_rule``: the reference recurrence and its fast paths (see kernels/README.md).

* ``torch``: :func:`kernels.ops.delta_rule.torch_chunk.delta_rule_chunked` (chunked WY/UT form, autograd).
* ``triton``: :func:`delta_rule_triton` -- the fused-recurrent kernel for T <= ``RECURRENT_MAX_T``
  (short sequences, generation), the chunked kernels otherwise.
"""

import warnings

from kernels.ops.delta_rule.reference import delta_rule_reference

#: sequences up to this length take the fused-recurrent Triton kernel
RECURRENT_MAX_T = 16


def _reference():
    return delta_rule_reference


def _torch():
    from kernels.ops.delta_rule.torch_chunk import delta_rule_chunked

    return delta_rule_chunked


def delta_rule_triton(q, k, v, beta, g, scale, initial_state=None, output_final_state=False):
    """Triton path: fused-recurrent for short T, chunked otherwise (same signature as the reference).

    Heads wider than ``MAX_HEAD`` keys or values do not fit the chunked kernels' tiles on chip; they
    take the chunked PyTorch path (with a warning)."""
    from kernels.ops.common.tiles import MAX_HEAD

    if q.shape[1] <= RECURRENT_MAX_T:
        from kernels.ops.delta_rule.triton_recurrent import delta_rule_fused_recurrent as fn
    elif max(q.shape[-1], v.shape[-1]) > MAX_HEAD:
        _warn_wide(q.shape[-1], v.shape[-1], MAX_HEAD)
        fn = _torch()
    else:
        from kernels.ops.delta_rule.triton_chunk import delta_rule_triton_chunked as fn
    return fn(q, k, v, beta, g, scale, initial_state, output_final_state)


def _warn_wide(K, V, limit):
    warnings.warn(f"delta_rule: K={K}, V={V} exceed {limit} for the chunked Triton kernels; using the chunked "
                  "PyTorch path", stacklevel=3)


def _triton():
    return delta_rule_triton


def _fla():
    from kernels.ops.delta_rule.fla import delta_rule_fla

    return delta_rule_fla


#: backend name -> loader returning the implementation (same signature as the reference)
BACKENDS = {"reference": _reference, "torch": _torch, "triton": _triton, "fla": _fla}
