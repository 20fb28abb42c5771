"""The Evaluate stage: a round's new policy answers held-out prompts; the figures say whether it got better.

    iterdpo evaluate --spec RUN_FILE --iteration T --reward-url URL [--judge-url URL]

Round 0 evaluates the initial policy (the baseline), round T the checkpoint round T trained.
The prompts of `spec.evaluation.prompts` are checked disjoint from every round's training
prompts by content; vLLM answers them as `spec.evaluation` samples (greedy by default, the
same seeds every round); the run's reward server and the judge's score the responses over
HTTP; round 0's responses to the same prompts are the opponents of the win rate; the
policy's and the initial policy's log-probabilities of each response give the KL estimate.
Output: `iter-NN/evaluate/responses.jsonl`, then `report.json` (the marker); a round with a
report is not redone.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from iterdpo.contracts import EvalRecord, EvaluationReport, LeftOut, read_lines, read_model, write_lines, write_model
from iterdpo.errors import StageError, UsageError, stage_main
from iterdpo.evaluation import kl_k1, mean, nearest_rank, outcome, prompt_digest, win_rate
from iterdpo.layout import RunLayout, claim_run_folder, evaluated_policy, initial_policy, reward_model_for
from iterdpo.lineage import open_ledger
from iterdpo.localpaths import require_model
from iterdpo.prompts import load_prompt_set
from iterdpo.runfile import load_for_stage
from iterdpo.spec import IterativeDPORun, RewardSpec
from iterdpo.stages import EvaluateSummary, LEFT_OUT_SHOWN, REASON_CHARS, Stage
from iterdpo.summary import emit_summary
from iterdpo_evaluator.logprobs import sequence_logps
from iterdpo_generator.generate import Sampling, format_prompts, load_tokenizer, sample
from iterdpo_reward_server.client import client_for, score_everything

PROG = "iterdpo evaluate"
BASELINE = 0  # the round every win rate is against
log = logging.getLogger("iterdpo.evaluate")


@dataclass
class Answer:
    """One held-out prompt's responses as they are scored."""

    prompt_id: str
    digest: str
    messages: list[dict]
    answer: str | None
    prompt_ids: list[int]
    responses: list[str]
    token_ids: list[list[int]]
    finish_reasons: list[str | None]
    rewards: list[float] | None = None
    judge: list[float] | None = None
    win: float | None = None
    policy_logps: list[float] = field(default_factory=list)
    reference_logps: list[float] = field(default_factory=list)

    def record(self) -> EvalRecord:
        return EvalRecord(prompt_id=self.prompt_id, digest=self.digest, prompt=self.messages, answer=self.answer,
                          responses=self.responses, response_tokens=[len(t) for t in self.token_ids],
                          finish_reasons=self.finish_reasons, rewards=self.rewards, judge=self.judge, win=self.win,
                          policy_logps=self.policy_logps, reference_logps=self.reference_logps)  # fmt: skip


def training_digests(run: IterativeDPORun) -> dict[str, str]:
    """Every round's training prompt, by content hash -> where it is (field path and row)."""
    spec, seen = run.spec, {}
    for t in range(1, spec.iterations + 1):
        path = f"spec.prompts.perIteration[{t - 1}]" if spec.prompts.per_iteration else "spec.prompts"
        for p in load_prompt_set(spec.prompts_for(t), field_path=path).prompts:
            if p is not None:
                seen.setdefault(prompt_digest(p.messages), f"{path} row {p.prompt_id}")
        if not spec.prompts.per_iteration:
            break  # one set for every round
    return seen


