"""The train stage as it really runs: `torchrun --nproc-per-node 2 -m iterdpo_trainer` on the CPU
(DeepSpeed with the gloo backend), on the tiny policy and synthetic pairs."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from iterdpo.contracts import PairRecord, read_lines
from iterdpo.layout import RunLayout
from iterdpo.runfile import load_run
from runfiles import write_tiny_pairs, write_tiny_run

pytestmark = pytest.mark.slow

TRL_NAMES = (
    "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
    "learning_rate", "epoch", "step",
)
TIMEOUT = 300


def write_run_file(tmp: Path, tiny, *, zero_stage: int, gradient_checkpointing: bool, precision: str = "fp32") -> Path:
    return write_tiny_run(
        tmp / "run.yaml",
        tiny,
        name="trainer-test",
        storage_root=tmp / "runs",
        iterations=2,
        training={
            "precision": precision, "gradientCheckpointing": gradient_checkpointing, "zeroStage": zero_stage,
            "epochs": 1, "learningRate": 1e-3,
        },
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_trainer(run_file: Path, tmp: Path, *, torchrun: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "ITERDPO_TERMINATION_LOG": str(tmp / "termination-log"),
           "OMP_NUM_THREADS": "1"}
    program = ["-m", "iterdpo_trainer", "--spec", str(run_file), "--iteration", "1"]
    if torchrun:
        torchrun = Path(sys.executable).with_name("torchrun")
        command = [str(torchrun), "--nproc-per-node", "2", "--master-port", str(_free_port()), *program]
    else:
        command = [sys.executable, *program]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp)


def _parameters(path: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def _single_process_reference(tiny, pairs_file: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference log-probs computed here, in one process, pair by pair."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from iterdpo_trainer.data import collate, tokenize_pair
    from iterdpo_trainer.forward import batch_logps

    tok = AutoTokenizer.from_pretrained(tiny.policy)
    model = AutoModelForCausalLM.from_pretrained(tiny.policy).eval()
    chosen, rejected = [], []
    with torch.no_grad():
        for record in read_lines(pairs_file, PairRecord):
            pair = tokenize_pair(tok, record, max_length=128, max_prompt_length=64)
            c, r = batch_logps(model, collate([pair], tok.pad_token_id), "cpu")
            chosen.append(c.item())
            rejected.append(r.item())
    return torch.tensor(chosen), torch.tensor(rejected)


def test_zero2_trains_every_parameter_saves_a_loadable_checkpoint_and_reruns_as_a_noop(tiny, tmp_path):
    run_file = write_run_file(tmp_path, tiny, zero_stage=2, gradient_checkpointing=False)
    pairs_file = write_tiny_pairs(run_file, 12, long_prompt=True)  # 12 pairs, batch 8: 2 steps, 4 repeated
    layout = RunLayout.of(load_run(run_file))

    result = run_trainer(run_file, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "[train rank 0]" in result.stderr and "step 2/2" in result.stderr

    # Every trainable parameter moved.
    checkpoint = layout.checkpoint(1)
    before, after = _parameters(tiny.policy), _parameters(checkpoint)
    assert before.keys() == after.keys()
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert not unchanged, f"parameters not trained: {unchanged}"
    assert all(after[n].dtype == torch.float32 for n in after)

    # The checkpoint carries the tokenizer and the chat template the next round generates with.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)
    original = AutoTokenizer.from_pretrained(tiny.policy)
    assert tok.chat_template == original.chat_template
    assert tok.get_vocab() == original.get_vocab() and tok.eos_token_id == original.eos_token_id
    assert (checkpoint / "model.safetensors").stat().st_mode & 0o044 == 0o044  # readable by others

    # metrics.json: TRL names, finite values, counts.
    metrics = json.loads(layout.train_metrics(1).read_text())
    assert metrics["pairs"] == 12
    phases = metrics["phaseSeconds"]
    assert set(phases) == {"referencePass", "trainingLoop", "checkpointSave"}
    assert sum(phases.values()) <= metrics["seconds"]
    assert metrics["pairsTruncated"] == 1
    assert metrics["pairsRepeatedToFillLastStep"] == 4
    assert metrics["checkpoint"] == str(checkpoint)
    assert metrics["policy"] == str(tiny.policy) and metrics["reference"] == str(tiny.policy)
    assert len(metrics["steps"]) == 2
    for record in [metrics["final"], *metrics["steps"]]:
        assert set(TRL_NAMES) <= record.keys()
        assert all(math.isfinite(record[name]) for name in TRL_NAMES)
    first, last = metrics["steps"]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference before step 1
    assert last["loss"] < first["loss"] and last["rewards/margins"] > 0
    assert (first["step"], last["step"], last["epoch"]) == (1, 2, 1.0)

    # Reference log-probs from 2 processes equal one process's, pair by pair (TRL #2423/#2569).
    cache = torch.load(layout.reference_cache(1), weights_only=True)
    chosen, rejected = _single_process_reference(tiny, pairs_file)
    torch.testing.assert_close(cache["chosen"], chosen, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cache["rejected"], rejected, rtol=1e-4, atol=1e-4)

    # The summary went where the backend reads it.
    summary = json.loads((tmp_path / "termination-log").read_text())
    assert summary["stage"] == "train" and summary["checkpoint"] == str(checkpoint) and summary["pairs"] == 12
    assert summary["loss"] == pytest.approx(metrics["final"]["loss"])
    assert summary["rewardAccuracy"] == metrics["final"]["rewards/accuracies"]
    assert len((tmp_path / "termination-log").read_bytes()) < 4096

    # Rerunning a finished stage is a no-op that re-emits the summary.
    (tmp_path / "termination-log").unlink()
    weights_mtime = (checkpoint / "model.safetensors").stat().st_mtime_ns
    metrics_mtime = layout.train_metrics(1).stat().st_mtime_ns
    again = run_trainer(run_file, tmp_path)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "already trained" in again.stderr
    assert (checkpoint / "model.safetensors").stat().st_mtime_ns == weights_mtime
    assert layout.train_metrics(1).stat().st_mtime_ns == metrics_mtime
    assert json.loads((tmp_path / "termination-log").read_text()) == summary


def test_zero3_bf16_with_gradient_checkpointing_saves_a_full_fp32_checkpoint(tiny, tmp_path):
    # bf16 training of an fp32 policy: the checkpoint must hold the optimizer's fp32 master
    # weights in the original dtype; the bf16 module copy would lose the small updates
    # of the norm weights (1.0 + 1e-3 rounds back to 1.0 in bf16).
    run_file = write_run_file(tmp_path, tiny, zero_stage=3, gradient_checkpointing=True, precision="bf16")
    write_tiny_pairs(run_file, 8, long_prompt=False)  # exactly one step
    layout = RunLayout.of(load_run(run_file))

    result = run_trainer(run_file, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]

    metrics = json.loads(layout.train_metrics(1).read_text())
    assert len(metrics["steps"]) == 1 and metrics["pairsRepeatedToFillLastStep"] == 0
    before, after = _parameters(tiny.policy), _parameters(layout.checkpoint(1))
    assert {n: t.shape for n, t in before.items()} == {n: t.shape for n, t in after.items()}
    assert all(after[n].dtype == before[n].dtype == torch.float32 for n in before)
    assert json.loads((layout.checkpoint(1) / "config.json").read_text())["dtype"] == "float32"
    assert not [n for n in before if torch.equal(before[n], after[n])]  # gathered, not left partitioned


def test_missing_pairs_file_is_one_clear_line_and_exit_1(tiny, tmp_path):
    run_file = write_run_file(tmp_path, tiny, zero_stage=2, gradient_checkpointing=False)
    pairs_file = RunLayout.of(load_run(run_file)).pairs_file(1)
    expected = f"pairs file {pairs_file} not found: run the Score stage of round 1 first"

    alone = run_trainer(run_file, tmp_path, torchrun=False)
    assert alone.returncode == 1
    assert expected in alone.stderr
    assert "Traceback" not in alone.stderr

    launched = run_trainer(run_file, tmp_path)
    assert launched.returncode == 1
    assert f"iterdpo_trainer (rank 0): error: {expected}" in launched.stderr
    # torchrun itself reports the failed child with its own launcher traceback; none comes from ours.
    assert "iterdpo_trainer/" not in launched.stderr and "services/trainer/" not in launched.stderr
    assert not (tmp_path / "runs" / "trainer-test" / "iter-01" / "train" / "metrics.json").exists()
