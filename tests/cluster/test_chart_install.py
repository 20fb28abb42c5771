"""The Helm chart (charts/iterdpo) against the real control plane: install, upgrade and
uninstall with the helm built by tests/cluster/helm/build.sh, and the chart's RBAC proven
to be enough, and each of its main rules needed, by running the real operator
(`iterdpo operator`, a subprocess) with the chart's ServiceAccount's own token.

The operator Deployment's pod only "runs" on the instant test kubelet (there is no image);
the operator that reconciles is the subprocess, with exactly the chart's permissions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from clusterutil import bound_claim, exists, wait_for
from scenarios import GROUP, PLURAL, VERSION, run_body, summaries
from kubernetes import client

from iterdpo.local.processes import resolve_executable, start, stop, tail

HERE = Path(__file__).resolve().parent
CHART = HERE.parents[1] / "charts" / "iterdpo"
sys.path.insert(0, str(HERE / "helm"))
import helmbin  # noqa: E402

pytestmark = pytest.mark.cluster
CRD_NAME = "iterativedporuns.iterdpo.io"


# -- helm ---------------------------------------------------------------------------------
class Helm:
    def __init__(self, path: Path, kubeconfig: Path, home: Path):
        self.path, self.kubeconfig = path, kubeconfig
        self.env = {**os.environ, "HELM_CACHE_HOME": str(home / "cache"), "HELM_CONFIG_HOME": str(home / "config"),
                    "HELM_DATA_HOME": str(home / "data")}  # fmt: skip

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(self.path), "--kubeconfig", str(self.kubeconfig), *args],
                              capture_output=True, text=True, env=self.env, timeout=120)  # fmt: skip
        if check and proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def install(self, release: str, ns: str, *sets: str) -> subprocess.CompletedProcess:
        args = ["install", release, str(CHART), "--namespace", ns]
        for s in sets:
            args += ["--set", s]
        return self(*args)


@pytest.fixture(scope="module")
def helm(control_plane, tmp_path_factory):
    path = helmbin.helm_path()
    if path is None:
        pytest.skip(helmbin.WHY_MISSING)
    return Helm(path, control_plane.kubeconfig, tmp_path_factory.mktemp("helm-home"))


@pytest.fixture()
def release(helm, ns):
    """The release's name; uninstalled at the end if a test left it installed."""
    name = f"op-{ns}"
    yield name
    helm("uninstall", name, "--namespace", ns, "--wait", check=False)


def deployment_available(cluster, ns: str, name: str, generation: int | None = None):
    apps = client.AppsV1Api(cluster.api_client)

    def check():
        d = apps.read_namespaced_deployment(name, ns)
        if generation is not None and (d.status.observed_generation or 0) < generation:
            return False
        conditions = {c.type: c.status for c in d.status.conditions or []}
        return conditions.get("Available") == "True" and d.status.updated_replicas == 1 and (d.status.ready_replicas or 0) == 1
    return check


