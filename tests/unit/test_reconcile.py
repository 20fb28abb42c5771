"""The operator's pure decision function: stage order, idempotence, retries, suspend,
resume, and what is created when."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from iterdpo.planner import Finished
from iterdpo.status import RunStatus
from iterdpo_operator.launchers import Outcome
from iterdpo.stages import GenerateSummary
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
    ready = step(run, nxt.status, Observed(reward_available=True))
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
    waiting = step(run, st, Observed(reward_available=False))
    assert waiting.status.waiting_since == "2026-11-27T12:00:00Z" and waiting.status.phase == "Running"
    limit = run.spec.reward.startup_timeout_seconds
    still = step(run, waiting.status, Observed(reward_available=False), now=NOW + timedelta(seconds=limit - 1))
    assert still.status.phase == "Running" and still.status.waiting_since == waiting.status.waiting_since
    late = step(run, still.status, Observed(reward_available=False), now=NOW + timedelta(seconds=limit + 1))
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
