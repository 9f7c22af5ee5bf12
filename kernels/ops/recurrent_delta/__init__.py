"""``recurrent_delta``: the reference recurrence and its fast paths (see kernels/README.md)."""

from kernels.ops.recurrent_delta.reference import recurrent_delta_reference


def _reference():
    return recurrent_delta_reference


#: backend name -> loader returning the implementation (same signature as the reference)
BACKENDS = {"reference": _reference}
