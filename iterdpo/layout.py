"""Where every artifact of a run lives: pure path arithmetic, shared by all stages.

    <storage root>/<run name>/
      recipe.json                  the spec hash of the run that owns the folder
      iter-00/sft/policy/          the fine-tuned policy (when spec.policy.sft is set): round 1's
      iter-00/sft/left-out.jsonl  metrics.json (written last: the marker)
      iter-00/reward_model/model/  the trained reward model (when spec.reward.training is set)
      iter-00/reward_model/left-out.jsonl   every preference row left out, with its reason
      iter-00/reward_model/metrics.json     (written last: the marker)
      iter-01/generate/shard-00000-of-00002.jsonl   responses of shard 0
      iter-01/generate/shard-00000-of-00002.done.json   its success marker (counts)
      iter-01/score/scored.jsonl  pairs.jsonl  stats.json (written last: the marker)
      iter-01/train/policy/       the round's Hugging Face checkpoint
      iter-01/train/metrics.json  (written last: the marker)
      iter-NN/evaluate/responses.jsonl  report.json (written last: the marker); with
                                  spec.evaluation, rounds 0..N (0: the initial policy)
      iter-NN/<stage>/lineage-<process>.json  digests of what the process read and wrote
                                  (iterdpo.lineage: a changed input is refused)

Each stage's folder is the one its entry in the stage table names (`StageDef.folder`).
What each file holds: `iterdpo.contracts`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from iterdpo.contracts import ContractError, RecipeMarker, read_model, write_model
from iterdpo.errors import StageError, UsageError
from iterdpo.spec import IterativeDPORun
from iterdpo.stages import STAGE_TABLE, Stage


@dataclass(frozen=True)
class RunLayout:
    root: Path  # <storage root>/<run name>

    @classmethod
    def of(cls, run: IterativeDPORun) -> RunLayout:
        if not run.spec.storage.root:
            raise UsageError(
                "spec.storage.root is not set: stage programs need it (the local runner and "
                "the operator fill it in before they start a stage)"
            )
        return cls(Path(run.spec.storage.root) / run.name)

    @property
    def recipe_file(self) -> Path:
        return self.root / "recipe.json"

    def iteration_dir(self, iteration: int) -> Path:
        return self.root / f"iter-{iteration:02d}"

    def stage_dir(self, iteration: int, stage: Stage) -> Path:
        return self.iteration_dir(iteration) / STAGE_TABLE[stage].folder

    # SFT (round 0: once, before round 1)
    def sft_checkpoint(self) -> Path:
        return self.stage_dir(0, Stage.SFT) / "policy"

    def sft_left_out(self) -> Path:
        return self.stage_dir(0, Stage.SFT) / "left-out.jsonl"

    def sft_metrics(self) -> Path:
        return self.stage_dir(0, Stage.SFT) / "metrics.json"

    # RewardModel (round 0: once, before round 1)
    def reward_model(self) -> Path:
        return self.stage_dir(0, Stage.REWARD_MODEL) / "model"

    def reward_model_left_out(self) -> Path:
        return self.stage_dir(0, Stage.REWARD_MODEL) / "left-out.jsonl"

    def reward_model_metrics(self) -> Path:
        return self.stage_dir(0, Stage.REWARD_MODEL) / "metrics.json"

    # Generate
    def shard_file(self, iteration: int, index: int, count: int) -> Path:
        return self.stage_dir(iteration, Stage.GENERATE) / f"shard-{index:05d}-of-{count:05d}.jsonl"

    def shard_marker(self, iteration: int, index: int, count: int) -> Path:
        return self.stage_dir(iteration, Stage.GENERATE) / f"shard-{index:05d}-of-{count:05d}.done.json"

    # Score
    def scored_file(self, iteration: int) -> Path:
        return self.stage_dir(iteration, Stage.SCORE) / "scored.jsonl"

    def pairs_file(self, iteration: int) -> Path:
        return self.stage_dir(iteration, Stage.SCORE) / "pairs.jsonl"

    def score_stats(self, iteration: int) -> Path:
        return self.stage_dir(iteration, Stage.SCORE) / "stats.json"

    # Train
    def checkpoint(self, iteration: int) -> Path:
        return self.stage_dir(iteration, Stage.TRAIN) / "policy"

    def train_metrics(self, iteration: int) -> Path:
        return self.stage_dir(iteration, Stage.TRAIN) / "metrics.json"

    def reference_cache(self, iteration: int) -> Path:
        return self.stage_dir(iteration, Stage.TRAIN) / "ref_logps.pt"


    # Evaluate
    def evaluation_responses(self, iteration: int) -> Path:
        return self.stage_dir(iteration, Stage.EVALUATE) / "responses.jsonl"

    def evaluation_report(self, iteration: int) -> Path:
        return self.stage_dir(iteration, Stage.EVALUATE) / "report.json"


def evaluated_policy(run: IterativeDPORun, iteration: int) -> str:
    """The policy round `iteration`'s Evaluate answers with: the round's trained checkpoint, and
    in round 0 the initial policy (the baseline every win rate is against)."""
    return initial_policy(run) if iteration == 0 else str(RunLayout.of(run).checkpoint(iteration))


def policy_for(run: IterativeDPORun, iteration: int) -> str:
    """The policy that generates round `iteration`: the SFT model (spec.policy.model, or the one
    the SFT stage fine-tunes from it), then each round's checkpoint. Round 0 (before round 1)
    names spec.policy.model: what the SFT stage starts from."""
    if iteration == 0:
        return run.spec.policy.model
    if iteration == 1:
        return initial_policy(run)
    return str(RunLayout.of(run).checkpoint(iteration - 1))


def initial_policy(run: IterativeDPORun) -> str:
    """Round 1's policy and the `initial` DPO reference: spec.policy.model, or its SFT checkpoint."""
    if run.spec.policy.sft is not None:
        return str(RunLayout.of(run).sft_checkpoint())
    return run.spec.policy.model


