"""One sub-package per op: ``reference.py`` (the specification) beside its fast paths."""
