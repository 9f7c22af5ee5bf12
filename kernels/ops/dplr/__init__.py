"""``dplr``: the reference recurrence and its fast paths (see kernels/README.md).

* ``torch``: :func:`kernels.ops.dplr.torch_chunk.dplr_chunked` (chunked generalised WY form, autograd
  through it plus a hand-written backward for the decay-weighted score matrices).
* ``triton``: ``dplr_triton`` -- the fused-recurrent kernel for T <= ``RECURRENT_MAX_T``
  (short sequences, generation), the chunked kernels otherwise, the chunked PyTorch path for heads wider
  than the chunked tiles (:func:`kernels.ops.utils.triton_path.triton_backend`).
"""

from kernels._dispatch import lazy
from kernels.ops.utils.triton_path import triton_backend

#: sequences up to this length take the fused-recurrent Triton kernel
RECURRENT_MAX_T = 16
_RECURRENT = lazy(__name__ + ".triton_recurrent", "dplr_fused_recurrent")
_CHUNKED = lazy(__name__ + ".triton_chunk", "dplr_triton_chunked")


#: backend name -> loader returning the implementation (same signature as the reference)
BACKENDS = {
    "reference": lazy(__name__ + ".reference", "dplr_reference"),
    "torch": lazy(__name__ + ".torch_chunk", "dplr_chunked"),
    "triton": lambda: dplr_triton,
    "fla": lazy(__name__ + ".fla", "dplr_fla"),
}

dplr_triton = triton_backend(
    "dplr",
    RECURRENT_MAX_T,
    lazy("kernels.ops.dplr.triton_chunk_tiles", "MAX_HEAD"),
    _RECURRENT,
    _CHUNKED,
    BACKENDS["torch"],
)
