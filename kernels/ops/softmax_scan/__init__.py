"""``softmax_scan``: the reference recurrence and its fast paths (see kernels/README.md)."""

from kernels.ops.softmax_scan.reference import softmax_scan_reference


def _reference():
    return softmax_scan_reference


#: backend name -> loader returning the implementation (same signature as the reference)
BACKENDS = {"reference": _reference}
