"""The operator's pure decision function: stage order, idempotence, retries, suspend,
resume, and what is created when."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from iterdpo.planner import Finished
from iterdpo.status import RunStatus
from iterdpo_operator.launchers import Outcome
from iterdpo.stages import GenerateSummary, ScoreSummary, TrainSummary
from iterdpo_operator.reconcile import (RESUME_ANNOTATION, Create, Ensure, Observed, Patch, PodMessage, Scale, Target,
                                        current_target, decide)  # fmt: skip
from iterdpo_operator.reconcile import invalid_decision
from iterdpo_operator.validation import validate_resource
from iterdpo.spec import MAX_RETRY_BACKOFF_SECONDS

NOW = datetime(2026, 11, 27, 12, 0, 0, tzinfo=timezone.utc)


def make_run(**kubernetes):
    body = {
        "apiVersion": "iterdpo.io/v1alpha1", "kind": "IterativeDPORun", "metadata": {"name": "r", "namespace": "ml"},
        "spec": {"iterations": 2, "policy": {"model": "/iterdpo/p"}, "prompts": {"dataset": "/iterdpo/q.jsonl"},
                 "reward": {"model": "org/rm"}, "generation": {"shards": 2},
                 "kubernetes": {"volume": {"claimName": "data"}, "stageRetries": 1, "retryBackoffSeconds": 10, **kubernetes}},
    }  # fmt: skip
    return validate_resource(body)


def step(run, status, observed=Observed(), annotations=None, now=NOW):
    target = current_target(run, status)
    return decide(run, status, owner_uid="uid-1", generation=3, annotations=annotations or {}, target=target,
                  observed=observed, now=now, new_token="tok")  # fmt: skip


def created(decision) -> list[str]:
    return [a.manifest["metadata"]["name"] for a in decision.actions if isinstance(a, (Create, Ensure))]


# What the two shards' pods left as termination messages, built from the stage's own contract.
GEN = [PodMessage(f"r-i01-generate-a1-{i}", GenerateSummary(shard=i, shards=2, prompts=5, prompts_out=5, samples=40,
                                                            prompts_left_out=0, seconds=3.0).to_message())
       for i in range(2)]  # fmt: skip
DONE = Outcome(True, True, "Complete", start_time="2026-11-27T11:59:00Z", completion_time="2026-11-27T11:59:30Z")


def test_fresh_run_starts_generation_with_reward_server_scaled_down():
    d = step(make_run(), RunStatus())
    assert created(d) == ["r-spec", "r-reward-token", "r-reward", "r-reward", "r-i01-generate-a1"]
    assert Scale("r-reward", 0) in d.actions
    assert (d.status.phase, d.status.current_stage, d.status.current_attempt, d.status.current_child) == (
        "Running", "Generate", 1, "r-i01-generate-a1")
    assert d.status.observed_generation == 3 and d.status.condition("Valid").status == "True"
    assert [e.reason for e in d.events] == ["StageStarted"]


def test_running_child_is_left_alone_and_status_is_stable():
    run = make_run()
    first = step(run, RunStatus()).status
    running = Observed(child_exists=True, outcome=Outcome(False))
    d1 = step(run, first, running)
    d2 = step(run, d1.status, running)
    assert "r-i01-generate-a1" not in created(d1)
    assert d1.status == d2.status == first  # nothing to write
    assert d1.events == []


def test_success_records_figures_and_moves_on():
    run = make_run()
    st = step(run, RunStatus()).status
    d = step(run, st, Observed(True, DONE, summaries=GEN))
    assert d.again and d.status.iteration(1).generation.samples == 80
    assert d.status.iteration(1).generation.seconds == 30.0
    nxt = step(run, d.status)  # Score: reward server wanted, but not available yet
    assert Scale("r-reward", 1) in nxt.actions and "r-i01-annotate-a1" not in created(nxt)
    assert nxt.status.condition("Progressing").reason == "WaitingForRewardServer"
    ready = step(run, nxt.status, Observed(servers_available=frozenset({"reward"})))
    assert "r-i01-annotate-a1" in created(ready)


def test_missing_shard_summary_is_a_failure_not_a_silent_drop():
    run = make_run()
    st = step(run, RunStatus()).status
    d = step(run, st, Observed(True, DONE, summaries=GEN[:1]))
    assert d.status.iteration(1).generation is None
    assert d.status.current_attempt == 2
    assert "found shards [0] in 1 summaries" in d.status.condition("Progressing").message


def test_a_summary_that_is_not_the_stages_contract_fails_the_attempt_naming_the_pod():
    run = make_run()
    st = step(run, RunStatus()).status
    bad = [GEN[0], PodMessage("r-i01-generate-a1-x", '{"stage": "generate", "prompts": 5}')]
    d = step(run, st, Observed(True, DONE, summaries=bad))
    assert d.status.iteration(1).generation is None and d.status.current_attempt == 2
    assert "pod r-i01-generate-a1-x left no valid GenerateSummary (shard: Field required" in (
        d.status.condition("Progressing").message)


def test_the_backoff_is_capped_at_a_day_whatever_the_attempt():
    """retryBackoffSeconds x 2^(n-1) grows past any sane wait: the decision caps it (no overflow, no years)."""
    run = make_run(stageRetries=10, retryBackoffSeconds=3600)
    failed = Observed(True, Outcome(True, False, "BackoffLimitExceeded", "Job has reached the specified backoff limit"))
    st = step(run, RunStatus()).status
    waits = []
    for attempt in range(1, 11):
        st = st.model_copy(update={"current_attempt": attempt, "retry_after": None})
        d = step(run, st, failed, now=NOW)
        waits.append(d.requeue_after)
    assert waits[:4] == [3600, 7200, 14400, 28800] and max(waits) == 86400 == MAX_RETRY_BACKOFF_SECONDS


@pytest.mark.parametrize(("launcher", "outcome"), [
    ("job", Outcome(True, False, "DeadlineExceeded", "Job was active longer than specified deadline")),
    ("pytorchjob", Outcome(True, False, "PyTorchJobFailed", "Job r-i01-train-a1 has failed because it was active longer than specified deadline")),
])  # fmt: skip
def test_a_stage_past_its_deadline_is_a_failed_attempt_naming_the_timeout(launcher, outcome):
    run = make_run(launcher=launcher, stageTimeoutSeconds={"train": 90})
    st = RunStatus(current_iteration=1, current_stage="Train")
    target = Target(1, "Train", "/iterdpo/p", 1)
    d = decide(run, st, owner_uid="u", generation=1, annotations={}, target=target, observed=Observed(True, outcome),
               now=NOW, new_token="tok")  # fmt: skip
    message = d.status.condition("Progressing").message
    assert d.status.current_attempt == 2 and "attempt 2 in 10s" in message
    assert "it ran longer than spec.kubernetes.stageTimeoutSeconds.train = 90 s (pending pods count)" in message


def test_failure_retries_after_backoff_then_fails_the_run():
    run = make_run()
    st = step(run, RunStatus()).status
    failed = Observed(True, Outcome(True, False, "BackoffLimitExceeded", "Job has reached the specified backoff limit"),
                      failure_detail="pod r-i01-generate-a1-0-x: CUDA out of memory")  # fmt: skip
    d = step(run, st, failed)
    assert (d.status.current_attempt, d.status.retry_after) == (2, "2026-11-27T12:00:10Z")
    assert [e.reason for e in d.events] == ["StageRetrying"] and d.requeue_after == 10
    early = step(run, d.status, Observed(), now=NOW + timedelta(seconds=5))
    assert "r-i01-generate-a2" not in created(early) and early.requeue_after == pytest.approx(5)
    later = step(run, d.status, Observed(), now=NOW + timedelta(seconds=11))
    assert "r-i01-generate-a2" in created(later)
    final = step(run, later.status, failed, now=NOW + timedelta(seconds=20))
    assert final.status.phase == "Failed"
    message = final.status.condition("Failed").message
    assert "CUDA out of memory" in message and "attempt 2 of 2" in message and "BackoffLimitExceeded" in message
    assert not [a for a in final.actions if isinstance(a, Create)]
    assert step(run, final.status, Observed()).status.phase == "Failed"  # stays failed


def test_resume_annotation_starts_a_new_attempt_once():
    run = make_run(stageRetries=0)
    st = step(run, RunStatus()).status
    failed = step(run, st, Observed(True, Outcome(True, False, "BackoffLimitExceeded"))).status
    assert failed.phase == "Failed"
    d = step(run, failed, annotations={RESUME_ANNOTATION: "t1"})
    assert (d.status.phase, d.status.current_attempt, d.status.resume_token) == ("Running", 2, "t1")
    assert "r-i01-generate-a2" in created(step(run, d.status, annotations={RESUME_ANNOTATION: "t1"}))
    again = step(run, failed.model_copy(update={"resume_token": "t1"}), annotations={RESUME_ANNOTATION: "t1"})
    assert again.status.phase == "Failed"  # the same token is not acted on twice


def test_suspend_suspends_the_child_and_resume_unsuspends():
    run = make_run()
    st = step(run, RunStatus()).status
    suspended_run = run.model_copy(update={"spec": run.spec.model_copy(update={"suspend": True})})
    d = step(suspended_run, st, Observed(True, Outcome(False)))
    assert Patch(d.actions[1].ref, {"spec": {"suspend": True}}) in d.actions
    assert d.status.phase == "Suspended" and d.status.condition("Suspended").status == "True"
    back = step(run, d.status, Observed(True, Outcome(False), child_suspended=True))
    assert any(isinstance(a, Patch) and a.patch == {"spec": {"suspend": False}} for a in back.actions)
    assert back.status.phase == "Running" and back.status.condition("Suspended").status == "False"


def test_the_suspend_message_says_whether_a_stage_was_running():
    run = make_run()
    st = step(run, RunStatus()).status
    suspended_run = run.model_copy(update={"spec": run.spec.model_copy(update={"suspend": True})})
    mid = step(suspended_run, st, Observed(True, Outcome(False))).status.condition("Progressing").message
    assert mid == "suspended during round 1's Generate: r-i01-generate-a1 is suspended and continues when spec.suspend is false"
    between = step(suspended_run, st, Observed()).status.condition("Progressing").message
    assert between == "suspended between stages: round 1's Generate starts when spec.suspend is false"


def test_a_fixed_spec_keeps_its_reason_once_the_next_stage_starts():
    """Failed goes True (InvalidSpec) -> False (SpecFixed); starting the stage in the same pass keeps SpecFixed."""
    broken = invalid_decision(RunStatus(), "spec.kubernetes.volume.claimName: required\nspec.policy.model: bad", 1, NOW)
    assert broken.status.condition("Failed").reason == "InvalidSpec"
    (event,) = broken.events
    assert event.message == "spec.kubernetes.volume.claimName: required; spec.policy.model: bad"  # one line
    assert invalid_decision(broken.status, "spec.kubernetes.volume.claimName: required\nspec.policy.model: bad", 1, NOW).events == []  # said once
    fixed = step(make_run(), broken.status)
    assert created(fixed) and fixed.status.condition("Failed").reason == "SpecFixed"
    assert fixed.status.condition("Failed").status == "False"


def test_train_uses_the_launcher_and_finish_scales_reward_down():
    run = make_run(launcher="job")
    st = RunStatus()
    target = Target(1, "Train", "/iterdpo/p", 1)
    d = decide(run, st, owner_uid="u", generation=1, annotations={}, target=target, observed=Observed(), now=NOW, new_token="tok")
    (train,) = [a.manifest for a in d.actions if isinstance(a, Create) and a.manifest["kind"] == "Job"]
    assert train["metadata"]["name"] == "r-i01-train-a1"
    done = decide(run, st, owner_uid="u", generation=1, annotations={}, target=Finished("/x"), observed=Observed(), now=NOW, new_token="tok")
    assert done.status.phase == "Succeeded" and Scale("r-reward", 0) in done.actions


def test_changed_recipe_stops_the_run():
    run = make_run()
    st = step(run, RunStatus()).status.model_copy(update={"spec_hash": "something-else"})
    d = step(run, st)
    assert d.status.condition("Valid").reason == "SpecChanged" and not d.actions


def make_rounds(rounds: int, **spec):
    run = make_run()
    return run.model_copy(update={"spec": run.spec.model_copy(update={"iterations": rounds, **spec})})


def succeed(run, st):
    """Drive the run to its end, every child succeeding with its stage's summary."""
    summaries = {
        "Generate": GEN,
        "Score": [PodMessage("a", ScoreSummary(mean_reward=0.5, min_reward=0.0, max_reward=1.0, pairs=5, ties_dropped=0,
                                               prompts_left_out=0, seconds=1.0).to_message())],
        "Train": [PodMessage("t", TrainSummary(loss=0.5, reward_accuracy=0.8, reward_margin=0.2, checkpoint="/c",
                                               seconds=1.0, pairs=5, pairs_truncated=0).to_message())],
    }  # fmt: skip
    for _ in range(40):
        target = current_target(run, st)
        if isinstance(target, Finished):
            return step(run, st)
        st = step(run, st, Observed(servers_available=frozenset({"reward"}))).status  # the child is created
        st = step(run, st, Observed(True, DONE, summaries=summaries[target.stage], servers_available=frozenset({"reward"}))).status
    raise AssertionError("the run did not finish")


