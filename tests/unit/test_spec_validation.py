"""Bad run files are rejected before anything runs, with the field path and allowed values."""

import copy
from pathlib import Path

import pytest
import yaml

from iterdpo.runfile import SpecError, load_run, parse_run

VALID = {
    "apiVersion": "iterdpo.io/v1alpha1",
    "kind": "IterativeDPORun",
    "metadata": {"name": "demo"},
    "spec": {
        "iterations": 2,
        "policy": {"model": "org/sft-model"},
        "prompts": {"dataset": "org/prompts"},
        "reward": {"model": "org/reward-model"},
        "training": {"globalBatchSize": 8, "microBatchSize": 2, "nprocPerNode": 2},
    },
}


def with_change(path: str, value):
    data = copy.deepcopy(VALID)
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return data


def problems(data) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_run(data)
    return info.value.problems


def test_valid_run_gets_defaults():
    run = parse_run(VALID)
    assert run.spec.generation.samples_per_prompt == 8
    assert run.spec.pairing.strategy == "max_min"
    assert run.spec.reference == "initial"
    assert run.spec.training.loss.beta == 0.1
    assert run.spec.reward.kind == "bradley-terry"


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("spec.generation.samplesPerPrompt", 1, "spec.generation.samplesPerPrompt: must be >= 2 (got 1)"),
        ("spec.pairing.strategy", "best_worst", "spec.pairing.strategy: unknown value 'best_worst'; allowed: "
         "'max_min', 'max_random', 'max_max', 'random' or 'max_min_length_penalty'"),
        ("spec.training.loss.beta", -0.1, "spec.training.loss.beta: must be > 0.0 (got -0.1)"),
        ("spec.reference", "latest", "spec.reference: unknown value 'latest'; allowed: 'initial' or 'previous'"),
        ("spec.reward.kind", "armo", "spec.reward.kind: unknown value 'armo'; allowed: 'bradley-terry', 'multi-objective', 'pairwise', 'verifiable', 'length' or 'composite'"),
        ("spec.training.zeroStage", 4, "spec.training.zeroStage: unknown value 4; allowed: 0, 1, 2 or 3"),
        ("spec.training.precision", "fp8", "spec.training.precision: unknown value 'fp8'; allowed: 'bf16', 'fp16' or 'fp32'"),
        ("spec.generation.topP", 1.5, "spec.generation.topP: must be <= 1.0 (got 1.5)"),
        ("spec.iterations", 0, "spec.iterations: must be >= 1 (got 0)"),
    ],
)
def test_single_field_errors_name_the_field_and_allowed_values(path, value, expected):
    assert problems(with_change(path, value)) == [expected]


def test_micro_batch_must_divide_global_batch():
    [problem] = problems(with_change("spec.training.microBatchSize", 3))
    assert problem.startswith("spec.training.globalBatchSize: must be a multiple of microBatchSize x nprocPerNode x nodes")
    assert "3 x 2 x 1 = 6 (got 8)" in problem


def test_prompt_length_must_leave_room_for_the_response():
    data = with_change("spec.training.maxPromptLength", 2048)
    [problem] = problems(data)
    assert problem.startswith("spec.training.maxPromptLength: must be less than training.maxLength (2048)")


def test_per_iteration_prompts_need_one_set_per_round():
    [problem] = problems(with_change("spec.prompts.perIteration", [{"dataset": "a"}]))
    assert problem == "spec.prompts.perIteration: must list one prompt set per round: 2 (spec.iterations), got 1"


def test_length_penalty_only_with_its_strategy():
    [problem] = problems(with_change("spec.pairing.lengthPenalty", 0.01))
    assert problem.startswith("spec.pairing.lengthPenalty: is only used by strategy max_min_length_penalty")


def test_unknown_field_is_rejected_with_a_suggestion():
    [problem] = problems(with_change("spec.generation.samplesPerPromt", 4))
    assert problem.startswith("spec.generation.samplesPerPromt: unknown field (did you mean 'samplesPerPrompt'?)")
    assert "allowed fields:" in problem


def test_unknown_field_inside_a_list_item():
    [problem] = problems(with_change("spec.prompts.perIteration", [{"dataset": "a", "splt": "x"}, {"dataset": "b"}]))
    assert problem.startswith("spec.prompts.perIteration.0.splt: unknown field (did you mean 'split'?)")


