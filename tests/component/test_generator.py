"""The Generate stage on the tiny policy with real vLLM (CPU build)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from runfiles import write_tiny_run

from iterdpo.atomic import read_json, read_jsonl, write_jsonl
from iterdpo.layout import RunLayout
from iterdpo.lineage import digest
from iterdpo.runfile import load_run

pytestmark = pytest.mark.slow


def write_run(tmp_path: Path, tiny, prompts: Path, *, shards: int, name: str) -> Path:
    return write_tiny_run(
        tmp_path / f"{name}.yaml",
        tiny,
        name=name,
        storage_root=tmp_path / "runs",
        prompts={"dataset": str(prompts)},
        generation={"samplesPerPrompt": 3, "maxNewTokens": 12, "shards": shards},
        training={"maxLength": 96, "maxPromptLength": 40, "globalBatchSize": 4},
    )


def generate(run_file: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "iterdpo_generator", "--spec", str(run_file), "--iteration", "1", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
    )


@pytest.fixture(scope="module")
def prompts(tiny, tmp_path_factory) -> Path:
    rows = read_jsonl(tiny.prompts[0])[:7]
    rows[2] = {"id": "long", "messages": [{"role": "user", "content": "tell me about the river " * 40}]}
    rows[5] = {"id": "bad", "messages": [{"role": "robot", "content": "hi"}]}
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    write_jsonl(path, rows)
    return path


def test_two_shards_cover_every_prompt_once_and_count_the_left_out(tiny, prompts, tmp_path):
    run_file = write_run(tmp_path, tiny, prompts, shards=2, name="two-shards")
    summary_file = tmp_path / "summary.json"
    first = generate(run_file, "--shard", "0", env={"ITERDPO_TERMINATION_LOG": str(summary_file)})
    assert first.returncode == 0, first.stderr[-3000:]
    second = generate(run_file, env={"JOB_COMPLETION_INDEX": "1"})  # as in an Indexed Job
    assert second.returncode == 0, second.stderr[-3000:]

    layout = RunLayout.of(load_run(run_file))
    markers = [read_json(layout.shard_marker(1, i, 2)) for i in range(2)]
    records = [r for i in range(2) for r in read_jsonl(layout.shard_file(1, i, 2))]
    assert [m["prompts_in"] for m in markers] == [4, 3]  # 7 prompts: the remainder is not lost
    ids_out = sorted(int(r["prompt_id"]) for r in records)
    left_out = {item["prompt_id"]: item["reason"] for m in markers for item in m["left_out"]}
    assert sorted(ids_out + [int(i) for i in left_out]) == list(range(7))
    assert set(left_out) == {"2", "5"}
    assert "more than training.maxPromptLength (40)" in left_out["2"]
    assert "role 'robot'" in left_out["5"]
    for record in records:
        assert len(record["responses"]) == 3 and all(isinstance(t, str) for t in record["responses"])
        assert record["prompt"][0]["role"] == "user"
    summary = json.loads(summary_file.read_text())
    assert summary == {
        "stage": "generate", "shard": 0, "shards": 2, "prompts": 4, "promptsOut": 3,
        "samples": 9, "promptsLeftOut": 1, "seconds": markers[0]["seconds"],
        "lineage": {"read": {str(prompts): digest(prompts), str(tiny.policy): digest(tiny.policy)},
                    "wrote": {str(layout.shard_file(1, 0, 2)): digest(layout.shard_file(1, 0, 2))}},
    }

    # Rerunning a finished shard is a no-op.
    before = layout.shard_file(1, 0, 2).stat().st_mtime_ns
    again = generate(run_file, "--shard", "0")
    assert again.returncode == 0 and "already done" in again.stderr
    assert layout.shard_file(1, 0, 2).stat().st_mtime_ns == before

    # A prompt set changed under the same name is refused, naming it, even for a finished shard.
    original = prompts.read_bytes()
    prompts.write_bytes(original + b"\n")
    try:
        changed = generate(run_file, "--shard", "1")
    finally:
        prompts.write_bytes(original)
    assert changed.returncode == 2 and "an input changed since this run used it" in changed.stderr
    assert f"{prompts}: round 1 Generate (shard-" in changed.stderr

    # Seeds are per prompt: one shard over the same prompts samples the same texts.
    single = write_run(tmp_path, tiny, prompts, shards=1, name="one-shard")
    assert generate(single, "--shard", "0").returncode == 0
    one = {r["prompt_id"]: r["responses"] for r in read_jsonl(RunLayout.of(load_run(single)).shard_file(1, 0, 1))}
    assert one == {r["prompt_id"]: r["responses"] for r in records}


def test_bad_arguments_are_one_line_errors(tiny, prompts, tmp_path):
    """Usage mistakes exit 2 with one line (iterdpo.errors), before anything is written."""
    run_file = write_run(tmp_path, tiny, prompts, shards=2, name="bad-args")
    no_shard = generate(run_file)
    assert no_shard.returncode == 2
    assert no_shard.stderr.strip().splitlines()[-1] == (
        "iterdpo generate: error: --shard is required outside an Indexed Job (JOB_COMPLETION_INDEX is unset)")
    assert "Traceback" not in no_shard.stderr
    out_of_range = generate(run_file, "--shard", "2")
    assert out_of_range.returncode == 2
    assert "iterdpo generate: error: --shard: must be in 0..1 (spec.generation.shards is 2); got 2" in out_of_range.stderr
    bad_round = subprocess.run([sys.executable, "-m", "iterdpo_generator", "--spec", str(run_file), "--iteration", "5",
                                "--shard", "0"], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert bad_round.returncode == 2
    assert "iterdpo generate: error: --iteration: Generate runs in round 1 only (spec.iterations is 1); got 5" in (
        bad_round.stderr)
    assert not RunLayout.of(load_run(run_file)).recipe_file.exists()