def reward_model_for(run: IterativeDPORun) -> str | None:
    """The reward model every round scores with: spec.reward.model, or the one the run trains
    (None for a kind that loads none)."""
    if run.spec.reward.training is not None:
        return str(RunLayout.of(run).reward_model())
    assert run.spec.reward.model is not None or not run.spec.reward.reads_model  # a spec rule
    return run.spec.reward.model


def reference_for(run: IterativeDPORun, iteration: int, start: str | None = None) -> str:
    """The DPO reference of round `iteration`, as spec.reference says; `previous` is the policy
    the round starts from (`start`, with evaluation.rollback; else the previous checkpoint)."""
    if run.spec.reference == "initial":
        return initial_policy(run)
    return start or policy_for(run, iteration)


def claim_run_folder(run: IterativeDPORun) -> None:
    """Refuse to add to a run folder that holds another recipe's artifacts.

    Stage programs skip work whose outputs exist, so a run re-created under the same name
    and storage root with a different recipe would silently reuse the old round's files.
    The first stage to run marks the folder with the spec hash; every stage checks it.
    """
    layout = RunLayout.of(run)
    want = run.spec_hash()
    if not layout.recipe_file.exists():
        write_model(layout.recipe_file, RecipeMarker(name=run.name, spec_hash=want))
        return
    try:
        have = read_model(layout.recipe_file, RecipeMarker).spec_hash
    except ContractError:
        raise StageError(f"{layout.recipe_file} is not a recipe marker; remove it if the folder is yours") from None
    if have != want and run.extended_from(have) is not None:  # spec.iterations raised: the same recipe, grown
        write_model(layout.recipe_file, RecipeMarker(name=run.name, spec_hash=want))
    elif have != want:
        raise StageError(
            f"{layout.root} holds the artifacts of another recipe (spec hash {have}; this run's is {want}): "
            "give the run another metadata.name or spec.storage.root, or remove that folder"
        )
