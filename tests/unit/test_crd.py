"""crds/iterativedporuns.iterdpo.io.yaml is generated from the spec model and must not drift:
a structural schema (every field typed and described, no $ref/anyOf), the model's defaults,
bounds and enums, and a CEL rule for each of the model's cross-field rules."""

from __future__ import annotations

import copy
import inspect
import re
from pathlib import Path

import pytest

from iterdpo import kubevalues
import yaml
from pydantic import BaseModel, Field

from iterdpo import crd
from iterdpo.spec import MAX_NAME_LENGTH, IterativeDPORun, IterativeDPORunSpec, nested_model

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = yaml.safe_load((ROOT / "examples" / "tiny-local.yaml").read_text())
MINIMAL = {"policy": {"model": "org/sft"}, "prompts": {"dataset": "org/prompts"}, "reward": {"model": "org/rm"}}


@pytest.fixture(scope="module")
def built() -> dict:
    return crd.build_crd()


@pytest.fixture(scope="module")
def root(built) -> dict:
    return built["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_committed_crd_matches_the_model():
    committed = (ROOT / crd.FILE).read_text()
    assert committed == crd.render(), f"crds/ is stale: regenerate with `{crd.REGENERATE}`"


def _nodes(schema: dict, path: str = ""):
    """(path, schema) of every property, list item and map value, depth first."""
    for key, sub in schema.get("properties", {}).items():
        yield f"{path}.{key}", sub
        yield from _nodes(sub, f"{path}.{key}")
    if "items" in schema:
        yield f"{path}[]", schema["items"]
        yield from _nodes(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield f"{path}{{}}", schema["additionalProperties"]
        yield from _nodes(schema["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize("section", ["spec", "status"])
def test_every_property_has_a_type_and_a_description(root, section):
    nodes = list(_nodes(root["properties"][section], section))
    assert len(nodes) > 30
    untyped = [p for p, s in nodes if "type" not in s]
    undescribed = [p for p, s in nodes if "description" not in s and not p.endswith(("[]", "{}"))]
    assert (untyped, undescribed) == ([], [])


def test_schema_uses_only_what_a_structural_crd_accepts(built):
    forbidden = {"$ref", "$defs", "anyOf", "allOf", "oneOf", "not", "const", "title", "nullable"}

    def walk(node, path="root"):
        if isinstance(node, dict):
            if not path.endswith(".properties"):  # there, keys are field names
                assert not forbidden & set(node), (path, forbidden & set(node))
            if "properties" in node:
                assert node.get("type") == "object" and "additionalProperties" not in node, path
            for key, value in node.items():
                walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]")

    walk(built)


def test_spec_properties_mirror_the_model_by_alias(root):
    def check(model: type[BaseModel], schema: dict, path: str):
        fields = {f.alias or n: f for n, f in model.model_fields.items()}
        assert list(schema["properties"]) == list(fields), path
        required = [k for k, f in fields.items() if f.is_required()]
        assert schema.get("required", []) == required, path
        for key, field in fields.items():
            nested, sub = nested_model(field.annotation), schema["properties"][key]
            if nested is not None and sub["type"] == "array":
                check(nested, sub["items"], f"{path}.{key}[]")
            elif nested is not None:
                check(nested, sub, f"{path}.{key}")

    check(IterativeDPORunSpec, root["properties"]["spec"], "spec")


def test_types_bounds_enums_and_defaults(root):
    spec = root["properties"]["spec"]["properties"]
    gen = spec["generation"]["properties"]
    assert gen["samplesPerPrompt"] == {**gen["samplesPerPrompt"], "type": "integer", "default": 8, "minimum": 2}
    assert {k: gen["topP"][k] for k in ("type", "minimum", "exclusiveMinimum", "maximum")} == {
        "type": "number", "minimum": 0.0, "exclusiveMinimum": True, "maximum": 1.0}  # fmt: skip
    assert "exclusiveMaximum" not in gen["topP"]
    assert gen["stopTokenIds"]["items"] == {"type": "integer", "minimum": 0, "maximum": 2**32 - 1}
    assert gen["maxModelLen"]["type"] == "integer" and "default" not in gen["maxModelLen"]  # int | None -> int
    training = spec["training"]["properties"]
    assert (training["zeroStage"]["type"], training["zeroStage"]["enum"]) == ("integer", [0, 1, 2, 3])
    assert training["precision"]["enum"] == ["bf16", "fp16", "fp32"]
    assert spec["pairing"]["properties"]["strategy"]["enum"][0] == "max_min"
    kube = spec["kubernetes"]["properties"]
    assert kube["nodeSelector"]["additionalProperties"] == {"type": "string", "pattern": kubevalues.LABEL_VALUE.pattern, "maxLength": 63}
    assert kube["nodeSelector"]["maxProperties"] == 64
    assert kube["hubTokenSecret"]["required"] == ["name"] and "default" not in kube["hubTokenSecret"]
    assert kube["stageRetries"]["maximum"] == 10
    assert spec["prompts"]["properties"]["perIteration"]["maxItems"] == 100
    assert root["properties"]["spec"]["required"] == ["policy", "prompts", "reward"]


def test_fractional_bound_is_checked_by_cel(root):
    """kube-openapi compares an integer value with int64(bound): `labelSmoothing: 0` would fail
    `maximum: 0.5, exclusiveMaximum: true`; CEL compares doubles."""
    smoothing = root["properties"]["spec"]["properties"]["training"]["properties"]["loss"]["properties"]["labelSmoothing"]
    assert smoothing["maximum"] == 0.5 and "exclusiveMaximum" not in smoothing
    assert smoothing["x-kubernetes-validations"] == [{"rule": "self < 0.5", "message": "must be < 0.5"}]


def _apply_defaults(value, schema):
    """What the API server's structural defaulting does (properties, items)."""
    if isinstance(value, dict) and "properties" in schema:
        out = dict(value)
        for key, sub in schema["properties"].items():
            if key not in out and "default" in sub:
                out[key] = copy.deepcopy(sub["default"])
            if key in out:
                out[key] = _apply_defaults(out[key], sub)
        return out
    if isinstance(value, list) and "items" in schema:
        return [_apply_defaults(v, schema["items"]) for v in value]
    return value


def _drop_empty_collections(model_dump: dict, schema: dict) -> dict:
    """The model's empty lists and maps are left unset in the CRD (unset means empty)."""
    out = {}
    for key, value in model_dump.items():
        sub = schema["properties"][key]
        if value in ([], {}) and "properties" not in sub:
            continue
        out[key] = _drop_empty_collections(value, sub) if isinstance(value, dict) and "properties" in sub else value
    return out


@pytest.mark.parametrize("spec", [MINIMAL, EXAMPLE["spec"]], ids=["minimal", "tiny-local"])
def test_defaults_are_the_models(root, spec):
    schema = root["properties"]["spec"]
    defaulted = _apply_defaults(copy.deepcopy(spec), schema)
    model = IterativeDPORunSpec.model_validate(spec).model_dump(mode="json", by_alias=True, exclude_none=True)
    assert defaulted == _drop_empty_collections(model, schema)


def test_each_cross_field_rule_has_a_cel_rule(root):
    """spec.RULES is the one declaration: the model checks each rule, the CRD carries it as CEL."""
    from iterdpo.spec import RULES

    assert len(RULES) == len({r.blames for r in RULES}) == 38
    assert "RULES" in inspect.getsource(IterativeDPORunSpec._cross_field)  # the model walks the same table
    for rule in RULES:
        node = root["properties"]["spec"]
        for part in filter(None, rule.at.split(".")):
            node = node["properties"][part]
        assert crd.rule_schema(rule) in node["x-kubernetes-validations"], rule
        target = node
        for part in rule.field.split("."):
            target = target["properties"][part]  # fieldPath names a real field
        assert rule.message and rule.reason in ("FieldValueInvalid", "FieldValueRequired")
        # the fields a rule reads, without a list macro's call (self.tolerations.all(t, ...))
        fields = {re.sub(r"\.(all|exists|exists_one)$", "", m) for m in re.findall(r"self\.([\w.]+)", rule.cel)}
        assert fields, rule
        for dotted in fields:  # every field a rule reads exists (and has a default, or is guarded by has())
            leaf = node
            for part in dotted.split("."):
                leaf = leaf["properties"][part]
            assert "default" in leaf or f"has(self.{dotted})" in rule.cel, (rule.cel, dotted)


RM = {"base": "/m/base", "data": {"dataset": "/d/prefs.jsonl"}}  # a spec.reward.training
SFT = {"data": {"dataset": "/d/chat.jsonl"}}  # a spec.policy.sft
EVAL = {"prompts": {"dataset": "/d/held-out.jsonl"}}  # a spec.evaluation


def test_each_rule_is_checked_by_the_model_and_blames_its_field():
    """Break each rule on a valid spec: the model's error names exactly the field the rule blames."""
    from iterdpo.runfile import SpecError, parse_run
    from iterdpo.spec import RULES

    breakers = {
        "training.globalBatchSize": {"training": {"globalBatchSize": 7, "microBatchSize": 2}},
        "training.zeroStage": {"training": {"zeroStage": 0, "precision": "bf16"}},
        "training.maxPromptLength": {"training": {"maxLength": 64, "maxPromptLength": 64}},
        "reward.batchTokens": {"reward": {"model": "/m/rm", "maxLength": 512, "batchTokens": 256}},
        "prompts.dataset": {"prompts": {"dataset": None}},
        "prompts.perIteration": {"prompts": {"perIteration": [{"dataset": "/p/a.jsonl"}]}, "iterations": 2},
        "kubernetes.launcher": {"kubernetes": {"launcher": "job"}, "training": {"nodes": 2}},
        "pairing.lengthPenalty": {"pairing": {"lengthPenalty": 0.1}},
        "generation.maxModelLen": {"generation": {"maxModelLen": 1000}, "training": {"maxPromptLength": 1000}},
        "kubernetes.tolerations": {"kubernetes": {"tolerations": [{"operator": "Exists", "value": "x"}]}},
        "reward.model": {"reward": {"model": None}},
        "reward.training": {"reward": {"training": RM}},
        "reward.training.globalBatchSize": {"reward": {"model": None, "training": {**RM, "globalBatchSize": 7,
                                                                                  "microBatchSize": 2}}},
        "reward.training.zeroStage": {"reward": {"model": None, "training": {**RM, "zeroStage": 0}}},
        "reward.training.heldOutSplit": {"reward": {"model": None, "training": {**RM, "heldOutShare": 0.1,
                                                                               "heldOutSplit": "test"}}},
        "reward.training.data.rejectedField": {"reward": {"model": None, "training": {
            **RM, "data": {"dataset": "/d/prefs.jsonl", "rejectedField": "chosen"}}}},
        "policy.sft.globalBatchSize": {"policy": {"model": "/m/sft", "sft": {**SFT, "globalBatchSize": 7,
                                                                             "microBatchSize": 2}}},
        "policy.sft.zeroStage": {"policy": {"model": "/m/sft", "sft": {**SFT, "zeroStage": 0}}},
        "policy.sft.nodes": {"kubernetes": {"launcher": "job"}, "policy": {"model": "/m/sft", "sft": {**SFT, "nodes": 2}}},
        "reward.training.nodes": {"kubernetes": {"launcher": "job"},
                                  "reward": {"model": None, "training": {**RM, "nodes": 2}}},
        "reward.kind": {"reward": {"kind": "verifiable"}, "prompts": {"answerField": "answer"}},
        "reward.verifiable": {"reward": {"verifiable": {"correct": 2.0}}},
        "prompts.answerField": {"reward": {"kind": "verifiable", "model": None}},
        "reward.components": {"reward": {"kind": "composite", "model": None}},
        "reward.objectiveWeights": {"reward": {"objectiveWeights": {"helpsteer-correctness": 1.0}}},
        "pairing.selection": {"pairing": {"selection": "bracket"}},
        "reward.training.data.marginField": {"reward": {"kind": "pairwise", "model": None, "training": {
            **RM, "data": {"dataset": "/d/prefs.jsonl", "marginField": "margin"}}}},
        # spec.evaluation (the Evaluate stage)
        "evaluation.judge.batchTokens": {"evaluation": {**EVAL, "judge": {"model": "/m/gold", "maxLength": 512,
                                                                          "batchTokens": 256}}},
        "evaluation.judge.components": {"evaluation": {**EVAL, "judge": {"kind": "composite"}}},
        "evaluation.judge.objectiveWeights": {"evaluation": {**EVAL, "judge": {"model": "/m/gold",
                                                                               "objectiveWeights": {"x": 1.0}}}},
        "evaluation.judge.verifiable": {"evaluation": {**EVAL, "judge": {"model": "/m/gold",
                                                                         "verifiable": {"correct": 2.0}}}},
        "evaluation.judge.model": {"evaluation": {**EVAL, "judge": {"kind": "bradley-terry"}}},
        "evaluation.judge.training": {"evaluation": {**EVAL, "judge": {"model": "/m/gold", "training": RM}}},
        "evaluation.judge.kind": {"evaluation": {**EVAL, "judge": {"kind": "verifiable", "model": "/m/gold"}}},
        "evaluation.select": {"evaluation": {**EVAL, "select": "judge-reward"}},
        "evaluation.gates.judgeRewardFallingRounds": {"evaluation": {**EVAL, "gates": {"judgeRewardFallingRounds": 2}}},
        "evaluation.rollback": {"evaluation": {**EVAL, "rollback": True}},
        "evaluation.prompts.answerField": {"evaluation": {**EVAL, "judge": {"kind": "verifiable"}}},
    }  # fmt: skip
    assert set(breakers) == {r.blames for r in RULES}
    for blames, change in breakers.items():
        spec = copy.deepcopy(MINIMAL)
        for key, value in change.items():
            spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
            spec[key] = {k: v for k, v in spec[key].items() if v is not None} if isinstance(value, dict) else value
        body = {"apiVersion": "iterdpo.io/v1alpha1", "kind": "IterativeDPORun", "metadata": {"name": "r"}, "spec": spec}
        with pytest.raises(SpecError) as err:
            parse_run(body)
        assert err.value.problems[0].startswith(f"spec.{blames}: "), (blames, err.value.problems)


def test_name_rules_follow_the_model(root):
    rules = {r["rule"]: r for r in root["x-kubernetes-validations"]}
    assert f"size(self.metadata.name) <= {MAX_NAME_LENGTH}" in rules
    pattern = re.search(r"matches\('(.*)'\)", next(r for r in rules if "matches" in r)).group(1)
    for name, ok in (("tiny-local", True), ("a" * 40, True), ("Tiny", False), ("a.b", False), ("-a", False)):
        assert bool(re.fullmatch(pattern, name)) is ok
        try:
            IterativeDPORun.model_validate({"apiVersion": "iterdpo.io/v1alpha1", "kind": "IterativeDPORun",
                                            "metadata": {"name": name}, "spec": MINIMAL})  # fmt: skip
            assert ok
        except ValueError:
            assert not ok


def test_names_status_subresource_and_printer_columns(built):
    spec = built["spec"]
    assert built["metadata"]["name"] == "iterativedporuns.iterdpo.io" and spec["group"] == "iterdpo.io"
    assert spec["names"] == {"kind": "IterativeDPORun", "listKind": "IterativeDPORunList", "plural": "iterativedporuns",
                             "singular": "iterativedporun", "shortNames": ["idr", "dporun"], "categories": ["iterdpo"]}  # fmt: skip
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: (c["jsonPath"], c["type"]) for c in version["additionalPrinterColumns"]}
    assert columns == {
        "Round": (".status.currentIteration", "integer"),
        "Stage": (".status.currentStage", "string"),
        "Phase": (".status.phase", "string"),
        "Reward": (".status.iterations[-1:].scoring.meanReward", "number"),
        "Age": (".metadata.creationTimestamp", "date"),
    }


def test_status_schema_is_typed_from_run_status(root):
    status = root["properties"]["status"]
    assert status["properties"]["phase"]["enum"] == ["Pending", "Running", "Suspended", "Succeeded", "Failed"]
    scoring = status["properties"]["iterations"]["items"]["properties"]["scoring"]
    assert "meanReward" not in scoring["required"]  # float | None: unset when nothing was scored
    assert status["properties"]["conditions"]["items"]["required"] == ["type", "status", "reason", "lastTransitionTime"]


# -- the walker fails loudly on what it cannot express ----------------------------------------


class _Tuple(BaseModel):
    pair: tuple[int, int] = Field(description="A pair.")


class _Union(BaseModel):
    value: int | str = Field(description="Either.")


class _Undescribed(BaseModel):
    value: int = 1


class _Pattern(BaseModel):
    value: str = Field(pattern="^a", description="Constrained string.")


@pytest.mark.parametrize("model", [_Tuple, _Union, _Undescribed, _Pattern])
def test_unknown_types_and_missing_descriptions_raise(model):
    with pytest.raises(crd.SchemaError):
        crd._Walker("spec").model(model, "")


def test_stale_descriptions_or_extras_raise():
    walker = crd._Walker("status", descriptions={**{k: v for k, v in crd.STATUS_DESCRIPTIONS.items() if k},
                                                  "gone": "A field RunStatus no longer has."})  # fmt: skip
    walker.model(crd.RunStatus, "")
    with pytest.raises(crd.SchemaError, match="gone"):
        walker.check_all_used()
