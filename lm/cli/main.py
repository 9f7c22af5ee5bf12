"""Entry point of the ``lm`` console command.

Every command module registers itself on :data:`lm.cli.app.app`; :func:`main` turns user errors
(:class:`~lm.errors.LMError`) into ``error: <one line>`` on stderr and exit status 2.
"""

from __future__ import annotations

import sys
from typing import List, Optional

import click

from lm.cli.app import app
from lm.errors import LMError


def _register() -> None:
    # imported for their side effect of adding commands to `app`
    from lm.cli import commands  # noqa: F401


def main(argv: Optional[List[str]] = None) -> None:
    """Run the CLI; exit 2 with a one-line message on bad input."""
    _register()
    try:
        result = app(args=argv, standalone_mode=False)
    except LMError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    if isinstance(result, int) and result:
        sys.exit(result)


if __name__ == "__main__":  # pragma: no cover
    main()
