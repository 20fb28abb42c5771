"""The one error type a user can act on: the CLI prints its message and exits 1, no traceback."""


class TrainError(Exception):
    """Bad input or a setup the train stage cannot run with; the message says what to fix."""