def test_raising_iterations_on_a_succeeded_run_runs_the_added_rounds_from_the_last_policy():
    one = succeed(make_rounds(1), RunStatus())
    assert one.status.phase == "Succeeded"
    three = make_rounds(3)
    d = step(three, one.status)
    assert d.status.condition("Valid").status == "True" and [e.reason for e in d.events][:1] == ["Extended"]
    assert "rounds 2-3" in d.events[0].message and d.status.phase == "Running"
    assert "r-i02-generate-a1" in created(d)  # round 2 starts at once, from round 1's checkpoint
    assert d.status.iteration(2).policy.endswith("iter-01/train/policy")
    (spec_map,) = [a.manifest for a in d.actions if isinstance(a, Ensure) and a.manifest["kind"] == "ConfigMap"]
    assert "iterations: 3" in spec_map["data"]["run.yaml"]  # the pods read the grown spec
    done = succeed(three, d.status)
    assert done.status.phase == "Succeeded" and [it.iteration for it in done.status.iterations] == [1, 2, 3]
    assert done.events[-1].reason == "Succeeded"


def test_fewer_rounds_or_changed_prompts_for_done_rounds_are_refused():
    two = succeed(make_rounds(2), RunStatus()).status
    for changed in (make_rounds(1), make_rounds(3, generation=make_run().spec.generation.model_copy(update={"seed": 9}))):
        d = step(changed, two)
        assert d.status.condition("Valid").reason == "SpecChanged" and "spec.iterations, raised" in d.events[0].message


