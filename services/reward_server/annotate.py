"""`iterdpo annotate`: score a round's generations over HTTP, pair them, count every prompt.

Two ways to a pair, by the reward kind: a kind that scores each response (`POST /v1/score`)
is paired by `pairing.strategy`; kind pairwise, which only compares two, runs each prompt's
tournament (`pairing.selection`, iterdpo/tournament.py) over `POST /v1/compare`, all prompts
in lockstep. Every prompt the generator was given ends in exactly one of: a pair, a dropped
tie, or `leftOut` with its reason (the generator's, fewer than 2 responses, or the server's
reason for not scoring it); `promptsIn == pairs + tiesDropped + promptsLeftOut` is checked before
anything is written. A prompt with a response count other than K is paired all
the same (if it has 2) and counted in `promptsNotK`, never skipped silently.
stats.json is written last: it is the stage's completion marker, and a rerun
that finds it only re-emits the summary.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from dataclasses import dataclass

import httpx

from iterdpo.contracts import LeftOut, PairRecord, ScoredRecord, ScoreStats, read_model, write_lines, write_model
from iterdpo.errors import stage_main
from iterdpo.layout import RunLayout, claim_run_folder, reward_model_for
from iterdpo.lineage import open_ledger
from iterdpo.pairing import Pair, TIE, choose_pair, prompt_rng
from iterdpo.tournament import Outcome as TournamentOutcome
from iterdpo.tournament import Tournament, run_all
from iterdpo.runfile import load_for_stage
from iterdpo.spec import IterativeDPORun
from iterdpo.stages import ScoreSummary, Stage
from iterdpo.summary import emit_summary
from iterdpo_reward_server.client import client_for, score_everything
from iterdpo_reward_server.scoring import ScoreResult
from iterdpo_reward_server.shards import RoundGenerations, read_round

log = logging.getLogger("iterdpo.annotate")
PROG = "iterdpo annotate"


@dataclass(frozen=True)
class Outcome:
    scored: list[ScoredRecord]
    pairs: list[PairRecord]
    stats: ScoreStats  # seconds 0: the caller times the whole stage


def pair_round(
    generations: RoundGenerations,
    rewards: list[list[float] | str],
    *,
    strategy: str,
    length_penalty: float,
    seed: int,
    iteration: int,
    samples_per_prompt: int,
    truncated: int,
    details: dict[str, float] | None = None,
    choices: list[Pair | str] | None = None,
    comparisons: int = 0,
    forward_passes: int = 0,
) -> Outcome:
    """Pure: scored rows, pairs and stats from the rewards of each record's responses
    (or, for a record the reward server could not score, the reason: it is left out)."""
    records = generations.records
    if len(rewards) != len(records) or any(
        not isinstance(r, str) and len(r) != len(g.responses) for r, g in zip(rewards, records)
    ):
        raise ValueError("rewards do not match the responses they score")
    scored, pairs = [], []
    left_out = list(generations.left_out)
    ties = not_k = 0
    for index, (record, record_rewards) in enumerate(zip(records, rewards)):
        if len(record.responses) != samples_per_prompt:
            not_k += 1
        if isinstance(record_rewards, str):
            left_out.append(LeftOut(prompt_id=record.prompt_id, reason=record_rewards))
            continue
        scored.append(ScoredRecord(prompt_id=record.prompt_id, prompt=record.prompt, responses=record.responses,
                                   rewards=record_rewards, answer=record.answer))  # fmt: skip
        choice = choices[index] if choices is not None else choose_pair(
            record_rewards,
            [len(r) for r in record.responses],
            strategy,
            rng=prompt_rng(seed, iteration, record.prompt_id),
            length_penalty=length_penalty,
        )
        if isinstance(choice, Pair):
            pairs.append(
                PairRecord(
                    prompt_id=record.prompt_id,
                    prompt=record.prompt,
                    chosen=record.responses[choice.chosen],
                    rejected=record.responses[choice.rejected],
                    chosen_reward=record_rewards[choice.chosen],
                    rejected_reward=record_rewards[choice.rejected],
                    margin=choice.margin,
                )
            )
        elif choice == TIE:
            ties += 1
        else:
            reason = f"{choice} of K={samples_per_prompt}" if len(record.responses) < 2 else choice
            left_out.append(LeftOut(prompt_id=record.prompt_id, reason=reason))
    flat = [x for r in rewards if not isinstance(r, str) for x in r]
    stats = ScoreStats(  # its validator checks promptsIn == pairs + tiesDropped + promptsLeftOut
        prompts_in=generations.prompts_in,
        responses_scored=len(flat),
        mean_reward=sum(flat) / len(flat) if flat else None,
        min_reward=min(flat) if flat else None,
        max_reward=max(flat) if flat else None,
        pairs=len(pairs),
        ties_dropped=ties,
        prompts_left_out=len(left_out),
        left_out=left_out,
        prompts_not_k=not_k,
        truncated=truncated,
        strategy=strategy,
        seconds=0.0,
        details=details or {},
        comparisons=comparisons,
        forward_passes=forward_passes,
    )
    return Outcome(scored, pairs, stats)


def unique_items(generations: RoundGenerations) -> tuple[list[dict], list[int]]:
    """Scoring items, one per distinct response of each prompt, and for every response
    (flattened, in order) the index of its item. Identical responses of a prompt then get
    the very same reward, so they tie exactly whatever forward pass scored them."""
    items: list[dict] = []
    where: list[int] = []
    for record in generations.records:
        seen: dict[str, int] = {}
        messages = [m.model_dump() for m in record.prompt]  # once per prompt, shared by its responses
        answer = {} if record.answer is None else {"answer": record.answer}
        for response in record.responses:
            if response not in seen:
                seen[response] = len(items)
                items.append({"messages": messages, "response": response, **answer})
            where.append(seen[response])
    return items, where


def record_rewards(spans: list[list[int]], batch: ScoreResult) -> list[list[float] | str]:
    """Each record's rewards in response order (`spans`: its responses' item indices),
    or why the server could not score it."""
    out: list[list[float] | str] = []
    for span in spans:
        reason = next((batch.unscored[i] for i in span if i in batch.unscored), None)
        out.append(f"not scored: {reason}" if reason is not None else [batch.scores[i] for i in span])  # type: ignore[misc]
    return out


def detail_means(batch: ScoreResult, spans: list[list[int]], rewards: list[list[float] | str]) -> dict[str, float]:
    """The mean of each named part of the reward over the round's scored responses."""
    means = {}
    for name, values in batch.details.items():
        picked = [values[i] for span, r in zip(spans, rewards) if not isinstance(r, str) for i in span]
        picked = [v for v in picked if v is not None]
        if picked:
            means[name] = sum(picked) / len(picked)
    return means


