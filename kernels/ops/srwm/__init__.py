"""``srwm``: the reference recurrence and its fast paths (see kernels/README.md)."""

from kernels._dispatch import lazy

#: backend name -> loader returning the implementation (same signature as the reference)
BACKENDS = {
    "reference": lazy(__name__ + ".reference", "srwm_reference"),
    "torch": lazy(__name__ + ".torch_recurrent", "srwm_torch"),
    "triton": lazy(__name__ + ".triton_recurrent", "srwm_triton"),
}
