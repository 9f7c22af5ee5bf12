"""``delta_rule`` on flash-linear-attention's Triton kernels (``pip install rnn-lm[fla]``).

* gated (``g`` given) -> ``fla.ops.gated_delta_rule.chunk_gated_delta_rule(q, k, v, g, beta, ...)``;
* ungated -> ``fla.ops.delta_rule.chunk_delta_rule(q, k, v, beta, ...)`` for bf16/fp16 inputs. fla's
  ungated chunk kernel refuses fp32, so fp32 inputs take the gated kernel with ``g = 0`` (the same
  recurrence: ``exp(0) = 1``).

fla's recurrence is ours: ``S' = exp(g_t) S_{t-1}``, ``S_t = S' + beta_t k_t (v_t - S'^T k_t)^T``,
``o_t = scale S_t^T q_t``, natural-log ``g``, state ``[B, H, K, V]``. No in-kernel l2 norm or
sigmoid is requested (the models normalise k and squash beta themselves). Initial states are passed
in fp32; the final state comes back in fp32 and the output in the input dtype.
"""

from __future__ import annotations

import torch

from kernels.ops.utils.fla import call_fla


def delta_rule_fla(q, k, v, beta, g, scale, initial_state=None, output_final_state=False):
    """q, k: [B, T, H, K]; v: [B, T, H, V]; beta, g: [B, T, H] (g <= 0 or None)."""
    if g is None and q.dtype != torch.float32:
        from fla.ops.delta_rule import chunk_delta_rule

        return call_fla(chunk_delta_rule, (q, k, v, beta), v, scale, initial_state, output_final_state)
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    if g is None:
        g = q.new_zeros(q.shape[:3], dtype=torch.float32)
    return call_fla(chunk_gated_delta_rule, (q, k, v, g, beta), v, scale, initial_state, output_final_state)
