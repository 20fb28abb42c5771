"""The Kubeflow training operator v1 (`kubeflow/build.sh`, v1.8.1) as a process against a
test control plane (`controlplane.py`), so that PyTorchJobs really get pods, a master
Service and status conditions. See kubeflow/README.md.

v1.8 has no flag to turn its webhook server off: `main` blocks the controllers until the
embedded cert rotator (open-policy-agent/cert-controller) reports "ready", and that needs

* the Secret `training-operator-webhook-cert` in the operator's namespace
  (`MY_POD_NAMESPACE`, default `kubeflow`); the rotator fills it with a CA and a cert;
* a file at the *fixed* path `/tmp/k8s-webhook-server/serving-certs/tls.crt` (in a pod,
  the Secret is mounted there; only its existence is checked). We create an empty
  placeholder there when missing and never remove it (other runs may rely on it);
* a cert/key pair that the webhook server (controller-runtime) serves, read from
  `$TMPDIR/k8s-webhook-server/serving-certs`. We point TMPDIR into the work dir and put a
  self-signed cert for 127.0.0.1 there.

With `webhook=True` we also register the operator's validating webhook for the enabled
kinds with the API server (a ValidatingWebhookConfiguration with a `url` on loopback and
our cert as caBundle, under a name the rotator does not touch), so PyTorchJobs are
validated the way a real deployment validates them. It is removed on stop: with
failurePolicy Fail a dangling one would block every create of those kinds.
"""

from __future__ import annotations

import base64
import subprocess
import time
from pathlib import Path

from iterdpo.local.processes import free_port, start, stop, tail, wait_ready

OPERATOR_VERSION = "v1.8.1"
WEBHOOK_SECRET = "training-operator-webhook-cert"
# Hard-coded in training-operator v1.8.1 pkg/cert (certDir); not affected by TMPDIR.
ROTATOR_CERT_FILE = Path("/tmp/k8s-webhook-server/serving-certs/tls.crt")
# kind (as --enable-scheme takes it) -> (webhook path, resource plural, operations)
WEBHOOKS = {
    "pytorchjob": ("/validate-kubeflow-org-v1-pytorchjob", "pytorchjobs", ["CREATE", "UPDATE"]),
    "tfjob": ("/validate-kubeflow-org-v1-tfjob", "tfjobs", ["CREATE", "UPDATE"]),
    "xgboostjob": ("/validate-kubeflow-org-v1-xgboostjob", "xgboostjobs", ["CREATE", "UPDATE"]),
    "paddlejob": ("/validate-kubeflow-org-v1-paddlejob", "paddlejobs", ["CREATE", "UPDATE"]),
    "mxjob": ("/validate-kubeflow-org-v1-mxjob", "mxjobs", ["CREATE", "UPDATE", "DELETE"]),
}


class TrainingOperatorError(RuntimeError):
    pass


