"""``linear_scan``: the reference recurrence and its fast paths (see kernels/README.md)."""

from kernels.ops.linear_scan.reference import linear_scan_reference


def _reference():
    return linear_scan_reference


#: backend name -> loader returning the implementation (same signature as the reference)
BACKENDS = {"reference": _reference}
