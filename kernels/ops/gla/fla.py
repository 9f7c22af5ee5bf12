"""``gla`` on flash-linear-attention's Triton kernels (``pip install rnn-lm[fla]``).

Maps this package's contract onto fla >= 0.6 (``[B, T, H, *]`` inputs, no ``head_first``):

* per-key decays ``g [B, T, H, K]`` -> ``fla.ops.gla.chunk_gla(q, k, v, g, ...)``;
* per-head decays ``g [B, T, H]`` -> ``fla.ops.simple_gla.chunk_simple_gla(q, k, v, g, ...)``.

Both take natural-log decays (``exp(g)``, our convention), the same ``scale`` and the state as
``[B, H, K, V]`` (``state_v_first=False``). fla asserts an fp32 initial state, so it is cast (the
gradient flows back to the caller's dtype); the final state is returned in fp32 and the output in
the input dtype, as the contract asks.
"""

from __future__ import annotations

from kernels.ops.utils.fla import call_fla


def gla_fla(q, k, v, g, scale, initial_state=None, output_final_state=False):
    """q, k: [B, T, H, K]; v: [B, T, H, V]; g: [B, T, H, K] or [B, T, H] (log decays <= 0)."""
    if g.dim() == 3:
        from fla.ops.simple_gla import chunk_simple_gla

        return call_fla(chunk_simple_gla, (q, k, v), v, scale, initial_state, output_final_state, g=g)
    from fla.ops.gla import chunk_gla

    return call_fla(chunk_gla, (q, k, v, g), v, scale, initial_state, output_final_state)
