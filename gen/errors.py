"""The one exception type for user mistakes: the CLI prints its message on one line and exits 2."""


class GenError(ValueError):
    """A user-facing error: bad input, a missing file, an unsupported model or option."""


class Stopped(Exception):
    """A run that stopped on request (SIGTERM, Ctrl-C) after saving what it had: the CLI prints the message
    (where the work is and how to go on) and exits with `code` (143 for SIGTERM, 130 for Ctrl-C, as a shell
    reports a process those signals ended). An empty message prints nothing (the other processes of a run)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code
