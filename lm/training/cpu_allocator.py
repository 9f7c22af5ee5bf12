"""Keep freed memory in the process on glibc (Linux) so that large CPU tensors are not page-faulted in anew.

glibc serves every allocation above 32 MiB with a fresh ``mmap`` and returns it to the system on
``free``; a training step on CPU allocates its large activations (logits, MLP hidden states,
chunked-scan temporaries) anew every step, so each step pays a page fault per 4 KiB page of them
(on the benchmark machine up to a third of an RWKV-7 step at T=8192, see ``docs/benchmarks.md``).
With ``M_MMAP_MAX = 0`` every allocation comes from the heap, and a large ``M_TRIM_THRESHOLD``
keeps freed heap memory for the next step. The process's resident memory then stays at its
peak, which is what a training process reaches anyway. The same effect as a caching allocator
(jemalloc/tcmalloc via ``LD_PRELOAD``), without one. ``LM_CPU_ALLOCATOR=default`` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_applied = False


def keep_freed_memory() -> bool:
    """Apply the glibc settings once per process; True when they are in effect."""
    global _applied
    if _applied:
        return True
    if os.environ.get("LM_CPU_ALLOCATOR", "").lower() == "default" or not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): leave the allocator alone
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # the threshold is an int: 2 GiB - 1 is the largest value mallopt accepts
    _applied = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    return _applied
