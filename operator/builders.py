"""Pure builders: the typed run -> the pieces of its Kubernetes manifests.

Nothing here talks to the API, and nothing here knows a stage: names, labels, pods and
containers, the run's spec ConfigMap and its model servers (token Secret; per server of
`iterdpo.stages.SERVERS`, the reward's and the judge's: Service, Deployment, NetworkPolicy).
Each stage's child is built in `iterdpo_operator.stage_children` from these pieces. The
operator, `iterdpo render` and the golden tests all call the same functions, so what is
reviewed is what is applied. Every container command comes from `iterdpo.planner`, the
same argv the local runner starts as a process.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import PurePosixPath

import yaml

from iterdpo.planner import REWARD_TOKEN_ENV, StageStep, reward_server_argv, stage_step
from iterdpo.spec import API_VERSION, DEFAULT_IMAGE, KIND, IterativeDPORun, Resources
from iterdpo.stages import SERVERS, Server, Stage, pods

SPEC_DIR = "/etc/iterdpo"
SPEC_FILE = f"{SPEC_DIR}/run.yaml"
GPU = "nvidia.com/gpu"
RUN_AS = 1000  # the runtime image's user (Dockerfile)
# Pod Security Standard "restricted": non-root, no escalation, no capabilities, RuntimeDefault
# seccomp, read-only root filesystem; /tmp (also HOME, for caches) is a writable emptyDir.
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "fsGroup": RUN_AS,
                "seccompProfile": {"type": "RuntimeDefault"}}  # fmt: skip
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
                      "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}  # fmt: skip
RUN_LABEL = "iterdpo.io/run"
TEMPLATE_HASH = "iterdpo.io/template-hash"  # on long-lived children: the pod template (or data) they were built with


# -- names and labels ----------------------------------------------------------------
def child_name(run: IterativeDPORun, iteration: int, component: str, attempt: int) -> str:
    """The one name of a stage attempt's child: a restarted operator finds it again."""
    return f"{run.name}-i{iteration:02d}-{component}-a{attempt}"


def server_name(run: IterativeDPORun, server: Server) -> str:
    """<run>-reward, <run>-judge: the Deployment, Service and NetworkPolicy of one model server."""
    return f"{run.name}-{server.key}"


def reward_token_ref(run: IterativeDPORun) -> tuple[str, str]:
    """(Secret name, key) of the reward server's bearer token: the user's, or the one the operator makes."""
    named = run.spec.kubernetes.reward_token_secret
    return (named.name, named.key) if named is not None else (f"{run.name}-reward-token", "token")


def spec_config_map_name(run: IterativeDPORun) -> str:
    return f"{run.name}-spec"


def labels(run: IterativeDPORun, component: str, iteration: int | None = None, attempt: int | None = None) -> dict:
    out = {
        "app.kubernetes.io/name": "iterdpo",
        "app.kubernetes.io/instance": run.name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": "iterdpo-operator",
        RUN_LABEL: run.name,
    }
    if iteration is not None:
        out["iterdpo.io/iteration"] = str(iteration)
    if attempt is not None:
        out["iterdpo.io/attempt"] = str(attempt)
    return out


def template_hash(template: dict) -> str:
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:16]


def owner_reference(run: IterativeDPORun, uid: str) -> dict:
    """Makes the run the controller of a child: deleting the run garbage-collects it."""
    return {"apiVersion": API_VERSION, "kind": KIND, "name": run.name, "uid": uid,
            "controller": True, "blockOwnerDeletion": True}  # fmt: skip


def _meta(run: IterativeDPORun, name: str, component: str, owner_uid: str | None, **label_args) -> dict:
    meta = {"name": name, "labels": labels(run, component, **label_args)}
    if run.metadata.namespace:
        meta["namespace"] = run.metadata.namespace
    if owner_uid:
        meta["ownerReferences"] = [owner_reference(run, owner_uid)]
    return meta


def pod_template(run: IterativeDPORun, component: str, pod: dict, **label_args) -> dict:
    """A pod template of the run's `component`, labelled like its child."""
    return {"metadata": {"labels": labels(run, component, **label_args)}, "spec": pod}


def attempt_job(run: IterativeDPORun, name: str, component: str, pod: dict, owner_uid: str | None, *,
                iteration: int, attempt: int) -> dict:  # fmt: skip
    """The batch Job of one stage attempt: one pod, never retried by the Job itself (the
    operator retries a stage as a new attempt, under a new name)."""
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": _meta(run, name, component, owner_uid, iteration=iteration, attempt=attempt),
        "spec": {"backoffLimit": 0,
                 "template": pod_template(run, component, pod, iteration=iteration, attempt=attempt)},
    }  # fmt: skip


