"""The ``lm`` command line (typer). Each ``*_cmd`` module adds one command group."""
