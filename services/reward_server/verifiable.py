"""Reward kind `verifiable`: a rule, not a model, checks each response's final answer.

The Online-DPO-R1 scheme: `correct` when the response's final answer equals its prompt's
gold answer, `wrongAnswer` when it gives one in the expected form that is not it,
`noAnswer` when it gives none (spec.reward.verifiable; +1 / -0.5 / -1 by default).
Extraction and equivalence are math-verify's (LaTeX, numbers, sets, symbolic equality):
the field's maintained checker, the one TRL's accuracy reward uses.

math-verify bounds each parse and comparison with `signal.alarm`, which only works in a
process's main thread, and a pathological expression can keep sympy busy for minutes, so
the checks run in a pool of worker processes (each check in a worker's main thread, under
`checkTimeoutSeconds`), never in the server's threads; a worker that does not answer at
all is replaced. A gold answer that math-verify cannot parse leaves the item unscored
with that reason (the annotator leaves its prompt out), never a silent -1.
"""

from __future__ import annotations

import functools
import logging
import math
import multiprocessing
import os
import re
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from typing import Sequence

from iterdpo.errors import StageError
from iterdpo.spec import VerifiableSpec
from iterdpo_reward_server.scoring import ScoreInput, ScoreResult, UnscorableItem
from iterdpo_reward_server.settings import Settings

log = logging.getLogger("iterdpo.reward_server")

CORRECT, WRONG, NO_ANSWER, BAD_GOLD = "correct", "wrong", "no-answer", "bad-gold"
MAX_WORKERS = 8
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (braces balanced), or None if there is none."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i]
    return None


@functools.lru_cache(maxsize=4096)  # per worker: the K responses of a prompt share one gold answer
def _parse_gold(gold: str, seconds: int):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    configs = [LatexExtractionConfig(), ExprExtractionConfig()]
    parsed = parse(gold, extraction_config=configs, extraction_mode="first_match", parsing_timeout=seconds)
    if not parsed and "$" not in gold:  # a bare LaTeX answer such as \frac{1}{2}
        parsed = parse(f"${gold}$", extraction_config=configs, extraction_mode="first_match", parsing_timeout=seconds)
    return parsed


