"""Imports every command module so that each registers its commands on the app."""

from lm.cli import config_cmd  # noqa: F401
from lm.cli import data_cmd  # noqa: F401
from lm.cli import train_cmd  # noqa: F401
from lm.cli import export_cmd  # noqa: F401
from lm.cli import import_cmd  # noqa: F401
from lm.cli import probe_cmd  # noqa: F401
from lm.cli import eval_cmd  # noqa: F401
from lm.cli import eval_longctx_cmd  # noqa: F401
from lm.cli import generate_cmd  # noqa: F401
from lm.cli import repro_cmd  # noqa: F401
from lm.cli import slurm_cmd  # noqa: F401