def test_a_resume_asked_before_any_failure_is_not_kept_for_later():
    run = make_run(stageRetries=0)
    st = step(run, RunStatus(), annotations={RESUME_ANNOTATION: "early"}).status
    assert st.resume_token == "early"
    failed = step(run, st, Observed(True, Outcome(True, False, "BackoffLimitExceeded")), annotations={RESUME_ANNOTATION: "early"})
    assert failed.status.phase == "Failed"
    assert step(run, failed.status, annotations={RESUME_ANNOTATION: "early"}).status.phase == "Failed"


def test_volume_change_mid_run_is_a_recipe_change_but_image_is_not():
    run = make_run()
    st = step(run, RunStatus()).status
    new_image = make_run(image="registry.example/iterdpo:0.2")
    assert step(new_image, st).status.condition("Valid").status == "True"
    moved = make_run(volume={"claimName": "other"})
    d = step(moved, st)
    assert d.status.condition("Valid").reason == "SpecChanged" and [e.reason for e in d.events] == ["SpecChanged"]


def test_a_reward_server_that_never_becomes_available_fails_the_attempt():
    run = make_run(stageRetries=0)
    st = step(run, RunStatus()).status
    st = step(run, st, Observed(True, DONE, summaries=GEN)).status  # Generate done
    waiting = step(run, st, Observed(servers_available=frozenset()))
    assert waiting.status.waiting_since == "2026-11-27T12:00:00Z" and waiting.status.phase == "Running"
    limit = run.spec.reward.startup_timeout_seconds
    still = step(run, waiting.status, Observed(servers_available=frozenset()), now=NOW + timedelta(seconds=limit - 1))
    assert still.status.phase == "Running" and still.status.waiting_since == waiting.status.waiting_since
    late = step(run, still.status, Observed(servers_available=frozenset()), now=NOW + timedelta(seconds=limit + 1))
    assert late.status.phase == "Failed"
    assert "r-reward was not Available within" in late.status.condition("Failed").message
    assert [e.reason for e in late.events] == ["StageFailed"]


