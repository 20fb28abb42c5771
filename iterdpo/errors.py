"""One error vocabulary for every stage program: two error types, one `main` wrapper.

Exit codes, the same in every program:
- 2: what the user gave is wrong: a flag, the run file, an `--iteration` or shard out of
  range, the prompt or preference data the run file names (running it again unchanged
  cannot help);
- 1: the stage ran and could not finish: its inputs on disk, the model, the server it
  calls, the machine (a retry, or fixing an earlier stage, may help).

Either way the program prints one line, `<prog>: error: <message>` (argparse's own
format, so usage errors look the same), never a traceback. The local runner and the
operator lead a failed stage's report with that line.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class ProgramError(Exception):
    exit_code = 1


class StageError(ProgramError, RuntimeError):
    """The stage cannot finish; the message says why and, where it can, what to do (exit 1)."""

    exit_code = 1


class UsageError(ProgramError, ValueError):
    """The command line or the run file is wrong; the message names the flag or field (exit 2)."""

    exit_code = 2


def stage_main(prog: str, body: Callable[[], int | None]) -> int:
    """Run a stage program's body and turn its errors into one line and an exit code."""
    try:
        return body() or 0
    except ProgramError as exc:
        report(prog, str(exc))
        return exc.exit_code
    except OSError as exc:  # a file the stage needs: missing, unreadable, the disk full
        where = f"{exc.filename}: " if exc.filename else ""
        report(prog, f"{where}{exc.strerror or exc}")
        return 1


MAX_REPORT_CHARS = 4000  # whatever a message quotes, the report stays readable


def report(prog: str, message: str) -> None:
    if len(message) > MAX_REPORT_CHARS:
        message = f"{message[:MAX_REPORT_CHARS]}... ({len(message)} characters)"
    first, *rest = message.splitlines() or [""]
    print("\n".join([f"{prog}: error: {first}", *rest]), file=sys.stderr, flush=True)
