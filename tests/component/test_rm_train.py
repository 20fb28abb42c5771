"""Bradley-Terry reward-model training as it really runs: `torchrun --nproc-per-node 2` on the CPU
(DeepSpeed, gloo), a score head on the tiny policy, pairs of kind vs unkind responses (which the
tiny gold reward model prefers); the checkpoint served by `serve-reward` unchanged."""

from __future__ import annotations

import json
import math
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from iterdpo.tiny import KIND_WORDS, PROMPT_FORMS, TOPICS, UNKIND_WORDS
from iterdpo_reward_server.process import RewardServerProcess

pytestmark = pytest.mark.slow

TIMEOUT = 300
SEED = 7
ARCH = "LlamaForSequenceClassification"

# What the stage program will do, reduced to the trainer's entry point: read the pairs, encode
# them with the base's tokenizer (bt.encode_pairs), train on every rank.
DRIVER = r'''
import json, logging, os, sys
from pathlib import Path

from iterdpo.spec import TrainingSpec
from iterdpo_trainer import rm_train
from iterdpo_trainer.preferences import Message, PreferencePair

rank = int(os.environ.get("RANK", "0"))
logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                    format=f"[rm rank {rank}] %(levelname)s %(message)s", stream=sys.stderr)
for noisy in ("DeepSpeed", "torch.distributed", "transformers"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
job = json.loads(Path(sys.argv[1]).read_text())
training = TrainingSpec.model_validate(job["training"])
tokenizer = rm_train.load_tokenizer(job["base"])

def pairs(rows, first_row):
    return [
        PreferencePair(first_row + i, (Message("user", p),), (Message("assistant", c),), (Message("assistant", r),), m)
        for i, (p, c, r, m) in enumerate(rows)
    ]

objective = rm_train.OBJECTIVES[job["objective"]]
train = objective.encode_pairs(tokenizer, pairs(job["train"], 0), max_length=training.max_length, seed=training.seed)
held = objective.encode_pairs(tokenizer, pairs(job["held_out"], len(job["train"])), max_length=training.max_length,
                              seed=training.seed)
rm_train.train_reward_model(
    base=job["base"], training=training, tokenizer=tokenizer, train_pairs=train.pairs, held_out=held.pairs,
    destination=Path(job["destination"]), metrics_path=Path(job["metrics"]),
    pairs_left_out=len(train.unusable) + len(held.unusable), objective=objective,
)
'''