def test_the_runs_next_look_is_what_the_decision_asked_within_bounds():
    """Decision.requeue_after drives each run's loop (handlers.look_again): a retry's back-off
    ending or the reward server's wait is looked at then, never later than the interval and
    never in a busy loop."""
    from iterdpo_operator.handlers import SOONEST_LOOK, TIMER_INTERVAL, next_look

    assert next_look(None) == TIMER_INTERVAL
    assert next_look(2.0) == 2.0 and next_look(0.0) == SOONEST_LOOK
    assert next_look(10 * TIMER_INTERVAL) == TIMER_INTERVAL
    run = make_run()
    st = step(run, RunStatus()).status
    failed = step(run, st, Observed(True, Outcome(True, False, "BackoffLimitExceeded")))
    assert failed.requeue_after == 10 and next_look(failed.requeue_after) == TIMER_INTERVAL  # the interval first
    waiting = step(run, failed.status, Observed(), now=NOW + timedelta(seconds=8))
    assert next_look(waiting.requeue_after) == pytest.approx(2.0)  # then exactly when the back-off ends


# -- the run says what is wrong: missing objects, pods that cannot start -------------------------
from iterdpo_operator.reconcile import POD_DETAIL, PodProblem, pod_problem  # noqa: E402
from iterdpo_operator.validation import Reference, references  # noqa: E402

