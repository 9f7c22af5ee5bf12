"""``srwm``: the reference recurrence and its fast paths (see kernels/README.md)."""

from kernels.ops.srwm.reference import srwm_reference


def _reference():
    return srwm_reference


#: backend name -> loader returning the implementation (same signature as the reference)
BACKENDS = {"reference": _reference}
