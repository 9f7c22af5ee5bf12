"""``gla``: the reference recurrence and its fast paths (see kernels/README.md)."""

from kernels._dispatch import lazy

#: backend name -> loader returning the implementation (same signature as the reference)
BACKENDS = {
    "reference": lazy(__name__ + ".reference", "gla_reference"),
    "torch": lazy(__name__ + ".torch_chunk", "gla_chunked"),
    "triton": lazy(__name__ + ".triton_chunk", "gla_triton"),
    "fla": lazy(__name__ + ".fla", "gla_fla"),
}