CLAIM = Reference("spec.kubernetes.volume.claimName", "PersistentVolumeClaim", "data")


def test_the_claim_and_each_named_secret_are_references_but_not_the_operators_token():
    assert references(make_run()) == [CLAIM]  # the generated <run>-reward-token is the operator's own
    run = make_run(hubTokenSecret={"name": "hf"}, rewardTokenSecret={"name": "rt", "key": "k"})
    assert references(run) == [CLAIM, Reference("spec.kubernetes.hubTokenSecret.name", "Secret", "hf"),
                               Reference("spec.kubernetes.rewardTokenSecret.name", "Secret", "rt")]  # fmt: skip


def test_a_missing_claim_is_valid_false_naming_the_field_creates_nothing_and_says_it_once():
    run = make_run()
    d = step(run, RunStatus(), Observed(missing=(CLAIM,)))
    valid, progressing = d.status.condition("Valid"), d.status.condition("Progressing")
    assert (valid.status, valid.reason) == ("False", "ReferenceNotFound")
    assert valid.message == ('spec.kubernetes.volume.claimName: PersistentVolumeClaim "data" not found in namespace "ml"; '
                             "create it (docs/kubernetes.md) or fix the field")  # fmt: skip
    assert (progressing.status, progressing.reason) == ("False", "ReferenceNotFound")
    assert d.actions == [] and d.status.phase == "Pending" and d.status.condition("Failed") is None
    assert [(e.type, e.reason, e.message) for e in d.events] == [("Warning", "ReferenceNotFound", valid.message)]
    again = step(run, d.status, Observed(missing=(CLAIM,)), now=NOW + timedelta(seconds=30))
    assert again.status == d.status and again.events == [] and again.actions == []  # no write, no Event per pass
    found = step(run, again.status, Observed(), now=NOW + timedelta(seconds=60))  # the claim was created
    assert "r-i01-generate-a1" in created(found) and [e.reason for e in found.events] == ["StageStarted"]
    assert found.status.condition("Valid").status == "True" and found.status.condition("Progressing").reason == "GenerateRunning"