def split(flat: list, sizes: list[int]) -> list[list]:
    out, start = [], 0
    for n in sizes:
        out.append(flat[start : start + n])
        start += n
    return out


def annotate(run: IterativeDPORun, iteration: int, reward_url: str, *, transport: httpx.AsyncBaseTransport | None = None) -> ScoreStats:
    """Run the Score stage for round `iteration`; returns its stats (the existing ones on a rerun)."""
    layout = RunLayout.of(run)
    stats_path = layout.score_stats(iteration)
    if stats_path.is_file():
        log.info("round %d is already scored (%s): nothing to do", iteration, stats_path)
        return read_model(stats_path, ScoreStats)

    started = time.monotonic()
    spec = run.spec
    generations = read_round(layout, iteration, spec.generation.shards)
    items, where = unique_items(generations)
    log.info(
        "round %d: %d prompts in, %d responses, %d distinct to score",
        iteration, generations.prompts_in, len(where), len(items),
    )
    if spec.reward.compares:  # a judge of two responses: each prompt's pair from a tournament
        outcome = _pair_by_comparisons(run, iteration, generations, reward_url, transport)
    else:
        outcome = _pair_by_scores(run, iteration, generations, items, where, reward_url, transport)
    stats = outcome.stats.model_copy(update={"seconds": round(time.monotonic() - started, 3)})
    write_lines(layout.scored_file(iteration), outcome.scored)
    write_lines(layout.pairs_file(iteration), outcome.pairs)
    write_model(stats_path, stats)  # last: the completion marker
    return stats


def _pair_by_scores(run, iteration, generations, items, where, reward_url, transport) -> Outcome:
    spec = run.spec
    batch = score_everything(spec.reward, reward_url, items, transport) if items else ScoreResult([], 0)
    spans = split(where, [len(g.responses) for g in generations.records])
    rewards = record_rewards(spans, batch)
    return pair_round(
        generations,
        rewards,
        strategy=spec.pairing.strategy,
        length_penalty=spec.pairing.length_penalty,
        seed=spec.generation.seed,
        iteration=iteration,
        samples_per_prompt=spec.generation.samples_per_prompt,
        truncated=batch.truncated,
        details=detail_means(batch, spans, rewards),
    )


