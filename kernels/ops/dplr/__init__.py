"""``dplr``: the reference recurrence and its fast paths (see kernels/README.md).

* ``torch``: :func:`kernels.ops.dplr.torch_chunk.dplr_chunked` (chunked generalised WY form, autograd
  through it plus a hand-written backward for the decay-weighted score matrices).
* ``triton``: :func:`dplr_triton` -- the fused-recurrent kernel for T <= ``RECURRENT_MAX_T``
  (short sequences, generation), the chunked kernels otherwise.
"""

import warnings

from kernels.ops.dplr.reference import dplr_reference

#: sequences up to this length take the fused-recurrent Triton kernel
RECURRENT_MAX_T = 16


def _reference():
    return dplr_reference


def _torch():
    from kernels.ops.dplr.torch_chunk import dplr_chunked

    return dplr_chunked


def dplr_triton(q, k, v, a, b, g, scale, initial_state=None, output_final_state=False):
    """Triton path: fused-recurrent for short T, chunked otherwise (same signature as the reference).

    Heads wider than ``MAX_HEAD`` (256) keys or values would make the state-passing loops' [K, BV]
    tiles too large; they take the chunked PyTorch path (with a warning)."""
    from kernels.ops.dplr.triton_chunk_tiles import MAX_HEAD

    if q.shape[1] <= RECURRENT_MAX_T:
        from kernels.ops.dplr.triton_recurrent import dplr_fused_recurrent as fn
    elif max(q.shape[-1], v.shape[-1]) > MAX_HEAD:
        _warn_wide(q.shape[-1], v.shape[-1], MAX_HEAD)
        fn = _torch()
    else:
        from kernels.ops.dplr.triton_chunk import dplr_triton_chunked as fn
    return fn(q, k, v, a, b, g, scale, initial_state, output_final_state)


def _warn_wide(K, V, limit):
    warnings.warn(f"dplr: K={K}, V={V} exceed {limit} for the chunked Triton kernels; using the chunked "
                  "PyTorch path", stacklevel=3)


def _triton():
    return dplr_triton


def _fla():
    from kernels.ops.dplr.fla import dplr_fla

    return dplr_fla


#: backend name -> loader returning the implementation (same signature as the reference)
BACKENDS = {"reference": _reference, "torch": _torch, "triton": _triton, "fla": _fla}
