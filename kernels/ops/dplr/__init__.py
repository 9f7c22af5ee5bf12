"""``dplr``: the reference recurrence and its fast paths (see kernels/README.md)."""

from kernels.ops.dplr.reference import dplr_reference


def _reference():
    return dplr_reference


#: backend name -> loader returning the implementation (same signature as the reference)
BACKENDS = {"reference": _reference}
