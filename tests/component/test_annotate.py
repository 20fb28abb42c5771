"""`annotate` end to end: hand-written generation shards, the real reward server over HTTP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from iterdpo.contracts import GeneratedRecord, ShardMarker, write_lines, write_model
from iterdpo.layout import RunLayout
from iterdpo.runfile import load_run
from iterdpo.stages import ScoreSummary, Stage
from iterdpo.lineage import digest
from iterdpo.summary import TERMINATION_LOG_ENV, read_summary
from iterdpo_reward_server import annotate_main
from iterdpo_reward_server.process import RewardServerProcess, free_port
from runfiles import write_tiny_run

pytestmark = pytest.mark.slow

K = 3


@pytest.fixture(scope="module")
def server(tiny):
    with RewardServerProcess(["--model", str(tiny.reward), "--max-length", "256", "--batch-tokens", "512"]) as proc:
        yield proc


def _run_file(tmp_path: Path, tiny, **reward) -> Path:
    return write_tiny_run(
        tmp_path / "run.yaml",
        tiny,
        name="score-test",
        storage_root=tmp_path / "runs",
        iterations=2,
        generation={"samplesPerPrompt": K, "shards": 2, "seed": 5},
        reward={"requestBatchSize": 2, "concurrency": 2, **reward},
        pairing={"strategy": "max_min"},
    )


def _row(pid: str, responses: list[str]) -> dict:
    return {
        "prompt_id": pid,
        "prompt": [{"role": "user", "content": f"tell me about the {pid}"}],
        "responses": responses,
        "finish_reasons": ["stop"] * len(responses),
    }


def _shard(layout: RunLayout, index: int, rows: list[dict], left_out: list[dict] = ()) -> None:
    """A shard as the generator writes it, through the same contracts."""
    write_lines(layout.shard_file(1, index, 2), [GeneratedRecord.model_validate(r) for r in rows])
    write_model(layout.shard_marker(1, index, 2), ShardMarker(
        iteration=1, shard=index, shards=2, policy="/p", prompts_in=len(rows) + len(left_out), prompts_out=len(rows),
        samples=sum(len(r["responses"]) for r in rows), left_out=list(left_out), seconds=1.0))  # fmt: skip


KIND = "kind gentle happy bright warm"
NEUTRAL = "the river and the stone"
UNKIND = "cruel harsh sad dark cold"


def _write_round(layout: RunLayout) -> None:
    _shard(
        layout,
        0,
        [_row("river", [NEUTRAL, KIND, UNKIND]), _row("stone", ["the tree"] * K)],
        left_out=[{"prompt_id": "lamp", "reason": "prompt longer than the model's context"}],
    )
    _shard(layout, 1, [_row("cloud", ["kind words"]), _row("road", [UNKIND + " harm", "calm " + NEUTRAL]), _row("book", [KIND, NEUTRAL, UNKIND])])


def test_annotate_end_to_end(server, tiny, tmp_path, monkeypatch, capsys):
    summary_path = tmp_path / "termination-log"
    monkeypatch.setenv(TERMINATION_LOG_ENV, str(summary_path))
    run_file = _run_file(tmp_path, tiny)
    layout = RunLayout.of(load_run(run_file))
    _write_round(layout)

    assert annotate_main(["--spec", str(run_file), "--iteration", "1", "--reward-url", server.url]) == 0

    scored = {r["prompt_id"]: r for r in map(json.loads, layout.scored_file(1).read_text().splitlines())}
    pairs = {p["prompt_id"]: p for p in map(json.loads, layout.pairs_file(1).read_text().splitlines())}
    stats = json.loads(layout.score_stats(1).read_text())

    assert list(scored) == ["river", "stone", "cloud", "road", "book"]
    assert all(len(r["rewards"]) == len(r["responses"]) for r in scored.values())
    # Best vs worst, by the served rewards; the hand-wired RM likes kind words.
    assert set(pairs) == {"river", "road", "book"}
    for pid, pair in pairs.items():
        rewards = scored[pid]["rewards"]
        assert pair["chosen_reward"] == max(rewards) and pair["rejected_reward"] == min(rewards)
        assert pair["margin"] == pytest.approx(max(rewards) - min(rewards))
        assert pair["margin"] > 0 and pair["prompt"] == scored[pid]["prompt"]
    assert (pairs["river"]["chosen"], pairs["river"]["rejected"]) == (KIND, UNKIND)
    assert pairs["road"]["chosen"].startswith("calm")

    assert stats["promptsIn"] == 6 == stats["pairs"] + stats["tiesDropped"] + stats["promptsLeftOut"]
    assert (stats["pairs"], stats["tiesDropped"], stats["promptsLeftOut"]) == (3, 1, 2)
    assert stats["promptsNotK"] == 2  # "cloud" (1 response, left out) and "road" (2, paired)
    assert {e["prompt_id"]: e["reason"] for e in stats["leftOut"]} == {
        "lamp": "prompt longer than the model's context",
        "cloud": "fewer than 2 responses (1) of K=3",
    }
    flat = [x for r in scored.values() for x in r["rewards"]]
    assert stats["responsesScored"] == len(flat) == 12
    assert stats["meanReward"] == pytest.approx(sum(flat) / len(flat))
    assert (stats["minReward"], stats["maxReward"]) == (min(flat), max(flat))
    assert stats["truncated"] == 0 and stats["strategy"] == "max_min" and stats["seconds"] > 0

    summary = read_summary(summary_path, ScoreSummary)
    shards = [str(layout.shard_file(1, i, 2)) for i in (0, 1)]
    lineage = {"read": {p: digest(p) for p in [*shards, str(tiny.reward)]},
               "wrote": {str(p): digest(p) for p in (layout.scored_file(1), layout.pairs_file(1))}}  # fmt: skip
    assert summary.model_dump(by_alias=True) == {"stage": "score", "lineage": lineage, **{k: stats[k] for k in (
        "meanReward", "minReward", "maxReward", "pairs", "tiesDropped", "promptsLeftOut", "seconds", "details",
        "comparisons", "forwardPasses")}}

    # A rerun is a no-op that re-emits the summary (the server is not even needed).
    before = {p: p.stat().st_mtime_ns for p in layout.stage_dir(1, Stage.SCORE).iterdir()}
    summary_path.unlink()
    dead_url = f"http://127.0.0.1:{free_port()}"
    assert annotate_main(["--spec", str(run_file), "--iteration", "1", "--reward-url", dead_url]) == 0
    assert {p: p.stat().st_mtime_ns for p in layout.stage_dir(1, Stage.SCORE).iterdir()} == before
    assert read_summary(summary_path, ScoreSummary) == summary


def test_scores_match_a_direct_request(server, tiny, tmp_path):
    """The annotator sends the prompt messages and each response as items, grouped and in order."""
    import httpx

    run_file = _run_file(tmp_path, tiny, requestBatchSize=1, concurrency=4)
    layout = RunLayout.of(load_run(run_file))
    _write_round(layout)
    assert annotate_main(["--spec", str(run_file), "--iteration", "1", "--reward-url", server.url]) == 0
    row = json.loads(layout.scored_file(1).read_text().splitlines()[0])
    items = [{"messages": row["prompt"], "response": r} for r in row["responses"]]
    direct = httpx.post(f"{server.url}/v1/score", json={"items": items}).json()["scores"]
    assert row["rewards"] == pytest.approx(direct, abs=1e-5)


def test_missing_marker_is_one_clear_line(tiny, tmp_path, capsys):
    run_file = _run_file(tmp_path, tiny)
    layout = RunLayout.of(load_run(run_file))
    _write_round(layout)
    layout.shard_marker(1, 1, 2).unlink()
    assert annotate_main(["--spec", str(run_file), "--iteration", "1", "--reward-url", "http://127.0.0.1:9"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert "generation shard 2 of 2 of round 1 has no success marker" in err
    assert "the Generate stage did not finish" in err
    assert not layout.score_stats(1).exists()


def test_unreachable_server_fails_after_the_startup_timeout(tiny, tmp_path, capsys):
    run_file = _run_file(tmp_path, tiny, startupTimeoutSeconds=0.5)
    layout = RunLayout.of(load_run(run_file))
    _write_round(layout)
    url = f"http://127.0.0.1:{free_port()}"
    assert annotate_main(["--spec", str(run_file), "--iteration", "1", "--reward-url", url]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("iterdpo annotate: error:") and "not ready within 0.5 s" in err and "ConnectError" in err
    assert not layout.score_stats(1).exists() and not layout.pairs_file(1).exists()


def test_bad_iteration_is_refused_as_bad_input(tiny, tmp_path, capsys):
    """Exit 2, the same as generate and train for the same mistake (iterdpo.errors), nothing written."""
    run_file = _run_file(tmp_path, tiny)
    assert annotate_main(["--spec", str(run_file), "--iteration", "3", "--reward-url", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "iterdpo annotate: error: --iteration: Score runs in rounds 1..2 (spec.iterations is 2); got 3"
    assert not RunLayout.of(load_run(run_file)).recipe_file.exists()
