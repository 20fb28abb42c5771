"""The generated CRD (crds/iterativedporuns.iterdpo.io.yaml) on a real API server: it
installs, `kubectl explain` shows the model's descriptions, the API server fills the
model's defaults and rejects what the model rejects (schema, bounds, CEL cross-field
rules, metadata.name), naming the field; status is a subresource; the printer columns show.

Every rejected case is also checked against the pydantic model, so the CRD and
`iterdpo validate` blame the same field."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml
from clusterutil import wait_for
from kubernetes import client
from kubernetes.client.rest import ApiException

from iterdpo.crd import GROUP, NAME, PLURAL, VERSION
from iterdpo.runfile import SpecError, parse_run
from iterdpo.spec import IterativeDPORun
from iterdpo.stages import GenerationFigures, ScoringFigures
from iterdpo.status import RunStatus, accepted, stage_finished, stage_started

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / f"{NAME}.yaml"


def tiny_run(name: str = "tiny") -> dict:
    """examples/tiny-local.yaml with its ./ paths made absolute (a cluster has no run file folder)."""
    data = yaml.safe_load((ROOT / "examples" / "tiny-local.yaml").read_text())
    spec = data["spec"]
    spec["policy"]["model"] = "/iterdpo/tiny/policy"
    spec["reward"]["training"]["base"] = "/iterdpo/tiny/policy"
    spec["reward"]["training"]["data"]["dataset"] = "/iterdpo/tiny/preferences.jsonl"
    for i, source in enumerate(spec["prompts"]["perIteration"], 1):
        source["dataset"] = f"/iterdpo/tiny/prompts-iter{i}.jsonl"
    spec["evaluation"]["prompts"]["dataset"] = "/iterdpo/tiny/eval-prompts.jsonl"
    spec["evaluation"]["judge"]["model"] = "/iterdpo/tiny/reward"
    data["metadata"] = {"name": name}
    return data


def minimal_run(name: str = "minimal") -> dict:
    return {
        "apiVersion": "iterdpo.io/v1alpha1",
        "kind": "IterativeDPORun",
        "metadata": {"name": name},
        "spec": {"policy": {"model": "org/sft"}, "prompts": {"dataset": "org/prompts"}, "reward": {"model": "org/rm"}},
    }


@pytest.fixture(scope="module")
def crd(control_plane):
    control_plane.kubectl("apply", "--server-side", "-f", str(CRD_FILE))
    control_plane.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{NAME}")
    return control_plane


def custom(cluster) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(cluster.api_client)


def create(cluster, ns: str, body: dict, **kwargs) -> dict:
    return custom(cluster).create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body, **kwargs)


def rejection(cluster, ns: str, body: dict, **kwargs) -> dict:
    """The API server's Status for a create that must fail with 422 Invalid."""
    with pytest.raises(ApiException) as info:
        create(cluster, ns, body, **kwargs)
    assert info.value.status == 422, info.value.body
    return json.loads(info.value.body)


def model_problems(body: dict) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_run(body)
    return info.value.problems


def test_crd_is_established_with_its_names(crd):
    obj = json.loads(crd.kubectl("get", "crd", NAME, "-o", "json").stdout)
    conditions = {c["type"]: c["status"] for c in obj["status"]["conditions"]}
    assert conditions["Established"] == "True" and conditions["NamesAccepted"] == "True"
    assert "NonStructuralSchema" not in conditions
    names = obj["status"]["acceptedNames"]
    assert (names["kind"], names["plural"], names["singular"]) == ("IterativeDPORun", "iterativedporuns", "iterativedporun")
    assert names["shortNames"] == ["idr", "dporun"] and names["categories"] == ["iterdpo"]


def test_kubectl_explain_shows_the_model_descriptions(crd):
    def explain():  # the OpenAPI v3 document of a new CRD is published a moment after Established
        proc = crd.kubectl("explain", "iterativedporun.spec.generation", check=False)
        return proc.stdout if proc.returncode == 0 else None

    out = wait_for("kubectl explain iterativedporun.spec.generation", explain, crd, timeout=30)
    assert "Sampling K responses per prompt with vLLM." in out
    assert "samplesPerPrompt" in out and "Responses sampled per prompt (K); pairing needs at least 2." in out
    assert "Skip vLLM's graph compilation" in " ".join(out.split())
    field = crd.kubectl("explain", "idr.spec.kubernetes.launcher").stdout
    assert "How training runs: pytorchjob" in " ".join(field.split())