def _pair_by_comparisons(run, iteration, generations, reward_url, transport) -> Outcome:
    """Each prompt's tournament (pairing.selection), all prompts in lockstep: one batch of
    comparisons per tournament round. A response's reward is its share of comparisons won."""
    spec = run.spec
    selection = spec.pairing.selection or "bracket"
    records = generations.records
    tours = [Tournament(len(r.responses), selection, prompt_rng(spec.generation.seed, iteration, r.prompt_id))
             for r in records]  # fmt: skip
    client = client_for(spec.reward, reward_url, transport)
    asyncio.run(client.wait_ready(spec.reward.startup_timeout_seconds))
    cost = {"forward_passes": 0, "truncated": 0}

    # Each prompt's part of a comparison item, built once (its messages and gold answer).
    prompt_of = [{"messages": [m.model_dump() for m in r.prompt], **({} if r.answer is None else {"answer": r.answer})}
                 for r in records]  # fmt: skip

    def compare(asked: list[tuple[int, int, int]]) -> list[float]:
        out: list[float | None] = [None] * len(asked)
        items, slots = [], []
        for n, (t, a, b) in enumerate(asked):
            ra, rb = records[t].responses[a], records[t].responses[b]
            if ra == rb:
                out[n] = 0.5  # identical responses tie exactly, without the model
                continue
            items.append({**prompt_of[t], "a": ra, "b": rb})
            slots.append(n)
        if items:
            got = asyncio.run(client.compare_all(items, request_size=spec.reward.request_batch_size,
                                                 concurrency=spec.reward.concurrency))  # fmt: skip
            cost["forward_passes"] += got.forward_passes
            cost["truncated"] += got.truncated
            for n, p in zip(slots, got.probabilities):
                out[n] = p
        return out  # type: ignore[return-value]

    batches = run_all(tours, compare)
    log.info("round %d: %s tournaments in %d batches", iteration, selection, batches)
    rewards: list[list[float] | str] = []
    choices: list[Pair | str] = []
    for record, tour in zip(records, tours):
        wins = tour.referee.wins
        played = tour.referee.games
        rewards.append([wins.get(i, 0.0) / played[i] if played.get(i) else 0.0 for i in range(len(record.responses))])
        out = tour.outcome
        if isinstance(out, TournamentOutcome):
            share = rewards[-1]
            choices.append(Pair(out.chosen, out.rejected, share[out.chosen] - share[out.rejected]))
        else:
            choices.append(out)  # type: ignore[arg-type]
    return pair_round(
        generations, rewards, strategy=selection, length_penalty=0.0, seed=spec.generation.seed, iteration=iteration,
        samples_per_prompt=spec.generation.samples_per_prompt, truncated=cost["truncated"], choices=choices,
        comparisons=sum(t.referee.comparisons for t in tours), forward_passes=cost["forward_passes"],
    )  # fmt: skip


def summary_of(stats: ScoreStats) -> ScoreSummary:
    return ScoreSummary(mean_reward=stats.mean_reward, min_reward=stats.min_reward, max_reward=stats.max_reward,
                        pairs=stats.pairs, ties_dropped=stats.ties_dropped, prompts_left_out=stats.prompts_left_out,
                        seconds=stats.seconds, details=stats.details, comparisons=stats.comparisons,
                        forward_passes=stats.forward_passes)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="iterdpo annotate", description="Score a round's responses and pair them.")
    p.add_argument("--spec", required=True, help="run file (YAML or JSON)")
    p.add_argument("--iteration", required=True, type=int, help="round to score (1-based)")
    p.add_argument("--reward-url", required=True, help="base URL of the reward server, e.g. http://127.0.0.1:8000")
    return p


def annotate_main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise

    def body() -> None:
        run = load_for_stage(args.spec, args.iteration, Stage.SCORE)
        claim_run_folder(run)
        layout, it, shards = RunLayout.of(run), args.iteration, run.spec.generation.shards
        ledger = open_ledger(layout, it, Stage.SCORE, reads=[
            *(layout.shard_file(it, i, shards) for i in range(shards)), reward_model_for(run)])  # fmt: skip
        stats = annotate(run, it, args.reward_url)
        emit_summary(ledger.stamp(summary_of(stats), wrote=[layout.scored_file(it), layout.pairs_file(it)]))

    return stage_main(PROG, body)


if __name__ == "__main__":
    import sys

    sys.exit(annotate_main())
