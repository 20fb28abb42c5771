"""`iterdpo run` end to end on the tiny models: real vLLM, reward server, DeepSpeed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from runfiles import write_tiny_run

from iterdpo.layout import RunLayout
from iterdpo.lineage import digest

pytestmark = pytest.mark.slow
ITERDPO = [sys.executable, "-m", "iterdpo.cli"]
REPO = Path(__file__).resolve().parents[2]


def write_run(tmp_path: Path, tiny, name: str, rounds: int = 2) -> Path:
    return write_tiny_run(
        tmp_path / f"{name}.yaml",
        tiny,
        name=name,
        iterations=rounds,
        prompts={"dataset": None, "perIteration": [{"dataset": str(p), "maxPrompts": 16} for p in tiny.prompts[:rounds]]},
        generation={"samplesPerPrompt": 4, "maxNewTokens": 16},
        reward={"maxLength": 256, "batchTokens": 4096},
        training={"learningRate": 1e-3, "epochs": 1, "scheduler": "constant", "warmupRatio": 0.0,
                  "maxLength": 96, "maxPromptLength": 40, "gradientCheckpointing": False},
    )


def status_of(workdir: Path, name: str) -> dict:
    path = workdir / name / "status.json"
    return json.loads(path.read_text()) if path.exists() else {}


def run_cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([*ITERDPO, *args], capture_output=True, text=True, timeout=timeout)


def assert_succeeded_with_both_rounds(status: dict) -> None:
    assert status["phase"] == "Succeeded"
    assert [it["iteration"] for it in status["iterations"]] == [1, 2]
    for it in status["iterations"]:
        assert it["generation"]["prompts"] == 16 and it["generation"]["samples"] == 64
        scoring = it["scoring"]
        assert scoring["pairs"] + scoring["tiesDropped"] + scoring["promptsLeftOut"] == 16
        assert scoring["minReward"] <= scoring["meanReward"] <= scoring["maxReward"]
        assert 0.0 <= it["training"]["rewardAccuracy"] <= 1.0
        assert Path(it["training"]["checkpoint"]).is_dir()
    first, second = status["iterations"]
    assert second["policy"] == first["training"]["checkpoint"]
    assert status["finalPolicy"] == second["training"]["checkpoint"]
    # Lineage: each round trained on the very pairs it scored, and round 2 generated from the very
    # checkpoint round 1 trained (by content, not only by name).
    for it in status["iterations"]:
        lineage, checkpoint = it["lineage"], it["training"]["checkpoint"]
        (pairs,) = (p for p in lineage["wrote"] if p.endswith("pairs.jsonl"))
        assert lineage["read"][pairs] == lineage["wrote"][pairs]
        assert lineage["wrote"][checkpoint] == digest(checkpoint)
    assert second["lineage"]["read"][first["training"]["checkpoint"]] == digest(first["training"]["checkpoint"])
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Succeeded"]["status"] == "True" and conditions["Failed"]["status"] == "False"


def test_two_rounds_reach_succeeded(tiny, tmp_path):
    run_file = write_run(tmp_path, tiny, "two-rounds")
    workdir = tmp_path / "runs"
    result = run_cli("run", str(run_file), "--workdir", str(workdir))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    status = status_of(workdir, "two-rounds")
    assert_succeeded_with_both_rounds(status)
    assert "[round 2/2] Train: loss" in result.stdout
    assert "Succeeded: round 1 mean reward" in result.stdout

    table = run_cli("status", "two-rounds", "--workdir", str(workdir))
    assert table.returncode == 0
    assert table.stdout.splitlines()[0] == "run two-rounds: Succeeded (round 2)"
    assert len(table.stdout.splitlines()) >= 4  # header, columns, two rounds

    # Running a finished run again does nothing and still succeeds.
    again = run_cli("run", str(run_file), "--workdir", str(workdir))
    assert again.returncode == 0 and "already succeeded" in again.stdout

    # Raising spec.iterations (a prompt set for the added round) runs round 3 only, from round 2's policy.
    finished = [RunLayout(workdir.resolve() / "two-rounds").score_stats(i) for i in (1, 2)]
    mtimes = [path.stat().st_mtime_ns for path in finished]
    grown = run_cli("run", str(write_run(tmp_path, tiny, "two-rounds", rounds=3)), "--workdir", str(workdir))
    assert grown.returncode == 0, grown.stdout[-3000:] + grown.stderr[-3000:]
    assert "spec.iterations raised from 2 to 3: round 3 to run" in grown.stdout
    assert "[round 2/3]" not in grown.stdout and "[round 3/3] Train: loss" in grown.stdout
    assert [path.stat().st_mtime_ns for path in finished] == mtimes
    status = status_of(workdir, "two-rounds")
    assert status["phase"] == "Succeeded" and [it["iteration"] for it in status["iterations"]] == [1, 2, 3]
    assert status["iterations"][2]["policy"] == status["iterations"][1]["training"]["checkpoint"]
    assert status["finalPolicy"] == status["iterations"][2]["training"]["checkpoint"]


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(int(pid))
    return found


def test_killed_run_resumes_without_redoing_finished_stages(tiny, tmp_path):
    run_file = write_run(tmp_path, tiny, "killed")
    workdir = tmp_path / "runs"
    runner = subprocess.Popen(
        [*ITERDPO, "run", str(run_file), "--workdir", str(workdir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_for(
            lambda: status_of(workdir, "killed").get("currentStage") == "Train",
            timeout=600,
            what="round 1 training to start",
        )
        time.sleep(3)  # let torchrun get going
    finally:
        runner.send_signal(signal.SIGKILL)
        runner.wait()

    # Nothing the runner started outlives it (PR_SET_PDEATHSIG + process groups).
    spec_json = str(workdir / "killed" / "run.json")
    _wait_for(lambda: not _processes_mentioning(spec_json), timeout=60, what="stage processes to exit")

    status = status_of(workdir, "killed")
    assert status["phase"] == "Running" and status["currentStage"] == "Train"
    layout = RunLayout(workdir.resolve() / "killed")
    finished = [layout.shard_file(1, 0, 1), layout.shard_marker(1, 0, 1), layout.pairs_file(1), layout.score_stats(1)]
    mtimes = {path: path.stat().st_mtime_ns for path in finished}

    # Round 1's pairs changed while the run was down: the resumed Train refuses them, naming the file.
    pairs, original = layout.pairs_file(1), layout.pairs_file(1).read_bytes()
    pairs.write_bytes(original.replace(b'"chosen"', b'"chosen" ', 1))
    refused = run_cli("run", str(run_file), "--workdir", str(workdir))
    assert refused.returncode != 0
    assert "an input changed since this run used it" in refused.stdout + refused.stderr
    assert f"{pairs}: round 1 Score (main) recorded sha256:" in refused.stdout + refused.stderr
    pairs.write_bytes(original)  # put back, with its old time: the resume goes on
    os.utime(pairs, ns=(mtimes[pairs], mtimes[pairs]))

    result = run_cli("run", str(run_file), "--workdir", str(workdir))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[round 1/2] Generate" not in result.stdout and "[round 1/2] Score" not in result.stdout
    assert "[round 1/2] Train: loss" in result.stdout
    assert {path: path.stat().st_mtime_ns for path in finished} == mtimes
    assert_succeeded_with_both_rounds(status_of(workdir, "killed"))


def test_stopped_runner_stops_its_stage_and_records_the_interruption(tiny, tmp_path):
    """SIGTERM (like Ctrl-C) stops the stage's processes and leaves a status that says so."""
    run_file = write_run(tmp_path, tiny, "stopped")
    workdir = tmp_path / "runs"
    runner = subprocess.Popen([*ITERDPO, "run", str(run_file), "--workdir", str(workdir)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    spec_json = str(workdir / "stopped" / "run.json")
    _wait_for(lambda: _processes_mentioning(f"{spec_json} --iteration 1 --shard 0"), timeout=120,
              what="the generate process to start")
    runner.send_signal(signal.SIGTERM)
    output, _ = runner.communicate(timeout=120)
    assert runner.returncode == 130, output
    assert "interrupted: start the same command again to resume" in output
    assert not _processes_mentioning(spec_json)
    status = status_of(workdir, "stopped")
    assert (status["phase"], status["currentIteration"], status["currentStage"]) == ("Running", 1, "Generate")
    progressing = next(c for c in status["conditions"] if c["type"] == "Progressing")
    assert (progressing["status"], progressing["reason"]) == ("False", "Interrupted")


def test_a_failing_stage_fails_the_run_with_its_reason(tiny, tmp_path):
    run_file = write_run(tmp_path, tiny, "broken")
    broken = yaml.safe_load(run_file.read_text())
    # A prompt file that passes the up-front checks (it exists, it is not empty) but holds no
    # usable row: the run starts, and generation fails, saying why. (A missing file is refused
    # before anything runs: tests/unit/test_hostile_run_files.py.)
    prompts = tmp_path / "no-such-prompts.jsonl"
    prompts.write_text("not json\n")
    broken["spec"]["prompts"] = {"dataset": str(prompts)}
    run_file.write_text(yaml.safe_dump(broken))
    workdir = tmp_path / "runs"
    result = run_cli("run", str(run_file), "--workdir", str(workdir))
    assert result.returncode == 1
    assert "[round 1/2] Generate failed: generate-shard-0 exited with code 2" in result.stderr
    assert "no-such-prompts.jsonl has no usable prompt" in result.stderr  # the log tail says why
    status = status_of(workdir, "broken")
    assert status["phase"] == "Failed"
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and failed["message"].startswith("round 1: Generate failed:")


def test_an_invalid_run_file_runs_nothing(tmp_path):
    run_file = tmp_path / "bad.yaml"
    run_file.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "iterdpo.io/v1alpha1",
                "kind": "IterativeDPORun",
                "metadata": {"name": "bad"},
                "spec": {
                    "policy": {"model": "x"}, "prompts": {"dataset": "y"}, "reward": {"model": "z"},
                    "generation": {"samplesPerPrompt": 1},
                },
            }
        )
    )
    result = run_cli("run", str(run_file), "--workdir", str(tmp_path / "runs"))
    assert result.returncode == 2
    assert "spec.generation.samplesPerPrompt: must be >= 2 (got 1)" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def write_rm_run(tmp_path: Path, tiny, name: str, epochs: int = 1) -> tuple[Path, int]:
    """A run whose RewardModel stage trains the reward model first, on 240 of the tiny
    preference pairs plus 2 rows that cannot be pairs; returns (run file, rows)."""
    rows = [line for line in tiny.preferences.read_text().splitlines() if line.strip()][:240]
    rows.insert(10, json.dumps({"id": "no-rejected", "chosen": json.loads(rows[0])["chosen"]}))
    rows.insert(20, "{not json")
    data = tmp_path / f"{name}-preferences.jsonl"
    data.write_text("\n".join(rows) + "\n")
    run_file = write_run(tmp_path, tiny, name)
    manifest = yaml.safe_load(run_file.read_text())
    manifest["spec"]["reward"].pop("model")
    manifest["spec"]["reward"]["training"] = {
        "base": str(tiny.policy), "data": {"dataset": str(data)}, "heldOutShare": 0.1,
        "learningRate": 1e-3, "epochs": epochs, "scheduler": "constant", "warmupRatio": 0.0, "weightDecay": 0.0,
        "globalBatchSize": 16, "microBatchSize": 4, "nprocPerNode": 2, "zeroStage": 2, "precision": "fp32",
        "gradientCheckpointing": False,
    }  # fmt: skip
    run_file.write_text(yaml.safe_dump(manifest))
    return run_file, len(rows)