def test_valid_run_is_accepted_and_defaults_are_filled(crd, ns):
    body = tiny_run()
    del body["spec"]["generation"]["samplesPerPrompt"]
    crd.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(body))
    got = json.loads(crd.kubectl("get", "idr", "tiny", "-n", ns, "-o", "json").stdout)
    spec = got["spec"]
    assert spec["generation"]["samplesPerPrompt"] == 8
    assert spec["generation"]["maxNewTokens"] == 24  # given values are kept
    assert spec["kubernetes"]["launcher"] == "pytorchjob"
    assert spec["kubernetes"]["volume"] == {"mountPath": "/iterdpo"}
    assert spec["kubernetes"]["resources"] == {"sft": {}, "rm": {}, "generate": {}, "reward": {}, "annotate": {}, "train": {},
                                              "judge": {}, "evaluate": {}}
    assert spec["prompts"]["perIteration"][0] == {"dataset": "/iterdpo/tiny/prompts-iter1.jsonl", "split": "train",
                                                  "messagesField": "messages"}  # fmt: skip
    assert spec["reward"]["requestBatchSize"] == 64
    # what the operator reads back is the run the model makes of the user's file
    assert IterativeDPORun.model_validate({k: got[k] for k in ("apiVersion", "kind", "spec")} | {
        "metadata": {"name": "tiny"}}).spec == IterativeDPORun.model_validate(body).spec  # fmt: skip


def test_api_server_fills_every_default_the_model_fills(crd, ns):
    """The defaults live in the CRD (default: {} on objects), not only in the operator."""
    got = create(crd, ns, minimal_run())
    model = IterativeDPORun.model_validate(minimal_run()).spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    # lists and maps the model defaults to empty are left unset on the server (unset means empty)
    expected = copy.deepcopy(model)
    for section, key in (("generation", "stop"), ("generation", "stopTokenIds"), ("kubernetes", "nodeSelector"),
                         ("kubernetes", "tolerations")):  # fmt: skip
        assert expected[section].pop(key) in ([], {})
    assert got["spec"] == expected