def evaluate(run: IterativeDPORun, iteration: int, reward_url: str, judge_url: str | None) -> EvaluateSummary:
    layout = RunLayout.of(run)
    report_path = layout.evaluation_report(iteration)
    if report_path.is_file():
        log.info("round %d is already evaluated (%s)", iteration, report_path)
        return EvaluateSummary.model_validate(read_model(report_path, EvaluationReport).summary)
    spec = run.spec.evaluation
    if spec is None:
        raise UsageError("spec.evaluation is not set: the run has no Evaluate stage")
    if spec.judge is not None and judge_url is None:
        raise UsageError("--judge-url: required, since spec.evaluation.judge is set")
    started = time.monotonic()

    prompt_set = load_prompt_set(spec.prompts, field_path="spec.evaluation.prompts")
    prompts = [p for p in prompt_set.prompts if p is not None]
    left_out = list(prompt_set.left_out)
    trained = training_digests(run)
    shared = [(p, trained[d]) for p in prompts if (d := prompt_digest(p.messages)) in trained]
    if shared and not spec.allow_overlap:
        p, where = shared[0]
        raise UsageError(f"spec.evaluation.prompts: {len(shared)} of its {len(prompts)} prompts are also training "
                         f"prompts (the first: row {p.prompt_id}, the same as {where}); held-out prompts must be "
                         "unseen, or set spec.evaluation.allowOverlap to report them instead")  # fmt: skip

    policy = evaluated_policy(run, iteration)
    require_model(policy, f"the policy round {iteration} evaluates", iteration)
    tokenizer = load_tokenizer(policy, run.spec.policy.chat_template)
    formatted, too_long = format_prompts(prompts, tokenizer, max_prompt_tokens=run.spec.training.max_prompt_length)
    left_out += too_long
    how = Sampling(spec.samples_per_prompt, spec.temperature, spec.top_p,
                   spec.max_new_tokens or run.spec.generation.max_new_tokens, spec.seed)  # fmt: skip
    log.info("round %d: %d held-out prompts (%d left out), %s, policy %s", iteration, len(formatted), len(left_out),
             how, policy)  # fmt: skip
    outputs = sample(run, BASELINE, policy, tokenizer, formatted, how) if formatted else []
    answers = [
        Answer(item.prompt.prompt_id, prompt_digest(item.prompt.messages), item.prompt.messages, item.prompt.answer,
               item.token_ids, [c.text for c in out.outputs], [list(c.token_ids) for c in out.outputs],
               [c.finish_reason for c in out.outputs])
        for item, out in zip(formatted, outputs)
    ]  # fmt: skip

    _log_probabilities(run, iteration, policy, answers)
    answers, unscored = _score(run.spec.reward, reward_url, answers, "rewards", "the run's reward model")
    left_out += unscored
    if spec.judge is not None:
        answers, unscored = _score(spec.judge, judge_url, answers, "judge", "the judge")
        left_out += unscored
    baseline = None if iteration == BASELINE else _baseline(layout)
    judged_by = "judge" if spec.judge is not None else "reward"
    comparisons = 0
    if baseline is not None:
        comparisons = _win_outcomes(spec.judge or run.spec.reward, judge_url if spec.judge else reward_url,
                                    judged_by, answers, baseline[1])  # fmt: skip

    summary = _summary(run, iteration, policy, prompt_set, len(prompts), left_out, len(shared), answers, baseline,
                       judged_by, comparisons, time.monotonic() - started)  # fmt: skip
    write_lines(layout.evaluation_responses(iteration), [a.record() for a in answers])
    report = EvaluationReport(summary=summary.model_dump(mode="json", by_alias=True), left_out=sorted(left_out, key=_row))
    write_model(report_path, report)  # last: the marker
    return summary


def _row(item: LeftOut):
    return (0, int(item.prompt_id), "") if item.prompt_id.isdigit() else (1, 0, item.prompt_id)


def _log_probabilities(run: IterativeDPORun, iteration: int, policy: str, answers: list[Answer]) -> None:
    """Each response's log-probability under the policy and the initial policy (round 0: the same
    model, so the same numbers, read once)."""
    sequences = [(a.prompt_ids, ids) for a in answers for ids in a.token_ids]
    if not sequences:
        return
    mine = sequence_logps(policy, sequences)
    reference = mine if policy == initial_policy(run) else sequence_logps(initial_policy(run), sequences)
    start = 0
    for a in answers:
        n = len(a.token_ids)
        a.policy_logps, a.reference_logps = mine[start : start + n], reference[start : start + n]
        start += n


def _items(a: Answer, **fields) -> dict:
    return {"messages": a.messages, **({} if a.answer is None else {"answer": a.answer}), **fields}


def _score(reward: RewardSpec, url: str, answers: list[Answer], attr: str, who: str) -> tuple[list[Answer], list[LeftOut]]:
    """Every response scored by the server at `url` (a comparing kind scores none: skipped);
    a prompt with a response it could not score is left out with the reason."""
    if reward.compares or not answers:
        return answers, []
    result = score_everything(reward, url, [_items(a, response=r) for a in answers for r in a.responses], who=who)
    kept, dropped, start = [], [], 0
    for a in answers:
        span = range(start, start + len(a.responses))
        start = span.stop
        reason = next((result.unscored[i] for i in span if i in result.unscored), None)
        if reason is not None:
            dropped.append(LeftOut(prompt_id=a.prompt_id, reason=f"{who} could not score a response: {reason}"))
            continue
        setattr(a, attr, [result.scores[i] for i in span])
        kept.append(a)
    return kept, dropped


def _baseline(layout: RunLayout) -> tuple[EvaluateSummary, dict[str, EvalRecord]]:
    path = layout.evaluation_report(BASELINE)
    if not path.is_file():
        raise StageError(f"round 0's evaluation ({path}) is missing: the baseline every win rate is against")
    summary = EvaluateSummary.model_validate(read_model(path, EvaluationReport).summary)
    return summary, {r.prompt_id: r for r in read_lines(layout.evaluation_responses(BASELINE), EvalRecord)}


