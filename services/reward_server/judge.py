"""`iterdpo judge`: score a run's samples again with another reward model, round by round.

The run's own reward model is a proxy (trained on preference data, or given); whether what the
policy gained under it transfers shows only under a second, independent judge: a stronger or
*gold* model (the report's proxy-reward setting; the tiny demo's hand-wired model). This reads
every round's `score/scored.jsonl` (each prompt's K responses with the run's rewards), scores
the same (prompt, response) items in-process with the judge, through the server's own scorer
(its template, truncation and token-budget batches), and prints, per round, the mean reward
under the run's model and under the judge. Rounds not scored yet are listed as such.

    iterdpo judge RUN_FILE --model JUDGE_DIR [--workdir DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from iterdpo.contracts import ScoredRecord, read_lines
from iterdpo.errors import UsageError, stage_main
from iterdpo.layout import RunLayout
from iterdpo.local import DEFAULT_WORKDIR
from iterdpo.local.runner import with_storage_root
from iterdpo.runfile import load_run
from iterdpo.spec import RewardSpec

PROG = "iterdpo judge"


@dataclass(frozen=True)
class RoundJudgement:
    iteration: int
    samples: int
    mean_reward: float | None  # under the run's reward model (scored.jsonl)
    judge_mean_reward: float | None  # under the judge


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description="Score every round's samples of a local run with another "
                                "reward model (a gold judge) and print both mean rewards per round.")  # fmt: skip
    p.add_argument("run_file", type=Path)
    p.add_argument("--model", required=True, help="the judge: a bradley-terry reward model folder or hub id")
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="as given to iterdpo run")
    p.add_argument("--chat-template", type=Path, metavar="FILE", help="replaces the judge tokenizer's template")
    p.add_argument("--json", action="store_true", help="print the figures as JSON lines")
    return p.parse_args(argv)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def judge(run, judge_reward: RewardSpec) -> list[RoundJudgement]:
    from transformers.utils import logging as hf_logging

    from iterdpo_reward_server.scorers import scorer_kind
    from iterdpo_reward_server.scoring import ScoreInput
    from iterdpo_reward_server.settings import Settings

    hf_logging.disable_progress_bar()

    scorer = scorer_kind(judge_reward.kind).load(Settings(reward=judge_reward, device="auto"))
    layout = RunLayout.of(run)
    out = []
    for t in range(1, run.spec.iterations + 1):
        path = layout.scored_file(t)
        if not layout.score_stats(t).exists():  # stats.json, written last: the round was scored
            out.append(RoundJudgement(t, 0, None, None))
            continue
        records = read_lines(path, ScoredRecord)
        items = [ScoreInput([m.model_dump() for m in r.prompt], response, r.answer) for r in records for response in r.responses]
        proxy = [reward for r in records for reward in r.rewards]
        scores = scorer.score(items).scores if items else []
        out.append(RoundJudgement(t, len(items), _mean(proxy), _mean(scores)))
    return out


def table(rows: list[RoundJudgement], judge_model: str) -> str:
    def cell(value: float | None) -> str:
        return "-" if value is None or math.isnan(value) else f"{value:+.3f}"

    lines = [f"judge: {judge_model}", "round  samples  run's reward model  judge"]
    lines += [f"{r.iteration:>5}  {r.samples:>7}  {cell(r.mean_reward):>18}  {cell(r.judge_mean_reward):>5}"
              for r in rows]  # fmt: skip
    scored = [r for r in rows if r.judge_mean_reward is not None]
    if len(scored) >= 2:
        first, last = scored[0], scored[-1]
        lines.append(f"round {first.iteration} -> {last.iteration}: run's model {cell(first.mean_reward)} -> "
                     f"{cell(last.mean_reward)}, judge {cell(first.judge_mean_reward)} -> {cell(last.judge_mean_reward)}")  # fmt: skip
    return "\n".join(lines)


def _main(args: argparse.Namespace) -> int:
    run = with_storage_root(load_run(args.run_file), args.workdir)
    if not RunLayout.of(run).root.is_dir():
        raise UsageError(f"{RunLayout.of(run).root}: no such run folder (run it first: iterdpo run {args.run_file})")
    template = None
    if args.chat_template is not None:
        try:
            template = args.chat_template.read_text()
        except OSError as exc:
            raise UsageError(f"--chat-template: cannot read {args.chat_template}: {exc.strerror}") from None
    model = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model  # a folder here, or a hub id
    try:
        reward = run.spec.reward.model_copy(update={"model": model, "chat_template": template, "training": None})
        reward = RewardSpec.model_validate(reward.model_dump())
    except ValueError as exc:
        raise UsageError(f"--model: {exc}") from None
    rows = judge(run, reward)
    if args.json:
        for row in rows:
            print(json.dumps(asdict(row)))
    else:
        print(table(rows, args.model))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return stage_main(PROG, lambda: _main(args))


if __name__ == "__main__":
    sys.exit(main())