# (what to change, the field the API server and the model both blame, text in the API server's message)
EVAL = {"prompts": {"dataset": "/iterdpo/tiny/eval-prompts.jsonl"}}  # a spec.evaluation
JUDGE = {"model": "/iterdpo/tiny/reward", "maxLength": 256}  # its judge
INVALID = {
    "enum": (
        {"pairing": {"strategy": "best_worst"}},
        "spec.pairing.strategy",
        'supported values: "max_min", "max_random", "max_max", "random", "max_min_length_penalty"',
    ),
    "bound": ({"generation": {"samplesPerPrompt": 1}}, "spec.generation.samplesPerPrompt", "greater than or equal to 2"),
    "exclusive bound": ({"generation": {"topP": 0}}, "spec.generation.topP", "greater than 0"),
    "fractional exclusive bound": (
        {"training": {"loss": {"labelSmoothing": 0.5}}},
        "spec.training.loss.labelSmoothing",
        "must be < 0.5",
    ),
    "globalBatchSize": (
        {"training": {"globalBatchSize": 12}},
        "spec.training.globalBatchSize",
        "must be a multiple of microBatchSize x nprocPerNode x nodes",
    ),
    "zeroStage": (
        {"training": {"zeroStage": 0, "precision": "bf16"}},
        "spec.training.zeroStage",
        "0 keeps no readable fp32 master weights under precision 'bf16'",
    ),
    "maxPromptLength": (
        {"training": {"maxPromptLength": 128}},
        "spec.training.maxPromptLength",
        "must be less than training.maxLength to leave room for the response",
    ),
    "batchTokens": ({"reward": {"batchTokens": 128}}, "spec.reward.batchTokens", "must be at least reward.maxLength"),
    "perIteration length": (
        {"iterations": 2},
        "spec.prompts.perIteration",
        "must list one prompt set per round: as many as spec.iterations",
    ),
    "prompts required": (
        {"prompts": {"perIteration": None}},
        "spec.prompts.dataset",
        "is required unless prompts.perIteration lists the prompt sets",
    ),
    "launcher job": (
        {"kubernetes": {"launcher": "job"}, "training": {"nodes": 2}},
        "spec.kubernetes.launcher",
        "job runs training on one node: set training.nodes to 1 or use pytorchjob",
    ),
    "lengthPenalty": (
        {"pairing": {"lengthPenalty": 0.01}},
        "spec.pairing.lengthPenalty",
        "is only used by strategy max_min_length_penalty (strategy is 'max_min')",
    ),
    # What iterdpo validate refuses locally, the API server refuses too (issue 10).
    "quoted number": ({"generation": {"samplesPerPrompt": "8"}}, "spec.generation.samplesPerPrompt", "must be of type integer"),
    "seed range": ({"generation": {"seed": 2**32}}, "spec.generation.seed", "less than or equal to 4294967295"),
    "quantity": ({"kubernetes": {"resources": {"train": {"memory": "64 GB"}}}}, "spec.kubernetes.resources.train.memory",
                 "should match"),
    "claim name": ({"kubernetes": {"volume": {"claimName": "My_Claim"}}}, "spec.kubernetes.volume.claimName", "should match"),
    "toleration": ({"kubernetes": {"tolerations": [{"operator": "Exists", "value": "x"}]}}, "spec.kubernetes.tolerations",
                   "operator Exists takes no value"),
    "maxModelLen": ({"generation": {"maxModelLen": 48}}, "spec.generation.maxModelLen",
                    "must be more than training.maxPromptLength"),
    # spec.reward.training (the RewardModel stage)
    "reward model and training": ({"reward": {"model": "/iterdpo/tiny/reward"}}, "spec.reward.training",
                                  "remove reward.model (the base to train"),
    "reward model required": ({"reward": {"training": None}}, "spec.reward.model",
                              "is required unless reward.training trains the reward model"),
    "rm globalBatchSize": ({"reward": {"training": {"globalBatchSize": 12}}}, "spec.reward.training.globalBatchSize",
                           "must be a multiple of microBatchSize x nprocPerNode x nodes"),
    "rm zeroStage": ({"reward": {"training": {"zeroStage": 0, "precision": "bf16"}}}, "spec.reward.training.zeroStage",
                     "0 keeps no readable fp32 master weights"),
    "held-out share and split": ({"reward": {"training": {"heldOutSplit": "test"}}},
                                 "spec.reward.training.heldOutSplit", "names the held-out pairs"),
    "preference fields": ({"reward": {"training": {"data": {"rejectedField": "chosen"}}}},
                          "spec.reward.training.data.rejectedField", "must name different fields"),
    "rm launcher job": ({"kubernetes": {"launcher": "job"}, "reward": {"training": {"nodes": 2}}},
                        "spec.reward.training.nodes", "launcher job trains on one node"),
    # reward kind verifiable (issue 13)
    "verifiable loads no model": ({"reward": {"kind": "verifiable"}, "prompts": {"perIteration": [
        {"dataset": f"/iterdpo/tiny/prompts-iter{i}.jsonl", "answerField": "answer"} for i in (1, 2, 3)]}},
        "spec.reward.kind", "read reward.model and reward.training"),
    "verifiable needs answers": ({"reward": {"kind": "verifiable", "training": None}}, "spec.prompts.answerField",
                                 "is required by reward kind verifiable"),
    "verifiable settings unused": ({"reward": {"verifiable": {"correct": 2.0}}}, "spec.reward.verifiable",
                                   "is only used by kind verifiable (kind is 'bradley-terry')"),
    "composite term without its model": ({"reward": {"kind": "composite", "training": None, "components": [
        {"name": "rm", "kind": "bradley-terry"}, {"name": "len", "kind": "length", "weight": -0.01}]}},
        "spec.reward.components", "each component names a model exactly when its kind reads one"),
    "composite names twice": ({"reward": {"kind": "composite", "training": None, "components": [
        {"name": "len", "kind": "length"}, {"name": "len", "kind": "length", "weight": -0.01}]}},
        "spec.reward.components", "has a name of its own"),
    "length alone": ({"reward": {"kind": "length", "training": None}}, "spec.reward.kind",
                     "length is only a term of a composite reward"),
    "objective weights unused": ({"reward": {"objectiveWeights": {"helpsteer-correctness": 1.0}}},
                                 "spec.reward.objectiveWeights", "is only used by kind multi-objective (kind is 'bradley-terry')"),
    "multi-objective trained": ({"reward": {"kind": "multi-objective"}}, "spec.reward.training",
                                "(kind bradley-terry or pairwise)"),
    "pairwise trained with margins": ({"reward": {"kind": "pairwise", "training": {"data": {"marginField": "margin"}}}},
                                      "spec.reward.training.data.marginField", "kind pairwise trains on which side won"),
    "selection without pairwise": ({"pairing": {"selection": "bracket"}}, "spec.pairing.selection",
                                   "is only used by reward kind pairwise"),
    # spec.evaluation (issue 14): the judge's rules are the reward's, blamed under evaluation.judge
    "judge batchTokens": ({"evaluation": {**EVAL, "judge": {**JUDGE, "batchTokens": 128}}},
                          "spec.evaluation.judge.batchTokens", "must be at least judge.maxLength"),
    "judge components": ({"evaluation": {**EVAL, "judge": {"kind": "composite"}}}, "spec.evaluation.judge.components",
                         "is required by kind composite"),
    "judge objectiveWeights": ({"evaluation": {**EVAL, "judge": {**JUDGE, "objectiveWeights": {"x": 1.0}}}},
                               "spec.evaluation.judge.objectiveWeights", "is only used by kind multi-objective"),
    "judge verifiable settings": ({"evaluation": {**EVAL, "judge": {**JUDGE, "verifiable": {"correct": 2.0}}}},
                                  "spec.evaluation.judge.verifiable", "is only used by kind verifiable"),
    "judge model": ({"evaluation": {**EVAL, "judge": {"kind": "bradley-terry"}}}, "spec.evaluation.judge.model",
                    "a judge is given, not trained"),
    "judge trained": ({"evaluation": {**EVAL, "judge": {**JUDGE, "training": {
        "base": "/iterdpo/tiny/policy", "data": {"dataset": "/iterdpo/tiny/preferences.jsonl"}}}}},
        "spec.evaluation.judge.training", "a judge is given, not trained"),
    "judge verifiable with a model": ({"evaluation": {"prompts": {**EVAL["prompts"], "answerField": "answer"},
                                                      "judge": {"kind": "verifiable", "model": JUDGE["model"]}}},
                                      "spec.evaluation.judge.kind", "read a model"),
    "select judge-reward without a judge": ({"evaluation": {**EVAL, "select": "judge-reward"}},
                                            "spec.evaluation.select", "judge-reward needs a judge"),
    "rollback without a best round": ({"evaluation": {**EVAL, "rollback": True}}, "spec.evaluation.rollback",
                                      "rollback needs a best round to go back to"),
    "falling rounds without a judge": ({"evaluation": {**EVAL, "gates": {"judgeRewardFallingRounds": 2}}},
                                       "spec.evaluation.gates.judgeRewardFallingRounds", "needs a judge"),
    "verifiable judge needs answers": ({"evaluation": {**EVAL, "judge": {"kind": "verifiable"}}},
                                       "spec.evaluation.prompts.answerField", "evaluation.judge is verifiable"),
}  # fmt: skip