def test_a_missing_secret_between_stages_holds_the_next_stage_and_a_new_message_is_said_again():
    run = make_run(hubTokenSecret={"name": "hf"})
    st = step(run, step(run, RunStatus()).status, Observed(True, DONE, summaries=GEN)).status  # Generate done
    hf = Reference("spec.kubernetes.hubTokenSecret.name", "Secret", "hf")
    d = step(run, st, Observed(missing=(CLAIM, hf)))
    assert d.actions == [] and d.status.phase == "Running"
    assert 'PersistentVolumeClaim "data"' in d.status.condition("Valid").message
    assert d.status.condition("Valid").message.endswith('Secret "hf" not found in namespace "ml"; create it (docs/kubernetes.md) or fix the field')
    assert "\n" not in d.status.condition("Valid").message
    assert d.status.condition("Progressing").message == "round 1: Score starts once every object the Valid condition names exists"
    fewer = step(run, d.status, Observed(missing=(hf,)))
    assert [e.reason for e in fewer.events] == ["ReferenceNotFound"] and "claimName" not in fewer.events[0].message


def test_pod_problem_reads_the_scheduler_and_the_kubelet_and_skips_finished_pods():
    def pod(name, phase="Pending", conditions=(), waiting=None, deleting=False):
        meta = {"name": name, **({"deletionTimestamp": "2026-11-27T12:00:00Z"} if deleting else {})}
        statuses = [{"name": "c", "state": {"waiting": waiting}}] if waiting else []
        return {"metadata": meta, "status": {"phase": phase, "conditions": list(conditions), "containerStatuses": statuses}}

    unschedulable = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                     "message": "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."}  # fmt: skip
    assert pod_problem([]) is None
    assert pod_problem([pod("b", conditions=[unschedulable]), pod("a", waiting={"reason": "ErrImagePull", "message": "not found"})]) == (
        PodProblem("a", "ErrImagePull", "not found"))  # the first by name
    assert pod_problem([pod("a", conditions=[unschedulable])]) == PodProblem("a", "Unschedulable", unschedulable["message"])
    assert pod_problem([pod("a", waiting={"reason": "ContainerCreating"})]) is None  # starting, not stuck
    assert pod_problem([pod("a", "Failed", waiting={"reason": "CrashLoopBackOff"}),
                        pod("b", waiting={"reason": "CrashLoopBackOff"}, deleting=True)]) is None  # fmt: skip
    assert PodProblem("p", "ImagePullBackOff").kind == "ErrImagePull"  # the kubelet alternates the two
    line = PodProblem("p", "CreateContainerConfigError", "couldn't find key\ntoken " + "x" * 1000).line()
    assert "\n" not in line and len(line) < POD_DETAIL + 60
    assert line.startswith("pod p: CreateContainerConfigError: couldn't find key token xxx")


