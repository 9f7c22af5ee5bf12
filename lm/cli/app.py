"""The typer application every command module registers on."""

import typer

app = typer.Typer(
    name="lm",
    help="Train, probe and evaluate recurrent language models that compute attention.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
