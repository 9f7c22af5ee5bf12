"""User-facing errors: one line that names the file, key or value at fault.

The CLI prints ``error: <message>`` for any :class:`LMError` and exits with status 2; other
exceptions are bugs and keep their traceback.
"""


class LMError(Exception):
    """A problem with the user's input (config, path, data), reported in one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class ConfigError(LMError):
    """An invalid configuration: unknown key, wrong type, inconsistent values."""


class DataError(LMError):
    """A problem with a corpus, tokenizer or token shards."""


def did_you_mean(word: object, options, cutoff: float = 0.6) -> str:
    """`` (did you mean 'x'?)`` naming the closest of ``options`` to ``word``, or ``""``.

    The one "unknown X" hint of the project: config keys and values, group configs, model families,
    synthetic tasks and their parameters, ``lm eval icl --tasks``.
    """
    import difflib

    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=cutoff)
    return f" (did you mean '{close[0]}'?)" if close else ""
