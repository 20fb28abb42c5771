"""The operator's builders: pinned manifests, the invariants a cluster relies on, the
real schemas, and `iterdpo render`.

Goldens: tests/unit/golden/<spec>-round1.yaml is `to_yaml(render_round(run, 1))` for
each input in tests/unit/golden_specs/. After an intended change to the manifests,
rewrite them with

    ITERDPO_UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q tests/unit/test_builders.py

and review the diff. No cluster is needed for anything here.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from pathlib import Path

import pytest
import yaml

from iterdpo.cli import main as cli_main
from iterdpo.spec import API_VERSION, KIND, MAX_NAME_LENGTH, IterativeDPORun
from iterdpo.stages import JUDGE, REWARD, SERVER_TABLE, Stage
from iterdpo_operator import builders as b
from iterdpo_operator import stage_children as sc
from iterdpo_operator.launchers import JobLauncher, PyTorchJobLauncher, launcher_for
from iterdpo_operator.validation import InvalidRun, validate_resource

RM = SERVER_TABLE[REWARD]  # the run's reward server
REWARD_PORT = RM.port

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SPECS = HERE / "golden_specs"
GOLDEN = HERE / "golden"
EXAMPLE = REPO / "examples" / "run.yaml"
UPDATE_GOLDEN = os.environ.get("ITERDPO_UPDATE_GOLDEN") == "1"
GOLDEN_NAMES = sorted(p.stem for p in SPECS.glob("*.yaml"))
CORE_KINDS = {("v1", "ConfigMap"), ("batch/v1", "Job"), ("apps/v1", "Deployment"), ("v1", "Service")}
OWNER_UID = "uid-1"
DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # Service names


# -- inputs ----------------------------------------------------------------------------
def spec_body(name: str) -> dict:
    return yaml.safe_load((SPECS / f"{name}.yaml").read_text())


def _set(body: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    node = body
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value


def variant(base: str, **changes) -> IterativeDPORun:
    """A golden spec with fields changed; keys are dotted paths with '__' for '.'."""
    body = copy.deepcopy(spec_body(base))
    for dotted, value in changes.items():
        _set(body, dotted.replace("__", "."), value)
    return validate_resource(body)


def load(name: str) -> IterativeDPORun:
    return validate_resource(spec_body(name))


# Runs whose manifests every invariant and schema test checks: the goldens plus the
# corners (CPU training, explicit GPU counts, one-node PyTorchJob, no namespace,
# no hub token, the longest allowed name).
RUNS = {
    "small": lambda: load("small"),
    "multinode": lambda: load("multinode"),
    "small-cpu-train": lambda: variant("small", spec__kubernetes__resources__train__gpus=0),
    "small-no-namespace": lambda: variant("small", metadata={"name": "small"}),
    "small-explicit-gpus": lambda: variant(
        "small",
        spec__kubernetes__resources={"generate": {"gpus": 1, "memory": "16Gi"}, "reward": {"gpus": 0, "cpu": "4"},
                                     "annotate": {"gpus": 1}, "train": {"memory": "32Gi"}},
    ),  # fmt: skip
    "pytorchjob-one-node": lambda: variant(
        "multinode", spec__training__nodes=1, spec__kubernetes__hubTokenSecret=None
    ),
    "multinode-four-nodes": lambda: variant("multinode", spec__training__nodes=4, spec__training__globalBatchSize=256),
    "longest-name": lambda: variant("multinode", metadata={"name": "r" * MAX_NAME_LENGTH, "namespace": "ns"}),
}


@pytest.fixture(params=sorted(RUNS))
def run(request) -> IterativeDPORun:
    return RUNS[request.param]()


def children(run: IterativeDPORun, owner_uid: str | None = OWNER_UID, iteration: int = 1, attempt: int = 1) -> list[dict]:
    """Every child of a round, built directly (the operator's path, with an owner uid)."""
    return [
        b.spec_config_map(run, owner_uid),
        sc.child_manifest(run, Stage.GENERATE, iteration, attempt, owner_uid),
        b.server_service(run, RM, owner_uid),
        b.server_deployment(run, RM, 1, owner_uid),
        sc.child_manifest(run, Stage.SCORE, iteration, attempt, owner_uid),
        sc.child_manifest(run, Stage.TRAIN, iteration, attempt, owner_uid),
    ]


def by_component(manifests: list[dict]) -> dict[tuple[str, str], dict]:
    return {(m["kind"], m["metadata"]["labels"]["app.kubernetes.io/component"]): m for m in manifests}


def pod_templates(manifest: dict) -> list[tuple[str, dict]]:
    """(where, pod template) of every pod a manifest makes."""
    if manifest["kind"] in ("Job", "Deployment"):
        return [(f"{manifest['kind']}/{manifest['metadata']['name']}", manifest["spec"]["template"])]
    if manifest["kind"] == "PyTorchJob":
        return [(f"PyTorchJob/{manifest['metadata']['name']}/{role}", spec["template"])
                for role, spec in manifest["spec"]["pytorchReplicaSpecs"].items()]  # fmt: skip
    return []


def containers(manifest: dict) -> list[tuple[str, dict]]:
    return [(f"{where}/{c['name']}", c) for where, t in pod_templates(manifest) for c in t["spec"]["containers"]]


def stage_of(manifest: dict) -> str:
    """The resources key (generate, reward, annotate, train) of a pod-making child."""
    return manifest["metadata"]["labels"]["app.kubernetes.io/component"]


# -- goldens ---------------------------------------------------------------------------
def test_golden_inputs_exist():
    assert {"small", "multinode"} <= set(GOLDEN_NAMES), f"golden inputs missing from {SPECS}"


@pytest.mark.parametrize("name", GOLDEN_NAMES)
def test_round_one_matches_golden(name):
    rendered = b.to_yaml(sc.render_round(load(name), 1))
    path = GOLDEN / f"{name}-round1.yaml"
    if UPDATE_GOLDEN:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(rendered)
        return
    assert path.exists(), (
        f"{path.relative_to(REPO)} is missing; create it with "
        f"ITERDPO_UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q {Path(__file__).relative_to(REPO)}"
    )
    expected = path.read_text()
    if rendered != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), rendered.splitlines(True),
                                            f"golden/{path.name}", "rendered", n=2))  # fmt: skip
        lines = diff.splitlines()
        shown = "\n".join(lines[:80]) + (f"\n... ({len(lines) - 80} more diff lines)" if len(lines) > 80 else "")
        pytest.fail(
            f"the manifests of {name} round 1 differ from {path.relative_to(REPO)}.\n"
            f"If the change is intended, rewrite the goldens with ITERDPO_UPDATE_GOLDEN=1 "
            f".venv/bin/python -m pytest -q {Path(__file__).relative_to(REPO)} and review the diff.\n{shown}",
            pytrace=False,
        )


