"""The operator's log: one INFO line per decision and action; kopf's chatter at DEBUG only (issue 11)."""

from __future__ import annotations

import json
import logging

import pytest

from iterdpo.status import RunStatus
from iterdpo_operator.handlers import _log_decision
from iterdpo_operator.main import CHATTY_LOGGERS, configure_logging
from iterdpo_operator.reconcile import Decision, Event


def test_a_decision_logs_where_the_run_is_and_each_event(caplog):
    before = RunStatus()
    after = RunStatus(phase="Running", current_iteration=1, current_stage="Generate", current_attempt=2)
    decision = Decision(after, events=[Event("Warning", "StageRetrying", "round 1: Generate attempt 1 failed: OOM")])
    with caplog.at_level(logging.INFO, logger="iterdpo.operator"):
        _log_decision("ml", "r", before, decision)
        _log_decision("ml", "r", after, Decision(after))  # nothing changed: nothing logged
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", "run ml/r: Running, round 1 Generate attempt 2"),
        ("WARNING", "run ml/r: StageRetrying: round 1: Generate attempt 1 failed: OOM"),
    ]


@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
def test_kopfs_per_pass_lines_and_probe_hits_show_at_debug_only(level):
    configure_logging(level, "plain")
    for name in CHATTY_LOGGERS:
        assert logging.getLogger(name).isEnabledFor(logging.INFO) == (level == "DEBUG")
    assert logging.getLogger("iterdpo.operator").isEnabledFor(logging.INFO)


def test_json_format_is_one_object_per_line(capsys):
    configure_logging("INFO", "json")
    logging.getLogger("iterdpo.operator").info("run ml/r: Succeeded")
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert json.loads(line)["message"] == "run ml/r: Succeeded"
    configure_logging("INFO", "plain")
