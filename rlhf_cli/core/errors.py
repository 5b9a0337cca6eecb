"""The toolkit's own exceptions.

Each message is one line a person can act on: what was wrong, where (file and line, flag, field), what was
expected, and how to fix it. The CLI prints it as `error: ...` and exits non-zero; `--debug` shows the traceback.
"""


class RLHFError(Exception):
    """Base class: a problem the user can fix (bad input, missing checkpoint, wrong flag)."""

    exit_code = 1


class ConfigError(RLHFError):
    """A bad flag, YAML key or value."""

    exit_code = 2


class DataError(RLHFError):
    """A data file that cannot be read or does not have the expected shape."""


class CheckpointError(RLHFError):
    """A model or stage folder that is missing, incomplete or of the wrong stage."""


class ModelNotFoundError(CheckpointError):
    """A model id or path that is not available locally, in the cache, on the hub or embedded."""


class TrainingError(RLHFError):
    """Training that cannot go on: a NaN or infinite loss, runaway KL."""
