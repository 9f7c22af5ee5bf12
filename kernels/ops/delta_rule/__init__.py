"""``delta_rule``: the reference recurrence and its fast paths (see kernels/README.md).

* ``torch``: :func:`kernels.ops.delta_rule.torch_chunk.delta_rule_chunked` (chunked WY/UT form, autograd).
* ``triton``: ``delta_rule_triton`` -- the fused-recurrent kernel for T <= ``RECURRENT_MAX_T``
  (short sequences, generation), the chunked kernels otherwise, the chunked PyTorch path for heads wider
  than the chunked tiles (:func:`kernels.ops.utils.triton_path.triton_backend`).
"""

from kernels._dispatch import lazy
from kernels.ops.utils.triton_path import triton_backend

#: sequences up to this length take the fused-recurrent Triton kernel
RECURRENT_MAX_T = 16
_RECURRENT = lazy(__name__ + ".triton_recurrent", "delta_rule_fused_recurrent")
_CHUNKED = lazy(__name__ + ".triton_chunk", "delta_rule_triton_chunked")


#: backend name -> loader returning the implementation (same signature as the reference)
BACKENDS = {
    "reference": lazy(__name__ + ".reference", "delta_rule_reference"),
    "torch": lazy(__name__ + ".torch_chunk", "delta_rule_chunked"),
    "triton": lambda: delta_rule_triton,
    "fla": lazy(__name__ + ".fla", "delta_rule_fla"),
}

delta_rule_triton = triton_backend(
    "delta_rule",
    RECURRENT_MAX_T,
    lazy("kernels.ops.common.tiles", "MAX_HEAD"),
    _RECURRENT,
    _CHUNKED,
    BACKENDS["torch"],
)