def _merge(base: dict, change: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in change.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_run_is_rejected_naming_the_field(crd, ns, case):
    change, field, text = INVALID[case]
    body = tiny_run()
    if "evaluation" in change or "kind" in change.get("reward", {}):  # its own spec.evaluation, or
        del body["spec"]["evaluation"]  # a reward kind whose rules reach into the demo's (answerField)
    body["spec"] = _merge(body["spec"], change)
    if case == "prompts required":
        body["spec"]["prompts"] = {"split": "train"}
    status = rejection(crd, ns, body)
    causes = [c for c in status["details"]["causes"] if "rules were not checked" not in c["message"]]
    assert [c["field"] for c in causes] == [field], status["message"]
    assert text in causes[0]["message"], causes[0]["message"]
    # the model blames the same field
    assert any(p.startswith(f"{field}:") for p in model_problems(body)), model_problems(body)


def test_rules_pass_when_satisfied(crd, ns):
    """The other side of each rule: values the model accepts, the API server accepts."""
    body = tiny_run("edges")
    body["spec"] = _merge(body["spec"], {
        "training": {"globalBatchSize": 16, "nodes": 2, "zeroStage": 0, "precision": "fp32", "maxPromptLength": 127,
                     "loss": {"labelSmoothing": 0}},  # an integer: kube-openapi would compare it with int64(0.5)
        "reward": {"batchTokens": 256},
        "pairing": {"strategy": "max_min_length_penalty", "lengthPenalty": 0.01},
        "evaluation": {**EVAL, "judge": {**JUDGE, "batchTokens": 256}, "select": "judge-reward",
                       "gates": {"judgeRewardFallingRounds": 1, "minWinRate": 0, "maxKl": 0}, "rollback": True},
    })  # fmt: skip
    IterativeDPORun.model_validate(body)
    create(crd, ns, body)
    body = minimal_run("single-dataset")  # prompts.dataset alone; job launcher on one node
    body["spec"]["kubernetes"] = {"launcher": "job"}
    create(crd, ns, body)
    body = minimal_run("rule-reward")  # kind verifiable: no reward model, gold answers in the prompt set
    body["spec"]["reward"] = {"kind": "verifiable", "verifiable": {"answerFormat": "any"}}
    body["spec"]["prompts"]["answerField"] = "answer"
    IterativeDPORun.model_validate(body)
    create(crd, ns, body)
    body = minimal_run("pairwise")  # a pairwise judge, pairs from a bracket
    body["spec"]["reward"] = {"kind": "pairwise", "model": "org/pm"}
    body["spec"]["pairing"] = {"selection": "bracket"}
    IterativeDPORun.model_validate(body)
    create(crd, ns, body)
    body = tiny_run("pairwise-trained")  # the RewardModel stage trains the pairwise judge
    body["spec"]["reward"]["kind"] = "pairwise"
    IterativeDPORun.model_validate(body)
    create(crd, ns, body)
    body = minimal_run("composite")  # a reward model, a rule and a length penalty, summed
    body["spec"]["reward"] = {"kind": "composite", "components": [
        {"name": "rm", "kind": "bradley-terry", "model": "org/rm"}, {"name": "math", "kind": "verifiable", "weight": 2},
        {"name": "len", "kind": "length", "weight": -0.01}]}  # fmt: skip
    body["spec"]["prompts"]["answerField"] = "answer"
    IterativeDPORun.model_validate(body)
    create(crd, ns, body)


@pytest.mark.parametrize(
    "name, text",
    [("a" * 41, "metadata.name must be at most 40 characters"), ("tiny.v2", "an RFC 1035 label"), ("1st-run", "starting with a letter")],
)
def test_bad_name_is_rejected(crd, ns, name, text):
    status = rejection(crd, ns, tiny_run(name))
    assert text in status["message"], status["message"]
    assert [c["field"] for c in status["details"]["causes"]] == ["metadata.name"], status["message"]
    assert any(p.startswith("metadata") for p in model_problems(tiny_run(name)))


def test_unknown_fields_are_rejected_when_strict_and_pruned_otherwise(crd, ns):
    body = tiny_run("unknown")
    body["spec"]["generation"]["samplez"] = 3
    with pytest.raises(ApiException) as info:
        create(crd, ns, body, field_validation="Strict")
    assert info.value.status == 400
    assert 'unknown field "spec.generation.samplez"' in json.loads(info.value.body)["message"]
    got = create(crd, ns, body)  # default (Warn): pruned, as extra=forbid cannot be in a CRD
    assert "samplez" not in got["spec"]["generation"]
    proc = crd.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(body | {"metadata": {"name": "unknown2"}}),
                       check=False)  # fmt: skip
    assert proc.returncode != 0 and "samplez" in proc.stderr  # kubectl validates strictly by default


