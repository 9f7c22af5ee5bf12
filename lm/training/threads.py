"""``train.threads``: the number of CPU threads each training process gives torch.

Default (``0``): ``$OMP_NUM_THREADS`` when set; otherwise the node's physical cores (those this
process may run on) when one rank runs per node, and 1 per rank when several ranks share a node
(DDP / DeepSpeed on CPU), so the ranks do not oversubscribe the cores. On a shared CPU the
default torch thread count can be many times slower than 1-2 threads (docs/own-corpus.md).
"""

from __future__ import annotations

import os
from typing import Tuple


def physical_cores() -> int:
    """Physical cores this process may use: psutil's physical count, capped by the CPU affinity mask."""
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        allowed = os.cpu_count() or 1
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or allowed
    except ImportError:
        physical = allowed
    return max(1, min(physical, allowed))


def resolve_threads(configured: int, ranks_per_node: int) -> Tuple[int, str]:
    """(threads per rank, where the number comes from) for ``train.threads = configured``."""
    if configured > 0:
        return configured, "train.threads"
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS"
    if ranks_per_node > 1:
        return 1, f"default: {ranks_per_node} ranks share this node"
    return physical_cores(), "default: physical cores"


def apply_threads(configured: int, ranks_per_node: int) -> Tuple[int, str]:
    """Set ``torch.set_num_threads`` in this process; returns what :func:`resolve_threads` chose."""
    import torch

    threads, why = resolve_threads(configured, ranks_per_node)
    torch.set_num_threads(threads)
    return threads, why
