"""``recurrent_delta``: the reference recurrence and its fast paths (see kernels/README.md)."""

from kernels._dispatch import lazy

#: backend name -> loader returning the implementation (same signature as the reference)
BACKENDS = {
    "reference": lazy(__name__ + ".reference", "recurrent_delta_reference"),
    "torch": lazy(__name__ + ".torch_recurrent", "recurrent_delta_torch"),
    "triton": lazy(__name__ + ".triton_recurrent", "recurrent_delta_triton"),
}