def test_missing_required_fields_and_wrong_kind_are_all_reported():
    data = copy.deepcopy(VALID)
    data["kind"] = "DPORun"
    del data["spec"]["reward"]
    found = problems(data)
    assert "kind: unknown value 'DPORun'; allowed: 'IterativeDPORun'" in found
    assert "spec.reward: required field is missing" in found


def test_bad_name_is_rejected():
    found = problems(with_change("metadata.name", "My_Run"))
    assert len(found) == 1 and found[0].startswith("metadata.name: must be lowercase letters")


def test_relative_paths_resolve_against_the_run_file(tmp_path: Path):
    data = with_change("spec.policy.model", "./models/policy")
    data["spec"]["storage"] = {"root": "../out"}
    run_file = tmp_path / "sub" / "run.yaml"
    run_file.parent.mkdir()
    run_file.write_text(yaml.safe_dump(data))
    run = load_run(run_file)
    assert run.spec.policy.model == str(tmp_path / "sub" / "models" / "policy")
    assert run.spec.storage.root == str(tmp_path / "out")
    assert run.spec.reward.model == "org/reward-model"  # a hub id stays as written


def test_unreadable_and_multi_document_files(tmp_path: Path):
    with pytest.raises(SpecError, match="cannot read the file"):
        load_run(tmp_path / "missing.yaml")
    two = tmp_path / "two.yaml"
    two.write_text(yaml.safe_dump(VALID) + "---\n" + yaml.safe_dump(VALID))
    with pytest.raises(SpecError, match="a second YAML document"):
        load_run(two)


def test_spec_hash_changes_with_the_spec():
    assert parse_run(VALID).spec_hash() == parse_run(copy.deepcopy(VALID)).spec_hash()
    assert parse_run(VALID).spec_hash() != parse_run(with_change("spec.iterations", 3)).spec_hash()


def test_a_recipe_with_rounds_added_extends_the_old_one_and_nothing_else_does():
    two, four = parse_run(VALID), parse_run(with_change("spec.iterations", 4))
    assert four.extended_from(two.spec_hash()) == 2
    assert four.spec_hash(rounds=4) == four.spec_hash()
    assert two.extended_from(four.spec_hash()) is None  # fewer rounds is another recipe
    assert two.extended_from(two.spec_hash()) is None  # the same recipe is not an extension
    other = with_change("spec.iterations", 4)
    other["spec"]["generation"] = {"seed": 1}
    assert parse_run(other).extended_from(two.spec_hash()) is None


def test_per_round_prompt_sets_extend_only_when_the_old_rounds_keep_theirs():
    def run(*sets):
        data = with_change("spec.iterations", len(sets))
        data["spec"]["prompts"] = {"perIteration": [{"dataset": d} for d in sets]}
        return parse_run(data)

    old = run("org/a", "org/b").spec_hash()
    assert run("org/a", "org/b", "org/c").extended_from(old) == 2
    assert run("org/a", "org/x", "org/c").extended_from(old) is None  # round 2's prompts changed


def test_prompts_need_a_dataset_or_per_iteration_sets():
    data = copy.deepcopy(VALID)
    data["spec"]["prompts"] = {"maxPrompts": 5}
    assert problems(data) == ["spec.prompts.dataset: is required unless prompts.perIteration lists the prompt sets"]
    data["spec"]["prompts"] = {"perIteration": [{"dataset": "a"}, {"dataset": "./b"}]}
    run = parse_run(data)
    assert run.spec.prompts_for(2).dataset == "./b"


def test_reward_batch_budget_must_fit_the_longest_conversation():
    parse_run(with_change("spec.reward.maxLength", 8192))  # the default budget (16384) fits it
    [problem] = problems(with_change("spec.reward.batchTokens", 1024))
    assert problem == (
        "spec.reward.batchTokens: must be at least reward.maxLength (4096) so that the longest "
        "conversation fits in one forward pass (got 1024)"
    )