# -- the run as the pods see it ---------------------------------------------------------
def storage_root(run: IterativeDPORun) -> str:
    return run.spec.storage.root or str(PurePosixPath(run.spec.kubernetes.volume.mount_path) / "runs")


def pod_run(run: IterativeDPORun) -> IterativeDPORun:
    """The run with storage.root filled in, as the stage programs read it in a pod."""
    spec = run.spec.model_copy(update={"storage": run.spec.storage.model_copy(update={"root": storage_root(run)})})
    return run.model_copy(update={"spec": spec, "status": None})


def spec_config_map(run: IterativeDPORun, owner_uid: str | None = None) -> dict:
    manifest = pod_run(run).to_manifest()
    manifest["metadata"] = {k: v for k, v in manifest["metadata"].items() if k in ("name", "namespace")}
    data = {"run.yaml": yaml.safe_dump(manifest, sort_keys=False)}
    meta = _meta(run, spec_config_map_name(run), "spec", owner_uid)
    meta["annotations"] = {TEMPLATE_HASH: template_hash(data)}  # kept current (Ensure): spec.iterations may grow
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}


# -- pods ------------------------------------------------------------------------------
def _resources(resources: Resources, default_gpus: int) -> dict:
    gpus = default_gpus if resources.gpus is None else resources.gpus
    limits: dict[str, str] = {}
    if gpus:
        limits[GPU] = str(gpus)
    if resources.cpu:
        limits["cpu"] = resources.cpu
    if resources.memory:
        limits["memory"] = resources.memory
    requests = {k: v for k, v in limits.items() if k != GPU}
    out: dict = {}
    if limits:
        out["limits"] = limits
    if requests:
        out["requests"] = requests
    return out


_PODS = {pod.key: pod for pod in pods()}


def stage_gpus(run: IterativeDPORun, pod: str) -> int:
    """GPUs of one kind of pod (a key of spec.kubernetes.resources): the run's, else the pod's default."""
    chosen = getattr(run.spec.kubernetes.resources, pod).gpus
    return _PODS[pod].default_gpus(run.spec) if chosen is None else chosen


def container(run: IterativeDPORun, name: str, argv: tuple[str, ...] | list[str], pod: str, *,
              deepspeed: bool = False, extra_env: list[dict] | None = None) -> dict:  # fmt: skip
    """`pod`: its key under spec.kubernetes.resources; `deepspeed`: DeepSpeed runs in it (on CPUs
    it is told so)."""
    k = run.spec.kubernetes
    env = [{"name": "PYTHONUNBUFFERED", "value": "1"}, {"name": "HOME", "value": "/tmp"},
           {"name": "HF_HOME", "value": str(PurePosixPath(k.volume.mount_path) / ".cache" / "huggingface")}]  # fmt: skip
    if k.hub_token_secret is not None:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": k.hub_token_secret.name, "key": k.hub_token_secret.key}}})
    if deepspeed and stage_gpus(run, pod) == 0:
        env.append({"name": "DS_ACCELERATOR", "value": "cpu"})  # DeepSpeed on CPUs (gloo)
    env += extra_env or []
    return {
        "name": name,
        "image": k.image or DEFAULT_IMAGE,
        "imagePullPolicy": k.image_pull_policy,
        "command": list(argv),
        "env": env,
        "resources": _resources(getattr(k.resources, pod), stage_gpus(run, pod)),
        "volumeMounts": [{"name": "run-volume", "mountPath": k.volume.mount_path},
                         {"name": "run-spec", "mountPath": SPEC_DIR, "readOnly": True},
                         {"name": "tmp", "mountPath": "/tmp"}],  # fmt: skip
        # The stage's JSON summary is its termination message; on a crash, the log tail.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": CONTAINER_SECURITY,
    }


def pod_spec(run: IterativeDPORun, containers: list[dict], restart_policy: str = "Never", *, shm: bool = False) -> dict:
    """`shm`: a memory-backed /dev/shm (containers get 64 MB by default; vLLM's workers,
    NCCL and DeepSpeed's CPU communication need more)."""
    k = run.spec.kubernetes
    spec: dict = {
        "restartPolicy": restart_policy,
        "securityContext": POD_SECURITY,
        "automountServiceAccountToken": False,  # stage programs never call the API
        "containers": containers,
        "volumes": [
            {"name": "run-volume", "persistentVolumeClaim": {"claimName": k.volume.claim_name}},
            {"name": "run-spec", "configMap": {"name": spec_config_map_name(run)}},
            {"name": "tmp", "emptyDir": {}},
        ],
    }
    if shm:
        spec["volumes"].append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        for c in containers:
            c["volumeMounts"] = [*c["volumeMounts"], {"name": "dshm", "mountPath": "/dev/shm"}]
    if k.service_account_name:
        spec["serviceAccountName"] = k.service_account_name
    if k.node_selector:
        spec["nodeSelector"] = dict(k.node_selector)
    if k.tolerations:
        spec["tolerations"] = [t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in k.tolerations]
    return spec