def check(response: str, gold: str, answer_format: str, timeout_seconds: float) -> str:
    """One response against its gold answer: CORRECT, WRONG, NO_ANSWER or BAD_GOLD.

    Runs in a worker process's main thread (math-verify's timeouts need it). A check that
    times out counts as WRONG: the response gave an answer, but not one shown to be right."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    seconds = max(1, math.ceil(timeout_seconds))  # signal.alarm counts whole seconds
    gold_parsed = _parse_gold(gold, seconds)
    if not any(not isinstance(p, str) for p in gold_parsed):  # nothing, or only math-verify's raw-string fallback
        return BAD_GOLD
    if answer_format == "boxed":
        boxed = last_boxed(response)
        if boxed is None:
            return NO_ANSWER
        answer = parse(f"\\boxed{{{boxed}}}", extraction_config=[LatexExtractionConfig(boxed_match_priority=0)],
                       parsing_timeout=seconds)  # fmt: skip
        if not answer:
            return WRONG  # a boxed answer, but not a readable one
    else:
        answer = parse(response, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                       parsing_timeout=seconds)  # fmt: skip
        if not answer:
            return NO_ANSWER
    return CORRECT if verify(gold_parsed, answer, timeout_seconds=seconds) else WRONG


def _check_all(tasks: list[tuple[str, str]], answer_format: str, timeout_seconds: float) -> list[str]:
    return [check(response, gold, answer_format, timeout_seconds) for response, gold in tasks]


def _warm() -> None:
    import math_verify  # noqa: F401  (sympy and the LaTeX parser load once per worker, at start)


class VerifiableScorer:
    """Scores by rule; items must carry their prompt's gold answer (`answer`)."""

    def __init__(self, rule: VerifiableSpec, workers: int):
        self.rule = rule
        self.workers = workers
        self._lock = threading.Lock()
        self._pool = self._start_pool()

    @staticmethod
    def preflight(settings: Settings) -> None:
        try:
            import math_verify  # noqa: F401
        except ImportError as exc:
            raise StageError(f"kind verifiable needs the math-verify package ({exc})") from None

    @classmethod
    def load(cls, settings: Settings) -> VerifiableScorer:
        cls.preflight(settings)
        workers = max(1, min(MAX_WORKERS, os.cpu_count() or 1))
        scorer = cls(settings.reward.rule, workers)
        log.info("verifiable: %d checker processes, answer format %s, timeout %gs", workers,
                 settings.reward.rule.answer_format, settings.reward.rule.check_timeout_seconds)  # fmt: skip
        return scorer

    def _start_pool(self) -> ProcessPoolExecutor:
        # spawn, not fork: the server has threads (uvicorn, the loader) that a fork would copy mid-flight
        pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_warm)
        list(pool.map(_noop, range(self.workers)))  # start (and import in) every worker now, not on the first request
        return pool

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def score(self, items: Sequence[ScoreInput]) -> ScoreResult:
        for index, item in enumerate(items):
            if item.answer is None:
                raise UnscorableItem(index, "kind verifiable checks a response against its prompt's gold answer: "
                                     "the item has no 'answer'", field="answer")  # fmt: skip
        outcomes = self._outcomes([(item.response, item.answer) for item in items])
        scores: list[float | None] = []
        unscored: dict[int, str] = {}
        for index, outcome in enumerate(outcomes):
            if outcome == BAD_GOLD:
                scores.append(None)
                unscored[index] = "math-verify cannot parse the gold answer (answerField)"
            else:
                scores.append({CORRECT: self.rule.correct, WRONG: self.rule.wrong_answer, NO_ANSWER: self.rule.no_answer}[outcome])
        details = {
            "correct": [None if o == BAD_GOLD else float(o == CORRECT) for o in outcomes],
            "answered": [None if o == BAD_GOLD else float(o != NO_ANSWER) for o in outcomes],
        }
        return ScoreResult(scores, 0, unscored, details)

    def _outcomes(self, tasks: list[tuple[str, str]]) -> list[str]:
        """Outcomes in task order, the tasks spread over the workers in chunks."""
        if not tasks:
            return []
        rule = self.rule
        size = max(1, math.ceil(len(tasks) / (self.workers * 4)))
        chunks = [tasks[i : i + size] for i in range(0, len(tasks), size)]
        # Each check is at most three bounded steps in its worker (gold, answer, comparison); twice
        # that per check, plus a start-up margin, bounds a worker that stopped answering altogether.
        budget = 2 * 3 * max(1, math.ceil(rule.check_timeout_seconds)) * size + 30
        with self._lock:
            done: list[list[str] | None] = [None] * len(chunks)
            pending = list(range(len(chunks)))
            while pending:
                futures = [(k, self._pool.submit(_check_all, chunks[k], rule.answer_format, rule.check_timeout_seconds))
                           for k in pending]  # fmt: skip
                pending, restarted = [], False
                for k, future in futures:
                    if restarted:  # the old pool is gone: what it had not answered goes to the new one
                        pending.append(k)
                        continue
                    try:
                        done[k] = future.result(timeout=budget)
                    except (FutureTimeout, BrokenProcessPool) as exc:
                        log.warning("a checker process did not answer (%s): its %d checks count as wrong; "
                                    "restarting the checkers", type(exc).__name__, len(chunks[k]))  # fmt: skip
                        done[k] = [WRONG] * len(chunks[k])
                        self._restart()
                        restarted = True
            return [outcome for chunk in done for outcome in chunk]  # type: ignore[union-attr]

    def _restart(self) -> None:
        old = self._pool
        for process in list(getattr(old, "_processes", {}).values()):  # a stuck worker ignores shutdown
            process.kill()
        old.shutdown(wait=False, cancel_futures=True)
        self._pool = self._start_pool()


def _noop(_: int) -> None:
    return None
