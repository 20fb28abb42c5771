"""The one module that talks to the Kubernetes API (through the official client's
dynamic client, so core kinds, Jobs and Kubeflow's CRDs go through one code path)."""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path

from kubernetes import client, config, dynamic
from kubernetes.client.rest import ApiException

from iterdpo.spec import API_VERSION, IterativeDPORun
from iterdpo.stages import STAGE_TABLE, Server, servers_of
from iterdpo_operator import builders as b
from iterdpo_operator.launchers import ChildRef
from iterdpo_operator.reconcile import (RESUME_ANNOTATION, Create, Ensure, Observed, Patch, PodMessage, PodProblem, Scale,
                                        Target, child_ref, pod_problem)  # fmt: skip
from iterdpo_operator.stage_children import CHILDREN, child_kind
from iterdpo_operator.validation import Reference, references

log = logging.getLogger(__name__)
PLURAL = "iterativedporuns"
MAX_DETAIL = 600  # characters of a failed pod's message kept in the run's condition
# Ask for an object's metadata only: whether a Secret exists, never its data (the verb is still get).
METADATA_ONLY = {"Accept": "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1,application/json"}


class Conflict(Exception):
    """The run changed since it was read (resourceVersion); read again and redo."""


def load_config() -> client.ApiClient:
    """In a pod: the service account; elsewhere: $KUBECONFIG or ~/.kube/config."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


def current_namespace() -> str:
    """The kubeconfig context's namespace; in a pod, the service account's; else 'default'."""
    try:
        return config.list_kube_config_contexts()[1].get("context", {}).get("namespace") or "default"
    except (config.ConfigException, OSError):
        in_pod = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        return in_pod.read_text().strip() if in_pod.exists() else "default"


class Kube:
    def __init__(self, api_client: client.ApiClient):
        self.api_client = api_client
        self.core = client.CoreV1Api(api_client)
        self.apps = client.AppsV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self._dynamic: dynamic.DynamicClient | None = None

    @property
    def dyn(self) -> dynamic.DynamicClient:
        if self._dynamic is None:
            self._dynamic = dynamic.DynamicClient(self.api_client)
        return self._dynamic

    def _resource(self, api_version: str, kind: str):
        return self.dyn.resources.get(api_version=api_version, kind=kind)

    # -- the run ------------------------------------------------------------------------
    def read_run(self, namespace: str, name: str) -> dict | None:
        group, version = API_VERSION.split("/")
        try:
            return self.custom.get_namespaced_custom_object(group, version, namespace, PLURAL, name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def ask_resume(self, namespace: str, name: str, token: str) -> str | None:
        """Annotate a Failed run so that the operator resumes its failed stage; returns the
        phase it found (only a Failed run is annotated; None if there is no such run)."""
        body = self.read_run(namespace, name)
        if body is None:
            return None
        phase = (body.get("status") or {}).get("phase") or "Pending"
        if phase == "Failed":
            group, version = API_VERSION.split("/")
            self.custom.patch_namespaced_custom_object(group, version, namespace, PLURAL, name,
                                                       {"metadata": {"annotations": {RESUME_ANNOTATION: token}}})  # fmt: skip
        return phase

    def write_status(self, body: dict, status: dict) -> None:
        """Replace the status, guarded by the resourceVersion that was read (409 -> Conflict)."""
        group, version = API_VERSION.split("/")
        meta = body["metadata"]
        new = {"apiVersion": body["apiVersion"], "kind": body["kind"],
               "metadata": {"name": meta["name"], "namespace": meta["namespace"], "resourceVersion": meta["resourceVersion"]},
               "status": status}  # fmt: skip
        try:
            self.custom.replace_namespaced_custom_object_status(group, version, meta["namespace"], PLURAL, meta["name"], new)
        except ApiException as e:
            if e.status == 409:
                raise Conflict(meta["name"]) from None
            raise

    # -- observing ----------------------------------------------------------------------
    def _get(self, ref: ChildRef, namespace: str) -> dict | None:
        try:
            return self._resource(ref.api_version, ref.kind).get(name=ref.name, namespace=namespace).to_dict()
        except dynamic.exceptions.NotFoundError:
            return None

    def _pods(self, namespace: str, selector: str) -> list[client.V1Pod]:
        return self.core.list_namespaced_pod(namespace, label_selector=selector).items

    @staticmethod
    def _message(pod: client.V1Pod) -> str:
        for cs in pod.status.container_statuses or []:
            if cs.state and cs.state.terminated and cs.state.terminated.message:
                return cs.state.terminated.message
        return ""

    def _summaries(self, namespace: str, selector: str) -> list[PodMessage]:
        """The termination messages of the succeeded pods: one per Job index (the last success)."""
        by_index: dict[str, PodMessage] = {}
        for pod in sorted(self._pods(namespace, selector), key=lambda p: p.metadata.creation_timestamp):
            if pod.status.phase != "Succeeded":
                continue
            index = (pod.metadata.annotations or {}).get("batch.kubernetes.io/job-completion-index", pod.metadata.name)
            by_index[index] = PodMessage(pod.metadata.name, self._message(pod))
        return list(by_index.values())

    def _failure_detail(self, namespace: str, selector: str) -> str:
        failed = [p for p in self._pods(namespace, selector) if p.status.phase == "Failed"]
        if not failed:
            return ""
        pod = max(failed, key=lambda p: p.metadata.creation_timestamp)
        message = self._message(pod).strip()
        if len(message) > MAX_DETAIL:
            message = "..." + message[-MAX_DETAIL:]
        return f"pod {pod.metadata.name}: {message}" if message else f"pod {pod.metadata.name} failed"

    def server_available(self, run: IterativeDPORun, server: Server) -> bool:
        """Whether a model server's Deployment is scaled up and Available."""
        try:
            dep = self.apps.read_namespaced_deployment_status(b.server_name(run, server), run.metadata.namespace)
        except ApiException as e:
            if e.status == 404:
                return False
            raise
        return bool(dep.status.available_replicas) and (dep.spec.replicas or 0) > 0

    def _exists(self, ref: Reference, namespace: str) -> bool:
        """Whether the object is there; only its metadata is read (404 -> False, 403 raises)."""
        read = {"PersistentVolumeClaim": self.core.read_namespaced_persistent_volume_claim,
                "Secret": self.core.read_namespaced_secret}[ref.kind]  # fmt: skip
        try:
            response = read(ref.name, namespace, _headers=METADATA_ONLY, _preload_content=False)
        except ApiException as e:
            if e.status == 404:
                return False
            raise
        response.read()  # the body is not used; reading it returns the connection to the pool
        return True

    def missing_references(self, run: IterativeDPORun) -> tuple[Reference, ...]:
        """The claim and Secrets the spec names that are not in the run's namespace."""
        return tuple(r for r in references(run) if not self._exists(r, run.metadata.namespace))

    def pod_problem(self, namespace: str, labels: dict[str, str]) -> PodProblem | None:
        """Why one of the pods with these labels cannot start (unschedulable, image, crash loop), if one cannot."""
        pods = self._pods(namespace, ",".join(f"{k}={v}" for k, v in labels.items()))
        return pod_problem([self.api_client.sanitize_for_serialization(p) for p in pods])

    def observe(self, run: IterativeDPORun, target: Target) -> Observed:
        ns = run.metadata.namespace
        ref = child_ref(run, target)
        obj = self._get(ref, ns)
        calls = servers_of(run, STAGE_TABLE[target.stage])
        up = frozenset(s.key for s in calls if self.server_available(run, s))
        if obj is None:  # a child may be created next: what it needs must exist, and its servers must be up
            down = [s for s in calls if s.key not in up]  # the reconciler waits for the first of these
            problem = self.pod_problem(ns, b.labels(run, down[0].key)) if down else None
            return Observed(child_exists=False, servers_available=up, missing=self.missing_references(run),
                            server_problem=problem)  # fmt: skip
        controller = child_kind(run, target.stage)
        outcome, selector, suspended = controller.outcome(obj), controller.summary_pods_selector(ref.name), controller.suspended(obj)
        summaries = self._summaries(ns, selector) if outcome.done and outcome.succeeded else []
        detail = self._failure_detail(ns, selector) if outcome.done and not outcome.succeeded else ""
        # Every pod of the attempt (a PyTorchJob's workers too), by the labels its pod template carries.
        attempt_pods = b.labels(run, CHILDREN[target.stage].component, target.iteration, target.attempt)
        problem = None if outcome.done or suspended else self.pod_problem(ns, attempt_pods)
        return Observed(True, outcome, summaries, detail, suspended, up, pod_problem=problem)

    # -- acting -------------------------------------------------------------------------
    def apply(self, run: IterativeDPORun, actions: list) -> None:
        ns = run.metadata.namespace
        for action in actions:
            if isinstance(action, Create):
                if self.create(action.manifest, ns):
                    log.info("created %s %s/%s", action.manifest["kind"], ns, action.manifest["metadata"]["name"])
            elif isinstance(action, Ensure):
                self.ensure(action.manifest, ns)
            elif isinstance(action, Scale):
                self.scale(action.name, ns, action.replicas)
            elif isinstance(action, Patch):
                self._resource(action.ref.api_version, action.ref.kind).patch(
                    name=action.ref.name, namespace=ns, body=action.patch, content_type="application/merge-patch+json")
                log.info("patched %s %s/%s: %s", action.ref.kind, ns, action.ref.name, action.patch)
            else:
                raise TypeError(f"unknown action {action!r}")

    def create(self, manifest: dict, namespace: str) -> bool:
        """Create if absent; True if created. 409 means it exists: that object is the child."""
        try:
            self._resource(manifest["apiVersion"], manifest["kind"]).create(body=manifest, namespace=namespace)
            return True
        except dynamic.exceptions.ConflictError:
            return False

    def ensure(self, manifest: dict, namespace: str) -> None:
        """Create if absent; if the existing object was built from another pod template, replace
        its template (a Deployment then rolls its pods; a ConfigMap's data is replaced). Replicas
        are Scale's business. Read first: on every pass but the first the object exists, so one
        GET, not a refused create and then the GET."""
        resource = self._resource(manifest["apiVersion"], manifest["kind"])
        name = manifest["metadata"]["name"]
        try:
            existing = resource.get(name=name, namespace=namespace).to_dict()
        except dynamic.exceptions.NotFoundError:
            if self.create(manifest, namespace):  # False: created meanwhile; the next pass compares
                log.info("created %s %s/%s", manifest["kind"], namespace, name)
            return
        want = manifest["metadata"]["annotations"][b.TEMPLATE_HASH]
        have = ((existing.get("metadata") or {}).get("annotations") or {}).get(b.TEMPLATE_HASH)
        if have != want:
            what = ("data", manifest["data"]) if manifest["kind"] == "ConfigMap" else ("spec/template", manifest["spec"]["template"])
            log.info("%s %s/%s: %s changed (%s -> %s); updating it", manifest["kind"], namespace, name, what[0], have, want)
            key = b.TEMPLATE_HASH.replace("~", "~0").replace("/", "~1")
            patch = [{"op": "replace", "path": f"/{what[0]}", "value": what[1]},  # whole: keys go too
                     {"op": "add", "path": f"/metadata/annotations/{key}", "value": want}]  # fmt: skip
            resource.patch(name=name, namespace=namespace, body=patch, content_type="application/json-patch+json")

    def scale(self, name: str, namespace: str, replicas: int) -> None:
        try:
            dep = self.apps.read_namespaced_deployment(name, namespace)
        except ApiException as e:
            if e.status == 404:
                return
            raise
        if dep.spec.replicas != replicas:
            self.apps.patch_namespaced_deployment(name, namespace, {"spec": {"replicas": replicas}})
            log.info("scaled Deployment %s/%s to %d", namespace, name, replicas)

    def event(self, body: dict, type_: str, reason: str, message: str) -> None:
        """A core/v1 Event on the run (what `kubectl describe` shows); best effort."""
        meta = body["metadata"]
        now = datetime.now(timezone.utc)
        event = client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name=f"{meta['name']}.", namespace=meta["namespace"]),
            involved_object=client.V1ObjectReference(api_version=body["apiVersion"], kind=body["kind"], name=meta["name"],
                                                     namespace=meta["namespace"], uid=meta["uid"]),  # fmt: skip
            type=type_, reason=reason, message=message[:1024], count=1, first_timestamp=now, last_timestamp=now,
            source=client.V1EventSource(component="iterdpo-operator"), reporting_component="iterdpo-operator",
        )  # fmt: skip
        try:
            self.core.create_namespaced_event(meta["namespace"], event)
        except ApiException as e:  # an Event is never worth failing a reconcile
            log.warning("could not post event %s on %s: %s", reason, meta["name"], e.reason)
