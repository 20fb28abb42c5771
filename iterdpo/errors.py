"""Errors a stage program reports as one clear line (exit code 1), never as a traceback."""


class StageError(RuntimeError):
    """The stage cannot proceed; the message says why and, where it can, what to do."""
