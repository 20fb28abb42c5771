"""The local runner refuses, before starting anything, to mix recipes or to run a run twice."""

import fcntl
import io
import json

import pytest

from iterdpo.local.runner import AlreadyRunning, LocalRunner, RunPaths, SpecChanged
from iterdpo.runfile import parse_run

RUN = parse_run(
    {
        "apiVersion": "iterdpo.io/v1alpha1",
        "kind": "IterativeDPORun",
        "metadata": {"name": "guarded"},
        "spec": {"policy": {"model": "/m"}, "prompts": {"dataset": "/p"}, "reward": {"model": "/r"}},
    }
)


def test_a_changed_spec_is_refused(tmp_path):
    paths = RunPaths(tmp_path / "guarded")
    paths.home.mkdir()
    paths.status_file.write_text(json.dumps({"phase": "Running", "specHash": "0123456789abcdef"}))
    with pytest.raises(SpecChanged, match="changed since it started \\(spec hash 0123456789abcdef -> "):
        LocalRunner(RUN, tmp_path, out=io.StringIO()).execute()
    assert json.loads(paths.status_file.read_text())["specHash"] == "0123456789abcdef"  # untouched


def test_a_second_runner_of_the_same_run_is_refused(tmp_path):
    paths = RunPaths(tmp_path / "guarded")
    paths.home.mkdir()
    with open(paths.lock_file, "w") as held:
        held.write("pid 4242")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(AlreadyRunning, match="run 'guarded' is already being run by pid 4242"):
            LocalRunner(RUN, tmp_path, out=io.StringIO()).execute()
    assert not paths.status_file.exists()