# -- tests: install, upgrade, uninstall ----------------------------------------------------
def test_install_upgrade_uninstall(control_plane, helm, ns, release):
    core, apps, rbac = (client.CoreV1Api(control_plane.api_client), client.AppsV1Api(control_plane.api_client),
                        client.RbacAuthorizationV1Api(control_plane.api_client))  # fmt: skip
    full = f"{release}-iterdpo"
    out = helm.install(release, ns, f"watch.namespaces={{{ns}}}")
    notes = out.stdout  # NOTES.txt
    assert f"kubectl -n {ns} get idr -w" in notes and "kubectl apply --server-side -f charts/iterdpo/crds/" in notes, notes
    wait_for("the operator Deployment Available", deployment_available(control_plane, ns, full), control_plane, timeout=60)
    dep = apps.read_namespaced_deployment(full, ns)
    (c,) = dep.spec.template.spec.containers
    assert c.command == ["iterdpo", "operator", "-n", ns, "--liveness", "http://0.0.0.0:8080/healthz"]
    assert dep.spec.strategy.type == "Recreate" and dep.spec.template.spec.service_account_name == full
    selector = f"app.kubernetes.io/instance={release},app.kubernetes.io/component=operator"
    (pod,) = core.list_namespaced_pod(ns, label_selector=selector).items
    assert pod.status.phase == "Running" and pod.spec.security_context.run_as_user == 65532
    assert exists(core.read_namespaced_service_account, full, ns)
    assert exists(rbac.read_namespaced_role, full, ns) and exists(rbac.read_namespaced_role_binding, full, ns)
    assert exists(rbac.read_cluster_role, f"{full}-kopf") and exists(rbac.read_cluster_role_binding, f"{full}-kopf")
    ext = client.ApiextensionsV1Api(control_plane.api_client)
    assert exists(ext.read_custom_resource_definition, CRD_NAME)  # from crds/ (or already there)

    # upgrade with a changed value: the Deployment (and its pod) change
    helm("upgrade", release, str(CHART), "--namespace", ns, "--reuse-values", "--set", "operator.reconcileInterval=7")
    dep = apps.read_namespaced_deployment(full, ns)
    assert ("ITERDPO_RECONCILE_INTERVAL", "7") in [(e.name, e.value) for e in dep.spec.template.spec.containers[0].env]
    wait_for("the upgraded Deployment Available",
             deployment_available(control_plane, ns, full, dep.metadata.generation), control_plane, timeout=60)  # fmt: skip
    assert json.loads(helm("history", release, "--namespace", ns, "-o", "json").stdout)[-1]["revision"] == 2

    # uninstall: everything of the release is gone; the CRD (and so the runs) stays
    helm("uninstall", release, "--namespace", ns, "--wait")
    assert not exists(apps.read_namespaced_deployment, full, ns)
    assert not exists(core.read_namespaced_service_account, full, ns)
    assert not exists(rbac.read_namespaced_role, full, ns) and not exists(rbac.read_namespaced_role_binding, full, ns)
    assert not exists(rbac.read_cluster_role, f"{full}-kopf") and not exists(rbac.read_cluster_role_binding, f"{full}-kopf")
    assert exists(ext.read_custom_resource_definition, CRD_NAME)


def test_wrong_value_fails_the_install(control_plane, helm, ns, release):
    proc = helm("install", release, str(CHART), "--namespace", ns, "--set", "operator.image.pullPolicy=Sometimes", check=False)
    assert proc.returncode != 0 and "/operator/image/pullPolicy" in proc.stderr, proc.stderr
    assert not exists(client.AppsV1Api(control_plane.api_client).read_namespaced_deployment, f"{release}-iterdpo", ns)


# -- least privilege: the operator with the chart's ServiceAccount token -------------------
HUB_SECRET = "hf-token"


def chart_run(name: str) -> dict:
    """One round; rewardNetworkPolicy: the operator then creates a NetworkPolicy too, and
    hubTokenSecret: it checks that Secret exists (two more rules to prove)."""
    return run_body(name, iterations=1, kubernetes={"rewardNetworkPolicy": True, "hubTokenSecret": {"name": HUB_SECRET}})


def service_account_kubeconfig(cluster, ns: str, sa: str, path: Path) -> Path:
    """A kubeconfig with a fresh token of `sa` (TokenRequest API): the operator's pod's identity."""
    core = client.CoreV1Api(cluster.api_client)
    request = client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=3600))
    token = core.create_namespaced_service_account_token(sa, ns, request).status.token
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{"name": "c", "cluster": {"server": cluster.control_plane.server, "insecure-skip-tls-verify": True}}],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "c", "user": sa, "namespace": ns}}],
    }))  # fmt: skip
    os.chmod(path, 0o600)
    return path