def test_render_round_order_and_no_owner():
    """render_round is what `iterdpo render` prints: the operator's creation order, no ownerReferences."""
    for name, kinds in (("small", ["Job", "Job"]), ("multinode", ["PyTorchJob"])):  # small evaluates: a Job
        manifests = sc.render_round(load(name), 1)
        assert [m["kind"] for m in manifests] == ["ConfigMap", "Job", "Service", "Deployment", "Job", *kinds]
        assert all("ownerReferences" not in m["metadata"] for m in manifests)


# -- invariants ------------------------------------------------------------------------
def test_labels_on_every_child_and_pod(run):
    for m in children(run):
        where = f"{m['kind']}/{m['metadata']['name']}"
        for labels in [m["metadata"]["labels"]] + [t["metadata"]["labels"] for _, t in pod_templates(m)]:
            assert labels.get("app.kubernetes.io/instance") == run.name, where
            assert labels.get(b.RUN_LABEL) == run.name, where
            assert all(isinstance(v, str) and len(v) <= 63 for v in labels.values()), (where, labels)


def test_every_child_is_controlled_by_the_run(run):
    for m in children(run, OWNER_UID):
        refs = m["metadata"].get("ownerReferences")
        assert refs is not None and len(refs) == 1, f"{m['kind']}/{m['metadata']['name']}: {refs}"
        (ref,) = refs
        assert ref == {"apiVersion": API_VERSION, "kind": KIND, "name": run.name, "uid": OWNER_UID,
                       "controller": True, "blockOwnerDeletion": True}  # fmt: skip
    assert all("ownerReferences" not in m["metadata"] for m in children(run, None))


@pytest.mark.parametrize("launcher", ["job", "pytorchjob"])
def test_every_stage_attempt_has_its_deadline(launcher):
    """spec.kubernetes.stageTimeoutSeconds: activeDeadlineSeconds on each Job, runPolicy's on a PyTorchJob."""
    run = variant("small", spec__kubernetes__launcher=launcher, spec__kubernetes__stageTimeoutSeconds={"generate": 600})
    generate, score, train = (sc.child_manifest(run, stage, 1, 1) for stage in (Stage.GENERATE, Stage.SCORE, Stage.TRAIN))
    assert generate["spec"]["activeDeadlineSeconds"] == 600  # as set
    assert score["spec"]["activeDeadlineSeconds"] == 6 * 3600  # the stage table's defaults
    deadline = train["spec"]["activeDeadlineSeconds"] if launcher == "job" else train["spec"]["runPolicy"]["activeDeadlineSeconds"]
    assert deadline == 24 * 3600
    assert run.spec_hash() == variant("small", spec__kubernetes__launcher=launcher).spec_hash()  # may change mid-run


def test_children_carry_the_run_namespace(run):
    for m in children(run):
        assert m["metadata"].get("namespace") == run.metadata.namespace


