"""The error type users see: a single line naming the culprit, its value and the expectation.

Every user-facing failure raises :class:`ReidTuneError` or a subclass; the CLI prints it as one
``error: WHERE: what, expected what`` line with exit status 2. Subclasses say what kind of input
was wrong, for callers that must tell them apart (the search retries none of them).
"""


class ReidTuneError(Exception):
    """A user-facing error; the CLI prints its message on one line and exits with status 2."""


class ConfigError(ReidTuneError, ValueError):
    """An option's value: a training option, a network or head name, a loss or sampler setting (a ValueError
    too, for library callers that catch that)."""


class InputError(ReidTuneError):
    """A file or folder given as input: missing, unreadable, or not in the expected format."""


class SpaceError(ReidTuneError):
    """A search-space YAML file: syntax, schema or a value, named by file and line."""


class TrackingError(ReidTuneError):
    """MLflow: the tracking server, an experiment, a run or a registered model."""