class SAOperator:
    """`iterdpo operator` as a process, authenticated as the chart's ServiceAccount."""

    def __init__(self, kubeconfig: Path, args: tuple[str, ...], log_path: Path):
        self.kubeconfig, self.args, self.log_path = kubeconfig, args, log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> "SAOperator":
        env = {"KUBECONFIG": str(self.kubeconfig), "ITERDPO_RECONCILE_INTERVAL": "1"}
        self.proc = start((resolve_executable("iterdpo"), "operator", *self.args), env=env, log_path=self.log_path)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc, grace_seconds=10)
            self.proc = None

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"the operator exited with {self.proc.returncode}:\n{tail(self.log_path, 40)}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def custom(cluster) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(cluster.api_client)


def phase(cluster, ns: str, name: str) -> str | None:
    return (custom(cluster).get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name).get("status") or {}).get("phase")


def run_to_succeeded(cluster, ns: str, op: SAOperator, name: str = "r", timeout: float = 90) -> None:
    cluster.kubelet.rule = summaries()
    custom(cluster).create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, chart_run(name))

    def done():
        op.check_alive()
        return phase(cluster, ns, name) in ("Succeeded", "Failed")

    try:
        wait_for(f"run {name} done", done, cluster, timeout=timeout)
    except AssertionError as e:
        raise AssertionError(f"{e}\noperator log:\n{tail(op.log_path, 60)}") from None
    assert phase(cluster, ns, name) == "Succeeded", tail(op.log_path, 60)


class ChartOperator:
    """The chart installed watching `ns`, and `iterdpo operator` run with its ServiceAccount's token."""

    def __init__(self, cluster, helm: Helm, ns: str, release: str, work: Path):
        self.cluster, self.helm, self.ns, self.release, self.work = cluster, helm, ns, release, work
        self.sa = f"{release}-iterdpo"
        self.rbac = client.RbacAuthorizationV1Api(cluster.api_client)
        self.op: SAOperator | None = None

    def install(self, *sets: str, all_namespaces: bool = False) -> "ChartOperator":
        watch = "watch.allNamespaces=true" if all_namespaces else f"watch.namespaces={{{self.ns}}}"
        self.helm.install(self.release, self.ns, watch, *sets)
        return self

    def start(self, *args: str) -> SAOperator:
        kubeconfig = service_account_kubeconfig(self.cluster, self.ns, self.sa, self.work / "sa.kubeconfig")
        self.op = SAOperator(kubeconfig, args or ("-n", self.ns), self.work / "operator.log").start()
        return self.op

    def stop(self) -> None:
        if self.op is not None:
            self.op.stop()
            if os.environ.get("ITERDPO_SHOW_OPERATOR_LOG"):
                print(tail(self.op.log_path, 200))


@pytest.fixture()
def chart_operator(control_plane, crd, helm, ns, release, tmp_path):
    bound_claim(control_plane, ns, tmp_path / "pv", name="iterdpo-data")
    client.CoreV1Api(control_plane.api_client).create_namespaced_secret(
        ns, {"metadata": {"name": HUB_SECRET}, "stringData": {"token": "hf_test"}})  # chart_run's hubTokenSecret
    co = ChartOperator(control_plane, helm, ns, release, tmp_path)
    yield co
    co.stop()


def forbidden(log: str) -> list[str]:
    """What the API server refused, as `VERB resource "RES"` (from its 403 messages in the log)."""
    found = set()
    for line in log.splitlines():
        for part in line.split(" cannot ")[1:]:
            words = part.replace('\\"', '"').split('"')
            if len(words) >= 2:
                found.add(f"{words[0].strip()} {words[1]}")
    return sorted(found)


def test_chart_rbac_is_enough_for_a_run(control_plane, chart_operator, ns):
    op = chart_operator.install().start()
    run_to_succeeded(control_plane, ns, op)
    log = op.log()
    assert not forbidden(log), forbidden(log)
    assert "Not enough permissions" not in log  # kopf's own warnings: its cluster-wide read is granted
    core = client.CoreV1Api(control_plane.api_client)
    net = client.NetworkingV1Api(control_plane.api_client)
    assert exists(core.read_namespaced_secret, "r-reward-token", ns)  # made by the operator, with `create` only
    assert exists(net.read_namespaced_network_policy, "r-reward", ns)