def test_pods_mount_the_claim_and_the_spec(run):
    k = run.spec.kubernetes
    config_maps = [m for m in children(run) if m["kind"] == "ConfigMap"]
    assert [c["metadata"]["name"] for c in config_maps] == [b.spec_config_map_name(run)]
    for m in children(run):
        for where, template in pod_templates(m):
            volumes = {v["name"]: v for v in template["spec"]["volumes"]}
            claims = [v["persistentVolumeClaim"]["claimName"] for v in volumes.values() if "persistentVolumeClaim" in v]
            maps = [v["configMap"]["name"] for v in volumes.values() if "configMap" in v]
            assert claims == [k.volume.claim_name], where
            assert maps == [b.spec_config_map_name(run)], where
            for c in template["spec"]["containers"]:
                mounts = {mt["name"]: mt for mt in c["volumeMounts"]}
                claim_volume = next(n for n, v in volumes.items() if "persistentVolumeClaim" in v)
                spec_volume = next(n for n, v in volumes.items() if "configMap" in v)
                assert mounts[claim_volume]["mountPath"] == k.volume.mount_path, where
                assert mounts[spec_volume]["mountPath"] == b.SPEC_DIR and mounts[spec_volume].get("readOnly"), where
                assert c["image"] == k.image and c["imagePullPolicy"] == k.image_pull_policy, where
                # Every stage program reads the spec the ConfigMap mounts.
                assert b.SPEC_FILE in c["command"] or c["name"] == "reward-server", (where, c["command"])
            if k.node_selector:
                assert template["spec"]["nodeSelector"] == k.node_selector, where
            if k.tolerations:
                assert len(template["spec"]["tolerations"]) == len(k.tolerations), where
            if k.service_account_name:
                assert template["spec"]["serviceAccountName"] == k.service_account_name, where


def test_spec_config_map_holds_the_pod_view_of_the_run(run):
    cm = b.spec_config_map(run)
    assert b.SPEC_FILE == f"{b.SPEC_DIR}/run.yaml" and list(cm["data"]) == ["run.yaml"]
    inside = validate_resource(yaml.safe_load(cm["data"]["run.yaml"]))
    assert inside.spec.storage.root == b.storage_root(run)
    assert inside.spec.storage.root.startswith(run.spec.kubernetes.volume.mount_path.rstrip("/") + "/")
    assert inside.spec_hash() != "" and inside.name == run.name
    assert "status" not in yaml.safe_load(cm["data"]["run.yaml"])


def test_hub_token_only_from_a_secret_ref(run):
    secret = run.spec.kubernetes.hub_token_secret
    for m in children(run):
        assert m["kind"] != "Secret"
        for where, c in containers(m):
            env = {e["name"]: e for e in c["env"]}
            assert len(env) == len(c["env"]), f"{where}: duplicate env names"
            if secret is None:
                assert "HF_TOKEN" not in env, where
            else:
                assert env["HF_TOKEN"] == {"name": "HF_TOKEN",
                                           "valueFrom": {"secretKeyRef": {"name": secret.name, "key": secret.key}}}, where  # fmt: skip
            for e in c["env"]:
                if re.search(r"TOKEN|SECRET|PASSWORD|KEY", e["name"]):
                    assert "value" not in e and "secretKeyRef" in e.get("valueFrom", {}), f"{where}: {e}"
    # No manifest inlines a token (Hugging Face tokens look like hf_<letters and digits>).
    assert not re.search(r"\bhf_[A-Za-z0-9]{10,}", b.to_yaml(children(run)))


def test_generate_is_an_indexed_job_one_index_per_shard(run):
    job = by_component(children(run))[("Job", "generate")]
    spec = job["spec"]
    shards = run.spec.generation.shards
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == shards
    assert spec["backoffLimitPerIndex"] == run.spec.kubernetes.shard_retries
    (c,) = spec["template"]["spec"]["containers"]
    assert "--shard" not in c["command"], "JOB_COMPLETION_INDEX picks the shard, not an argument"
    assert c["command"][:2] == ["iterdpo", "generate"]
    assert spec["template"]["spec"]["restartPolicy"] == "Never"  # required by backoffLimitPerIndex


