"""The one error type users see: a single line naming the culprit, its value and the expectation."""


class ReidTuneError(Exception):
    """A user-facing error; the CLI prints its message on one line and exits non-zero."""