def planned(run: IterativeDPORun, iteration: int, stage: Stage, policy: str | None = None) -> StageStep:
    """The planner's step of `stage` in round `iteration`, as the pods run it; `policy`: the round's
    start policy the planner chose (Target.policy; unset: the previous round's checkpoint)."""
    return stage_step(pod_run(run), iteration, stage, spec_file=SPEC_FILE, host="0.0.0.0", urls=server_urls(run),
                      policy=policy)  # fmt: skip


def server_url(run: IterativeDPORun, server: Server) -> str:
    """A model server's Service by its cluster DNS name."""
    return f"http://{server_name(run, server)}.{run.metadata.namespace or 'default'}.svc:{server.port}"


def server_urls(run: IterativeDPORun) -> dict[str, str]:
    return {server.key: server_url(run, server) for server in SERVERS}


# -- the run's model servers -------------------------------------------------------------
def token_env(run: IterativeDPORun) -> list[dict]:
    """The servers' token, from its Secret: for each server and for every caller."""
    name, key = reward_token_ref(run)
    return [{"name": REWARD_TOKEN_ENV, "valueFrom": {"secretKeyRef": {"name": name, "key": key}}}]


def reward_token_secret(run: IterativeDPORun, token: str, owner_uid: str | None = None) -> dict:
    """The generated bearer token of the run's servers (only without spec.kubernetes.rewardTokenSecret)."""
    name, key = reward_token_ref(run)
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": _meta(run, name, "reward", owner_uid),
            "stringData": {key: token}}  # fmt: skip


def _server_selector(run: IterativeDPORun, server: Server) -> dict:
    return {RUN_LABEL: run.name, "app.kubernetes.io/component": server.key}


def server_network_policy(run: IterativeDPORun, server: Server, clients: tuple[str, ...],
                          owner_uid: str | None = None) -> dict:  # fmt: skip
    """Only the run's pods of the `clients` components may reach this server
    (spec.kubernetes.rewardNetworkPolicy)."""
    peers = [{"podSelector": {"matchLabels": {RUN_LABEL: run.name, "app.kubernetes.io/component": c}}} for c in clients]
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": _meta(run, server_name(run, server), server.key, owner_uid),
        "spec": {"podSelector": {"matchLabels": _server_selector(run, server)},
                 "policyTypes": ["Ingress"],
                 "ingress": [{"from": peers, "ports": [{"protocol": "TCP", "port": server.port}]}]},
    }  # fmt: skip


def server_deployment(run: IterativeDPORun, server: Server, replicas: int, owner_uid: str | None = None) -> dict:
    """One model server; Recreate, so a new pod never waits for the old one's GPUs."""
    argv = (*reward_server_argv(spec_file=SPEC_FILE, host="0.0.0.0", port=server.port), *server.flags)
    main = container(run, f"{server.key}-server", argv, server.key, extra_env=token_env(run))
    main["ports"] = [{"name": "http", "containerPort": server.port}]
    main["readinessProbe"] = {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5, "failureThreshold": 1}
    main["livenessProbe"] = {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10, "failureThreshold": 6}
    template = pod_template(run, server.key, pod_spec(run, [main], restart_policy="Always"))
    meta = _meta(run, server_name(run, server), server.key, owner_uid)
    meta["annotations"] = {TEMPLATE_HASH: template_hash(template)}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "replicas": replicas, "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": _server_selector(run, server)},
            "template": template,
        },
    }  # fmt: skip


def server_service(run: IterativeDPORun, server: Server, owner_uid: str | None = None) -> dict:
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": _meta(run, server_name(run, server), server.key, owner_uid),
        "spec": {"selector": _server_selector(run, server),
                 "ports": [{"name": "http", "port": server.port, "targetPort": "http"}]},
    }  # fmt: skip


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the run file in the ConfigMap) as literal blocks."""


_Dumper.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def to_yaml(manifests: list[dict]) -> str:
    """Multi-document YAML, as `kubectl apply -f` takes it."""
    return yaml.dump_all(manifests, Dumper=_Dumper, sort_keys=False)
