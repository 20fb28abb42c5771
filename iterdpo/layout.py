"""Where every artifact of a run lives: pure path arithmetic, shared by all stages.

    <storage root>/<run name>/
      recipe.json                  the spec hash of the run that owns the folder
      iter-01/generate/shard-00000-of-00002.jsonl   responses of shard 0
      iter-01/generate/shard-00000-of-00002.done.json   its success marker (counts)
      iter-01/score/scored.jsonl  pairs.jsonl  stats.json (written last: the marker)
      iter-01/train/policy/       the round's Hugging Face checkpoint
      iter-01/train/metrics.json  (written last: the marker)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from iterdpo.spec import IterativeDPORun


@dataclass(frozen=True)
class RunLayout:
    root: Path  # <storage root>/<run name>

    @classmethod
    def of(cls, run: IterativeDPORun) -> RunLayout:
        if not run.spec.storage.root:
            raise ValueError(
                "spec.storage.root is not set: stage programs need it (the local runner and "
                "the operator fill it in before they start a stage)"
            )
        return cls(Path(run.spec.storage.root) / run.name)

    @property
    def recipe_file(self) -> Path:
        return self.root / "recipe.json"

    def iteration_dir(self, iteration: int) -> Path:
        return self.root / f"iter-{iteration:02d}"

    # generate
    def generate_dir(self, iteration: int) -> Path:
        return self.iteration_dir(iteration) / "generate"

    def shard_file(self, iteration: int, index: int, count: int) -> Path:
        return self.generate_dir(iteration) / f"shard-{index:05d}-of-{count:05d}.jsonl"

    def shard_marker(self, iteration: int, index: int, count: int) -> Path:
        return self.generate_dir(iteration) / f"shard-{index:05d}-of-{count:05d}.done.json"

    # score
    def score_dir(self, iteration: int) -> Path:
        return self.iteration_dir(iteration) / "score"

    def scored_file(self, iteration: int) -> Path:
        return self.score_dir(iteration) / "scored.jsonl"

    def pairs_file(self, iteration: int) -> Path:
        return self.score_dir(iteration) / "pairs.jsonl"

    def score_stats(self, iteration: int) -> Path:
        return self.score_dir(iteration) / "stats.json"

    # train
    def train_dir(self, iteration: int) -> Path:
        return self.iteration_dir(iteration) / "train"

    def checkpoint(self, iteration: int) -> Path:
        return self.train_dir(iteration) / "policy"

    def train_metrics(self, iteration: int) -> Path:
        return self.train_dir(iteration) / "metrics.json"


def policy_for(run: IterativeDPORun, iteration: int) -> str:
    """The policy that generates round `iteration`: the SFT model, then each round's checkpoint."""
    if iteration == 1:
        return run.spec.policy.model
    return str(RunLayout.of(run).checkpoint(iteration - 1))


def reference_for(run: IterativeDPORun, iteration: int) -> str:
    """The DPO reference of round `iteration`, as spec.reference says."""
    if run.spec.reference == "initial":
        return run.spec.policy.model
    return policy_for(run, iteration)


def claim_run_folder(run: IterativeDPORun) -> None:
    """Refuse to add to a run folder that holds another recipe's artifacts.

    Stage programs skip work whose outputs exist, so a run re-created under the same name
    and storage root with a different recipe would silently reuse the old round's files.
    The first stage to run marks the folder with the spec hash; every stage checks it.
    """
    from iterdpo.atomic import write_json
    from iterdpo.errors import StageError

    layout = RunLayout.of(run)
    want = run.spec_hash()
    try:
        have = json.loads(layout.recipe_file.read_text())["specHash"]
    except FileNotFoundError:
        write_json(layout.recipe_file, {"name": run.name, "specHash": want})
        return
    except (ValueError, KeyError, TypeError):
        raise StageError(f"{layout.recipe_file} is not a recipe marker; remove it if the folder is yours") from None
    if have != want:
        raise StageError(
            f"{layout.root} holds the artifacts of another recipe (spec hash {have}; this run's is {want}): "
            "give the run another metadata.name or spec.storage.root, or remove that folder"
        )
