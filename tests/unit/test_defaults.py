"""The operator's cluster-wide defaults fill only what a run leaves unset."""

from __future__ import annotations

import copy

import pytest

from iterdpo.stages import Stage
from iterdpo_operator import builders as b
from iterdpo_operator import stage_children as sc
from iterdpo.spec import DEFAULT_IMAGE as FALLBACK_IMAGE
from iterdpo_operator.defaults import StageDefaults, defaults_from_env, with_defaults
from iterdpo_operator.validation import validate_resource

BODY = {
    "apiVersion": "iterdpo.io/v1alpha1", "kind": "IterativeDPORun", "metadata": {"name": "r", "namespace": "ml"},
    "spec": {"policy": {"model": "org/p"}, "prompts": {"dataset": "org/q"}, "reward": {"model": "org/rm"},
             "kubernetes": {"volume": {"claimName": "data"}, "resources": {"train": {"memory": "100Gi"}}}},
}  # fmt: skip
DEFAULTS = StageDefaults.model_validate(
    {"image": "registry.example/iterdpo:0.1.0", "resources": {"train": {"cpu": "32", "memory": "400Gi"}, "reward": {"cpu": "4"}}}
)


def test_unset_values_come_from_the_defaults_and_set_ones_stay():
    run = with_defaults(validate_resource(BODY), DEFAULTS)
    k = run.spec.kubernetes
    assert k.image == "registry.example/iterdpo:0.1.0"
    assert (k.resources.train.cpu, k.resources.train.memory) == ("32", "100Gi")  # the run's memory wins
    assert k.resources.reward.cpu == "4" and k.resources.generate.cpu is None
    body = copy.deepcopy(BODY)
    body["spec"]["kubernetes"]["image"] = "mine:1"
    assert with_defaults(validate_resource(body), DEFAULTS).spec.kubernetes.image == "mine:1"


def test_without_defaults_the_image_is_the_documented_fallback(monkeypatch):
    monkeypatch.delenv("ITERDPO_STAGE_DEFAULTS", raising=False)
    run = with_defaults(validate_resource(BODY), defaults_from_env())
    assert run.spec.kubernetes.image == FALLBACK_IMAGE
    assert sc.child_manifest(validate_resource(BODY), Stage.GENERATE, 1, 1)["spec"]["template"]["spec"]["containers"][0]["image"] == FALLBACK_IMAGE


@pytest.mark.parametrize("raw, text", [("{not json", "is not valid"), ('{"resources": {"trian": {}}}', "unknown stage"),
                                        ('{"imag": "x"}', "is not valid")])  # fmt: skip
def test_a_bad_defaults_value_stops_the_operator_naming_it(monkeypatch, raw, text):
    monkeypatch.setenv("ITERDPO_STAGE_DEFAULTS", raw)
    with pytest.raises(SystemExit, match=f"ITERDPO_STAGE_DEFAULTS.*{text}|{text}"):
        defaults_from_env()
