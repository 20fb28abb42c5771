"""The local backend: runs the planner's commands as processes on this machine."""

from pathlib import Path

DEFAULT_WORKDIR = Path("iterdpo-runs")  # where `iterdpo run` puts runs, and where `status` and `judge` look
