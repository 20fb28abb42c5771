"""Run files on the tiny models, for component and end-to-end tests."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import yaml

from iterdpo.contracts import PairRecord, write_lines
from iterdpo.layout import RunLayout
from iterdpo.runfile import load_run
from iterdpo.tiny import KIND_WORDS, TOPICS, UNKIND_WORDS


def tiny_run_manifest(tiny, *, name: str, storage_root: Path | None, **spec) -> dict:
    """An IterativeDPORun on the tiny models; `spec` entries are deep-merged over small defaults.

    Without `storage_root` the spec leaves storage unset (the local runner then uses its workdir).
    """
    base = {
        "iterations": 1,
        "policy": {"model": str(tiny.policy)},
        "prompts": {"dataset": str(tiny.prompts[0])},
        "generation": {"gpuMemoryUtilization": 0.2, "enforceEager": True},
        "reward": {"model": str(tiny.reward), "maxLength": 256},  # the tiny reward model has 1024 positions
        "training": {
            "precision": "fp32", "nprocPerNode": 2, "microBatchSize": 2, "globalBatchSize": 8,
            "maxLength": 128, "maxPromptLength": 64,
        },
    }
    if storage_root is not None:
        base["storage"] = {"root": str(storage_root)}
    return {
        "apiVersion": "iterdpo.io/v1alpha1",
        "kind": "IterativeDPORun",
        "metadata": {"name": name},
        "spec": _merge(base, spec),
    }


def write_tiny_run(path: Path, tiny, *, name: str, storage_root: Path | None = None, **spec) -> Path:
    path.write_text(yaml.safe_dump(tiny_run_manifest(tiny, name=name, storage_root=storage_root, **spec)))
    return path


def _merge(base: dict, override: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def write_tiny_pairs(run_file: Path, count: int, *, long_prompt: bool = False) -> Path:
    """Round 1's pairs as the Score stage writes them: kind words chosen over unkind ones;
    optionally one prompt too long."""
    rng = random.Random(count)
    path = RunLayout.of(load_run(run_file)).pairs_file(1)
    pairs = []
    for i in range(count):
        topic = rng.choice(TOPICS)
        prompt = f"tell me about the {topic}" + (" and the river" * 40 if long_prompt and i == 0 else "")
        pairs.append(PairRecord(  # what the Score stage writes, through the same contract
            prompt_id=f"p{i:04d}",
            prompt=[{"role": "user", "content": prompt}],
            chosen=" ".join([topic] + rng.sample(KIND_WORDS, 4)),
            rejected=" ".join([topic] + rng.sample(UNKIND_WORDS, 4)),
            chosen_reward=1.0,
            rejected_reward=-1.0,
            margin=2.0,
        ))  # fmt: skip
    write_lines(path, pairs)
    return path