def synthetic_pairs(count: int, seed: int, *, margin: float | None = None) -> list[list]:
    """(prompt, chosen, rejected, margin): chosen of kind words, rejected of unkind ones."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        topic = rng.choice(TOPICS)
        prompt = rng.choice(PROMPT_FORMS).format(topic)
        chosen = " ".join([topic] + rng.sample(KIND_WORDS, 4))
        rejected = " ".join([topic] + rng.sample(UNKIND_WORDS, 4))
        rows.append([prompt, chosen, rejected, margin])
    return rows


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_rm_training(
    tmp: Path, base: Path, *, training: dict, train: list, held_out: list, fails: bool = False,
    objective: str = "bradley-terry",
) -> tuple[Path, dict]:
    job = {
        "base": str(base), "training": {"seed": SEED, **training}, "train": train, "held_out": held_out,
        "objective": objective,
        "destination": str(tmp / "reward-model"), "metrics": str(tmp / "rm-metrics.json"),
    }  # fmt: skip
    (tmp / "job.json").write_text(json.dumps(job))
    (tmp / "driver.py").write_text(DRIVER)
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--nproc-per-node", "2", "--master-port", str(_free_port()),
               str(tmp / "driver.py"), str(tmp / "job.json")]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp)
    if fails:
        assert result.returncode != 0, result.stderr[-6000:]
        return Path(job["destination"]), {"stderr": result.stderr}
    assert result.returncode == 0, result.stderr[-6000:]
    return Path(job["destination"]), json.loads(Path(job["metrics"]).read_text())


def _initial_model(base: Path):
    """The model as training starts: the base's weights and a score head drawn from the seed.

    rm_train seeds torch with training.seed right before `from_pretrained(num_labels=1)`, so
    the new head's initial values are a function of the seed; loading the same way here
    reproduces them (checked: two such loads give the same head).
    """
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(SEED)
    return AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)


def _trainable(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def one_step(tiny, tmp_path_factory):
    """ZeRO-3, fp32, 2 processes: one optimizer step (8 pairs, global batch 8, micro batch 2)."""
    tmp = tmp_path_factory.mktemp("rm-one-step")
    training = {"zeroStage": 3, "precision": "fp32", "gradientCheckpointing": False, "epochs": 1,
                "learningRate": 1e-3, "globalBatchSize": 8, "microBatchSize": 2, "warmupRatio": 0.0,
                "maxLength": 64, "nprocPerNode": 2}  # fmt: skip
    return run_rm_training(tmp, tiny.policy, training=training, train=synthetic_pairs(8, 1, margin=0.5),
                           held_out=synthetic_pairs(5, 2, margin=0.5))  # fmt: skip


def test_one_zero3_step_changes_every_parameter_the_score_head_included(tiny, one_step):
    checkpoint, metrics = one_step
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    initial = _trainable(_initial_model(tiny.policy))
    assert torch.equal(initial["score.weight"], _trainable(_initial_model(tiny.policy))["score.weight"])
    trained_model, info = AutoModelForSequenceClassification.from_pretrained(checkpoint, output_loading_info=True)
    assert not info["missing_keys"], info  # the score head was saved
    trained = _trainable(trained_model)
    assert trained.keys() == initial.keys() and "score.weight" in trained
    unchanged = [name for name in initial if torch.equal(initial[name], trained[name])]
    assert not unchanged, f"parameters not trained: {unchanged}"
    assert all(t.dtype == torch.float32 for t in trained.values())

    # A reward model's checkpoint: its class, one label, the pad token, the base's tokenizer and template.
    config = AutoConfig.from_pretrained(checkpoint)
    base_tokenizer = AutoTokenizer.from_pretrained(tiny.policy)
    assert config.architectures == [ARCH] and config.num_labels == 1
    assert config.pad_token_id == base_tokenizer.pad_token_id is not None
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    assert tokenizer.chat_template == base_tokenizer.chat_template
    assert tokenizer.pad_token == base_tokenizer.pad_token
    assert (checkpoint / "model.safetensors").is_file()

    assert metrics["pairs"] == 8 and metrics["heldOutPairs"] == 5 and metrics["pairsLeftOut"] == 0
    assert metrics["checkpoint"] == str(checkpoint) and metrics["worldSize"] == 2
    assert len(metrics["steps"]) == 1 and len(metrics["heldOut"]) == 1
    step = metrics["steps"][0]
    assert all(math.isfinite(step[k]) for k in ("loss", "accuracy", "margin", "learningRate"))
    assert step["learningRate"] == pytest.approx(1e-3)
    # With margin 0.5 the loss is -log sigmoid(d - 0.5), above log 2 at the (near-)zero differences of the start.
    assert step["loss"] > math.log(2) - 0.05
    assert metrics["heldOut"][0]["pairs"] == 5 and 0.0 <= metrics["heldOutAccuracy"] <= 1.0


def test_the_checkpoint_is_served_unchanged_with_the_scores_of_a_direct_forward(one_step):
    checkpoint, _ = one_step
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    items = [
        {"messages": [{"role": "user", "content": prompt}], "response": response}
        for prompt, chosen, rejected, _ in synthetic_pairs(4, 3)
        for response in (chosen, rejected)
    ]
    with RewardServerProcess(["--model", str(checkpoint), "--max-length", "64", "--batch-tokens", "128"]) as server:
        response = httpx.post(f"{server.url}/v1/score", json={"items": items}, timeout=120)
        assert response.status_code == 200, response.text
        served = response.json()["scores"]

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint, dtype=torch.float32).eval()
    direct = []
    with torch.no_grad():
        for item in items:
            text = tokenizer.apply_chat_template(
                [*item["messages"], {"role": "assistant", "content": item["response"]}], tokenize=False
            )
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # the tiny template writes no BOS
            direct.append(model(input_ids=torch.tensor([ids])).logits[0, 0].item())
    assert served == pytest.approx(direct, abs=1e-5)


def test_a_few_epochs_on_kind_vs_unkind_pairs_reach_held_out_accuracy_0_9(tiny, tmp_path):
    """ZeRO-1, bf16, gradient checkpointing (the other test covers ZeRO-3 in fp32)."""
    training = {"zeroStage": 1, "precision": "bf16", "gradientCheckpointing": True, "epochs": 3,
                "learningRate": 1e-3, "globalBatchSize": 16, "microBatchSize": 4, "warmupRatio": 0.0,
                "scheduler": "constant", "maxLength": 64, "nprocPerNode": 2}  # fmt: skip
    checkpoint, metrics = run_rm_training(tmp_path, tiny.policy, training=training, train=synthetic_pairs(48, 11),
                                          held_out=synthetic_pairs(24, 12))  # fmt: skip
    assert [e["epoch"] for e in metrics["heldOut"]] == [1, 2, 3]
    assert all(e["pairs"] == 24 for e in metrics["heldOut"])
    assert metrics["heldOutAccuracy"] >= 0.9, metrics["heldOut"]
    assert metrics["heldOutMargin"] > 0
    assert metrics["finalLoss"] < metrics["steps"][0]["loss"]
    assert len(metrics["steps"]) == 9  # 48 pairs / 16 per step x 3 epochs

    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(checkpoint).dtype == torch.float32  # the base's dtype, from the fp32 master weights


def test_the_pairwise_objective_learns_kind_over_unkind_and_is_served_as_it_evaluated(tiny, tmp_path):
    """Kind pairwise (issue 13 item 2): the tiny policy taught to answer A or B, the chosen side at a
    seeded random slot, ZeRO-3 in fp32. The checkpoint stays a causal LM; served by `serve-reward
    --kind pairwise`, its /v1/compare reading of the held-out pairs gives the accuracy and margin
    the trainer measured (the same prompt, both orders averaged)."""
    from transformers import AutoConfig

    training = {"zeroStage": 3, "precision": "fp32", "gradientCheckpointing": False, "epochs": 4,
                "learningRate": 3e-3, "globalBatchSize": 16, "microBatchSize": 4, "warmupRatio": 0.0,
                "scheduler": "constant", "maxLength": 128, "nprocPerNode": 2}  # fmt: skip
    held_out = synthetic_pairs(24, 32)
    checkpoint, metrics = run_rm_training(tmp_path, tiny.policy, training=training, train=synthetic_pairs(128, 31),
                                          held_out=held_out, objective="pairwise")  # fmt: skip
    assert metrics["objective"] == "pairwise" and metrics["pairs"] == 128 and metrics["heldOutPairs"] == 24
    assert len(metrics["steps"]) == 32 and metrics["finalLoss"] < metrics["steps"][0]["loss"]
    assert metrics["heldOutAccuracy"] >= 0.9, metrics["heldOut"]
    assert AutoConfig.from_pretrained(checkpoint).architectures == ["LlamaForCausalLM"]

    items = [{"messages": [{"role": "user", "content": p}], "a": c, "b": r} for p, c, r, _ in held_out]
    with RewardServerProcess(["--kind", "pairwise", "--model", str(checkpoint), "--max-length", "128"]) as server:
        response = httpx.post(f"{server.url}/v1/compare", json={"items": items}, timeout=120)
        assert response.status_code == 200, response.text
        served = response.json()["probabilities"]
    assert sum(p > 0.5 for p in served) / len(served) == pytest.approx(metrics["heldOutAccuracy"])
    served_margin = sum(math.log(p / (1 - p)) for p in served) / len(served)
    assert served_margin == pytest.approx(metrics["heldOutMargin"], rel=1e-3, abs=1e-4)


def test_a_non_finite_loss_stops_training_before_anything_is_written(tiny, tmp_path):
    """An infinite margin makes the loss inf at step 1: a StageError, no checkpoint, no metrics."""
    training = {"zeroStage": 0, "precision": "fp32", "gradientCheckpointing": False, "epochs": 1,
                "globalBatchSize": 4, "microBatchSize": 2, "maxLength": 64, "nprocPerNode": 2}  # fmt: skip
    checkpoint, result = run_rm_training(tmp_path, tiny.policy, training=training, fails=True,
                                         train=synthetic_pairs(4, 5, margin=math.inf), held_out=[])  # fmt: skip
    assert "StageError: loss is inf at step 1: training diverged" in result["stderr"]
    assert not checkpoint.exists() and not (tmp_path / "rm-metrics.json").exists()


def test_the_stage_program_reads_a_saved_dataset_with_a_test_split_in_trls_format(tiny, tmp_path):
    """`torchrun -m iterdpo_trainer.reward_model`, as the planner starts it, on an Arrow dataset
    saved with `datasets` (TRL's format: prompt + chosen + rejected strings): the test split is
    the held-out set, a row with an empty side is left out and listed, the summary is the stage's."""
    import datasets
    import yaml

    from iterdpo.planner import next_step
    from iterdpo.status import RunStatus
    from runfiles import write_tiny_run

    def rows(count, seed):
        return [{"prompt": p, "chosen": c, "rejected": r} for p, c, r, _ in synthetic_pairs(count, seed)]

    train = rows(40, 21)
    train[5]["rejected"] = ""  # unusable: left out with its row
    datasets.DatasetDict({"train": datasets.Dataset.from_list(train),
                          "test": datasets.Dataset.from_list(rows(12, 22))}).save_to_disk(tmp_path / "prefs")  # fmt: skip
    run_file = write_tiny_run(tmp_path / "run.yaml", tiny, name="rm-arrow", storage_root=tmp_path / "runs")
    manifest = yaml.safe_load(run_file.read_text())
    manifest["spec"]["reward"] = {"maxLength": 64, "batchTokens": 4096, "training": {
        "base": str(tiny.policy), "data": {"dataset": str(tmp_path / "prefs")}, "heldOutSplit": "test",
        "learningRate": 1e-3, "epochs": 2, "scheduler": "constant", "warmupRatio": 0.0, "globalBatchSize": 8,
        "microBatchSize": 4, "nprocPerNode": 2, "zeroStage": 2, "precision": "fp32", "gradientCheckpointing": False,
    }}  # fmt: skip
    run_file.write_text(yaml.safe_dump(manifest))

    from iterdpo.runfile import load_run

    step = next_step(load_run(run_file), RunStatus(), spec_file=str(run_file))
    (job,) = step.jobs
    argv = [str(Path(sys.executable).with_name("torchrun")), *job.argv[1:2], "--master-port", str(_free_port()),
            *job.argv[2:]]  # fmt: skip
    summary = tmp_path / "summary.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "ITERDPO_TERMINATION_LOG": str(summary)}
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-6000:]
    reported = json.loads(summary.read_text())
    assert reported["stage"] == "reward-model"
    assert (reported["pairs"], reported["heldOutPairs"], reported["pairsLeftOut"]) == (39, 12, 1)
    assert reported["leftOutReasons"][0].startswith("row 5: ") and "rejected" in reported["leftOutReasons"][0]
    root = tmp_path / "runs" / "rm-arrow" / "iter-00" / "reward_model"
    assert [json.loads(line)["row"] for line in (root / "left-out.jsonl").read_text().splitlines()] == [5]
    metrics = json.loads((root / "metrics.json").read_text())
    assert [e["pairs"] for e in metrics["heldOut"]] == [12, 12] and metrics["checkpoint"] == str(root / "model")

    again = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path)
    assert again.returncode == 0 and "already trained" in again.stderr, again.stderr[-3000:]
    assert json.loads((root / "metrics.json").read_text()) == metrics  # not redone
