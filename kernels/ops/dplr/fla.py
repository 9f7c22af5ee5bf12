"""``dplr`` on flash-linear-attention's Triton kernels (``pip install rnn-lm[fla]``).

``fla.ops.generalized_delta_rule.chunk_dplr_delta_rule(q, k, v, a, b, gk, ...)`` computes, per head
with state ``S [K, V]`` (its ``naive.dplr_recurrence``)::

    S_t = diag(exp(gk_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T,    o_t = scale S_t^T q_t

which is this package's ``S_t = (diag(exp(g_t)) + b_t a_t^T) S_{t-1} + k_t v_t^T`` with the same
``a``, ``b`` (no sign flip: RWKV-7 passes ``a = -kk``, ``b = kk * a`` to both) and ``gk = g``
(natural log). ``fla.ops.rwkv7.chunk_rwkv7`` is a thin wrapper over the same kernel that takes
``w`` in the same log space, so it adds nothing here. Initial states are passed in fp32; the
final state comes back in fp32 and the output in the input dtype.
"""

from __future__ import annotations

from kernels.ops.utils.fla import call_fla


def dplr_fla(q, k, v, a, b, g, scale, initial_state=None, output_final_state=False):
    """q, k, a, b, g: [B, T, H, K] (g <= 0); v: [B, T, H, V]."""
    from fla.ops.generalized_delta_rule import chunk_dplr_delta_rule

    return call_fla(chunk_dplr_delta_rule, (q, k, v, a, b, g), v, scale, initial_state, output_final_state)