def test_reward_model_stage_trains_first_survives_kill_9_and_every_round_scores_with_it(tiny, tmp_path):
    """The whole workflow: RewardModel (killed -9 mid-training, then resumed), then 2 rounds
    scored by the model it trained; every preference row is counted."""
    # 20 epochs (280 steps): one epoch's 14 steps took 1 s on a fast machine, so a kill after
    # step 1 could land after the stage had finished.
    run_file, rows = write_rm_run(tmp_path, tiny, "rm-first", epochs=20)
    workdir = tmp_path / "runs"
    log = workdir / "rm-first" / "logs" / "iter-00-reward-model.log"
    runner = subprocess.Popen([*ITERDPO, "run", str(run_file), "--workdir", str(workdir)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        _wait_for(lambda: log.exists() and "INFO step 1/" in log.read_text(), timeout=600,
                  what="reward-model training to take its first step")  # fmt: skip
    finally:
        runner.send_signal(signal.SIGKILL)
        runner.wait()
    spec_json = str(workdir / "rm-first" / "run.json")
    _wait_for(lambda: not _processes_mentioning(spec_json), timeout=60, what="stage processes to exit")
    layout = RunLayout(workdir.resolve() / "rm-first")
    status = status_of(workdir, "rm-first")
    assert status["phase"] == "Running" and status["currentStage"] == "RewardModel"
    assert status["currentIteration"] == 0
    assert not layout.reward_model_metrics().exists()  # cut short: nothing is taken for finished

    result = run_cli("run", str(run_file), "--workdir", str(workdir))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("RewardModel: reward model:") == 1
    status = status_of(workdir, "rm-first")
    assert status["phase"] == "Succeeded"
    assert [it["iteration"] for it in status["iterations"]] == [0, 1, 2]
    rm = status["iterations"][0]["rewardModel"]
    assert rm["checkpoint"] == str(layout.reward_model())
    assert rm["pairsLeftOut"] == 2 and rm["pairs"] + rm["heldOutPairs"] + rm["pairsLeftOut"] == rows
    assert rm["heldOutPairs"] == 24 and 0.0 <= rm["heldOutAccuracy"] <= 1.0
    assert any("no-rejected" in r or "rejected" in r for r in rm["leftOutReasons"]), rm["leftOutReasons"]
    left_out = [json.loads(line) for line in layout.reward_model_left_out().read_text().splitlines()]
    assert sorted(r["row"] for r in left_out) == [10, 20] and all(r["split"] == "train" for r in left_out)
    assert (layout.reward_model() / "model.safetensors").is_file()
    config = json.loads((layout.reward_model() / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and len(config["id2label"]) == 1
    for t in (1, 2):  # every round's reward server loaded the trained model
        server_log = (workdir / "rm-first" / "logs" / f"iter-{t:02d}-reward-server.log").read_text()
        assert f"loaded {layout.reward_model()}" in server_log
    rounds = status["iterations"][1:]
    assert all(it["scoring"]["pairs"] + it["scoring"]["tiesDropped"] + it["scoring"]["promptsLeftOut"] == 16
               for it in rounds)  # fmt: skip
    succeeded = next(c for c in status["conditions"] if c["type"] == "Succeeded")
    assert succeeded["status"] == "True" and succeeded["message"] == "2 rounds finished"  # round 0 is not a round

    # A finished reward model is never retrained; the table shows its round.
    mtime = layout.reward_model_metrics().stat().st_mtime_ns
    again = run_cli("run", str(run_file), "--workdir", str(workdir))
    assert again.returncode == 0 and "already succeeded" in again.stdout
    assert layout.reward_model_metrics().stat().st_mtime_ns == mtime
    table = run_cli("status", "rm-first", "--workdir", str(workdir)).stdout
    assert "rm s" in table.splitlines()[1] and table.splitlines()[2].split()[0] == "0"


def test_sft_stage_fine_tunes_the_base_first_and_round_1_starts_from_it(tiny, tmp_path):
    """policy.sft: the SFT stage (round 0) fine-tunes the base on the tiny chat set; round 1
    generates with its checkpoint and uses it as the initial DPO reference."""
    run_file = write_run(tmp_path, tiny, "sft-first", rounds=1)
    manifest = yaml.safe_load(run_file.read_text())
    rows = tiny.sft.read_text().splitlines()[:64] + ['{"messages": [{"role": "user", "content": "hi"}]}']
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(rows) + "\n")
    manifest["spec"]["policy"]["sft"] = {
        "data": {"dataset": str(data)}, "maxLength": 64, "learningRate": 1e-3, "epochs": 1, "scheduler": "constant",
        "warmupRatio": 0.0, "globalBatchSize": 16, "microBatchSize": 8, "nprocPerNode": 2, "zeroStage": 2,
        "precision": "fp32", "gradientCheckpointing": False,
    }  # fmt: skip
    run_file.write_text(yaml.safe_dump(manifest))
    workdir = tmp_path / "runs"
    result = run_cli("run", str(run_file), "--workdir", str(workdir))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    layout = RunLayout(workdir.resolve() / "sft-first")
    status = status_of(workdir, "sft-first")
    assert status["phase"] == "Succeeded" and [it["iteration"] for it in status["iterations"]] == [0, 1]
    sft = status["iterations"][0]["sft"]
    assert (sft["conversations"], sft["conversationsLeftOut"]) == (64, 1) and sft["tokensTrained"] > 0
    assert 0 < sft["rows"] < 64  # packed: several conversations in each row of 64 tokens
    assert "conversations in %d rows of at most 64 tokens (packing on)" % sft["rows"] in \
        (workdir / "sft-first" / "logs" / "iter-00-sft.log").read_text()  # fmt: skip
    assert "no assistant turn" in sft["leftOutReasons"][0] and sft["checkpoint"] == str(layout.sft_checkpoint())
    assert status["iterations"][1]["policy"] == str(layout.sft_checkpoint())  # round 1 generates with it
    train_log = (workdir / "sft-first" / "logs" / "iter-01-train.log").read_text()
    assert str(layout.sft_checkpoint()) in train_log or (layout.sft_checkpoint() / "config.json").is_file()
    metrics = json.loads(layout.train_metrics(1).read_text())
    assert metrics["reference"] == metrics["policy"] == str(layout.sft_checkpoint())  # the initial reference


def test_verifiable_reward_two_rounds_answers_more_and_accounts_for_every_prompt(tiny, tmp_path):
    """Reward kind verifiable end to end: no reward model, math-verify in the reward server,
    gold answers carried from the prompt set through Generate to Score. A row without an answer
    is left out at Generate, one whose answer math-verify cannot read at Score, each with its
    reason; round 2's mean reward is above round 1's (DPO learns to answer with a number)."""
    prompts = tmp_path / "sums.jsonl"
    rows = tiny.arithmetic.read_text().splitlines()
    rows += [json.dumps({"messages": [{"role": "user", "content": "what is 1 + 1"}]}),  # no answer field
             json.dumps({"messages": [{"role": "user", "content": "what is 2 + 2"}], "answer": "???"})]  # fmt: skip
    prompts.write_text("\n".join(rows) + "\n")
    run_file = write_tiny_run(
        tmp_path / "rule.yaml", tiny, name="rule", iterations=2,
        prompts={"dataset": str(prompts), "answerField": "answer"},
        generation={"samplesPerPrompt": 8, "maxNewTokens": 16},
        reward={"model": None, "kind": "verifiable", "verifiable": {"answerFormat": "any"}},
        training={"learningRate": 5e-3, "epochs": 2, "scheduler": "constant", "warmupRatio": 0.0,
                  "globalBatchSize": 16, "microBatchSize": 4, "maxLength": 128, "maxPromptLength": 48,
                  "gradientCheckpointing": False},
    )  # fmt: skip
    workdir = tmp_path / "runs"
    result = run_cli("run", str(run_file), "--workdir", str(workdir), timeout=1200)
    assert result.returncode == 0, result.stdout + result.stderr
    status = status_of(workdir, "rule")
    assert status["phase"] == "Succeeded"
    first, second = (it["scoring"] for it in status["iterations"])
    assert second["meanReward"] > first["meanReward"], (first, second)
    assert second["details"]["answered"] > first["details"]["answered"]
    for it in status["iterations"]:
        s = it["scoring"]
        assert s["pairs"] + s["tiesDropped"] + s["promptsLeftOut"] == len(rows)
        assert s["tiesDropped"] > 0  # three reward values: all K alike is common
        assert -1.0 <= s["minReward"] <= s["meanReward"] <= s["maxReward"] <= 1.0
    stats = json.loads((workdir / "rule" / "iter-01" / "score" / "stats.json").read_text())
    reasons = {item["prompt_id"]: item["reason"] for item in stats["leftOut"]}
    assert reasons.keys() == {str(len(rows) - 2), str(len(rows) - 1)}
    assert "no 'answer' field" in reasons[str(len(rows) - 2)]
    assert reasons[str(len(rows) - 1)] == "not scored: math-verify cannot parse the gold answer (answerField)"
    scored = [json.loads(line) for line in (workdir / "rule" / "iter-01" / "score" / "scored.jsonl").read_text().splitlines()]
    assert len(scored) == len(rows) - 2 and all(r["answer"] is not None for r in scored)


def test_composite_of_a_multi_objective_model_and_a_length_penalty(tiny, tmp_path):
    """Reward kinds composite and multi-objective end to end, in one run (one server): ArmoRM's
    layout (the tiny armo/) as one term and a length penalty as the other. The round's mean
    reward is the weighted sum of its terms' means, and status names every term and objective."""
    run_file = write_tiny_run(
        tmp_path / "mix.yaml", tiny, name="mix",
        prompts={"dataset": str(tiny.prompts[0]), "maxPrompts": 16},
        generation={"samplesPerPrompt": 4, "maxNewTokens": 16},
        reward={"model": None, "kind": "composite", "components": [
            {"name": "armo", "kind": "multi-objective", "model": str(tiny.armo)},
            {"name": "length", "kind": "length", "weight": -0.02}]},
        training={"learningRate": 1e-3, "epochs": 1, "scheduler": "constant", "warmupRatio": 0.0,
                  "maxLength": 96, "maxPromptLength": 40, "gradientCheckpointing": False},
    )  # fmt: skip
    workdir = tmp_path / "runs"
    result = run_cli("run", str(run_file), "--workdir", str(workdir))
    assert result.returncode == 0, result.stdout + result.stderr
    (it,) = status_of(workdir, "mix")["iterations"]
    s, d = it["scoring"], it["scoring"]["details"]
    assert set(d) == {"armo", "armo.kindness", "armo.harshness", "armo.brevity", "length"} and d["length"] > 0
    assert s["meanReward"] == pytest.approx(d["armo"] - 0.02 * d["length"], abs=1e-3)
    assert d["armo.kindness"] == pytest.approx(-d["armo.harshness"], abs=1e-3)
    assert s["pairs"] + s["tiesDropped"] + s["promptsLeftOut"] == 16 and s["pairs"] > 0
    scored = [json.loads(line) for line in (workdir / "mix" / "iter-01" / "score" / "scored.jsonl").read_text().splitlines()]
    assert sum(len(r["responses"]) for r in scored) == 64
    assert Path(it["training"]["checkpoint"]).is_dir()
    # A gold judge reads the same samples with another reward model (iterdpo judge).
    judged = run_cli("judge", str(run_file), "--model", str(tiny.reward), "--workdir", str(workdir))
    assert judged.returncode == 0, judged.stdout + judged.stderr
    row = next(line.split() for line in judged.stdout.splitlines() if line.split()[:2] == ["1", "64"])
    assert float(row[2]) == pytest.approx(s["meanReward"], abs=1e-3) and -10 < float(row[3]) < 10


def gold_rewards(tiny, prompt: list[dict], responses: list[str]) -> list[float]:
    """The tiny gold reward model's scores (the hand-wired one that labelled the preferences)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny.reward)
    model = AutoModelForSequenceClassification.from_pretrained(tiny.reward).eval()
    texts = [tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": r}], tokenize=False)
             for r in responses]  # fmt: skip
    batch = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits[:, 0].tolist()


def test_pairwise_reward_trains_its_judge_then_pairs_by_tournament_for_two_rounds(tiny, tmp_path):
    """Reward kind pairwise end to end (issue 13 items 1 and 2): the RewardModel stage teaches the
    tiny policy to answer A or B on the tiny preference pairs; every round's prompts are paired
    from a bracket of comparisons sent to /v1/compare in lockstep, counted in stats and status;
    the judge agrees with the gold reward model that labelled its training pairs."""
    from iterdpo.tournament import expected_comparisons

    run_file = write_tiny_run(
        tmp_path / "pw.yaml", tiny, name="pw", iterations=2,
        prompts={"dataset": None, "perIteration": [{"dataset": str(p), "maxPrompts": 16} for p in tiny.prompts[:2]]},
        generation={"samplesPerPrompt": 4, "maxNewTokens": 16},
        reward={"kind": "pairwise", "training": {
            "base": str(tiny.policy), "data": {"dataset": str(tiny.preferences)}, "heldOutShare": 0.05,
            "learningRate": 1e-3, "epochs": 6, "scheduler": "constant", "warmupRatio": 0.0, "weightDecay": 0.0,
            "globalBatchSize": 16, "microBatchSize": 8, "nprocPerNode": 2, "zeroStage": 2, "precision": "fp32",
            "gradientCheckpointing": False}},
        pairing={"selection": "bracket"},
        training={"learningRate": 1e-3, "epochs": 1, "scheduler": "constant", "warmupRatio": 0.0,
                  "maxLength": 96, "maxPromptLength": 40, "gradientCheckpointing": False},
    )  # fmt: skip
    manifest = yaml.safe_load(run_file.read_text())
    manifest["spec"]["reward"].pop("model")
    run_file.write_text(yaml.safe_dump(manifest))
    workdir = tmp_path / "runs"
    result = run_cli("run", str(run_file), "--workdir", str(workdir), timeout=1500)
    assert result.returncode == 0, result.stdout + result.stderr
    layout = RunLayout(workdir.resolve() / "pw")
    metrics = json.loads(layout.reward_model_metrics().read_text())
    assert metrics["objective"] == "pairwise" and metrics["pairs"] + metrics["heldOutPairs"] == 1024
    assert json.loads((layout.reward_model() / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    for t in (1, 2):  # every round's reward server read the trained judge as a pairwise model
        server_log = (workdir / "pw" / "logs" / f"iter-{t:02d}-reward-server.log").read_text()
        assert f"loaded {layout.reward_model()} (pairwise" in server_log
    status = status_of(workdir, "pw")
    assert status["phase"] == "Succeeded" and [it["iteration"] for it in status["iterations"]] == [0, 1, 2]
    assert status["iterations"][0]["rewardModel"]["heldOutAccuracy"] == pytest.approx(metrics["heldOutAccuracy"], abs=1e-4)
    for it in status["iterations"][1:]:
        s = it["scoring"]
        assert s["comparisons"] == 16 * expected_comparisons("bracket", 4)
        assert 0 < s["forwardPasses"] <= 2 * s["comparisons"]  # identical responses tie without the model
        assert s["pairs"] + s["tiesDropped"] + s["promptsLeftOut"] == 16 and s["pairs"] > 0
        assert 0.0 <= s["minReward"] <= s["maxReward"] <= 1.0  # a response's share of comparisons won
    stats = json.loads((workdir / "pw" / "iter-01" / "score" / "stats.json").read_text())
    assert stats["strategy"] == "bracket" and stats["comparisons"] == 64
    pairs = [json.loads(line) for line in (workdir / "pw" / "iter-01" / "score" / "pairs.jsonl").read_text().splitlines()]
    assert all(p["chosen"] != p["rejected"] and p["chosen_reward"] > p["rejected_reward"] for p in pairs)
    # The trained judge's best beats its worst by the gold model's measure too, on average over both rounds.
    second = [json.loads(line) for line in (workdir / "pw" / "iter-02" / "score" / "pairs.jsonl").read_text().splitlines()]
    gaps = [c - r for p in pairs + second for c, r in [gold_rewards(tiny, p["prompt"], [p["chosen"], p["rejected"]])]]
    assert sum(gaps) / len(gaps) > 0, gaps


def test_evaluation_scores_every_round_against_round_0_and_a_gate_stops_the_loop(tiny, tmp_path):
    """spec.evaluation end to end: round 0 evaluates the initial policy on held-out prompts,
    round 1 its trained policy (greedy vLLM, the run's reward server and a judge server, KL
    by transformers log-probs), and gates.maxKl stops the run after round 1: round 2 never
    runs, the run succeeds with reason GateTripped and keeps the last policy inside the gate."""
    run_file = write_run(tmp_path, tiny, "gated")
    manifest = yaml.safe_load(run_file.read_text())
    manifest["spec"]["evaluation"] = {
        "prompts": {"dataset": str(tiny.evaluation), "maxPrompts": 12},
        "maxNewTokens": 16,
        "judge": {"model": str(tiny.reward), "maxLength": 256, "batchTokens": 4096},
        "gates": {"maxKl": 1.0e-3},  # any trained policy is further from the initial one than this
    }
    run_file.write_text(yaml.safe_dump(manifest))
    workdir = tmp_path / "runs"
    result = run_cli("run", str(run_file), "--workdir", str(workdir))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    status = status_of(workdir, "gated")
    assert status["phase"] == "Succeeded" and status["finalPolicy"] == str(tiny.policy)
    succeeded = next(c for c in status["conditions"] if c["type"] == "Succeeded")
    assert succeeded["status"] == "True" and succeeded["reason"] == "GateTripped"
    assert "gates.maxKl: round 1: estimated KL" in succeeded["message"]
    assert [it["iteration"] for it in status["iterations"]] == [0, 1]  # round 2 never ran
    before, first = (it["evaluation"] for it in status["iterations"])
    assert status["iterations"][0].get("training") is None and first["policy"] == status["iterations"][1]["training"]["checkpoint"]
    for f in (before, first):
        assert f["prompts"] == 12 and f["samples"] == 12 and f["promptsLeftOut"] == 0 and f["overlap"] == 0
        assert f["judgedBy"] == "judge" and 0 < f["lengthMean"] <= 16 and 0.0 <= f["truncatedShare"] <= 1.0
    assert before["policy"] == str(tiny.policy) and before["kl"] == pytest.approx(0.0, abs=1e-3)
    assert before.get("winRate") is None and before["meanReward"] == pytest.approx(before["judgeReward"], abs=1e-3)
    assert first["kl"] > 1.0e-3 and first["lengthRatio"] == pytest.approx(first["lengthMean"] / before["lengthMean"], abs=1e-3)
    assert first["winRateLow"] <= first["winRate"] <= first["winRateHigh"]

    # Every held-out prompt's response is kept, with its scores and the win against round 0's.
    layout_dir = workdir / "gated"
    rows = [json.loads(line) for line in (layout_dir / "iter-01" / "evaluate" / "responses.jsonl").read_text().splitlines()]
    baseline = {r["prompt_id"]: r for r in
                (json.loads(line) for line in (layout_dir / "iter-00" / "evaluate" / "responses.jsonl").read_text().splitlines())}  # fmt: skip
    assert len(rows) == 12 and baseline.keys() == {r["prompt_id"] for r in rows}
    wins = [1.0 if r["judge"][0] > baseline[r["prompt_id"]]["judge"][0] else 0.5 if r["judge"][0] == baseline[r["prompt_id"]]["judge"][0] else 0.0
            for r in rows]  # fmt: skip
    assert [r["win"] for r in rows] == wins and first["winRate"] == pytest.approx(sum(wins) / 12, abs=1e-4)
    assert "[round 1/2] Evaluate: evaluation of 12 responses" in result.stdout and "[round 2/2]" not in result.stdout

    table = run_cli("status", "gated", "--workdir", str(workdir))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0] == "run gated: Succeeded (round 1)" and {"judge", "win", "kl"} <= set(lines[1].split())
    assert [line.split()[0] for line in lines[2:4]] == ["0", "1"]
    assert any(line.startswith("stopped by gates.maxKl: round 1: estimated KL") for line in lines)


def _with_assets(node, tiny):
    """The example's ./tiny/ paths, pointed at this session's tiny assets."""
    if isinstance(node, dict):
        return {k: _with_assets(v, tiny) for k, v in node.items()}
    if isinstance(node, list):
        return [_with_assets(v, tiny) for v in node]
    return f"{tiny.root}/{node[len('./tiny/'):]}" if isinstance(node, str) and node.startswith("./tiny/") else node


def test_the_length_gate_example_stops_the_inflating_loop_and_survives_kill_9_during_evaluate(tiny, tmp_path):
    """examples/tiny-length-gate.yaml as shipped: a reward that pays for length lengthens the short
    policy's answers, and gates.maxLengthRatio ends the run after round 1, keeping round 0's policy.
    The runner is killed (SIGKILL) in round 1's Evaluate; the resumed run evaluates round 1 again,
    redoes nothing before it, and ends the same way."""
    manifest = _with_assets(yaml.safe_load((REPO / "examples" / "tiny-length-gate.yaml").read_text()), tiny)
    run_file = tmp_path / "length-gate.yaml"
    run_file.write_text(yaml.safe_dump(manifest))
    workdir, name = tmp_path / "runs", manifest["metadata"]["name"]
    runner = subprocess.Popen([*ITERDPO, "run", str(run_file), "--workdir", str(workdir)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        _wait_for(lambda: (lambda s: (s.get("currentIteration"), s.get("currentStage")) == (1, "Evaluate"))(
            status_of(workdir, name)), timeout=900, what="round 1's Evaluate to start")  # fmt: skip
        time.sleep(3)  # the evaluator is loading or sampling
    finally:
        runner.send_signal(signal.SIGKILL)
        runner.wait()
    _wait_for(lambda: not _processes_mentioning(str(workdir / name / "run.json")), timeout=60, what="stage processes to exit")
    layout = RunLayout(workdir.resolve() / name)
    done = [layout.evaluation_report(0), layout.train_metrics(1), layout.pairs_file(1)]
    mtimes = {path: path.stat().st_mtime_ns for path in done}
    assert status_of(workdir, name)["currentStage"] == "Evaluate" and not layout.evaluation_report(1).exists()

    result = run_cli("run", str(run_file), "--workdir", str(workdir))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[round 1/3] Evaluate: evaluation of" in result.stdout
    assert "[before round 1] Evaluate" not in result.stdout and "[round 1/3] Train" not in result.stdout
    assert {path: path.stat().st_mtime_ns for path in done} == mtimes
    status = status_of(workdir, name)
    succeeded = next(c for c in status["conditions"] if c["type"] == "Succeeded")
    assert status["phase"] == "Succeeded" and succeeded["reason"] == "GateTripped"
    assert "stopped by gates.maxLengthRatio: round 1: mean response length" in succeeded["message"]
    assert [it["iteration"] for it in status["iterations"]] == [0, 1]  # rounds 2 and 3 never ran
    before, first = (it["evaluation"] for it in status["iterations"])
    assert first["lengthRatio"] > 1.5 and first["lengthMean"] > before["lengthMean"]
    assert status["finalPolicy"] == str(tiny.short_policy)  # the last round inside every gate
    assert status["iterations"][1]["lineage"]["read"][str(layout.evaluation_responses(0))] == digest(
        layout.evaluation_responses(0))  # fmt: skip


def test_rollback_starts_round_2_from_the_best_round_so_far_not_a_worse_round_1(tiny, tmp_path):
    """evaluation.rollback end to end: round 1 trains against an inverted reward (the gold model,
    weight -1), so the judge (the gold model) sees no gain over round 0 and select judge-reward
    keeps round 0 as the best so far (the earliest on a tie): round 2 generates and trains from the
    initial policy, not from round 1's checkpoint, and its lineage shows it by content."""
    manifest = _with_assets(yaml.safe_load((REPO / "examples" / "tiny-gate.yaml").read_text()), tiny)
    spec = manifest["spec"]
    manifest["metadata"]["name"] = "rollback"
    spec["iterations"] = 2
    spec["prompts"]["perIteration"] = [{"dataset": str(p), "maxPrompts": 16} for p in tiny.prompts[:2]]
    spec["generation"].update(samplesPerPrompt=4, maxNewTokens=16)
    spec["evaluation"].update(maxNewTokens=16, gates={}, rollback=True, select="judge-reward")
    spec["evaluation"]["prompts"]["maxPrompts"] = 12
    run_file = tmp_path / "rollback.yaml"
    run_file.write_text(yaml.safe_dump(manifest))
    workdir = tmp_path / "runs"
    result = run_cli("run", str(run_file), "--workdir", str(workdir))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    status = status_of(workdir, "rollback")
    assert status["phase"] == "Succeeded" and [it["iteration"] for it in status["iterations"]] == [0, 1, 2]
    zero, one, two = status["iterations"]
    assert one["evaluation"]["judgeReward"] <= zero["evaluation"]["judgeReward"]  # round 1 made nothing better
    first_checkpoint = one["training"]["checkpoint"]
    assert two["policy"] == str(tiny.policy) != first_checkpoint
    assert two["lineage"]["read"][str(tiny.policy)] == digest(tiny.policy)
    assert first_checkpoint not in two["lineage"]["read"]
    judged = [(it["evaluation"]["judgeReward"], -it["iteration"]) for it in status["iterations"]]
    best = -max(judged)[1]
    assert status["finalPolicy"] == (str(tiny.policy) if best == 0 else status["iterations"][best]["training"]["checkpoint"])
