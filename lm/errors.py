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