def test_train_launcher_manifest(run):
    t = run.spec.training
    train = sc.child_manifest(run, Stage.TRAIN, 1, 1, OWNER_UID)
    assert train["metadata"]["name"] == sc.child_ref(run, Stage.TRAIN, 1, 1).name == sc.child_name(run, 1, Stage.TRAIN, 1)
    if run.spec.kubernetes.launcher == "job":
        assert isinstance(launcher_for(run), JobLauncher)
        assert (train["apiVersion"], train["kind"]) == ("batch/v1", "Job")
        assert train["spec"]["backoffLimit"] == 0
        return
    assert isinstance(launcher_for(run), PyTorchJobLauncher)
    assert (train["apiVersion"], train["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    spec = train["spec"]
    assert spec["nprocPerNode"] == str(t.nproc_per_node) and isinstance(spec["nprocPerNode"], str)
    replicas = spec["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1
    if t.nodes == 1:
        assert "Worker" not in replicas
    else:
        assert replicas["Worker"]["replicas"] == t.nodes - 1
    for role, r in replicas.items():
        (c,) = r["template"]["spec"]["containers"]
        assert c["name"] == "pytorch", f"{role}: Kubeflow finds the container by the name 'pytorch'"
        assert f"--nnodes={t.nodes}" in c["command"] and f"--nproc-per-node={t.nproc_per_node}" in c["command"]
        assert r["restartPolicy"] == "Never"
    assert spec["runPolicy"]["backoffLimit"] == 0


def test_gpu_limits_per_stage(run):
    s, k = run.spec, run.spec.kubernetes
    defaults = {"generate": s.generation.tensor_parallel_size, "reward": 1, "annotate": 0,
                "train": s.training.nproc_per_node}  # fmt: skip
    seen = set()
    for m in children(run):
        stage = stage_of(m)
        if stage == "spec":
            continue
        chosen = getattr(k.resources, stage).gpus
        expected = defaults[stage] if chosen is None else chosen
        assert b.stage_gpus(run, stage) == expected
        for where, c in containers(m):
            seen.add(stage)
            res = c["resources"]
            limits, requests = res.get("limits", {}), res.get("requests", {})
            if expected:
                assert limits[b.GPU] == str(expected), where
            else:
                assert b.GPU not in limits, where
            assert requests.get(b.GPU, limits.get(b.GPU)) == limits.get(b.GPU), f"{where}: GPU request != limit"
            for key in ("cpu", "memory"):
                want = getattr(getattr(k.resources, stage), key)
                assert limits.get(key) == want and requests.get(key) == want, (where, key)
            cpu_accel = {"name": "DS_ACCELERATOR", "value": "cpu"} in c["env"]
            assert cpu_accel == (stage == "train" and expected == 0), where
    assert seen == {"generate", "reward", "annotate", "train"}


def test_gpu_defaults_and_zero():
    small = load("small")
    assert [b.stage_gpus(small, s) for s in ("generate", "reward", "annotate", "train")] == [1, 1, 0, 1]
    multi = load("multinode")
    assert [b.stage_gpus(multi, s) for s in ("generate", "reward", "annotate", "train")] == [2, 1, 0, 8]
    cpu = variant("small", spec__kubernetes__resources__train__gpus=0)
    (c,) = sc.child_manifest(cpu, Stage.TRAIN, 1, 1)["spec"]["template"]["spec"]["containers"]
    assert b.GPU not in c["resources"].get("limits", {})
    assert {"name": "DS_ACCELERATOR", "value": "cpu"} in c["env"]


def test_reward_deployment_and_service(run):
    parts = by_component(children(run))
    dep, svc = parts[("Deployment", "reward")], parts[("Service", "reward")]
    assert dep["metadata"]["name"] == svc["metadata"]["name"] == b.server_name(run, RM) == f"{run.name}-reward"
    spec = dep["spec"]
    assert spec["strategy"] == {"type": "Recreate"}
    assert spec["replicas"] == 1
    template = spec["template"]
    assert template["spec"]["restartPolicy"] == "Always"
    selector = spec["selector"]["matchLabels"]
    assert selector.items() <= template["metadata"]["labels"].items(), "the Deployment must select its own pods"
    assert svc["spec"]["selector"] == selector, "the Service must reach the Deployment's pods"
    (c,) = template["spec"]["containers"]
    assert c["ports"] == [{"name": "http", "containerPort": REWARD_PORT}]
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["command"][:2] == ["iterdpo", "serve-reward"]
    assert c["command"][c["command"].index("--port") + 1] == str(REWARD_PORT)
    assert c["command"][c["command"].index("--host") + 1] == "0.0.0.0"
    (port,) = svc["spec"]["ports"]
    assert port == {"name": "http", "port": REWARD_PORT, "targetPort": "http"}
    assert b.server_deployment(run, RM, 0)["spec"]["replicas"] == 0  # scaled to zero outside scoring


def test_a_judge_is_served_like_the_reward_model_and_evaluate_calls_both(run):
    """spec.evaluation.judge on Kubernetes: its own Deployment + Service (<run>-judge, serve-reward
    --judge on its port), before round 0's Evaluate, whose Job gets both URLs and the token."""
    body = run.to_manifest()
    mount = run.spec.kubernetes.volume.mount_path
    body["spec"]["evaluation"] = {"prompts": {"dataset": f"{mount}/held-out.jsonl"}, "judge": {"model": f"{mount}/gold"}}
    judged = validate_resource(body)
    manifests = sc.render_round(judged, 0)
    names = [(m["kind"], m["metadata"]["name"]) for m in manifests]
    judge_name = f"{run.name}-judge"
    assert names.index(("Deployment", judge_name)) < names.index(("Job", sc.child_name(judged, 0, Stage.EVALUATE, 1)))
    parts = by_component(manifests)
    dep, svc = parts[("Deployment", JUDGE)], parts[("Service", JUDGE)]
    assert dep["metadata"]["name"] == svc["metadata"]["name"] == judge_name
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    port = SERVER_TABLE[JUDGE].port
    assert c["command"][:2] == ["iterdpo", "serve-reward"] and c["command"][-1] == "--judge"
    assert c["command"][c["command"].index("--port") + 1] == str(port) and c["ports"][0]["containerPort"] == port
    assert c["resources"]["limits"][b.GPU] == "1"  # the judge loads a model
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"] != parts[("Deployment", REWARD)]["spec"]["selector"]["matchLabels"]
    (e,) = parts[("Job", "evaluate")]["spec"]["template"]["spec"]["containers"]
    namespace = run.metadata.namespace or "default"
    assert e["command"][e["command"].index("--judge-url") + 1] == f"http://{judge_name}.{namespace}.svc:{port}"
    assert e["command"][e["command"].index("--reward-url") + 1] == b.server_url(judged, RM)
    assert any(v["name"] == "ITERDPO_REWARD_TOKEN" for v in e["env"]) and any(v["name"] == "ITERDPO_REWARD_TOKEN" for v in c["env"])
    generate = sc.render_round(judged, 1)
    assert ("Deployment", judge_name) in [(m["kind"], m["metadata"]["name"]) for m in generate]  # round 1 evaluates too


def test_a_rolled_back_start_reaches_the_generate_and_train_pods(run):
    """evaluation.rollback on Kubernetes: the reconciler's Target.policy (the planner's choice)
    becomes --policy of round 2's generate Job (every shard) and of its training child."""
    from iterdpo.layout import policy_for
    from iterdpo_operator import reconcile

    body = run.to_manifest()
    mount = run.spec.kubernetes.volume.mount_path
    body["spec"]["evaluation"] = {"prompts": {"dataset": f"{mount}/held-out.jsonl"}, "select": "win-rate", "rollback": True}
    rolled = validate_resource(body)
    start = b.pod_run(rolled).spec.policy.model
    for stage in (Stage.GENERATE, Stage.TRAIN):
        manifest = reconcile.child_manifest(rolled, reconcile.Target(2, stage, start, 1), "uid")
        pod = (manifest["spec"]["template"] if manifest["kind"] == "Job"
               else manifest["spec"]["pytorchReplicaSpecs"]["Master"]["template"])["spec"]  # fmt: skip
        argv = [a for c in pod["containers"] for a in c["command"] + c.get("args", [])]
        assert argv[argv.index("--policy") + 1] == start, stage
    previous = policy_for(b.pod_run(rolled), 2)  # no rollback this round: no flag, the program's default
    plain = reconcile.child_manifest(rolled, reconcile.Target(2, Stage.GENERATE, previous, 1), "uid")
    assert "--policy" not in plain["spec"]["template"]["spec"]["containers"][0]["command"]


def test_annotate_calls_the_reward_service_by_dns_name(run):
    job = by_component(children(run))[("Job", "annotate")]
    (c,) = job["spec"]["template"]["spec"]["containers"]
    url = c["command"][c["command"].index("--reward-url") + 1]
    namespace = run.metadata.namespace or "default"
    assert url == b.server_url(run, RM) == f"http://{run.name}-reward.{namespace}.svc:{REWARD_PORT}"
    assert job["spec"]["backoffLimit"] == 0


@pytest.mark.parametrize("iteration,attempt", [(1, 1), (3, 3), (99, 11)])
def test_names_fit_for_the_longest_run_name(iteration, attempt):
    """Child names, and the names Kubernetes derives from them, stay within 63 characters."""
    run = RUNS["longest-name"]()
    assert len(run.name) == MAX_NAME_LENGTH == 40
    for m in children(run, iteration=iteration, attempt=attempt):
        name = m["metadata"]["name"]
        assert len(name) <= 63 and DNS_1123_LABEL.match(name), name
        if m["kind"] == "Service":
            assert DNS_1035_LABEL.match(name), name
        if m["kind"] == "Job" and m["spec"].get("completionMode") == "Indexed":
            hostname = f"{name}-{m['spec']['completions'] - 1}"  # pods' hostnames: <job>-<index>
            assert len(hostname) <= 63, hostname
        if m["kind"] == "PyTorchJob":
            # The Training Operator names each replica's pod and headless Service <job>-<role>-<index>.
            for role, r in m["spec"]["pytorchReplicaSpecs"].items():
                derived = f"{name}-{role.lower()}-{r['replicas'] - 1}"
                assert len(derived) <= 63 and DNS_1035_LABEL.match(derived), derived


def test_a_run_name_starting_with_a_digit_is_refused_or_gives_valid_service_names():
    body = spec_body("small")
    body["metadata"]["name"] = "1st-run"
    try:
        run = validate_resource(body)
    except InvalidRun as exc:
        assert "metadata.name" in str(exc)
        return
    assert DNS_1035_LABEL.match(b.server_service(run, RM)["metadata"]["name"])


def test_rendered_yaml_has_no_anchors_or_aliases():
    text = b.to_yaml(sc.render_round(load("multinode"), 1))
    assert not re.search(r"[&*]id\d{3}", text), "YAML anchors/aliases in the rendered manifests"


def test_builders_are_pure():
    run = load("multinode")
    assert children(run) == children(run)
    assert b.to_yaml(sc.render_round(run, 2)) == b.to_yaml(sc.render_round(run, 2))
    assert sc.render_round(run, 2) != sc.render_round(run, 1)


# -- the real schemas ------------------------------------------------------------------
def _k8s_version() -> str:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is a test dependency (pip install -e .[test])")
    from packaging.version import Version

    versions = [v for v in kv.utils.all_versions() if Version(v) <= Version("1.34")]
    if not versions:
        pytest.skip(f"kubernetes-validate bundles no schema <= 1.34 (has {kv.utils.all_versions()})")
    return max(versions, key=Version)


def k8s_errors(manifest: dict) -> str | None:
    """None, or why `manifest` fails the strict Kubernetes schema (unknown fields rejected)."""
    import kubernetes_validate as kv

    version = _k8s_version()
    try:
        kv.validate(manifest, version, strict=True)
    except kv.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path) or "(root)"
        return (f"{manifest['kind']}/{manifest['metadata'].get('name')} fails the Kubernetes {exc.version} schema "
                f"(strict) at {path}: {exc.message}")  # fmt: skip
    return None


def test_core_manifests_pass_the_strict_kubernetes_schema(run):
    problems = [k8s_errors(m) for m in children(run) if (m["apiVersion"], m["kind"]) in CORE_KINDS]
    problems = [p for p in problems if p]
    assert not problems, "\n".join(problems)


def test_strict_kubernetes_schema_check_catches_unknown_fields():
    job = sc.child_manifest(load("small"), Stage.GENERATE, 1, 1)
    job["spec"]["template"]["spec"]["containers"][0]["gpus"] = 1
    assert "gpus" in (k8s_errors(job) or "")


def _shared_dir() -> Path:
    """As tests/cluster/conftest.py finds it."""
    if os.environ.get("ITERDPO_SHARED"):
        return Path(os.environ["ITERDPO_SHARED"])
    return REPO.parent / "shared"


@pytest.fixture(scope="module")
def pytorchjob_schema() -> dict:
    path = _shared_dir() / "kubeflow" / "kubeflow.org_pytorchjobs.yaml"
    if not path.exists():
        pytest.skip(f"no PyTorchJob CRD at {path} (set ITERDPO_SHARED to the folder holding kubeflow/)")
    crd = yaml.safe_load(path.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def unknown_fields(value, schema: dict, path: str = ""):
    """Paths of keys the schema does not declare (the API server would drop or reject them)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return
    if isinstance(value, dict):
        props, extra = schema.get("properties"), schema.get("additionalProperties")
        if props is not None:
            for key, sub in value.items():
                if key not in props:
                    yield f"{path}.{key}"
                else:
                    yield from unknown_fields(sub, props[key], f"{path}.{key}")
        elif isinstance(extra, dict):
            for key, sub in value.items():
                yield from unknown_fields(sub, extra, f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, sub in enumerate(value):
            yield from unknown_fields(sub, schema["items"], f"{path}[{i}]")


def pytorchjob_errors(manifest: dict, schema: dict) -> list[str]:
    jsonschema = pytest.importorskip("jsonschema")
    name = f"PyTorchJob/{manifest['metadata']['name']}"
    # x-kubernetes-* keys and CEL rules are not JSON Schema: jsonschema ignores them.
    errors = [f"{name} at {'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
              for e in jsonschema.Draft7Validator(schema).iter_errors(manifest)]  # fmt: skip
    errors += [f"{name}: unknown field {p[1:]}" for p in unknown_fields(manifest, schema)]
    # The CRD leaves the top-level metadata as a bare object: check it as core ObjectMeta.
    meta = k8s_errors({"apiVersion": "v1", "kind": "ConfigMap", "metadata": manifest["metadata"]})
    # And each pod template against the core PodTemplateSpec (the CRD copy can lag behind).
    for role, r in manifest["spec"]["pytorchReplicaSpecs"].items():
        pt = k8s_errors({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"x-{role.lower()}"},
                         "template": r["template"]})  # fmt: skip
        errors += [f"{name} {role}: {pt}"] if pt else []
    return errors + ([f"{name} metadata: {meta}"] if meta else [])


def test_pytorchjob_passes_the_kubeflow_crd_schema(run, pytorchjob_schema):
    if run.spec.kubernetes.launcher != "pytorchjob":
        run = run.model_copy(update={"spec": run.spec.model_copy(update={
            "kubernetes": run.spec.kubernetes.model_copy(update={"launcher": "pytorchjob"})})})  # fmt: skip
    job = sc.child_manifest(run, Stage.TRAIN, 1, 1, OWNER_UID)
    errors = pytorchjob_errors(job, pytorchjob_schema)
    assert not errors, "\n".join(errors)


def test_pytorchjob_check_catches_unknown_and_ill_typed_fields(pytorchjob_schema):
    run = load("multinode")
    job = sc.child_manifest(run, Stage.TRAIN, 1, 1)
    job["spec"]["pytorchReplicaSpecs"]["Master"] = copy.deepcopy(job["spec"]["pytorchReplicaSpecs"]["Master"])
    job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["gpus"] = 1
    job["spec"]["nprocPerNode"] = 8
    job["spec"]["runPolicy"]["restartEverything"] = True
    errors = "\n".join(pytorchjob_errors(job, pytorchjob_schema))
    assert "unknown field spec.pytorchReplicaSpecs.Master.template.spec.containers[0].gpus" in errors
    assert "unknown field spec.runPolicy.restartEverything" in errors
    assert "spec.nprocPerNode" in errors and "is not of type 'string'" in errors


# -- `iterdpo render` ------------------------------------------------------------------
def render(capsys, *args: str) -> tuple[int, str, str]:
    code = cli_main(["render", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_render_prints_the_round(capsys):
    code, out, err = render(capsys, SPECS / "small.yaml")
    assert code == 0, err
    docs = [d for d in yaml.safe_load_all(out) if d is not None]
    assert [d["kind"] for d in docs] == ["ConfigMap", "Job", "Service", "Deployment", "Job", "Job", "Job"]
    assert [d["metadata"]["name"] for d in docs] == [
        "small-spec", "small-i01-generate-a1", "small-reward", "small-reward", "small-i01-annotate-a1", "small-i01-train-a1",
        "small-i01-evaluate-a1"]  # fmt: skip
    assert out.startswith("#")  # a comment says what it is
    assert out.split("\n", 1)[1] == b.to_yaml(sc.render_round(load("small"), 1))


def test_render_multinode_iteration_and_namespace(capsys):
    code, out, err = render(capsys, SPECS / "multinode.yaml", "--iteration", "3", "-n", "other")
    assert code == 0, err
    docs = [d for d in yaml.safe_load_all(out) if d is not None]
    assert [d["kind"] for d in docs] == ["ConfigMap", "Job", "Service", "Deployment", "Job", "PyTorchJob"]
    assert {d["metadata"]["namespace"] for d in docs} == {"other"}
    assert docs[1]["metadata"]["name"] == "multinode-i03-generate-a1"
    (c,) = docs[4]["spec"]["template"]["spec"]["containers"]
    assert "http://multinode-reward.other.svc:8000" in c["command"]


def test_render_without_namespace_uses_default(tmp_path, capsys):
    body = spec_body("small")
    del body["metadata"]["namespace"]
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(body))
    code, out, err = render(capsys, path)
    assert code == 0, err
    assert {d["metadata"]["namespace"] for d in yaml.safe_load_all(out) if d} == {"default"}


def test_render_refuses_what_cannot_run_on_kubernetes(tmp_path, capsys):
    body = spec_body("small")
    body["spec"]["policy"]["model"] = "./models/policy"
    del body["spec"]["kubernetes"]["volume"]["claimName"]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(body))
    code, out, err = render(capsys, path)
    assert code == 2
    assert out == ""
    assert "spec.policy.model" in err and "relative" in err
    assert "spec.kubernetes.volume.claimName" in err


def test_render_reports_schema_errors_by_field(tmp_path, capsys):
    body = spec_body("small")
    body["spec"]["generation"]["samplesPerPrompt"] = 1
    body["spec"]["kubernetes"]["launchr"] = "job"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(body))
    code, out, err = render(capsys, path)
    assert code == 2 and out == ""
    assert "spec.generation.samplesPerPrompt" in err and "spec.kubernetes.launchr" in err


@pytest.mark.parametrize("iteration", ["0", "3", "-1"])
def test_render_refuses_an_iteration_out_of_range(capsys, iteration):
    code, out, err = render(capsys, SPECS / "small.yaml", f"--iteration={iteration}")  # small has 2 rounds
    assert code == 2 and out == ""
    assert "--iteration must be between 1 and 2" in err


def test_render_of_a_missing_file(tmp_path, capsys):
    code, out, err = render(capsys, tmp_path / "absent.yaml")
    assert code == 2 and out == ""
    assert "absent.yaml" in err


# -- examples/run.yaml -----------------------------------------------------------------
def test_example_run_renders_and_validates(capsys):
    assert cli_main(["validate", str(EXAMPLE)]) == 0, capsys.readouterr().err
    assert "valid IterativeDPORun" in capsys.readouterr().out
    code, out, err = render(capsys, EXAMPLE)
    assert code == 0, err
    docs = [d for d in yaml.safe_load_all(out) if d is not None]
    assert [d["kind"] for d in docs] == ["ConfigMap", "Job", "Service", "Deployment", "Job", "PyTorchJob"]
    problems = [k8s_errors(d) for d in docs if (d["apiVersion"], d["kind"]) in CORE_KINDS]
    assert not [p for p in problems if p], problems


def test_example_run_is_the_reports_recipe():
    """The numbers of arXiv 2405.07863 (RLHF Workflow), as /work/shared/RECIPE.md lists them."""
    run = validate_resource(yaml.safe_load(EXAMPLE.read_text()))
    s = run.spec
    assert s.iterations == 3
    assert s.policy.model == "RLHFlow/LLaMA3-SFT"
    assert s.reward.model == "sfairXC/FsfairX-LLaMA3-RM-v0.1" and s.reward.kind == "bradley-terry"
    assert len(s.prompts.per_iteration) == 3
    assert all(p.max_prompts in (None, 20000) for p in s.prompts.per_iteration)
    assert s.reference == "initial"
    g = s.generation
    assert (g.samples_per_prompt, g.temperature, g.top_p, g.max_new_tokens, g.seed) == (8, 1.0, 1.0, 2048, 42)
    assert 128009 in g.stop_token_ids  # Llama-3's <|eot_id|>
    assert s.pairing.strategy == "max_min"
    t = s.training
    assert (t.loss.type, t.loss.beta, t.learning_rate, t.scheduler, t.epochs) == ("sigmoid", 0.1, 5e-7, "cosine", 2)
    assert (t.global_batch_size, t.micro_batch_size, t.nodes, t.nproc_per_node) == (128, 1, 1, 8)
    assert t.global_batch_size // (t.micro_batch_size * t.nproc_per_node * t.nodes) == 16  # accumulation steps
    assert (t.max_length, t.max_prompt_length, t.precision, t.gradient_checkpointing) == (2048, 1000, "bf16", True)
    assert t.zero_stage in (2, 3)
    k = s.kubernetes
    assert k.launcher == "pytorchjob" and k.volume.claim_name and k.hub_token_secret is not None
    assert b.stage_gpus(run, "reward") == 1 and b.stage_gpus(run, "train") == 8


# -- Pod Security Standard "restricted" ---------------------------------------------------
ALLOWED_VOLUMES = {"configMap", "emptyDir", "persistentVolumeClaim", "secret", "projected", "downwardAPI"}


def test_every_pod_meets_the_restricted_pod_security_standard(run):
    """What the restricted profile requires (kubernetes.io/docs/concepts/security/pod-security-standards),
    plus a read-only root filesystem with /tmp as the one writable emptyDir."""
    for manifest in children(run):
        for where, template in pod_templates(manifest):
            spec = template["spec"]
            pod_sc = spec.get("securityContext", {})
            assert pod_sc.get("runAsNonRoot") is True and pod_sc.get("runAsUser", 0) != 0, where
            assert pod_sc.get("seccompProfile") == {"type": "RuntimeDefault"}, where
            assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), where
            assert {k for v in spec["volumes"] for k in v if k != "name"} <= ALLOWED_VOLUMES, where
            assert spec.get("automountServiceAccountToken") is False, where
            for c in spec["containers"] + spec.get("initContainers", []):
                sc = c.get("securityContext", {})
                assert sc.get("allowPrivilegeEscalation") is False and not sc.get("privileged"), (where, c["name"])
                assert sc.get("capabilities") == {"drop": ["ALL"]}, (where, c["name"])
                assert sc.get("readOnlyRootFilesystem") is True and sc.get("runAsNonRoot") is True, (where, c["name"])
                writable = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
                assert "/tmp" in writable and {"name": "HOME", "value": "/tmp"} in c["env"], (where, c["name"])


# -- the reward server's token and network policy -------------------------------------------
def test_reward_token_reaches_server_and_annotator_only_by_secret_ref():
    run = load("small")
    ref = {"secretKeyRef": {"name": f"{run.name}-reward-token", "key": "token"}}
    for manifest in (b.server_deployment(run, RM, 1), sc.child_manifest(run, Stage.SCORE, 1, 1)):
        (c,) = manifest["spec"]["template"]["spec"]["containers"]
        assert {"name": "ITERDPO_REWARD_TOKEN", "valueFrom": ref} in c["env"]
        assert not any(a.startswith(("--token", "--auth")) for a in c["command"])  # never on the command line
    secret = b.reward_token_secret(run, "tok", OWNER_UID)
    assert secret["stringData"] == {"token": "tok"} and secret["metadata"]["ownerReferences"][0]["uid"] == OWNER_UID
    assert all(m["kind"] != "Secret" for m in sc.render_round(run, 1))  # a random value is never rendered
    named = variant("small", **{"spec.kubernetes.rewardTokenSecret": {"name": "mine", "key": "k"}})
    assert b.reward_token_ref(named) == ("mine", "k")


def test_reward_network_policy_admits_only_the_runs_annotate_pods():
    run = variant("small", **{"spec.kubernetes.rewardNetworkPolicy": True})
    (policy,) = [m for m in sc.render_round(run, 1) if m["kind"] == "NetworkPolicy"]
    assert policy["spec"]["podSelector"]["matchLabels"] == b.server_deployment(run, RM, 1)["spec"]["selector"]["matchLabels"]
    (rule,) = policy["spec"]["ingress"]
    source = rule["from"][0]["podSelector"]["matchLabels"]
    annotate_labels = sc.child_manifest(run, Stage.SCORE, 1, 1)["spec"]["template"]["metadata"]["labels"]
    assert source.items() <= annotate_labels.items() and rule["ports"] == [{"protocol": "TCP", "port": 8000}]
    assert k8s_errors(policy) is None
    assert all(m["kind"] != "NetworkPolicy" for m in sc.render_round(load("small"), 1))