def test_zero_stage_0_needs_fp32():
    data = with_change("spec.training.zeroStage", 0)
    [problem] = problems(data)
    assert problem.startswith("spec.training.zeroStage: 0 keeps no readable fp32 master weights under precision 'bf16'")
    data["spec"]["training"]["precision"] = "fp32"
    parse_run(data)


def test_reward_kind_verifiable_loads_no_model_and_needs_gold_answers():
    data = copy.deepcopy(VALID)
    data["spec"]["reward"] = {"kind": "verifiable"}
    assert problems(data) == ["spec.prompts.answerField: is required by reward kind verifiable, which checks each "
                              "response against its prompt's gold answer"]  # fmt: skip
    data["spec"]["prompts"]["answerField"] = "answer"
    run = parse_run(data)
    assert not run.spec.reward.loads_model and run.spec.reward.rule.correct == 1.0 and run.spec.reward.rule.no_answer == -1.0
    data["spec"]["reward"]["model"] = "org/rm"
    assert problems(data) == ["spec.reward.kind: verifiable reads no reward.model (it scores by rule): remove reward.model"]
    bt = copy.deepcopy(VALID)
    bt["spec"]["reward"]["verifiable"] = {"correct": 2.0}
    assert problems(bt) == ["spec.reward.verifiable: is only used by kind verifiable (kind is 'bradley-terry')"]


def test_per_round_prompt_sets_each_need_their_gold_answers_under_verifiable():
    data = copy.deepcopy(VALID)
    data["spec"]["iterations"] = 2
    data["spec"]["reward"] = {"kind": "verifiable"}
    data["spec"]["prompts"] = {"perIteration": [{"dataset": "org/a", "answerField": "answer"}, {"dataset": "org/b"}]}
    [problem] = problems(data)
    assert problem.startswith("spec.prompts.answerField: is required by reward kind verifiable") and "every" in problem


def test_the_reward_pod_asks_for_no_gpu_when_the_kind_loads_no_model():
    from iterdpo.stages import REWARD, SERVER_TABLE

    REWARD_SERVER_POD = SERVER_TABLE[REWARD].pod
    data = copy.deepcopy(VALID)
    assert REWARD_SERVER_POD.default_gpus(parse_run(data).spec) == 1
    data["spec"]["reward"] = {"kind": "verifiable"}
    data["spec"]["prompts"]["answerField"] = "answer"
    assert REWARD_SERVER_POD.default_gpus(parse_run(data).spec) == 0


def test_the_judge_pod_asks_for_a_gpu_only_when_the_judge_loads_a_model():
    from iterdpo.stages import JUDGE, SERVER_TABLE

    judge_pod = SERVER_TABLE[JUDGE].pod
    data = copy.deepcopy(VALID)
    assert judge_pod.default_gpus(parse_run(data).spec) == 0  # no evaluation: no judge
    data["spec"]["evaluation"] = {"prompts": {"dataset": "./held-out.jsonl", "answerField": "answer"},
                                  "judge": {"model": "./gold"}}
    assert judge_pod.default_gpus(parse_run(data).spec) == 1
    data["spec"]["evaluation"]["judge"] = {"kind": "verifiable"}
    assert judge_pod.default_gpus(parse_run(data).spec) == 0


def _composite(*components) -> dict:
    data = copy.deepcopy(VALID)
    data["spec"]["reward"] = {"kind": "composite", "components": list(components)}
    return data


def test_a_composite_reward_lists_its_terms_each_checked():
    rm = {"name": "rm", "kind": "bradley-terry", "model": "org/rm"}
    length = {"name": "len", "kind": "length", "weight": -0.01}
    run = parse_run(_composite(rm, length))
    assert run.spec.reward.loads_model and not run.spec.reward.checks_answers
    assert run.spec.reward.components[1].as_reward(run.spec.reward).kind == "length"
    assert problems(_composite({"name": "rm", "kind": "bradley-terry"}, length)) == [
        "spec.reward.components: [0] (rm): kind bradley-terry needs its model"]
    assert problems(_composite(rm, {**length, "model": "org/x"})) == [
        "spec.reward.components: [1] (len): kind length reads no model: remove model"]
    assert problems(_composite(rm, {**rm, "model": "org/other"})) == [
        "spec.reward.components: [0]: the name 'rm' is used twice"]
    assert problems(_composite(rm, {**length, "verifiable": {"correct": 2}})) == [
        "spec.reward.components: [1] (len): verifiable is only used by kind verifiable"]
    [bad_name] = problems(_composite({**rm, "name": "RM_1"}))
    assert bad_name.startswith("spec.reward.components.0.name: must be a name of lowercase letters")
    [nested] = problems(_composite({**rm, "kind": "composite"}))
    assert nested.startswith("spec.reward.components.0.kind: unknown value 'composite'")