def test_cluster_wide_rbac_is_enough_for_a_run(control_plane, chart_operator, ns):
    """watch.allNamespaces: the same rules as a ClusterRole, and `iterdpo operator -A`."""
    co = chart_operator.install(all_namespaces=True)
    assert not co.rbac.list_namespaced_role(ns, label_selector=f"app.kubernetes.io/instance={co.release}").items
    assert co.rbac.read_cluster_role_binding(co.sa).subjects[0].name == co.sa
    op = co.start("-A")
    run_to_succeeded(control_plane, ns, op)
    assert not forbidden(op.log()), forbidden(op.log())
    assert "Not enough permissions" not in op.log()


# -- each rule is needed: the run breaks (or loses something) without it ------------------------
def without(rules: list[dict], group: str, resource: str, verb: str) -> list[dict]:
    """`rules` less one (group, resource, verb); the rest of each rule is kept."""
    out, removed = [], False
    for rule in rules:
        if group in rule["apiGroups"] and resource in rule["resources"] and verb in rule["verbs"]:
            assert rule["apiGroups"] == [group], rule
            removed = True
            if others := [r for r in rule["resources"] if r != resource]:
                out.append({**rule, "resources": others})
            if verbs := [v for v in rule["verbs"] if v != verb]:
                out.append({**rule, "resources": [resource], "verbs": verbs})
        else:
            out.append(rule)
    assert removed, f"no rule grants {verb} {group}/{resource}"
    return out


# (role, group, resource, verb, scenario, what happens without it). role: "role" is the
# operator's Role in the watched namespace, "kopf" the small ClusterRole of kopf's reads.
#   "stuck": the API server refuses it (403 in the operator log) and the run makes no progress;
#   "works": the run still Succeeds; only the Warning Events are lost (logged as refused).
# Scenario "run": a 1-round run; "suspend": the run is suspended while its generate Job runs;
# "extend": the 1-round run, once Succeeded, gets spec.iterations 2.
# Rules not listed here, found by hand with the same test (docs/install.md has the table):
# runs watch, jobs/deployments/pytorchjobs list+watch (kopf's watches: without them the
# run still finishes, on the timer and kopf's re-lists, only slower to react); runs patch
# (kopf's annotations and finalizer: the run still finishes, kopf's bookkeeping fails);
# CRD list/watch and namespaces watch (kopf warns and falls back); runs/finalizers update
# (only checked by the OwnerReferencesPermissionEnforcement admission plugin, off here).
CASES = [
    ("role", "iterdpo.io", "iterativedporuns", "get", "run", "stuck"),
    ("role", "iterdpo.io", "iterativedporuns", "list", "run", "stuck"),  # kopf's list of the runs
    ("role", "iterdpo.io", "iterativedporuns/status", "update", "run", "stuck"),
    ("role", "batch", "jobs", "create", "run", "stuck"),
    ("role", "batch", "jobs", "get", "run", "stuck"),
    ("role", "batch", "jobs", "patch", "suspend", "stuck"),
    ("role", "apps", "deployments", "create", "run", "stuck"),
    ("role", "apps", "deployments", "patch", "run", "stuck"),
    ("role", "apps", "deployments/status", "get", "run", "stuck"),
    ("role", "kubeflow.org", "pytorchjobs", "create", "run", "stuck"),
    ("role", "", "pods", "list", "run", "stuck"),
    ("role", "", "configmaps", "create", "run", "stuck"),
    ("role", "", "configmaps", "get", "run", "stuck"),  # kube.ensure: is the spec ConfigMap current?
    ("role", "", "configmaps", "patch", "extend", "stuck"),  # kube.ensure: spec.iterations raised, the pods' copy follows
    ("role", "", "services", "create", "run", "stuck"),
    ("role", "", "secrets", "create", "run", "stuck"),
    ("role", "", "secrets", "get", "run", "stuck"),  # missing_references: hubTokenSecret exists?
    ("role", "", "persistentvolumeclaims", "get", "run", "stuck"),  # missing_references: the claim exists?
    ("role", "networking.k8s.io", "networkpolicies", "create", "run", "stuck"),
    ("role", "", "events", "create", "run", "works"),
    # kopf's namespace observer (-n): it retries the list for ~55 s (its error back-offs,
    # 1+1+2+3+5+8+13+21 s) before falling back to the names given, serving nothing meanwhile.
    ("kopf", "", "namespaces", "list", "run", "stuck"),
]


