"""The Helm chart (charts/iterdpo): lint, render with several values files, every manifest
against the strict Kubernetes 1.34 schema, the values schema rejecting wrong values, the
operator pod's security, and the chart's CRD being the repository's.

helm is built from its Go module (tests/cluster/helm/build.sh, cached); without it every
test here but the CRD check skips and says how to build it. $ITERDPO_HELM names another.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "iterdpo"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
sys.path.insert(0, str(ROOT / "tests" / "cluster" / "helm"))
import helmbin  # noqa: E402

from iterdpo.stages import REWARD, SERVER_TABLE, SERVERS  # noqa: E402

RELEASE, NAMESPACE = "iterdpo", "iterdpo-system"
K8S_VERSION = "1.34"  # the schema the chart is checked against (as tests/unit/test_builders.py)
NOT_VALIDATED = {("monitoring.coreos.com/v1", "ServiceMonitor")}  # a CRD kind: no schema in kubernetes-validate


@pytest.fixture(scope="module")
def helm(tmp_path_factory):
    path = helmbin.helm_path()
    if path is None:
        pytest.skip(helmbin.WHY_MISSING)
    home = tmp_path_factory.mktemp("helm-home")
    env = {**os.environ, "HELM_CACHE_HOME": str(home / "cache"), "HELM_CONFIG_HOME": str(home / "config"),
           "HELM_DATA_HOME": str(home / "data"), "KUBECONFIG": str(home / "no-kubeconfig")}  # fmt: skip

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(path), *args], capture_output=True, text=True, env=env, timeout=60)
        if check and proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} -> {proc.returncode}\n{proc.stderr}")
        return proc

    return run


def render(helm, *values: Path | str, sets: tuple[str, ...] = (), crds: bool = False) -> list[dict]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    for v in values:
        args += ["--values", str(v)]
    for s in sets:
        args += ["--set", s]
    if crds:
        args.append("--include-crds")
    return [d for d in yaml.safe_load_all(helm(*args).stdout) if d]


def by_kind(manifests: list[dict], kind: str) -> list[dict]:
    return [m for m in manifests if m["kind"] == kind]


def the(manifests: list[dict], kind: str) -> dict:
    (m,) = by_kind(manifests, kind)
    return m


def operator_container(manifests: list[dict]) -> dict:
    (c,) = the(manifests, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def k8s_errors(manifest: dict) -> str | None:
    """None, or why `manifest` fails the strict Kubernetes schema (unknown fields rejected)."""
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is a test dependency (pip install -e .[test])")
    from packaging.version import Version

    versions = [v for v in kv.utils.all_versions() if Version(v) <= Version(K8S_VERSION)]
    if not versions:
        pytest.skip(f"kubernetes-validate bundles no schema <= {K8S_VERSION} (has {kv.utils.all_versions()})")
    try:
        kv.validate(manifest, max(versions, key=Version), strict=True)
    except kv.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path) or "(root)"
        return (f"{manifest['kind']}/{manifest['metadata'].get('name')} fails the Kubernetes {exc.version} schema "
                f"(strict) at {path}: {exc.message}")  # fmt: skip
    return None


CASES = [pytest.param((), id="defaults")] + [pytest.param((f,), id=f.name.removesuffix("-values.yaml")) for f in CI_VALUES]


# -- no helm needed ---------------------------------------------------------------------
def test_chart_crd_is_the_repository_crd():
    """Helm installs the chart's crds/ copy: it must be the generated one (crds/), byte for byte."""
    chart_crd = CHART / "crds" / "iterativedporuns.iterdpo.io.yaml"
    repo_crd = ROOT / "crds" / "iterativedporuns.iterdpo.io.yaml"
    assert chart_crd.read_bytes() == repo_crd.read_bytes(), (
        f"{chart_crd.relative_to(ROOT)} differs from {repo_crd.relative_to(ROOT)}: cp {repo_crd.relative_to(ROOT)} "
        f"{chart_crd.relative_to(ROOT)}")  # fmt: skip
    assert [p.name for p in (CHART / "crds").iterdir()] == [chart_crd.name]


def test_ci_values_files_exist():
    assert {f.name for f in CI_VALUES} == {"cluster-wide-values.yaml", "namespaces-values.yaml", "extras-values.yaml"}