def test_composite_needs_components_and_only_composite_has_them():
    data = _composite()
    del data["spec"]["reward"]["components"]
    assert problems(data) == ["spec.reward.components: is required by kind composite (its weighted terms)"]
    bt = copy.deepcopy(VALID)
    bt["spec"]["reward"]["components"] = [{"name": "len", "kind": "length"}]
    assert problems(bt) == ["spec.reward.components: is only used by kind composite (kind is 'bradley-terry')"]
    withmodel = _composite({"name": "len", "kind": "length"})
    withmodel["spec"]["reward"]["model"] = "org/rm"
    assert problems(withmodel) == ["spec.reward.kind: composite reads no reward.model (its components name their "
                                   "models): remove reward.model"]  # fmt: skip


def test_length_is_a_term_not_a_reward_and_a_verifiable_term_needs_gold_answers():
    data = copy.deepcopy(VALID)
    data["spec"]["reward"] = {"kind": "length"}
    assert problems(data) == ["spec.reward.kind: length is a term of a composite reward (a length penalty), not a "
                              "reward on its own: use kind composite with a length component"]  # fmt: skip
    mixed = _composite({"name": "rm", "kind": "bradley-terry", "model": "org/rm"}, {"name": "math", "kind": "verifiable"})
    [problem] = problems(mixed)
    assert problem.startswith("spec.prompts.answerField: is required by reward kind verifiable")
    mixed["spec"]["prompts"]["answerField"] = "answer"
    assert parse_run(mixed).spec.reward.checks_answers


def test_a_reward_pod_of_rules_only_asks_for_no_gpu():
    from iterdpo.stages import REWARD, SERVER_TABLE

    REWARD_SERVER_POD = SERVER_TABLE[REWARD].pod
    data = _composite({"name": "math", "kind": "verifiable"}, {"name": "len", "kind": "length", "weight": -0.01})
    data["spec"]["prompts"]["answerField"] = "answer"
    assert REWARD_SERVER_POD.default_gpus(parse_run(data).spec) == 0


def test_multi_objective_reads_a_model_and_only_it_weighs_objectives():
    data = copy.deepcopy(VALID)
    data["spec"]["reward"] = {"kind": "multi-objective", "model": "RLHFlow/ArmoRM-Llama3-8B-v0.1",
                              "objectiveWeights": {"helpsteer-correctness": 1.0, "helpsteer-verbosity": -0.5}}  # fmt: skip
    run = parse_run(data)
    assert run.spec.reward.loads_model and run.spec.reward.objective_weights["helpsteer-verbosity"] == -0.5
    del data["spec"]["reward"]["model"]
    assert problems(data)[0].startswith("spec.reward.model: is required unless reward.training trains")
    data["spec"]["reward"]["training"] = {"base": "org/base", "data": {"dataset": "org/prefs"}}
    assert problems(data) == ["spec.reward.training: trains a bradley-terry or pairwise model, not a multi-objective "
                              "one: use one of those kinds, or name the multi-objective model in reward.model"]  # fmt: skip
    bt = copy.deepcopy(VALID)
    bt["spec"]["reward"]["objectiveWeights"] = {"x": 1.0}
    assert problems(bt) == ["spec.reward.objectiveWeights: is only used by kind multi-objective (kind is 'bradley-terry')"]


