"""How a stage program hands its result back to whoever ran it.

Kubernetes-native: the summary is written as the container's termination message
(`/dev/termination-log`, read back from the pod status). The local runner points
ITERDPO_TERMINATION_LOG at a file of its own and reads it the same way, so a stage
never knows which backend runs it. What a summary holds is typed per stage
(`iterdpo.stages.StageSummary`); Kubernetes keeps at most 4096 bytes of it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TypeVar

from iterdpo.stages import StageSummary

S = TypeVar("S", bound=StageSummary)
TERMINATION_LOG_ENV = "ITERDPO_TERMINATION_LOG"
KUBERNETES_TERMINATION_LOG = Path("/dev/termination-log")
MAX_MESSAGE_BYTES = 4096


def termination_log_path() -> Path | None:
    explicit = os.environ.get(TERMINATION_LOG_ENV)
    if explicit:
        return Path(explicit)
    if KUBERNETES_TERMINATION_LOG.exists() and os.access(KUBERNETES_TERMINATION_LOG, os.W_OK):
        return KUBERNETES_TERMINATION_LOG
    return None


def emit_summary(summary: StageSummary) -> None:
    """Print the summary and write it where the backend reads it."""
    message = summary.to_message()
    if len(message.encode()) > MAX_MESSAGE_BYTES:
        raise ValueError(f"{summary.stage} summary is {len(message.encode())} bytes; at most {MAX_MESSAGE_BYTES} fit")
    print(f"[{summary.stage}] summary {message}", file=sys.stderr, flush=True)
    path = termination_log_path()
    if path is not None:
        path.write_text(message)


def read_summary(path: Path, model: type[S]) -> S | None:
    """The summary a finished process left at `path`, or None if it left none;
    a summary without the expected figures raises SummaryError naming the file."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return model.parse(text, source=str(path)) if text else None