def _status() -> RunStatus:
    status = accepted(RunStatus(), "0123456789abcdef", "2026-01-01T00:00:00Z")
    status = stage_started(status, 1, "Generate", "/iterdpo/tiny/policy", "2026-01-01T00:00:01Z")
    status = stage_finished(status, 1, "Generate", GenerationFigures(prompts=4, samples=32, seconds=2.5), "2026-01-01T00:00:02Z")
    status = stage_started(status, 1, "Score", "/iterdpo/tiny/policy", "2026-01-01T00:00:03Z")
    scoring = ScoringFigures(mean_reward=0.25, min_reward=-1.5, max_reward=2.0, pairs=3, ties_dropped=1,
                             prompts_left_out=0, seconds=1.0)  # fmt: skip
    status = stage_finished(status, 1, "Score", scoring, "2026-01-01T00:00:04Z")
    status = stage_started(status, 2, "Generate", "/iterdpo/runs/tiny/iter-1/policy", "2026-01-01T00:00:05Z")
    status = stage_finished(status, 2, "Generate", GenerationFigures(prompts=4, samples=32, seconds=2.5), "2026-01-01T00:00:06Z")
    status = stage_started(status, 2, "Score", "/iterdpo/runs/tiny/iter-1/policy", "2026-01-01T00:00:07Z")
    scoring = scoring.model_copy(update={"mean_reward": 0.75})
    status = stage_finished(status, 2, "Score", scoring, "2026-01-01T00:00:08Z")
    return status.model_copy(update={"observed_generation": 1, "current_attempt": 1, "attempt_limit": 3,
                                     "current_child": "tiny-i02-score"})  # fmt: skip


