"""`iterdpo annotate`: score a round's generations over HTTP, pair them, count every prompt.

Every prompt the generator was given ends in exactly one of: a pair, a dropped
tie, or `leftOut` with its reason (the generator's, or fewer than 2 responses
here); `promptsIn == pairs + tiesDropped + promptsLeftOut` is checked before
anything is written. A prompt with a response count other than K is paired all
the same (if it has 2) and counted in `promptsNotK`, never skipped silently.
stats.json is written last: it is the stage's completion marker, and a rerun
that finds it only re-emits the summary.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import math
import sys
import time
from dataclasses import dataclass

import httpx

from iterdpo.atomic import read_json, write_json, write_jsonl
from iterdpo.errors import StageError
from iterdpo.layout import RunLayout, claim_run_folder
from iterdpo.pairing import Pair, TIE, choose_pair, prompt_rng
from iterdpo.planner import REWARD_TOKEN_ENV
from iterdpo.runfile import SpecError, load_run
from iterdpo.spec import IterativeDPORun
from iterdpo.summary import emit_summary
from iterdpo_reward_server.client import Batch, RetryPolicy, RewardClient, RewardClientError
from iterdpo_reward_server.shards import AnnotateError, RoundGenerations, read_round

log = logging.getLogger("iterdpo.annotate")
PROG = "annotate"
SUMMARY_FIELDS = ("meanReward", "minReward", "maxReward", "pairs", "tiesDropped", "promptsLeftOut", "seconds")


@dataclass(frozen=True)
class Outcome:
    scored: list[dict]
    pairs: list[dict]
    stats: dict  # without "seconds" (the caller times the whole stage)


def pair_round(
    generations: RoundGenerations,
    rewards: list[list[float]],
    *,
    strategy: str,
    length_penalty: float,
    seed: int,
    iteration: int,
    samples_per_prompt: int,
    truncated: int,
) -> Outcome:
    """Pure: scored rows, pairs and stats from the rewards of each record's responses."""
    records = generations.records
    if len(rewards) != len(records) or any(len(r) != len(g.responses) for r, g in zip(rewards, records)):
        raise ValueError("rewards do not match the responses they score")
    scored, pairs = [], []
    left_out = list(generations.left_out)
    ties = not_k = 0
    for record, record_rewards in zip(records, rewards):
        scored.append(
            {"prompt_id": record.prompt_id, "prompt": record.prompt, "responses": record.responses, "rewards": record_rewards}
        )
        if len(record.responses) != samples_per_prompt:
            not_k += 1
        choice = choose_pair(
            record_rewards,
            [len(r) for r in record.responses],
            strategy,
            rng=prompt_rng(seed, iteration, record.prompt_id),
            length_penalty=length_penalty,
        )
        if isinstance(choice, Pair):
            pairs.append(
                {
                    "prompt_id": record.prompt_id,
                    "prompt": record.prompt,
                    "chosen": record.responses[choice.chosen],
                    "rejected": record.responses[choice.rejected],
                    "chosen_reward": record_rewards[choice.chosen],
                    "rejected_reward": record_rewards[choice.rejected],
                    "margin": choice.margin,
                }
            )
        elif choice == TIE:
            ties += 1
        else:
            reason = f"{choice} of K={samples_per_prompt}" if len(record.responses) < 2 else choice
            left_out.append({"prompt_id": record.prompt_id, "reason": reason})
    flat = [x for r in rewards for x in r]
    stats = {
        "promptsIn": generations.prompts_in,
        "responsesScored": len(flat),
        "meanReward": sum(flat) / len(flat) if flat else None,
        "minReward": min(flat) if flat else None,
        "maxReward": max(flat) if flat else None,
        "pairs": len(pairs),
        "tiesDropped": ties,
        "promptsLeftOut": len(left_out),
        "leftOut": left_out,
        "promptsNotK": not_k,
        "truncated": truncated,
        "strategy": strategy,
    }
    accounted = stats["pairs"] + stats["tiesDropped"] + stats["promptsLeftOut"]
    if stats["promptsIn"] != accounted:
        raise AssertionError(
            f"prompt accounting is off: promptsIn={stats['promptsIn']} but pairs + tiesDropped + "
            f"promptsLeftOut = {accounted}"
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
        for response in record.responses:
            if response not in seen:
                seen[response] = len(items)
                items.append({"messages": record.prompt, "response": response})
            where.append(seen[response])
    return items, where


def split(flat: list[float], sizes: list[int]) -> list[list[float]]:
    out, start = [], 0
    for n in sizes:
        out.append(flat[start : start + n])
        start += n
    return out


def annotate(run: IterativeDPORun, iteration: int, reward_url: str, *, transport: httpx.AsyncBaseTransport | None = None) -> dict:
    """Run the Score stage for round `iteration`; returns stats (existing ones on a rerun)."""
    if not 1 <= iteration <= run.spec.iterations:
        raise AnnotateError(f"--iteration must be in 1..{run.spec.iterations} (spec.iterations); got {iteration}")
    layout = RunLayout.of(run)
    stats_path = layout.score_stats(iteration)
    if stats_path.is_file():
        log.info("round %d is already scored (%s): nothing to do", iteration, stats_path)
        stats = read_json(stats_path)
        emit_summary("score", {k: stats.get(k) for k in SUMMARY_FIELDS})
        return stats

    started = time.monotonic()
    spec = run.spec
    generations = read_round(layout, iteration, spec.generation.shards)
    items, where = unique_items(generations)
    log.info(
        "round %d: %d prompts in, %d responses, %d distinct to score",
        iteration, generations.prompts_in, len(where), len(items),
    )
    batch = asyncio.run(_score(spec.reward, reward_url, items, transport)) if items else Batch([], 0)
    bad = [s for s in batch.scores if not math.isfinite(s)]
    if bad:
        raise AnnotateError(f"the reward server returned {len(bad)} non-finite scores")
    outcome = pair_round(
        generations,
        split([batch.scores[i] for i in where], [len(g.responses) for g in generations.records]),
        strategy=spec.pairing.strategy,
        length_penalty=spec.pairing.length_penalty,
        seed=spec.generation.seed,
        iteration=iteration,
        samples_per_prompt=spec.generation.samples_per_prompt,
        truncated=batch.truncated,
    )
    stats = {**outcome.stats, "seconds": round(time.monotonic() - started, 3)}
    write_jsonl(layout.scored_file(iteration), outcome.scored)
    write_jsonl(layout.pairs_file(iteration), outcome.pairs)
    write_json(stats_path, stats)  # last: the completion marker
    emit_summary("score", {k: stats[k] for k in SUMMARY_FIELDS})
    return stats


async def _score(reward, url: str, items: list[dict], transport) -> Batch:
    client = RewardClient(
        url, timeout_seconds=reward.timeout_seconds, retry=RetryPolicy(max_retries=reward.max_retries), transport=transport,
        token=os.environ.get(REWARD_TOKEN_ENV) or None,
    )
    ready = await client.wait_ready(reward.startup_timeout_seconds)
    log.info("reward server ready: %s", ready)
    done, step = [0], max(1, len(items) // 10)

    def progress(n: int) -> None:
        before, done[0] = done[0], done[0] + n
        if done[0] // step != before // step or done[0] == len(items):
            log.info("scored %d/%d responses", done[0], len(items))

    return await client.score_all(
        items, request_size=reward.request_batch_size, concurrency=reward.concurrency, progress=progress
    )


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
    try:
        run = load_run(args.spec)
        claim_run_folder(run)
        annotate(run, args.iteration, args.reward_url)
    except (StageError, AnnotateError, RewardClientError, SpecError, OSError, ValueError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(annotate_main())