class TrainingOperator:
    """Start on `__enter__`, stop on `__exit__`; the log is `<work_dir>/training-operator.log`.

    `bin_path` is the training-operator binary (`$(tests/cluster/kubeflow/build.sh)/training-operator`).
    Only the schemes whose CRDs are installed may be enabled (shared/kubeflow has PyTorchJob).
    """

    def __init__(
        self,
        bin_path: Path,
        kubeconfig: Path,
        work_dir: Path,
        *,
        namespace: str = "kubeflow",
        schemes: tuple[str, ...] = ("pytorchjob",),
        webhook: bool = True,
        ready_timeout: float = 60.0,
        extra_args: tuple[str, ...] = (),
    ):
        self.bin_path = Path(bin_path)
        self.kubeconfig = Path(kubeconfig)
        self.work_dir = Path(work_dir)
        self.namespace = namespace
        self.schemes = tuple(s.lower() for s in schemes)
        self.webhook = webhook
        self.ready_timeout = ready_timeout
        self.extra_args = tuple(extra_args)
        self.metrics_port = free_port()
        self.health_port = free_port()
        self.webhook_port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = self.work_dir / "training-operator.log"
        self.tmp_dir = self.work_dir / "training-operator-tmp"
        self.cert_dir = self.tmp_dir / "k8s-webhook-server" / "serving-certs"
        # One name per instance (the port), so two operators on one API server don't clash.
        self.webhook_config_name = f"iterdpo-test-{self.webhook_port}.training-operator.kubeflow.org"
        self.startup_seconds: float | None = None
        self._api_client = None

    # -- helpers --------------------------------------------------------------
    def _fail(self, why: str) -> TrainingOperatorError:
        return TrainingOperatorError(f"training-operator: {why}\n--- {self.log_path} ---\n{tail(self.log_path, 40)}")

    def _api(self):
        if self._api_client is None:
            from kubernetes import config as kconfig

            self._api_client = kconfig.new_client_from_config(config_file=str(self.kubeconfig))
        return self._api_client

    def _make_cert(self) -> bytes:
        """A self-signed cert (CA:TRUE, so it is its own caBundle) for the loopback webhook."""
        self.cert_dir.mkdir(parents=True, exist_ok=True)
        crt, key = self.cert_dir / "tls.crt", self.cert_dir / "tls.key"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "7",
             "-keyout", str(key), "-out", str(crt), "-subj", "/CN=training-operator-test",
             "-addext", f"subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:training-operator.{self.namespace}.svc"],
            check=True, capture_output=True,
        )  # fmt: skip
        return crt.read_bytes()

    def _ensure_rotator_file(self) -> None:
        if ROTATOR_CERT_FILE.exists():
            return
        ROTATOR_CERT_FILE.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(ROTATOR_CERT_FILE, "x") as f:
                f.write("placeholder for training-operator's cert rotator (tests/cluster/kubeflow_operator.py)\n")
        except FileExistsError:
            pass

    def _ensure_namespace_and_secret(self) -> None:
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        core = client.CoreV1Api(self._api())
        for create in (
            lambda: core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=self.namespace))),
            lambda: core.create_namespaced_secret(
                self.namespace, client.V1Secret(metadata=client.V1ObjectMeta(name=WEBHOOK_SECRET))
            ),
        ):
            try:
                create()
            except ApiException as e:
                if e.status != 409:
                    raise

    def _register_webhook(self, ca_pem: bytes) -> None:
        from kubernetes import client

        hooks = []
        for s in self.schemes:
            if s not in WEBHOOKS:
                continue
            path, plural, ops = WEBHOOKS[s]
            hooks.append({
                "name": f"validator.{s}.training-operator.kubeflow.org",
                "admissionReviewVersions": ["v1"], "sideEffects": "None", "failurePolicy": "Fail",
                "timeoutSeconds": 10,
                "clientConfig": {"url": f"https://127.0.0.1:{self.webhook_port}{path}",
                                 "caBundle": base64.b64encode(ca_pem).decode()},
                "rules": [{"apiGroups": ["kubeflow.org"], "apiVersions": ["v1"], "operations": ops, "resources": [plural]}],
            })  # fmt: skip
        if hooks:
            client.AdmissionregistrationV1Api(self._api()).create_validating_webhook_configuration(
                {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
                 "metadata": {"name": self.webhook_config_name}, "webhooks": hooks}  # fmt: skip
            )

    def _unregister_webhook(self) -> None:
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        try:
            client.AdmissionregistrationV1Api(self._api()).delete_validating_webhook_configuration(
                self.webhook_config_name, _request_timeout=10
            )
        except ApiException as e:
            if e.status != 404:
                raise
        except Exception:  # noqa: BLE001 - the API server is gone already: nothing left to block
            pass

    def _wait_ready(self) -> None:
        try:
            wait_ready(f"http://127.0.0.1:{self.health_port}/readyz", self.proc, timeout=self.ready_timeout, interval=0.2)
        except (RuntimeError, TimeoutError) as exc:
            raise self._fail(str(exc)) from None

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> "TrainingOperator":
        t0 = time.monotonic()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        try:
            ca_pem = self._make_cert()
            self._ensure_rotator_file()
            self._ensure_namespace_and_secret()
            args = [
                str(self.bin_path), "--kubeconfig", str(self.kubeconfig), "--leader-elect=false",
                "--metrics-bind-address", f"127.0.0.1:{self.metrics_port}",
                "--health-probe-bind-address", f"127.0.0.1:{self.health_port}",
                "--webhook-server-port", str(self.webhook_port),
                "--zap-log-level", "info",
                *(f"--enable-scheme={s}" for s in self.schemes),
                *self.extra_args,
            ]  # fmt: skip
            env = {"TMPDIR": str(self.tmp_dir), "MY_POD_NAMESPACE": self.namespace, "KUBEFLOW_NAMESPACE": ""}
            self.proc = start(tuple(args), env=env, log_path=self.log_path)
            self._wait_ready()
            if self.webhook:
                self._register_webhook(ca_pem)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def check_alive(self) -> None:
        """Raise with the log tail if the operator has died (for a test that times out)."""
        if self.proc is not None and self.proc.poll() is not None:
            raise self._fail(f"exited with code {self.proc.returncode}")

    def stop(self) -> None:
        """Unregister the webhook, then SIGTERM the operator. v1.8.1 then exits with
        `panic: close of closed channel` (main's `defer close(certsReady)` after the cert
        rotator closed it already): harmless, so the exit code is not checked."""
        try:
            if self.webhook and self._api_client is not None:
                self._unregister_webhook()
        finally:
            if self.proc is not None:
                stop(self.proc, grace_seconds=10)
                self.proc = None
            if self._api_client is not None:
                self._api_client.close()
                self._api_client = None

    def __enter__(self) -> "TrainingOperator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
