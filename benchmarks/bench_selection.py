"""Pairwise selections against Bradley-Terry scoring of the same responses, at K=8.

    .venv/bin/python benchmarks/bench_selection.py [--prompts 64] [--k 8] [--rounds 3]

Every system picks one (chosen, rejected) pair per prompt from the same K responses (word
salads like the tiny policy's samples, seeded):
  bradley-terry      the tiny reward model scores each response once (K forward sequences per
                     prompt) and the best and worst are taken (pairing max_min);
  <selection>        the tiny policy read as a pairwise judge (services/reward_server/pairwise.py:
                     both orders per comparison, two forward sequences each), every prompt's
                     tournament run in lockstep (iterdpo.tournament.run_all), one batch of all
                     pending comparisons per tournament round.
All run in this process on the same scorers the reward server serves (no HTTP: the cost of the
model is what differs), same batchTokens, fp32, 2 CPU threads. Reported per system: forward
sequences per prompt, model batches, seconds (median of --rounds, rounds interleaved) and
prompts/s, and the ratio of each selection's time to BT's. The judge's preferences are
arbitrary (a random tiny LM); the costs are what is measured: a pairwise model is an LM of the
same size, so forward sequences, not its answers, set its price.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()

    import torch

    torch.set_num_threads(2)
    from iterdpo.pairing import Pair, choose_pair
    from iterdpo.spec import RewardSpec
    from iterdpo.tiny import TOPICS, _response
    from iterdpo.tournament import SELECTIONS, Tournament, expected_comparisons, run_all
    from iterdpo_reward_server.pairwise import PairwiseScorer
    from iterdpo_reward_server.scorers import BradleyTerryScorer
    from iterdpo_reward_server.scoring import CompareInput, ScoreInput
    from iterdpo_reward_server.settings import Settings

    import tempfile

    tiny = c.tiny_assets(Path(tempfile.mkdtemp(prefix="iterdpo-bench-selection-")))
    rng = random.Random(0)
    prompts = []
    for _ in range(args.prompts):
        topic = rng.choice(TOPICS)
        prompts.append(([{"role": "user", "content": f"tell me about the {topic}"}], [_response(rng, topic) for _ in range(args.k)]))
    common = dict(max_length=256, batch_tokens=8192)
    bt = BradleyTerryScorer.load(Settings(reward=RewardSpec(model=str(tiny.reward), **common), device="cpu"))
    judge = PairwiseScorer.load(Settings(reward=RewardSpec(kind="pairwise", model=str(tiny.policy), **common), device="cpu"))

    def by_scores():
        items = [ScoreInput(m, r) for m, rs in prompts for r in rs]
        scores = bt.score(items).scores
        pairs = [choose_pair(scores[i * args.k : (i + 1) * args.k], [1] * args.k, "max_min", rng=random.Random(i))
                 for i in range(len(prompts))]  # fmt: skip
        return len(items), 1, sum(isinstance(x, Pair) for x in pairs)

    def by_selection(selection):
        def run():
            tours = [Tournament(args.k, selection, random.Random(i)) for i in range(len(prompts))]
            seqs = [0]

            def compare(asked):
                result = judge.compare([CompareInput(prompts[t][0], prompts[t][1][a], prompts[t][1][b]) for t, a, b in asked])
                seqs[0] += result.forward_passes
                return result.probabilities

            batches = run_all(tours, compare)
            assert all(t.referee.comparisons == expected_comparisons(selection, args.k) for t in tours)
            return seqs[0], batches, sum(not isinstance(t.outcome, str) for t in tours)

        return run

    systems = {"bradley-terry": by_scores, **{s: by_selection(s) for s in SELECTIONS}}
    seconds: dict[str, list[float]] = {name: [] for name in systems}
    shape: dict[str, tuple[int, int, int]] = {}
    for r in range(args.rounds):
        order = list(systems)[r % len(systems) :] + list(systems)[: r % len(systems)]
        for name in order:
            started = time.perf_counter()
            shape[name] = systems[name]()
            seconds[name].append(time.perf_counter() - started)
    base = statistics.median(seconds["bradley-terry"])
    print(f"selection benchmark: {args.prompts} prompts x K={args.k}, median of {args.rounds} rounds, 2 CPU threads")
    print(f"{'system':<18} {'comparisons':>11} {'fwd seq/prompt':>14} {'batches':>7} {'pairs':>5} {'seconds':>8} "
          f"{'prompts/s':>9} {'x BT time':>9}")  # fmt: skip
    for name in systems:
        seqs, batches, pairs = shape[name]
        median = statistics.median(seconds[name])
        comparisons = "-" if name == "bradley-terry" else str(expected_comparisons(name, args.k))
        print(f"{name:<18} {comparisons:>11} {seqs / args.prompts:>14.1f} {batches:>7} {pairs:>5} {median:>8.2f} "
              f"{args.prompts / median:>9.1f} {median / base:>9.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
