"""Language models built from recurrent token mixers that compute attention, trained at scale.

Subpackages: ``lm.config`` (typed experiment configs), ``lm.models`` (model zoo), ``lm.training``
(Lightning module, trainer, checkpoints), ``lm.probes``, ``lm.evaluation``, ``lm.cli`` (the ``lm`` command).
"""

__version__ = "0.1.0"
