"""``dplr``: the reference recurrence and its fast paths (see kernels/README.md).

* ``torch``: :func:`kernels.ops.dplr.torch_chunk.dplr_chunked` (chunked generalised WY form, autograd
  through it plus a hand-written backward for the decay-weighted score matrices).
* ``triton``: :func:`dplr_triton` -- the fused-recurrent kernel for T <= ``RECURRENT_MAX_T``
  (short sequences, generation), the chunked kernels otherwise.
"""

from kernels._dispatch import lazy
from kernels._varlen import mark_varlen
from kernels.ops.utils.triton_path import call_path, pick_triton_path

#: sequences up to this length take the fused-recurrent Triton kernel
RECURRENT_MAX_T = 16
_RECURRENT = lazy(__name__ + ".triton_recurrent", "dplr_fused_recurrent")
_CHUNKED = lazy(__name__ + ".triton_chunk", "dplr_triton_chunked")


def dplr_triton(q, k, v, a, b, g, scale, initial_state=None, output_final_state=False, cu_seqlens=None, offsets=None):
    """Triton path (same signature as the reference): fused-recurrent for T <= ``RECURRENT_MAX_T``, chunked
    otherwise; heads wider than the chunked kernels' ``MAX_HEAD`` take the chunked PyTorch path (with a
    warning), see :func:`~kernels.ops.utils.triton_path.pick_triton_path`. All three take packed sequences
    (``cu_seqlens``, B = 1, states [N, H, K, V]) natively; ``offsets``: its validated host copy."""
    from kernels.ops.dplr.triton_chunk_tiles import MAX_HEAD

    fn = pick_triton_path("dplr", q, v, RECURRENT_MAX_T, MAX_HEAD, _RECURRENT, _CHUNKED, BACKENDS["torch"])
    args = (q, k, v, a, b, g, scale, initial_state, output_final_state)
    return call_path(fn, args, cu_seqlens, offsets)


mark_varlen(dplr_triton, host_offsets=True)


#: backend name -> loader returning the implementation (same signature as the reference)
BACKENDS = {
    "reference": lazy(__name__ + ".reference", "dplr_reference"),
    "torch": lazy(__name__ + ".torch_chunk", "dplr_chunked"),
    "triton": lambda: dplr_triton,
    "fla": lazy(__name__ + ".fla", "dplr_fla"),
}