def test_a_running_stage_whose_pod_cannot_start_says_why_with_one_event_per_new_reason():
    run = make_run()
    st = step(run, RunStatus()).status
    unschedulable = PodProblem("r-i01-generate-a1-0-x", "Unschedulable", "0/2 nodes are available: 2 Insufficient nvidia.com/gpu.")
    d = step(run, st, Observed(True, Outcome(False), pod_problem=unschedulable))
    progressing = d.status.condition("Progressing")
    assert (progressing.status, progressing.reason) == ("True", "GenerateRunning")
    assert progressing.message == ("round 1: Generate is running; pod r-i01-generate-a1-0-x: Unschedulable: "
                                   "0/2 nodes are available: 2 Insufficient nvidia.com/gpu.")  # fmt: skip
    assert [(e.type, e.reason, e.message) for e in d.events] == [("Warning", "Unschedulable", progressing.message)]
    same = step(run, d.status, Observed(True, Outcome(False), pod_problem=unschedulable))
    assert same.status == d.status and same.events == []
    pull = PodProblem("r-i01-generate-a1-0-x", "ErrImagePull", "pull access denied")
    pulling = step(run, same.status, Observed(True, Outcome(False), pod_problem=pull))
    assert [e.reason for e in pulling.events] == ["ErrImagePull"]
    backoff = step(run, pulling.status, Observed(True, Outcome(False), pod_problem=PodProblem(pull.pod, "ImagePullBackOff")))
    assert backoff.events == [] and "ImagePullBackOff" in backoff.status.condition("Progressing").message  # one kind
    started = step(run, backoff.status, Observed(True, Outcome(False)))
    assert started.status.condition("Progressing").message == "round 1: Generate is running" and started.events == []


def test_an_attempt_that_times_out_with_pods_that_never_started_says_what_was_last_seen():
    run = make_run(stageRetries=0)
    st = step(run, RunStatus()).status
    problem = PodProblem("r-i01-generate-a1-0-x", "Unschedulable", "0/2 nodes are available: 2 Insufficient nvidia.com/gpu.")
    st = step(run, st, Observed(True, Outcome(False), pod_problem=problem)).status
    deadline = Outcome(True, False, "DeadlineExceeded", "Job was active longer than specified deadline")
    failed = step(run, st, Observed(True, deadline))
    assert failed.status.phase == "Failed"
    assert "; last seen: pod r-i01-generate-a1-0-x: Unschedulable: 0/2 nodes are available" in failed.status.condition("Failed").message


def test_waiting_for_the_reward_server_says_why_its_pod_cannot_start():
    run = make_run(stageRetries=0)
    st = step(run, step(run, RunStatus()).status, Observed(True, DONE, summaries=GEN)).status  # Generate done
    problem = PodProblem("r-reward-5d8-x", "Unschedulable", "0/2 nodes are available: 2 Insufficient nvidia.com/gpu.")
    waiting = step(run, st, Observed(server_problem=problem))
    progressing = waiting.status.condition("Progressing")
    assert progressing.reason == "WaitingForRewardServer"
    assert progressing.message == ("round 1: waiting for Deployment r-reward to be available; pod r-reward-5d8-x: "
                                   "Unschedulable: 0/2 nodes are available: 2 Insufficient nvidia.com/gpu.")  # fmt: skip
    assert [e.reason for e in waiting.events] == ["Unschedulable"]
    assert step(run, waiting.status, Observed(server_problem=problem), now=NOW + timedelta(seconds=2)).events == []
    late = NOW + timedelta(seconds=run.spec.reward.startup_timeout_seconds + 1)
    failed = step(run, waiting.status, Observed(server_problem=problem), now=late)
    assert "(spec.reward.startupTimeoutSeconds): pod r-reward-5d8-x: Unschedulable" in failed.status.condition("Failed").message


def test_a_stage_running_again_after_a_suspension_says_it_is_running():
    run = make_run()
    st = step(run, RunStatus()).status
    suspended_run = run.model_copy(update={"spec": run.spec.model_copy(update={"suspend": True})})
    paused = step(suspended_run, st, Observed(True, Outcome(False))).status
    back = step(run, paused, Observed(True, Outcome(False), child_suspended=True))
    assert back.status.condition("Progressing").status == "True"
    assert back.status.condition("Progressing").message == "round 1: Generate is running"


def judged_run(**kubernetes):
    """A run that evaluates every round with a judge of its own (spec.evaluation.judge)."""
    run = make_run(**kubernetes)
    body = run.to_manifest()
    body["spec"]["evaluation"] = {"prompts": {"dataset": "/iterdpo/held-out.jsonl"},
                                  "judge": {"model": "/iterdpo/gold", "startupTimeoutSeconds": 60}}  # fmt: skip
    return validate_resource(body)


