"""The evaluate program's refusals, before it loads a model: held-out prompts that are training
prompts, a judge without its URL, a finished round that is not redone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from iterdpo.contracts import EvaluationReport, write_model
from iterdpo.layout import RunLayout
from iterdpo.lineage import digest
from iterdpo.runfile import load_run
from iterdpo.stages import EvaluateSummary
from iterdpo_evaluator.evaluate import main as evaluate_main
from iterdpo_evaluator.evaluate import training_digests
from runfiles import write_tiny_run

URL = "http://127.0.0.1:9"  # nothing listens: a refusal must come before any request


def _run_file(tmp_path: Path, tiny, evaluation: dict) -> Path:
    return write_tiny_run(tmp_path / "run.yaml", tiny, name="ev", storage_root=tmp_path / "runs", iterations=2,
                          prompts={"dataset": None, "perIteration": [{"dataset": str(p)} for p in tiny.prompts[:2]]},
                          evaluation=evaluation)  # fmt: skip


def test_training_prompts_as_held_out_ones_are_refused_naming_the_row_and_the_round(tiny, tmp_path, capsys):
    mixed = tmp_path / "held-out.jsonl"
    trained = tiny.prompts[0].read_text().splitlines()
    rows = tiny.evaluation.read_text().splitlines()[:3] + trained[4:6]
    first = next(i for i, line in enumerate(trained) if json.loads(line) == json.loads(trained[4]))  # a repeat: its first row
    mixed.write_text("\n".join(rows) + "\n")
    run_file = _run_file(tmp_path, tiny, {"prompts": {"dataset": str(mixed)}})
    assert evaluate_main(["--spec", str(run_file), "--iteration", "0", "--reward-url", URL]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("iterdpo evaluate: error: spec.evaluation.prompts: 2 of its 5 prompts are also training")
    assert f"the first: row 3, the same as spec.prompts.perIteration[0] row {first})" in err and "allowOverlap" in err
    assert not RunLayout.of(load_run(run_file)).evaluation_report(0).exists()


def test_every_rounds_training_prompts_are_known_by_content(tiny, tmp_path):
    run = load_run(_run_file(tmp_path, tiny, {"prompts": {"dataset": str(tiny.evaluation)}}))
    seen = training_digests(run)
    rows = sum(1 for p in tiny.prompts[:2] for line in p.read_text().splitlines() if line.strip())
    assert 0 < len(seen) <= rows
    assert {where.split(" row ")[0] for where in seen.values()} == {"spec.prompts.perIteration[0]",
                                                                   "spec.prompts.perIteration[1]"}  # fmt: skip


def test_a_judge_needs_its_url(tiny, tmp_path, capsys):
    run_file = _run_file(tmp_path, tiny, {"prompts": {"dataset": str(tiny.evaluation)},
                                          "judge": {"model": str(tiny.reward), "maxLength": 256}})  # fmt: skip
    assert evaluate_main(["--spec", str(run_file), "--iteration", "1", "--reward-url", URL]) == 2
    assert "--judge-url: required, since spec.evaluation.judge is set" in capsys.readouterr().err


def test_a_round_with_its_report_is_not_evaluated_again(tiny, tmp_path, monkeypatch):
    run_file = _run_file(tmp_path, tiny, {"prompts": {"dataset": str(tiny.evaluation)}})
    report = RunLayout.of(load_run(run_file)).evaluation_report(0)
    summary = EvaluateSummary(policy=str(tiny.policy), prompts=3, prompts_left_out=0, left_out_reasons=[], overlap=0,
                              samples=3, mean_reward=0.5, judge_reward=None, win_rate=None,
                              win_rate_low=None, win_rate_high=None, length_ratio=None, judged_by="reward", length_mean=4.0, length_p90=5.0,
                              truncated_share=0.0, kl=0.0, seconds=1.0)  # fmt: skip
    report.parent.mkdir(parents=True)
    write_model(report, EvaluationReport(summary=summary.model_dump(mode="json", by_alias=True), left_out=[]))
    log = tmp_path / "summary.json"
    monkeypatch.setenv("ITERDPO_TERMINATION_LOG", str(log))
    assert evaluate_main(["--spec", str(run_file), "--iteration", "0", "--reward-url", URL]) == 0
    got = EvaluateSummary.model_validate(json.loads(log.read_text()))
    assert got.model_copy(update={"lineage": summary.lineage}) == summary  # the report's figures, not new ones
    assert got.lineage.read == {str(tiny.evaluation): digest(tiny.evaluation), str(tiny.policy): digest(tiny.policy),
                                str(tiny.reward): digest(tiny.reward)}  # fmt: skip
