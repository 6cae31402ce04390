"""The one exception type for user mistakes: the CLI prints its message on one line and exits 2."""


class GenError(ValueError):
    """A user-facing error: bad input, a missing file, an unsupported model or option."""
