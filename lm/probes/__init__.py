"""Attention-equivalence probes: form equivalence (whole sequence vs stepping), implicit
attention matrices and their statistics, and the share of each token mixer explained by a linear
self-attention layer. Run during training (:mod:`.callback`) or offline (``lm probe``)."""

from lm.probes.runner import ProbeResult, run_probes

__all__ = ["ProbeResult", "run_probes"]
