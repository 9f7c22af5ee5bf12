"""Imports every command module so that each registers its commands on the app."""

from lm.cli import config_cmd  # noqa: F401