def evaluated(iteration: int) -> list[PodMessage]:
    from iterdpo.stages import EvaluateSummary

    policy = "/iterdpo/p" if iteration == 0 else f"/iterdpo/runs/r/iter-{iteration:02d}/train/policy"
    return [PodMessage(f"r-i{iteration:02d}-evaluate-a1-x", EvaluateSummary(
        policy=policy, prompts=4, prompts_left_out=0, left_out_reasons=[], overlap=0, samples=4, mean_reward=0.1,
        judge_reward=0.2, win_rate=None, win_rate_low=None, win_rate_high=None, judged_by="judge", length_mean=9.0,
        length_p90=12.0, length_ratio=None, truncated_share=0.0, kl=0.0, seconds=1.0).to_message())]  # fmt: skip


def scales_of(decision) -> list[Scale]:
    return [a for a in decision.actions if isinstance(a, Scale)]


def test_evaluate_waits_for_the_reward_and_the_judge_then_both_go_to_zero():
    """The judge is served like the reward model (<run>-judge), up only while Evaluate runs."""
    run = judged_run()
    target = current_target(run, RunStatus())
    assert (target.iteration, target.stage) == (0, "Evaluate")
    first = step(run, RunStatus())  # round 0's Evaluate: both servers wanted, neither up yet
    assert {Scale("r-reward", 1), Scale("r-judge", 1)} <= set(scales_of(first))
    assert created(first) == ["r-spec", "r-reward-token", "r-reward", "r-reward", "r-judge", "r-judge"]
    assert first.status.condition("Progressing").reason == "WaitingForRewardServer"
    judge_down = step(run, first.status, Observed(servers_available=frozenset({"reward"})))
    progressing = judge_down.status.condition("Progressing")
    assert progressing.reason == "WaitingForJudgeServer" and "Deployment r-judge" in progressing.message
    assert "r-i00-evaluate-a1" not in created(judge_down)
    both = Observed(servers_available=frozenset({"reward", "judge"}))
    started = step(run, judge_down.status, both)
    assert "r-i00-evaluate-a1" in created(started)
    done = step(run, started.status, Observed(True, DONE, summaries=evaluated(0)))
    assert done.status.iteration(0).evaluation.judge_reward == 0.2
    assert {Scale("r-reward", 0), Scale("r-judge", 0)} <= set(scales_of(done))
    generate = step(run, done.status)  # round 1's Generate: neither server is up
    assert generate.status.current_stage == "Generate"
    assert {Scale("r-reward", 0), Scale("r-judge", 0)} <= set(scales_of(generate))


def test_a_judge_that_never_becomes_available_fails_by_its_own_deadline():
    run = judged_run(stageRetries=0)
    waiting = step(run, RunStatus(), Observed(servers_available=frozenset({"reward"})))
    late = step(run, waiting.status, Observed(servers_available=frozenset({"reward"})), now=NOW + timedelta(seconds=61))
    assert late.status.phase == "Failed"
    message = late.status.condition("Failed").message
    assert "Deployment r-judge was not Available within 60 s (spec.evaluation.judge.startupTimeoutSeconds)" in message


def test_keep_reward_warm_keeps_only_the_reward_server_up():
    run = judged_run(keepRewardWarm=True)
    started = step(run, RunStatus(), Observed(servers_available=frozenset({"reward", "judge"})))
    done = step(run, started.status, Observed(True, DONE, summaries=evaluated(0)))
    scales = {a.name: a.replicas for a in done.actions if isinstance(a, Scale)}
    assert scales == {"r-judge": 0}  # the reward server stays at the 1 it was scaled to


def test_a_run_without_a_judge_has_no_judge_objects():
    run = make_run()
    body = run.to_manifest()
    body["spec"]["evaluation"] = {"prompts": {"dataset": "/iterdpo/held-out.jsonl"}}
    d = step(validate_resource(body), RunStatus())
    assert not [n for n in created(d) if "judge" in n] and not [a for a in d.actions if isinstance(a, Scale) and "judge" in a.name]
