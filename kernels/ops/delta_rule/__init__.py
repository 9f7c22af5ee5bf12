"""``delta_rule``: the reference recurrence and its fast paths (see kernels/README.md)."""

from kernels.ops.delta_rule.reference import delta_rule_reference


def _reference():
    return delta_rule_reference


#: backend name -> loader returning the implementation (same signature as the reference)
BACKENDS = {"reference": _reference}