def _win_outcomes(judge: RewardSpec, url: str, judged_by: str, answers: list[Answer], base: dict[str, EvalRecord]) -> int:
    """Each answer's outcome against round 0's responses to the same prompt, response j against
    response j, averaged: a comparing judge's probability, else 1 / 0.5 / 0 by score. Returns
    the comparisons made. Prompts round 0 left out have no opponent and no outcome."""
    games = [(a, j) for a in answers if a.prompt_id in base
             for j in range(min(len(a.responses), len(base[a.prompt_id].responses)))]  # fmt: skip
    verdicts: list[float | None] = []
    asked = 0
    if judge.compares:
        items, slots = [], []
        for n, (a, j) in enumerate(games):
            theirs = base[a.prompt_id].responses[j]
            if a.responses[j] == theirs:
                verdicts.append(0.5)  # the same response: a tie, without the model
                continue
            verdicts.append(None)
            items.append(_items(a, a=a.responses[j], b=theirs))
            slots.append(n)
        if items:
            client = client_for(judge, url)

            async def go():
                await client.wait_ready(judge.startup_timeout_seconds)
                return await client.compare_all(items, request_size=judge.request_batch_size,
                                                concurrency=judge.concurrency)  # fmt: skip

            got = asyncio.run(go())
            asked = len(items)
            for n, p in zip(slots, got.probabilities):
                verdicts[n] = p
    else:
        attr = "judge" if judged_by == "judge" else "rewards"
        for a, j in games:
            theirs = getattr(base[a.prompt_id], attr)
            verdicts.append(None if theirs is None else outcome(getattr(a, attr)[j], theirs[j]))
    per: dict[str, list[float]] = {}
    for (a, _), v in zip(games, verdicts):
        if v is not None:
            per.setdefault(a.prompt_id, []).append(v)
    for a in answers:
        a.win = mean(per[a.prompt_id]) if a.prompt_id in per else None
    return asked


def _summary(run, iteration, policy, prompt_set, prompts_read, left_out, overlap, answers, baseline, judged_by,
             comparisons, seconds) -> EvaluateSummary:  # fmt: skip
    lengths = [len(ids) for a in answers for ids in a.token_ids]
    length_mean = mean(lengths) or 0.0
    truncated = sum(r == "length" for a in answers for r in a.finish_reasons)
    wins = win_rate([a.win for a in answers if a.win is not None])
    base_length = baseline[0].length_mean if baseline else None
    reasons = [f"{item.prompt_id}: {item.reason}"[:REASON_CHARS] for item in sorted(left_out, key=_row)]
    return EvaluateSummary(
        policy=policy, prompts=len(prompt_set.prompts), prompts_left_out=len(left_out),
        left_out_reasons=reasons[:LEFT_OUT_SHOWN], overlap=overlap, samples=len(lengths),
        mean_reward=mean(r for a in answers for r in (a.rewards or [])),
        judge_reward=mean(r for a in answers for r in (a.judge or [])),
        win_rate=wins and wins.rate, win_rate_low=wins and wins.low, win_rate_high=wins and wins.high,
        judged_by=judged_by, length_mean=length_mean, length_p90=nearest_rank(lengths, 0.9),
        length_ratio=1.0 if iteration == BASELINE else (length_mean / base_length if base_length else None),
        truncated_share=truncated / len(lengths) if lengths else 0.0,
        kl=kl_k1([x for a in answers for x in a.policy_logps], [x for a in answers for x in a.reference_logps]),
        comparisons=comparisons, seconds=round(seconds, 3),
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--spec", required=True, type=Path, help="the run file (YAML or JSON)")
    p.add_argument("--iteration", required=True, type=int, help="round (0: the initial policy)")
    p.add_argument("--reward-url", required=True, help="base URL of the run's reward server")
    p.add_argument("--judge-url", help="base URL of spec.evaluation.judge's server (required with a judge)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    def body() -> None:
        run = load_for_stage(args.spec, args.iteration, Stage.EVALUATE)
        claim_run_folder(run)
        layout, it, spec = RunLayout.of(run), args.iteration, run.spec
        judge = spec.evaluation.judge if spec.evaluation is not None else None
        ledger = open_ledger(layout, it, Stage.EVALUATE, reads=[
            spec.evaluation and spec.evaluation.prompts.dataset, evaluated_policy(run, it), initial_policy(run),
            reward_model_for(run), judge and judge.model, layout.evaluation_responses(BASELINE) if it else None])  # fmt: skip
        summary = evaluate(run, it, args.reward_url, args.judge_url)
        emit_summary(ledger.stamp(summary, wrote=[layout.evaluation_responses(it)]))

    return stage_main(PROG, body)
