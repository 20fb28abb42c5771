"""The real kopf operator (`iterdpo operator`, as a subprocess, as it runs in a cluster)
against the real control plane: Jobs, the reward Deployment and PyTorchJobs go through the
real Job/Deployment controllers and Kubeflow's training operator; the instant kubelet
plays the pods, each leaving a stage summary as its termination message."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time

import pytest
import yaml
from clusterutil import bound_claim, wait_for
from scenarios import GROUP, PLURAL, VERSION, run_body, summaries
from kubernetes import client
from kubernetes.client.rest import ApiException

from iterdpo.local.processes import resolve_executable

pytestmark = pytest.mark.cluster


def custom(cluster) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(cluster.api_client)


def get_run(cluster, ns: str, name: str) -> dict:
    return custom(cluster).get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)


def phase_is(cluster, ns, name, operator, *phases):
    def check():
        operator.check_alive()
        return (get_run(cluster, ns, name).get("status") or {}).get("phase") in phases
    return check


def children(cluster, ns: str, run: str) -> dict[str, list[str]]:
    selector = f"iterdpo.io/run={run}"
    batch, apps, core = client.BatchV1Api(cluster.api_client), client.AppsV1Api(cluster.api_client), client.CoreV1Api(cluster.api_client)
    pt = custom(cluster).list_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs", label_selector=selector)
    return {
        "jobs": sorted(j.metadata.name for j in batch.list_namespaced_job(ns, label_selector=selector).items),
        "pytorchjobs": sorted(p["metadata"]["name"] for p in pt["items"]),
        "deployments": sorted(d.metadata.name for d in apps.list_namespaced_deployment(ns, label_selector=selector).items),
        "services": sorted(s.metadata.name for s in core.list_namespaced_service(ns, label_selector=selector).items),
        "configmaps": sorted(c.metadata.name for c in core.list_namespaced_config_map(ns, label_selector=selector).items),
    }


def condition(run: dict, type_: str) -> dict:
    return next(c for c in run["status"]["conditions"] if c["type"] == type_)


def events(cluster, ns: str, name: str) -> list[str]:
    items = client.CoreV1Api(cluster.api_client).list_namespaced_event(ns, field_selector=f"involvedObject.name={name}").items
    return [e.reason for e in sorted(items, key=lambda e: e.metadata.creation_timestamp)]


# -- tests --------------------------------------------------------------------------------
def test_two_round_run_succeeds_with_figures(control_plane, operator, ns):
    control_plane.kubelet.rule = summaries()
    custom(control_plane).create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, run_body("r"))
    wait_for("run r Succeeded", phase_is(control_plane, ns, "r", operator, "Succeeded", "Failed"), control_plane, timeout=120)
    run = get_run(control_plane, ns, "r")
    status = run["status"]
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1)
    assert status["observedGeneration"] == run["metadata"]["generation"]
    assert [it["iteration"] for it in status["iterations"]] == [1, 2]
    first, second = status["iterations"]
    assert first["generation"]["prompts"] == 20 and first["generation"]["promptsLeftOut"] == 2  # 2 shards
    assert (first["scoring"]["meanReward"], second["scoring"]["meanReward"]) == (0.5, 1.0)
    assert second["training"]["rewardMargin"] == pytest.approx(0.6)
    assert second["policy"] == "/iterdpo/runs/r/iter-01/train/policy"
    assert second["lineage"] == {"read": {"/iterdpo/runs/r/iter-02/score/pairs.jsonl": f"sha256:{2:064x}"},
                                 "wrote": {"/iterdpo/runs/r/iter-02/train/policy": f"sha256:{102:064x}"}}  # fmt: skip
    assert condition(run, "Succeeded")["status"] == "True" and condition(run, "Valid")["status"] == "True"

    kids = children(control_plane, ns, "r")
    assert kids["jobs"] == ["r-i01-annotate-a1", "r-i01-generate-a1", "r-i02-annotate-a1", "r-i02-generate-a1"]
    assert kids["pytorchjobs"] == ["r-i01-train-a1", "r-i02-train-a1"]
    assert kids["deployments"] == kids["services"] == ["r-reward"]
    dep = client.AppsV1Api(control_plane.api_client).read_namespaced_deployment("r-reward", ns)
    assert dep.spec.replicas == 0  # scaled to zero outside scoring
    gen = client.BatchV1Api(control_plane.api_client).read_namespaced_job("r-i01-generate-a1", ns)
    assert gen.spec.completion_mode == "Indexed" and gen.status.succeeded == 2
    assert [o.kind for o in gen.metadata.owner_references] == ["IterativeDPORun"]
    assert {"StageStarted", "StageSucceeded", "Succeeded"} <= set(events(control_plane, ns, "r"))
    table = subprocess.run([resolve_executable("iterdpo"), "status", "r", "--cluster", "-n", ns], capture_output=True, text=True,
                           env={**os.environ, "KUBECONFIG": str(control_plane.kubeconfig)})  # fmt: skip
    assert table.returncode == 0, table.stderr
    assert "Succeeded" in table.stdout and "0.500" in table.stdout, table.stdout
    scraped = operator.metrics()
    assert f'iterdpo_run_phase{{namespace="{ns}",phase="Succeeded",run="r"}} 1.0' in scraped
    assert f'iterdpo_run_mean_reward{{namespace="{ns}",round="2",run="r"}} 1.0' in scraped
    assert 'iterdpo_events_total{reason="StageSucceeded"}' in scraped and "iterdpo_stage_seconds_count" in scraped


RM_TRAINING = {"base": "/iterdpo/models/policy", "data": {"dataset": "/iterdpo/prefs.jsonl"}, "nprocPerNode": 2,
               "globalBatchSize": 8}  # fmt: skip


def test_the_reward_model_is_trained_first_then_served_every_round(control_plane, operator, ns):
    control_plane.kubelet.rule = summaries()
    body = run_body("r", reward={"model": None, "training": RM_TRAINING})
    body["spec"]["reward"] = {k: v for k, v in body["spec"]["reward"].items() if v is not None}
    custom(control_plane).create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)
    wait_for("run r Succeeded", phase_is(control_plane, ns, "r", operator, "Succeeded", "Failed"), control_plane, timeout=120)
    status = get_run(control_plane, ns, "r")["status"]
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1)
    assert [it["iteration"] for it in status["iterations"]] == [0, 1, 2]
    rm = status["iterations"][0]["rewardModel"]
    assert (rm["pairs"], rm["pairsLeftOut"], rm["heldOutAccuracy"]) == (90, 2, 0.9)
    assert rm["checkpoint"] == "/iterdpo/runs/r/iter-00/reward_model/model"
    assert condition(get_run(control_plane, ns, "r"), "Succeeded")["message"] == "2 rounds finished"
    kids = children(control_plane, ns, "r")
    assert kids["pytorchjobs"] == ["r-i00-rm-a1", "r-i01-train-a1", "r-i02-train-a1"]
    job = custom(control_plane).get_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs", "r-i00-rm-a1")
    (container,) = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
    assert "iterdpo_trainer.reward_model" in container["command"] + container.get("args", [])
    assert job["spec"]["nprocPerNode"] == "2"


def test_evaluation_runs_every_round_and_a_gate_stops_the_run_with_its_event(control_plane, operator, ns):
    """The gates' state machine on the real control plane: round 0 evaluates the initial policy,
    round 1's Evaluate Job reports a length ratio of 1.5 and gates.maxLengthRatio 1.25 ends the
    run after it (Failed, as gates.onTrip asks), round 2 never starts, the reward and judge
    Deployments go back to zero, and the final policy is the initial one (the last round inside
    every gate). The judge (evaluation.judge) is served like the reward model, at its own port."""
    control_plane.kubelet.rule = summaries()
    body = run_body("r", iterations=3, prompts={"dataset": None, "perIteration": [
        {"dataset": f"/iterdpo/prompts-{i}.jsonl"} for i in (1, 2, 3)]},
        evaluation={"prompts": {"dataset": "/iterdpo/held-out.jsonl"}, "gates": {"maxLengthRatio": 1.25, "onTrip": "Failed"},
                    "judge": {"model": "/iterdpo/models/judge", "maxLength": 256}})  # fmt: skip
    body["spec"]["prompts"] = {k: v for k, v in body["spec"]["prompts"].items() if v is not None}
    custom(control_plane).create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)
    wait_for("run r Failed", phase_is(control_plane, ns, "r", operator, "Succeeded", "Failed"), control_plane, timeout=120)
    run = get_run(control_plane, ns, "r")
    status = run["status"]
    assert status["phase"] == "Failed", json.dumps(status, indent=1)
    assert [it["iteration"] for it in status["iterations"]] == [0, 1]
    zero, one = (it["evaluation"] for it in status["iterations"])
    assert zero["policy"] == "/iterdpo/models/policy" and "winRate" not in zero
    assert (one["lengthRatio"], one["winRate"], one["kl"]) == (1.5, 0.75, 1.0)
    failed = condition(run, "Failed")
    assert failed["status"] == "True" and failed["reason"] == "GateTripped"
    assert failed["message"].startswith("stopped by gates.maxLengthRatio: round 1: mean response length 30.0 tokens")
    assert status["finalPolicy"] == "/iterdpo/models/policy"
    kids = children(control_plane, ns, "r")
    assert kids["jobs"] == ["r-i00-evaluate-a1", "r-i01-annotate-a1", "r-i01-evaluate-a1", "r-i01-generate-a1"]
    assert kids["pytorchjobs"] == ["r-i01-train-a1"]
    job = client.BatchV1Api(control_plane.api_client).read_namespaced_job("r-i01-evaluate-a1", ns)
    (container,) = job.spec.template.spec.containers
    argv = container.command + (container.args or [])
    assert argv[argv.index("--iteration") + 1] == "1" and argv[argv.index("--reward-url") + 1].startswith("http://r-reward.")
    assert argv[argv.index("--judge-url") + 1] == f"http://r-judge.{ns}.svc:8001"
    apps, core = client.AppsV1Api(control_plane.api_client), client.CoreV1Api(control_plane.api_client)
    judge = apps.read_namespaced_deployment("r-judge", ns)
    (served,) = judge.spec.template.spec.containers
    assert "--judge" in served.command + (served.args or []) and served.resources.limits["nvidia.com/gpu"] == "1"
    assert [p.port for p in core.read_namespaced_service("r-judge", ns).spec.ports] == [8001]
    for name in ("r-reward", "r-judge"):
        wait_for(f"{name} scaled to 0", lambda: apps.read_namespaced_deployment(name, ns).spec.replicas == 0,
                 control_plane, timeout=30)  # fmt: skip
    assert "GateTripped" in events(control_plane, ns, "r") and "Succeeded" not in events(control_plane, ns, "r")


def test_a_failed_reward_model_fails_the_run_before_round_1(control_plane, operator, ns):
    control_plane.kubelet.rule = summaries(fail={"rm": "iterdpo_trainer.reward_model (rank 0): error: no usable pair"})
    body = run_body("rmfail", reward={"model": None, "training": RM_TRAINING},
                    kubernetes={"stageRetries": 0})  # fmt: skip
    body["spec"]["reward"] = {k: v for k, v in body["spec"]["reward"].items() if v is not None}
    custom(control_plane).create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)
    wait_for("run rmfail Failed", phase_is(control_plane, ns, "rmfail", operator, "Succeeded", "Failed"), control_plane,
             timeout=120)  # fmt: skip
    run = get_run(control_plane, ns, "rmfail")
    assert run["status"]["phase"] == "Failed" and run["status"]["currentStage"] == "RewardModel"
    assert condition(run, "Failed")["message"].startswith("before round 1: RewardModel failed"), condition(run, "Failed")
    assert children(control_plane, ns, "rmfail")["jobs"] == []  # no round started


def test_invalid_spec_past_the_schema_is_reported_not_crashed(control_plane, operator, ns):
    body = run_body("bad", policy={"model": "/elsewhere/policy"})
    custom(control_plane).create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)
    wait_for("run bad Failed", phase_is(control_plane, ns, "bad", operator, "Failed"), control_plane, timeout=60)
    run = get_run(control_plane, ns, "bad")
    valid = condition(run, "Valid")
    assert valid["status"] == "False" and valid["reason"] == "InvalidSpec"
    assert "spec.policy.model" in valid["message"] and "/iterdpo" in valid["message"]
    assert children(control_plane, ns, "bad")["jobs"] == []
    # fixing the spec lets the run go on
    control_plane.kubelet.rule = summaries()
    custom(control_plane).patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "bad", {"spec": {"policy": {"model": "/iterdpo/p"}}})
    wait_for("run bad Succeeded", phase_is(control_plane, ns, "bad", operator, "Succeeded"), control_plane, timeout=120)


def test_failed_stage_is_retried_then_fails_the_run_then_resumes(control_plane, operator, ns):
    control_plane.kubelet.rule = summaries(fail={"annotate": "reward server unreachable: connection refused"})
    body = run_body("flaky", iterations=1, kubernetes={"volume": {"claimName": "iterdpo-data"}, "stageRetries": 1,
                                                       "retryBackoffSeconds": 1})  # fmt: skip
    custom(control_plane).create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)
    wait_for("run flaky Failed", phase_is(control_plane, ns, "flaky", operator, "Failed"), control_plane, timeout=120)
    run = get_run(control_plane, ns, "flaky")
    failed = condition(run, "Failed")
    assert failed["status"] == "True"
    assert "reward server unreachable" in failed["message"] and "attempt 2 of 2" in failed["message"]
    assert children(control_plane, ns, "flaky")["jobs"] == ["flaky-i01-annotate-a1", "flaky-i01-annotate-a2", "flaky-i01-generate-a1"]
    reasons = events(control_plane, ns, "flaky")
    assert "StageRetrying" in reasons and "StageFailed" in reasons

    control_plane.kubelet.rule = summaries()  # the cause is fixed: resume from the failed stage
    out = subprocess.run([resolve_executable("iterdpo"), "resume", "flaky", "-n", ns], capture_output=True, text=True,
                         env={**os.environ, "KUBECONFIG": str(control_plane.kubeconfig)})  # fmt: skip
    assert out.returncode == 0, out.stderr
    wait_for("run flaky Succeeded", phase_is(control_plane, ns, "flaky", operator, "Succeeded"), control_plane, timeout=120)
    assert "flaky-i01-annotate-a3" in children(control_plane, ns, "flaky")["jobs"]


def test_a_stage_past_its_timeout_fails_through_the_real_job_controller(control_plane, operator, ns):
    """spec.kubernetes.stageTimeoutSeconds -> the Job's activeDeadlineSeconds: kube-controller-manager's
    Job controller ends the held attempt (DeadlineExceeded) and the operator fails it, naming the field."""
    control_plane.kubelet.rule = summaries(hold={"generate"})
    body = run_body("slow", iterations=1, kubernetes={"volume": {"claimName": "iterdpo-data"}, "stageRetries": 0,
                                                      "stageTimeoutSeconds": {"generate": 3}})  # fmt: skip
    custom(control_plane).create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)
    wait_for("run slow Failed", phase_is(control_plane, ns, "slow", operator, "Failed"), control_plane, timeout=90)
    failed = condition(get_run(control_plane, ns, "slow"), "Failed")
    assert "DeadlineExceeded" in failed["message"], failed["message"]
    assert "it ran longer than spec.kubernetes.stageTimeoutSeconds.generate = 3 s" in failed["message"]
    assert children(control_plane, ns, "slow")["jobs"] == ["slow-i01-generate-a1"]
    control_plane.kubelet.rule = summaries()
    control_plane.kubelet.release()


def test_operator_killed_mid_stage_creates_no_duplicates(control_plane, operator, ns):
    control_plane.kubelet.rule = summaries(hold={"generate"})
    custom(control_plane).create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, run_body("crash", iterations=1))
    batch = client.BatchV1Api(control_plane.api_client)
    wait_for("generate Job", lambda: batch.list_namespaced_job(ns, label_selector="iterdpo.io/run=crash").items, control_plane)
    operator.kill()
    operator.start()
    time.sleep(4)  # several reconcile periods of the new operator while the stage still runs
    assert children(control_plane, ns, "crash")["jobs"] == ["crash-i01-generate-a1"]
    control_plane.kubelet.rule = summaries()
    control_plane.kubelet.release()
    wait_for("run crash Succeeded", phase_is(control_plane, ns, "crash", operator, "Succeeded"), control_plane, timeout=120)
    kids = children(control_plane, ns, "crash")
    assert kids["jobs"] == ["crash-i01-annotate-a1", "crash-i01-generate-a1"] and kids["pytorchjobs"] == ["crash-i01-train-a1"]


def test_suspend_and_resume(control_plane, operator, ns):
    control_plane.kubelet.rule = summaries(hold={"generate"})
    custom(control_plane).create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, run_body("pause", iterations=1))
    batch = client.BatchV1Api(control_plane.api_client)
    wait_for("generate running", lambda: (get_run(control_plane, ns, "pause").get("status") or {}).get("currentChild"), control_plane)
    custom(control_plane).patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "pause", {"spec": {"suspend": True}})
    wait_for("run Suspended", phase_is(control_plane, ns, "pause", operator, "Suspended"), control_plane, timeout=60)
    wait_for("generate Job suspended", lambda: batch.read_namespaced_job("pause-i01-generate-a1", ns).spec.suspend, control_plane)
    assert condition(get_run(control_plane, ns, "pause"), "Suspended")["status"] == "True"

    control_plane.kubelet.rule = summaries()
    control_plane.kubelet.release()
    custom(control_plane).patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "pause", {"spec": {"suspend": False}})
    wait_for("run pause Succeeded", phase_is(control_plane, ns, "pause", operator, "Succeeded"), control_plane, timeout=120)
    assert condition(get_run(control_plane, ns, "pause"), "Suspended")["status"] == "False"
    assert children(control_plane, ns, "pause")["jobs"] == ["pause-i01-annotate-a1", "pause-i01-generate-a1"]


def test_deleting_the_run_collects_every_child(control_plane, operator, ns):
    control_plane.kubelet.rule = summaries(hold={"train", "master"})
    custom(control_plane).create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, run_body("gone", iterations=1))
    wait_for("training started", lambda: children(control_plane, ns, "gone")["pytorchjobs"], control_plane, timeout=90)
    assert children(control_plane, ns, "gone")["configmaps"] == ["gone-spec"]
    custom(control_plane).delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "gone")
    empty = {"jobs": [], "pytorchjobs": [], "deployments": [], "services": [], "configmaps": []}
    wait_for("children garbage-collected", lambda: children(control_plane, ns, "gone") == empty, control_plane, timeout=60)


def test_status_survives_resource_version_conflicts(control_plane, operator, ns):
    """Another writer keeps bumping the run's resourceVersion (as kubectl annotate or
    another controller would): every status write still lands, none is lost."""
    control_plane.kubelet.rule = summaries()
    custom(control_plane).create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, run_body("busy"))
    stop_writer = threading.Event()

    def writer():
        api = client.CustomObjectsApi(control_plane.api_client)
        i = 0
        while not stop_writer.is_set():
            i += 1
            try:
                api.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "busy", {"metadata": {"annotations": {"test/bump": str(i)}}})
            except ApiException:
                pass
            time.sleep(0.05)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        wait_for("run busy done", phase_is(control_plane, ns, "busy", operator, "Succeeded", "Failed"), control_plane, timeout=150)
    finally:
        stop_writer.set()
        thread.join()
    status = get_run(control_plane, ns, "busy")["status"]
    assert status["phase"] == "Succeeded"
    assert all(it.get("generation") and it.get("scoring") and it.get("training") for it in status["iterations"])


def test_kubectl_get_shows_printer_columns(control_plane, operator, ns):
    control_plane.kubelet.rule = summaries()
    custom(control_plane).create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, run_body("cols", iterations=1))
    wait_for("run cols Succeeded", phase_is(control_plane, ns, "cols", operator, "Succeeded"), control_plane, timeout=120)
    out = control_plane.kubectl("get", "idr", "-n", ns).stdout
    header, row = out.splitlines()[:2]
    assert header.split()[:5] == ["NAME", "ROUND", "STAGE", "PHASE", "REWARD"]
    assert row.split()[0] == "cols" and "Succeeded" in row and "0.5" in row
    assert yaml.safe_load(control_plane.kubectl("get", "idr", "cols", "-n", ns, "-o", "yaml").stdout)["status"]["finalPolicy"]


def test_a_new_image_mid_run_rolls_the_reward_server(control_plane, operator, ns):
    """spec.kubernetes may change mid-run: the long-lived reward Deployment follows it."""
    control_plane.kubelet.rule = summaries(hold={"generate"})
    body = run_body("roll", iterations=1, kubernetes={"keepRewardWarm": True, "image": "registry.example/iterdpo:1"})
    custom(control_plane).create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)
    apps = client.AppsV1Api(control_plane.api_client)

    def reward_image():
        deps = apps.list_namespaced_deployment(ns, field_selector="metadata.name=roll-reward").items
        return deps and deps[0].spec.template.spec.containers[0].image

    assert wait_for("reward Deployment", reward_image, control_plane) == "registry.example/iterdpo:1"
    custom(control_plane).patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "roll",
                                                         {"spec": {"kubernetes": {"image": "registry.example/iterdpo:2"}}})  # fmt: skip
    wait_for("reward Deployment on the new image", lambda: reward_image() == "registry.example/iterdpo:2", control_plane)
    assert condition(get_run(control_plane, ns, "roll"), "Valid")["status"] == "True"


# -- the run says what is wrong ------------------------------------------------------------
def passes(operator) -> float:
    """Reconcile passes the operator has finished (its metric): a test waits for more of them
    instead of sleeping, to show that something is said once and not on every pass."""
    line = next((l for l in operator.metrics().splitlines() if l.startswith('iterdpo_reconciles_total{result="ok"}')), None)
    return float(line.split()[-1]) if line else 0.0


def after_more_passes(cluster, operator, n: int = 3) -> None:
    start = passes(operator)
    wait_for(f"{n} more reconcile passes", lambda: passes(operator) >= start + n, cluster, timeout=60)


def progressing_says(cluster, ns, name, operator, *words):
    def check():
        operator.check_alive()
        status = get_run(cluster, ns, name).get("status") or {}
        message = next((c["message"] for c in status.get("conditions", []) if c["type"] == "Progressing"), "")
        return all(w in message for w in words) and message
    return check


def test_a_missing_claim_and_secret_are_named_then_the_run_goes_on_when_they_exist(control_plane, operator, ns, tmp_path):
    body = run_body("refs", iterations=1, kubernetes={"volume": {"claimName": "later-data"}, "hubTokenSecret": {"name": "later-hf"}})
    custom(control_plane).create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)

    def valid_false():
        operator.check_alive()
        conditions = (get_run(control_plane, ns, "refs").get("status") or {}).get("conditions") or []
        return next((c for c in conditions if c["type"] == "Valid" and c["reason"] == "ReferenceNotFound"), None)

    valid = wait_for("Valid=False ReferenceNotFound", valid_false, control_plane)
    assert valid["status"] == "False"
    assert valid["message"] == (f'spec.kubernetes.volume.claimName: PersistentVolumeClaim "later-data" not found in namespace "{ns}"; '
                                "create it (docs/kubernetes.md) or fix the field; "
                                f'spec.kubernetes.hubTokenSecret.name: Secret "later-hf" not found in namespace "{ns}"; '
                                "create it (docs/kubernetes.md) or fix the field")  # fmt: skip
    after_more_passes(control_plane, operator)
    run = get_run(control_plane, ns, "refs")
    assert run["status"]["phase"] == "Pending" and condition(run, "Progressing")["reason"] == "ReferenceNotFound"
    assert events(control_plane, ns, "refs") == ["ReferenceNotFound"]  # once, not once per pass
    assert children(control_plane, ns, "refs") == {"jobs": [], "pytorchjobs": [], "deployments": [], "services": [], "configmaps": []}

    core = client.CoreV1Api(control_plane.api_client)
    core.create_namespaced_secret(ns, {"metadata": {"name": "later-hf"}, "stringData": {"token": "hf_x"}})
    wait_for("only the claim still missing", lambda: "later-hf" not in valid_false()["message"], control_plane)
    control_plane.kubelet.rule = summaries()
    bound_claim(control_plane, ns, tmp_path / "later", name="later-data")
    wait_for("run refs Succeeded", phase_is(control_plane, ns, "refs", operator, "Succeeded", "Failed"), control_plane, timeout=120)
    run = get_run(control_plane, ns, "refs")
    assert run["status"]["phase"] == "Succeeded" and condition(run, "Valid")["reason"] == "SpecValid"
    assert condition(run, "Failed")["status"] == "False"


def test_a_stage_asking_for_more_gpus_than_any_node_has_says_unschedulable(control_plane, operator, ns):
    """The real scheduler marks the pod PodScheduled=False (Unschedulable); the run's Progressing
    message carries its message, and one Warning Event says it."""
    body = run_body("big", iterations=1, kubernetes={"resources": {"generate": {"gpus": 16}}})
    custom(control_plane).create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)
    message = wait_for("Progressing says Unschedulable",
                       progressing_says(control_plane, ns, "big", operator, "Unschedulable", "nvidia.com/gpu"), control_plane)  # fmt: skip
    assert message.startswith("round 1: Generate is running; pod big-i01-generate-a1-"), message
    assert "Insufficient nvidia.com/gpu" in message and "\n" not in message
    after_more_passes(control_plane, operator)
    assert sorted(events(control_plane, ns, "big")) == ["StageStarted", "Unschedulable"]
    assert get_run(control_plane, ns, "big")["status"]["phase"] == "Running"
    # the fix docs/kubernetes.md gives: change spec.kubernetes, delete the attempt's child; the
    # operator creates it again, under the same name, from the current spec
    control_plane.kubelet.rule = summaries()
    custom(control_plane).patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "big",
                                                         {"spec": {"kubernetes": {"resources": {"generate": {"gpus": 1}}}}})  # fmt: skip
    client.BatchV1Api(control_plane.api_client).delete_namespaced_job("big-i01-generate-a1", ns, propagation_policy="Background")
    wait_for("run big Succeeded", phase_is(control_plane, ns, "big", operator, "Succeeded", "Failed"), control_plane, timeout=120)
    run = get_run(control_plane, ns, "big")
    assert run["status"]["phase"] == "Succeeded" and children(control_plane, ns, "big")["jobs"] == ["big-i01-annotate-a1", "big-i01-generate-a1"]


def test_waiting_for_the_reward_server_says_why_its_pod_cannot_start(control_plane, operator, ns):
    control_plane.kubelet.rule = summaries()
    body = run_body("rw", iterations=1, kubernetes={"resources": {"reward": {"gpus": 16}}})
    custom(control_plane).create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)
    message = wait_for("WaitingForRewardServer says Unschedulable",
                       progressing_says(control_plane, ns, "rw", operator, "Unschedulable"), control_plane, timeout=90)  # fmt: skip
    assert message.startswith("round 1: waiting for Deployment rw-reward to be available; pod rw-reward-"), message
    assert "Insufficient nvidia.com/gpu" in message
    assert condition(get_run(control_plane, ns, "rw"), "Progressing")["reason"] == "WaitingForRewardServer"
    after_more_passes(control_plane, operator)
    assert events(control_plane, ns, "rw").count("Unschedulable") == 1


def test_an_image_that_does_not_exist_says_the_pull_failure_once(control_plane, operator, ns):
    """The instant kubelet's stand-in for a failed pull (kubelet.MISSING_IMAGE): ErrImagePull,
    then ImagePullBackOff, as a real kubelet reports them; one Event for both."""
    body = run_body("img", iterations=1, kubernetes={"image": "registry.example/iterdpo:does-not-exist"})
    custom(control_plane).create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)
    message = wait_for("Progressing says ImagePullBackOff",
                       progressing_says(control_plane, ns, "img", operator, "ImagePullBackOff"), control_plane)  # fmt: skip
    assert 'Back-off pulling image "registry.example/iterdpo:does-not-exist"' in message, message
    after_more_passes(control_plane, operator)
    reasons = events(control_plane, ns, "img")
    assert reasons.count("ErrImagePull") == 1 and "ImagePullBackOff" not in reasons, reasons
