"""SLURM ``--time`` values: parse and validate before anything is submitted.

Accepted forms (as ``sbatch`` documents them)::

    MM   MM:SS   HH:MM:SS   D-HH   D-HH:MM   D-HH:MM:SS

The leading field may be any size (``90`` minutes, ``36:00:00``); the fields after it are bounded
(seconds and minutes < 60, hours after a day count < 24). A limit of zero is rejected.
"""

from __future__ import annotations

import re

from lm.errors import ConfigError

FORMS = "MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"

_NO_DAYS = re.compile(r"^(\d+)(?::(\d+))?(?::(\d+))?$")
_DAYS = re.compile(r"^(\d+)-(\d+)(?::(\d+))?(?::(\d+))?$")


def _bounded(value: str, limit: int) -> int:
    n = int(value)
    if n >= limit:
        raise ValueError(value)
    return n


def time_seconds(value: str) -> int:
    """Seconds in a SLURM time string; ``ValueError`` when it has none of the accepted forms."""
    text = str(value).strip()
    m = _DAYS.match(text)
    if m:
        days, hours, minutes, seconds = m.groups()
        total = (int(days) * 24 + _bounded(hours, 24)) * 3600
        total += _bounded(minutes, 60) * 60 if minutes is not None else 0
        total += _bounded(seconds, 60) if seconds is not None else 0
        return total
    m = _NO_DAYS.match(text)
    if not m:
        raise ValueError(value)
    a, b, c = m.groups()
    if b is None:  # MM
        return int(a) * 60
    if c is None:  # MM:SS
        return int(a) * 60 + _bounded(b, 60)
    return int(a) * 3600 + _bounded(b, 60) * 60 + _bounded(c, 60)  # HH:MM:SS


def check_time(value: object, name: str = "--time/slurm.time") -> int:
    """Seconds in ``value``, or a one-line :class:`ConfigError` naming ``name`` and the value."""
    try:
        seconds = time_seconds(str(value))
    except ValueError:
        raise ConfigError(
            f"{name}: invalid SLURM time limit '{value}'; expected {FORMS} (e.g. 30, 1:30:00, 2-00:00:00)"
        ) from None
    if seconds <= 0:
        raise ConfigError(f"{name}: the time limit '{value}' is zero; give a positive limit")
    return seconds
