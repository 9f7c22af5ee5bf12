"""PyTorch helpers shared by the ops' fast paths, and the public home of the chunk helpers that models use.

* :mod:`~kernels.ops.utils.chunks`: padding, chunk views, causal masks, masked exponent differences, chunk
  layouts and segment passes of the chunked PyTorch paths (stable API, listed there).
* :mod:`~kernels.ops.utils.packed`: the packed-row driver and masks of the chunked paths with ``cu_seqlens``
  (``gla``, ``delta_rule``, ``dplr``).
* :mod:`~kernels.ops.utils.step_rows`: the time-major row layout of the fused PyTorch loops
  (``recurrent_delta``, ``srwm``).
* :mod:`~kernels.ops.utils.fla`: an fla op called under this package's contract (the ``fla`` backends).
* :mod:`~kernels.ops.utils.triton_path`: which Triton path a ``delta_rule`` / ``dplr`` call takes.

``from kernels.ops.utils import causal_mask, masked_exp_diff`` is the import for code outside ``kernels``.
"""

from kernels.ops.utils.chunks import (
    causal_mask,
    chunk_length,
    masked_exp_diff,
    merge_chunks,
    pad_to_multiple,
    split_chunks,
)

__all__ = ["causal_mask", "chunk_length", "masked_exp_diff", "merge_chunks", "pad_to_multiple", "split_chunks"]