def test_pairwise_picks_pairs_by_selection_and_only_it_does():
    data = copy.deepcopy(VALID)
    data["spec"]["reward"] = {"kind": "pairwise", "model": "RLHFlow/pair-preference-model-LLaMA3-8B"}
    data["spec"]["pairing"] = {"selection": "all-pairs"}
    assert parse_run(data).spec.pairing.selection == "all-pairs"
    data["spec"]["pairing"]["strategy"] = "max_random"
    assert problems(data) == ["spec.pairing.selection: kind pairwise picks each pair by pairing.selection, so "
                              "pairing.strategy ('max_random') would not be used: remove it"]  # fmt: skip
    bt = copy.deepcopy(VALID)
    bt["spec"]["pairing"] = {"selection": "bracket"}
    assert problems(bt) == ["spec.pairing.selection: is only used by reward kind pairwise (kind is 'bradley-terry')"]
    [bad] = problems({**data, "spec": {**data["spec"], "pairing": {"selection": "swiss"}}})
    assert bad.startswith("spec.pairing.selection: unknown value 'swiss'; allowed: 'bracket', 'knockout-random'")
    composite = copy.deepcopy(VALID)
    composite["spec"]["reward"] = {"kind": "composite", "components": [{"name": "pm", "kind": "pairwise", "model": "org/pm"}]}
    assert problems(composite)[0].startswith("spec.reward.components.0.kind: unknown value 'pairwise'")


def test_reward_training_trains_a_pairwise_model_without_margins():
    data = copy.deepcopy(VALID)
    data["spec"]["reward"] = {"kind": "pairwise", "training": {"base": "org/base", "data": {"dataset": "org/prefs"}}}
    run = parse_run(data)
    assert run.spec.reward.compares and run.spec.reward.training.base == "org/base"
    data["spec"]["reward"]["training"]["data"]["marginField"] = "margin"
    assert problems(data) == ["spec.reward.training.data.marginField: is a Bradley-Terry margin; kind pairwise trains "
                              "on which side won, not by how much: remove it"]  # fmt: skip
    data["spec"]["reward"]["model"] = "org/pm"
    del data["spec"]["reward"]["training"]["data"]["marginField"]
    assert problems(data)[0].startswith("spec.reward.training: trains the reward model every round scores with, so "
                                        "reward.model ('org/pm') would not be used")  # fmt: skip


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml")),
                         ids=lambda p: p.name)  # fmt: skip
def test_every_example_run_file_is_valid(path):
    runs = [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == "IterativeDPORun"]
    for data in runs:
        parse_run(data)
    assert runs or path.name == "tiny-k8s-assets.yaml"  # that one holds the volume and the asset Job


@pytest.mark.parametrize("which", ["trained", "composite"])
def test_every_path_field_written_relative_resolves_against_the_run_file(tmp_path: Path, which):
    """path_fields lists every path a run reads; each one written as ./ resolves (none forgotten)."""
    spec = {
        "iterations": 2, "policy": {"model": "./policy"}, "storage": {"root": "./runs"},
        "evaluation": {"prompts": {"dataset": "./held-out.jsonl"}},
    }  # fmt: skip
    if which == "trained":
        spec["policy"]["sft"] = {"data": {"dataset": "./chat.jsonl"}}
        spec["reward"] = {"maxLength": 256, "batchTokens": 4096,
                          "training": {"base": "./base", "data": {"dataset": "./prefs.jsonl"}}}  # fmt: skip
        spec["prompts"] = {"perIteration": [{"dataset": "./p1.jsonl"}, {"dataset": "./p2.jsonl"}]}
        spec["evaluation"]["judge"] = {"kind": "composite", "components": [
            {"name": "gold", "kind": "bradley-terry", "model": "./gold"}, {"name": "len", "kind": "length"}]}
    else:
        spec["reward"] = {"kind": "composite", "components": [
            {"name": "rm", "kind": "bradley-terry", "model": "./rm"}, {"name": "len", "kind": "length"}]}
        spec["prompts"] = {"dataset": "./prompts.jsonl"}
        spec["evaluation"]["judge"] = {"model": "./gold"}
    run_file = tmp_path / "run.yaml"
    run_file.write_text(yaml.safe_dump({"apiVersion": "iterdpo.io/v1alpha1", "kind": "IterativeDPORun",
                                        "metadata": {"name": "paths"}, "spec": spec}))  # fmt: skip
    fields = load_run(run_file).spec.path_fields()
    assert len(fields) == (9 if which == "trained" else 6)
    for field, _, value in fields:
        assert value.startswith(str(tmp_path) + "/"), (field, value)