@pytest.mark.parametrize(("role", "group", "resource", "verb", "scenario", "without_it"), CASES,
                         ids=[f"{c[3]}-{c[2]}" for c in CASES])  # fmt: skip
def test_each_rule_is_needed(control_plane, chart_operator, ns, role, group, resource, verb, scenario, without_it):
    """Remove one (resource, verb) from the installed chart's RBAC, start the operator with
    the ServiceAccount's token, and show what breaks (about 15 s a case)."""
    co = chart_operator.install()
    if role == "role":
        rules = [{"apiGroups": r.api_groups, "resources": r.resources, "verbs": r.verbs}
                 for r in co.rbac.read_namespaced_role(co.sa, ns).rules]  # fmt: skip
        co.rbac.patch_namespaced_role(co.sa, ns, {"rules": without(rules, group, resource, verb)})
    else:
        rules = [{"apiGroups": r.api_groups, "resources": r.resources, "verbs": r.verbs}
                 for r in co.rbac.read_cluster_role(f"{co.sa}-kopf").rules]  # fmt: skip
        co.rbac.patch_cluster_role(f"{co.sa}-kopf", {"rules": without(rules, group, resource, verb)})
    op = co.start()
    name = "r"
    if scenario == "suspend":
        control_plane.kubelet.rule = summaries(hold={"generate"})
        custom(control_plane).create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, chart_run(name))
        batch = client.BatchV1Api(control_plane.api_client)
        wait_for("the generate Job", lambda: exists(batch.read_namespaced_job, f"{name}-i01-generate-a1", ns), control_plane)
        custom(control_plane).patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name, {"spec": {"suspend": True}})
    elif scenario == "extend":  # a finished 1-round run gets a second round
        control_plane.kubelet.rule = summaries()
        custom(control_plane).create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, chart_run(name))
        wait_for("round 1 to finish", lambda: phase(control_plane, ns, name) == "Succeeded", control_plane, timeout=60)
        custom(control_plane).patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name, {"spec": {"iterations": 2}})
    else:
        control_plane.kubelet.rule = summaries()
        custom(control_plane).create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, chart_run(name))

    if resource == "events":  # Kube.event: best effort, the refusal is logged as a warning
        refused, expected = "could not post event", set()
        seen = lambda log: any(refused in line and "Forbidden" in line for line in log.splitlines())  # noqa: E731
    else:
        refused = f"{verb} resource {resource}"
        expected = {refused}
        seen = lambda log: refused in forbidden(log)  # noqa: E731

    def settled():
        op.check_alive()
        if without_it == "works":
            return phase(control_plane, ns, name) == "Succeeded" and seen(op.log())
        return seen(op.log())

    try:
        wait_for(f"{refused!r} refused", settled, control_plane, timeout=60)
    except AssertionError as e:
        raise AssertionError(f"{e}\nphase: {phase(control_plane, ns, name)}; refused: {forbidden(op.log())}\n"
                             f"{tail(op.log_path, 40)}") from None  # fmt: skip
    if without_it == "stuck":
        time.sleep(3)  # a few more timer passes (1 s apart): still no progress past the refusal
        status = custom(control_plane).get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name).get("status") or {}
        if scenario == "extend":  # still Succeeded with one round: round 2 never started
            assert [it["iteration"] for it in status.get("iterations", [])] == [1], status
        else:
            assert status.get("phase") not in ("Succeeded", "Suspended"), status
    assert set(forbidden(op.log())) == expected, forbidden(op.log())  # nothing else was refused
