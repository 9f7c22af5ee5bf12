"""Triton pieces shared by the ops' kernels (``triton.jit`` helpers inlined into each op's kernels, and the
host code that sizes and launches them); importing a module here needs Triton.

* :mod:`~kernels.ops.common.tiles`: tile loads/stores of ``[B, T, H, D]`` inputs and row-major buffers, a
  chunk's first step and buffer row, the unit-lower-triangular inverse, chunk-local cumsums, chunk lengths,
  block sizes and dot precision (chunked ``delta_rule`` and ``dplr``).
* :mod:`~kernels.ops.common.state`: the [K, V] state held on chip (block, first state, loads, stores) of the
  fused-recurrent kernels and the chunked state-passing loops of ``delta_rule`` and ``dplr``.
* :mod:`~kernels.ops.common.recurrent`: the fused-recurrent scaffolding of ``delta_rule`` and ``dplr``
  (per-step loads, launcher, autograd function); each op writes only its update and its adjoint.
* :mod:`~kernels.ops.common.dot`: the bf16/fp32 ``dot`` and masked exponential of ``gla`` and ``softmax_scan``.
* :mod:`~kernels.ops.common.loop`: the fused time loops of ``recurrent_delta`` and ``srwm``.
"""