def test_status_is_a_subresource(crd, ns):
    api = custom(crd)
    obj = create(crd, ns, tiny_run())
    status = _status().to_json()
    obj["status"] = status
    written = api.replace_namespaced_custom_object_status(GROUP, VERSION, ns, PLURAL, "tiny", obj)
    assert written["status"] == status
    assert RunStatus.model_validate(written["status"]) == _status()
    # a write of the main resource ignores status (and bumps generation only for spec changes)
    written["status"] = {"phase": "Failed"}
    written["spec"]["suspend"] = True
    updated = api.replace_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "tiny", written)
    assert updated["status"] == status and updated["spec"]["suspend"] is True
    assert updated["metadata"]["generation"] == 2
    # a status write ignores spec
    updated["spec"]["suspend"] = False
    after = api.replace_namespaced_custom_object_status(GROUP, VERSION, ns, PLURAL, "tiny", updated)
    assert after["spec"]["suspend"] is True
    # status is validated against RunStatus' schema too
    after["status"]["phase"] = "Exploded"
    with pytest.raises(ApiException) as info:
        api.replace_namespaced_custom_object_status(GROUP, VERSION, ns, PLURAL, "tiny", after)
    assert info.value.status == 422 and "status.phase" in info.value.body


def test_printer_columns(crd, ns):
    api = custom(crd)
    obj = create(crd, ns, tiny_run())
    obj["status"] = _status().to_json()
    api.replace_namespaced_custom_object_status(GROUP, VERSION, ns, PLURAL, "tiny", obj)
    for resource in ("iterativedporuns", "idr", "dporun", "iterdpo"):
        lines = crd.kubectl("get", resource, "-n", ns).stdout.splitlines()
        assert lines[0].split() == ["NAME", "ROUND", "STAGE", "PHASE", "REWARD", "AGE"], lines
        name, *columns = lines[1].split()
        assert name.split("/")[-1] == "tiny" and columns[:4] == ["2", "Score", "Running", "0.75"], lines
