"""`iterdpo status --cluster` on a run no operator has looked at says what to check (issue 11)."""

from __future__ import annotations

import iterdpo_operator.kube as kube

from iterdpo.cli import main


class _OneRun:
    def __init__(self, body):
        self.body = body

    def read_run(self, namespace, name):
        return self.body


def _status(monkeypatch, capsys, body) -> tuple[int, str, str]:
    monkeypatch.setattr(kube, "load_config", lambda: None)
    monkeypatch.setattr(kube, "Kube", lambda config: _OneRun(body))
    code = main(["status", "r", "--cluster", "-n", "ml"])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_run_without_status_says_no_operator_picked_it_up(monkeypatch, capsys):
    code, out, err = _status(monkeypatch, capsys, {"metadata": {"name": "r"}, "spec": {"iterations": 2}})
    assert code == 0 and "Pending" in out
    assert "ml/r has no status yet: no iterdpo operator has picked it up" in err
    assert "watches namespace 'ml'" in err and "kubectl get pods -A -l app.kubernetes.io/name=iterdpo" in err


def test_a_run_with_status_prints_no_hint(monkeypatch, capsys):
    body = {"metadata": {"name": "r"}, "spec": {"iterations": 2}, "status": {"phase": "Running", "currentIteration": 1}}
    code, out, err = _status(monkeypatch, capsys, body)
    assert code == 0 and "Running" in out and err == ""
