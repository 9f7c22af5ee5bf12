"""SLURM jobs for experiments: ``lm submit`` renders a job script from a template in ``slurm/``
(:mod:`.render`, validated by :mod:`.spec` and :mod:`.timefmt`), submits it with ``sbatch`` and
records it (:mod:`.submit`); ``lm status`` reports the job, the last step and checkpoint
(:mod:`.status`). Pre-emption and time limits: see docs/slurm.md."""