# -- lint and render --------------------------------------------------------------------
@pytest.mark.parametrize("values", CASES)
def test_lint(helm, values):
    args = ["lint", "--strict", str(CHART)] + [a for v in values for a in ("--values", str(v))]
    out = helm(*args)
    assert "1 chart(s) linted, 0 chart(s) failed" in out.stdout, out.stdout


@pytest.mark.parametrize("values", CASES)
def test_every_manifest_passes_the_strict_kubernetes_schema(helm, values):
    manifests = render(helm, *values, crds=True)
    assert the(manifests, "CustomResourceDefinition")["metadata"]["name"] == "iterativedporuns.iterdpo.io"
    problems = [k8s_errors(m) for m in manifests if (m["apiVersion"], m["kind"]) not in NOT_VALIDATED]
    problems = [p for p in problems if p]
    assert not problems, "\n".join(problems)


def test_strict_check_sees_a_bad_field(helm):
    dep = the(render(helm), "Deployment")
    dep["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["portt"] = 1
    assert "portt" in (k8s_errors(dep) or "")


def test_defaults_watch_the_release_namespace(helm):
    manifests = render(helm)
    dep = the(manifests, "Deployment")
    assert dep["metadata"]["namespace"] == NAMESPACE
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"] == {"type": "Recreate"}
    pod = dep["spec"]["template"]["spec"]
    c = operator_container(manifests)
    assert c["image"] == "iterdpo-operator:0.1.0" and c["imagePullPolicy"] == "IfNotPresent"
    assert c["command"] == ["iterdpo", "operator", "-n", NAMESPACE, "--liveness", "http://0.0.0.0:8080/healthz"]
    assert {"name": "ITERDPO_RECONCILE_INTERVAL", "value": "5"} in c["env"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    assert {"name": "healthz", "containerPort": 8080, "protocol": "TCP"} in c["ports"]
    assert c["resources"] == {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}}
    sa = the(manifests, "ServiceAccount")
    assert pod["serviceAccountName"] == sa["metadata"]["name"] and sa["metadata"]["namespace"] == NAMESPACE
    role, binding = the(manifests, "Role"), the(manifests, "RoleBinding")
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == NAMESPACE
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}]
    (kopf,) = by_kind(manifests, "ClusterRole")  # only kopf's cluster-wide read
    assert {r for rule in kopf["rules"] for r in rule["resources"]} == {"customresourcedefinitions", "namespaces"}
    assert all(set(rule["verbs"]) == {"list", "watch"} for rule in kopf["rules"])
    assert not by_kind(manifests, "NetworkPolicy") and not by_kind(manifests, "ServiceMonitor")
    assert not by_kind(manifests, "Service")


def test_several_namespaces_get_a_role_each(helm):
    manifests = render(helm, CHART / "ci" / "namespaces-values.yaml")
    watched = ["team-a", "team-b", "team-c"]
    assert sorted(r["metadata"]["namespace"] for r in by_kind(manifests, "Role")) == watched
    assert sorted(r["metadata"]["namespace"] for r in by_kind(manifests, "RoleBinding")) == watched
    assert all(b["subjects"][0]["namespace"] == NAMESPACE and b["subjects"][0]["name"] == "iterdpo-operator"
               for b in by_kind(manifests, "RoleBinding"))  # fmt: skip
    assert not by_kind(manifests, "ClusterRoleBinding") or all(
        b["roleRef"]["name"].endswith("-kopf") for b in by_kind(manifests, "ClusterRoleBinding"))  # fmt: skip
    c = operator_container(manifests)
    assert c["command"][2:8] == ["-n", "team-a", "-n", "team-b", "-n", "team-c"]
    assert {"name": "ITERDPO_RECONCILE_INTERVAL", "value": "2.5"} in c["env"] and {"name": "TZ", "value": "UTC"} in c["env"]
    assert c["resources"]["limits"] == {"cpu": "1", "memory": "1Gi"}
    pod = the(manifests, "Deployment")["spec"]["template"]
    assert pod["spec"]["nodeSelector"] == {"kubernetes.io/os": "linux"} and pod["spec"]["tolerations"][0]["key"] == "dedicated"
    assert pod["metadata"]["annotations"] == {"example.com/team": "ml"}


