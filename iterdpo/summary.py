"""How a stage program hands its result back to whoever ran it.

Kubernetes-native: the summary is written as the container's termination
message (`/dev/termination-log`, read back from the pod status). The local
runner points ITERDPO_TERMINATION_LOG at a file of its own and reads it the
same way, so a stage never knows which backend runs it. Kubernetes keeps at most
4096 bytes of a termination message, so summaries hold figures, not lists.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

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


def emit_summary(stage: str, figures: dict) -> None:
    """Print the summary and write it where the backend reads it."""
    message = json.dumps({"stage": stage, **figures}, sort_keys=True, separators=(",", ":"))
    if len(message.encode()) > MAX_MESSAGE_BYTES:
        raise ValueError(f"{stage} summary is {len(message.encode())} bytes; at most {MAX_MESSAGE_BYTES} fit")
    print(f"[{stage}] summary {message}", file=sys.stderr, flush=True)
    path = termination_log_path()
    if path is not None:
        path.write_text(message)


def read_summary(path: Path) -> dict | None:
    """The summary a finished stage left at `path`, or None if it left none."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return json.loads(text) if text else None
