"""``gla``: the reference recurrence and its fast paths (see kernels/README.md)."""

from kernels.ops.gla.reference import gla_reference


def _reference():
    return gla_reference


#: backend name -> loader returning the implementation (same signature as the reference)
BACKENDS = {"reference": _reference}