def test_cluster_wide_gets_a_cluster_role_and_no_roles(helm):
    manifests = render(helm, CHART / "ci" / "cluster-wide-values.yaml")
    assert not by_kind(manifests, "Role") and not by_kind(manifests, "RoleBinding")
    roles = {r["metadata"]["name"]: r for r in by_kind(manifests, "ClusterRole")}
    assert set(roles) == {"iterdpo", "iterdpo-kopf"}
    assert roles["iterdpo-kopf"]["rules"] == [
        {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": ["list", "watch"]}]
    bindings = {b["metadata"]["name"]: b for b in by_kind(manifests, "ClusterRoleBinding")}
    assert bindings["iterdpo"]["roleRef"]["name"] == "iterdpo"
    c = operator_container(manifests)
    assert c["command"] == ["iterdpo", "operator", "-A", "--liveness", "http://0.0.0.0:8080/healthz"]
    assert c["image"] == "registry.example.com/iterdpo/operator:0.1.0-rc1" and c["imagePullPolicy"] == "Always"
    assert the(manifests, "Deployment")["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    # the same rules, whichever the mode
    ns_role = the(render(helm), "Role")
    assert roles["iterdpo"]["rules"] == ns_role["rules"]


def test_rules_are_least_privilege(helm):
    """No wildcards, no list/watch of secrets, no delete; the exact set the operator's code uses
    (tests/cluster/test_chart_install.py shows each one is needed)."""
    rules = the(render(helm), "Role")["rules"]
    granted = {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    assert not any("*" in t for t in granted)
    assert granted == {
        *{("iterdpo.io", "iterativedporuns", v) for v in ("get", "list", "watch", "patch")},
        ("iterdpo.io", "iterativedporuns/status", "update"),
        ("iterdpo.io", "iterativedporuns/finalizers", "update"),
        *{(g, r, v) for g, r in (("batch", "jobs"), ("apps", "deployments"), ("kubeflow.org", "pytorchjobs"))
          for v in ("get", "list", "watch", "create", "patch")},
        ("apps", "deployments/status", "get"),
        ("", "services", "create"), *{("", "configmaps", v) for v in ("get", "create", "patch")}, ("", "secrets", "create"),
        ("", "secrets", "get"), ("", "persistentvolumeclaims", "get"),  # kube.py missing_references, metadata only
        ("networking.k8s.io", "networkpolicies", "create"), ("", "pods", "list"), ("", "events", "create"),
    }  # fmt: skip


def test_kopf_cluster_read_can_be_turned_off(helm):
    manifests = render(helm, sets=("rbac.kopfClusterRead=false",))
    assert not by_kind(manifests, "ClusterRole") and not by_kind(manifests, "ClusterRoleBinding")
    manifests = render(helm, sets=("rbac.create=false",))
    assert not {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"} & {m["kind"] for m in manifests}


def test_network_policy_and_service_monitor(helm):
    """The policies select the pods the operator's builders label: each model server's, and its callers."""
    from iterdpo.stages import Stage
    from iterdpo_operator import builders as b
    from iterdpo_operator import stage_children as sc
    from iterdpo_operator.validation import validate_resource

    manifests = render(helm, CHART / "ci" / "extras-values.yaml")
    policies = {p["metadata"]["name"].rsplit("-", 1)[1]: p for p in manifests if p["kind"] == "NetworkPolicy"}
    assert list(policies) == [s.key for s in SERVERS]  # one per model server of the table
    run = validate_resource(yaml.safe_load((ROOT / "tests" / "unit" / "golden_specs" / "small.yaml").read_text()))
    pod_labels = {c: sc.child_manifest(run, stage, 1, 1)["spec"]["template"]["metadata"]["labels"]
                  for stage, c in ((Stage.SCORE, "annotate"), (Stage.EVALUATE, "evaluate"), (Stage.GENERATE, "generate"))}  # fmt: skip
    selects = lambda selector, labels: selector.items() <= labels.items()  # noqa: E731
    for server in SERVERS:
        policy = policies[server.key]
        assert policy["metadata"]["namespace"] == "runs" and policy["spec"]["policyTypes"] == ["Ingress"]
        server_pod = b.server_deployment(run, server, 1)["spec"]["template"]["metadata"]["labels"]
        assert selects(policy["spec"]["podSelector"]["matchLabels"], server_pod)
        others = [b.server_deployment(run, o, 1)["spec"]["template"]["metadata"]["labels"] for o in SERVERS if o != server]
        assert not any(selects(policy["spec"]["podSelector"]["matchLabels"], o) for o in others)
        first, extra = policy["spec"]["ingress"]
        peers = [peer["podSelector"]["matchLabels"] for peer in first["from"]]
        let_in = tuple(c for c, labels in pod_labels.items() if any(selects(p, labels) for p in peers))
        assert let_in == sc.client_components(server)  # the chart's list: the stages that call this server
        assert not any(selects(p, server_pod) for p in peers)
        assert first["ports"] == [{"protocol": "TCP", "port": server.port}]
        assert extra["from"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
    assert sc.client_components(SERVER_TABLE[REWARD]) == ("annotate", "evaluate")

    monitor, service = the(manifests, "ServiceMonitor"), the(manifests, "Service")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s"}]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}]
    pod_labels = the(manifests, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert selects(service["spec"]["selector"], pod_labels)
    assert {"name": "metrics", "containerPort": 9090, "protocol": "TCP"} in operator_container(manifests)["ports"]
    assert not by_kind(manifests, "ClusterRole")  # rbac.kopfClusterRead: false in this file


def test_network_policy_with_all_namespaces_needs_its_namespaces(helm):
    proc = helm("template", RELEASE, str(CHART), "--set", "watch.allNamespaces=true", "--set", "networkPolicy.enabled=true",
                check=False)  # fmt: skip
    assert proc.returncode != 0 and "networkPolicy.namespaces" in proc.stderr
    manifests = render(helm, sets=("watch.allNamespaces=true", "networkPolicy.enabled=true", "networkPolicy.namespaces={a,b}"))
    placed = sorted((p["metadata"]["namespace"], p["metadata"]["name"]) for p in by_kind(manifests, "NetworkPolicy"))
    assert placed == [(ns, f"iterdpo-{s.key}") for ns in ("a", "b") for s in sorted(SERVERS, key=lambda s: s.key)]


def test_chart_refuses_kubernetes_older_than_1_29(helm):
    """The CRD's validation rules and backoffLimitPerIndex (docs/install.md)."""
    proc = helm("template", RELEASE, str(CHART), "--kube-version", "1.28.9", check=False)
    assert proc.returncode != 0 and "kubeVersion" in proc.stderr, proc.stderr
    assert render(helm) and helm("template", RELEASE, str(CHART), "--kube-version", "1.29.0").returncode == 0


# -- wrong values fail, naming the value -----------------------------------------------------
WRONG = [
    pytest.param({"operator": {"image": {"pullPolicy": "Sometimes"}}}, ["/operator/image/pullPolicy", "IfNotPresent"], id="pullPolicy"),
    pytest.param({"watch": {"namespaces": "x"}}, ["/watch/namespaces", "want array"], id="namespaces-string"),
    pytest.param({"watch": {"namespaces": ["Team_A"]}}, ["/watch/namespaces/0"], id="namespace-name"),
    pytest.param({"watch": {"namespaces": ["a"], "allNamespaces": True}}, ["/watch/namespaces"], id="both-watch-modes"),
    pytest.param({"watch": {"allNamespaces": "yes"}}, ["/watch/allNamespaces", "want boolean"], id="allNamespaces-string"),
    pytest.param({"operator": {"reconcileInterval": "fast"}}, ["/operator/reconcileInterval"], id="interval"),
    pytest.param({"operator": {"reconcileInterval": 0}}, ["/operator/reconcileInterval"], id="interval-zero"),
    pytest.param({"operator": {"resources": {"limits": {"memory": "lots"}}}}, ["/operator/resources/limits/memory"], id="quantity"),
    pytest.param({"operator": {"runAsUser": 0}}, ["/operator/runAsUser"], id="root"),
    pytest.param({"operator": {"imagePullSecrets": ["regcred"]}}, ["/operator/imagePullSecrets/0"], id="pull-secret"),
    pytest.param({"operatr": {}}, ["additional properties 'operatr' not allowed"], id="typo-top"),
    pytest.param({"operator": {"replicas": 2}}, ["/operator", "'replicas' not allowed"], id="replicas"),
    pytest.param({"serviceAccount": {"create": False}}, ["/serviceAccount/name"], id="sa-name-needed"),
    pytest.param({"serviceMonitor": {"enabled": True, "port": 8080}}, ["serviceMonitor.port"], id="port-clash"),
    pytest.param({"operator": {"logLevel": "chatty"}}, ["/operator/logLevel", "INFO"], id="log-level"),
    pytest.param({"stageDefaults": {"resources": {"trian": {"cpu": "8"}}}}, ["/stageDefaults/resources", "'trian' not allowed"], id="stage-typo"),
]


def test_stage_defaults_and_log_level_reach_the_operator(helm, tmp_path):
    """The values the operator reads at start: what it gives runs that leave image or cpu/memory unset."""
    from iterdpo_operator.defaults import StageDefaults

    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump({"operator": {"logLevel": "DEBUG"}, "stageDefaults": {
        "image": {"repository": "registry.example/iterdpo", "tag": "0.1.0"},
        "resources": {"train": {"cpu": "32", "memory": "400Gi"}}}}))  # fmt: skip
    env = {e["name"]: e.get("value") for e in operator_container(render(helm, path))["env"]}
    assert env["ITERDPO_LOG_LEVEL"] == "DEBUG"
    defaults = StageDefaults.model_validate_json(env["ITERDPO_STAGE_DEFAULTS"])
    assert defaults.image == "registry.example/iterdpo:0.1.0" and defaults.resources["train"].memory == "400Gi"


@pytest.mark.parametrize(("values", "expected"), WRONG)
def test_wrong_values_fail_naming_the_value(helm, tmp_path, values, expected):
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    proc = helm("template", RELEASE, str(CHART), "--values", str(path), check=False)
    assert proc.returncode != 0, proc.stdout[:500]
    for text in expected:
        assert text in proc.stderr, proc.stderr


# -- Pod Security Standard "restricted" for the operator pod -------------------------------
@pytest.mark.parametrize("values", CASES)
def test_operator_pod_is_restricted(helm, values):
    """kubernetes.io/docs/concepts/security/pod-security-standards (restricted), plus a read-only
    root filesystem with /tmp as the one writable emptyDir."""
    pod = the(render(helm, *values), "Deployment")["spec"]["template"]["spec"]
    sc = pod["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 65532 and sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC", "hostAliases"))
    assert pod["volumes"] == [{"name": "tmp", "emptyDir": {}}]
    for c in pod["containers"]:
        csc = c["securityContext"]
        assert csc["allowPrivilegeEscalation"] is False and not csc.get("privileged")
        assert csc["capabilities"] == {"drop": ["ALL"]} and csc["readOnlyRootFilesystem"] is True
        assert csc["runAsNonRoot"] is True and csc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert c["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
        assert {"name": "HOME", "value": "/tmp"} in c["env"]
        assert not any(p.get("hostPort") for p in c.get("ports", []))


def test_the_grafana_dashboard_is_a_sidecar_configmap_drawing_only_metrics_the_operator_exports(helm):
    """dashboards/iterdpo-runs.json as Grafana's sidecar loads it; every series it queries is one
    operator/metrics.py defines, so a renamed gauge cannot leave an empty panel behind."""
    import json
    import re

    from prometheus_client import REGISTRY

    from iterdpo_operator import metrics  # noqa: F401 (registers the operator's metrics)

    assert not by_kind(render(helm), "ConfigMap")  # off by default
    (config,) = by_kind(render(helm, CHART / "ci" / "extras-values.yaml"), "ConfigMap")
    assert config["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config["metadata"]["annotations"] == {"grafana_folder": "ML"}
    dashboard = json.loads(config["data"]["iterdpo-runs.json"])
    assert dashboard["uid"] == "iterdpo-runs" and dashboard == json.loads((CHART / "dashboards" / "iterdpo-runs.json").read_text())
    exported = {m.name for m in REGISTRY.collect() if m.name.startswith("iterdpo_")}
    queried = {re.sub(r"_(bucket|count|sum|total)$", "", name) if name not in exported else name
               for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"\biterdpo_[a-z_]+", target["expr"])}  # fmt: skip
    assert queried <= exported, queried - exported
    assert {f"iterdpo_evaluation_{f}" for f in metrics.EVALUATION} <= queried  # every evaluation gauge is drawn
    moved = render(helm, sets=("grafanaDashboard.enabled=true", "grafanaDashboard.namespace=monitoring"))
    assert the(moved, "ConfigMap")["metadata"]["namespace"] == "monitoring"
