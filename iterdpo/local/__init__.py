"""The local backend: runs the planner's commands as processes on this machine."""
