"""HTTP client of the reward server: readiness wait, bounded concurrency, retries.

What is retried is what a busy or restarting server answers (connection errors,
timeouts, 429/502/503/504), with exponential backoff and jitter so that many
clients do not retry in step; anything else (a 422, a 500) is a bug or bad input
and fails at once with the server's own message.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Sequence

import httpx
from pydantic import ValidationError

from iterdpo.errors import StageError
from iterdpo.planner import REWARD_TOKEN_ENV
from iterdpo_reward_server.settings import MAX_ITEM_CHARS, MAX_ITEMS_PER_REQUEST
from iterdpo_reward_server.schemas import CompareResponse, ScoreRequest, ScoreResponse, compare_request_model
from iterdpo_reward_server.scoring import CompareResult, ScoreResult

log = logging.getLogger("iterdpo.annotate")

RETRY_STATUSES = frozenset({429, 502, 503, 504})
CompareRequest = compare_request_model(MAX_ITEMS_PER_REQUEST, MAX_ITEM_CHARS)


class RewardClientError(StageError):
    """Scoring failed for good; the message says what the server said."""


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 5
    base_seconds: float = 0.5
    cap_seconds: float = 30.0

    def delay(self, attempt: int, rng: random.Random, retry_after: float | None = None) -> float:
        """Seconds before retry number `attempt` (0-based): base x 2^attempt, capped, jittered into [1/2, 1]."""
        backoff = min(self.cap_seconds, self.base_seconds * (2**attempt)) * (0.5 + 0.5 * rng.random())
        if retry_after is not None:
            backoff = max(backoff, min(retry_after, self.cap_seconds))
        return backoff


def concat(batches: Sequence[ScoreResult]) -> ScoreResult:
    """Results of consecutive items as one (indices of `unscored` shifted to match)."""
    scores: list[float | None] = []
    unscored: dict[int, str] = {}
    names = list(dict.fromkeys(name for b in batches for name in b.details))
    details: dict[str, list[float | None]] = {name: [] for name in names}
    for b in batches:
        unscored.update({len(scores) + i: why for i, why in b.unscored.items()})
        for name in names:
            details[name].extend(b.details.get(name, [None] * len(b.scores)))
        scores.extend(b.scores)
    return ScoreResult(scores, sum(b.truncated for b in batches), unscored, details)


def chunk(n: int, size: int) -> list[range]:
    """Index ranges of consecutive requests of at most `size` items covering 0..n."""
    if size < 1:
        raise ValueError(f"request size must be >= 1 (got {size})")
    return [range(start, min(start + size, n)) for start in range(0, n, size)]


@dataclass
class RewardClient:
    base_url: str
    timeout_seconds: float = 300.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    transport: httpx.AsyncBaseTransport | None = None  # tests pass a MockTransport
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    rng: random.Random = field(default_factory=random.Random)
    token: str | None = field(default=None, repr=False)  # sent as a bearer token

    def _client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {self.token}"} if self.token else None,
            timeout=self.timeout_seconds,
            transport=self.transport,
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
        )

    async def wait_ready(self, timeout_seconds: float) -> dict:
        """Poll /readyz until 200 or the deadline; returns its body."""
        deadline = time.monotonic() + timeout_seconds
        attempt, last = 0, "no answer yet"
        async with self._client() as client:
            while True:
                try:
                    r = await client.get("/readyz", timeout=min(10.0, self.timeout_seconds))
                    if r.status_code == 200:
                        return r.json()
                    last = f"HTTP {r.status_code}: {_server_message(r)}"
                except httpx.TransportError as exc:
                    last = _describe_transport(exc)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RewardClientError(
                        f"the reward server at {self.base_url} was not ready within {timeout_seconds:g} s "
                        f"(spec.reward.startupTimeoutSeconds); last answer: {last}"
                    )
                await self.sleep(min(left, 2.0, 0.1 * 2**attempt))
                attempt += 1

    async def score_all(
        self, items: Sequence[dict], *, request_size: int, concurrency: int, progress: Callable[[int], None] | None = None
    ) -> ScoreResult:
        """Scores of every item, in order: requests of `request_size` items, `concurrency` in flight."""
        return concat(await self._all(self._score_request, items, request_size, concurrency, progress))

    async def compare_all(self, items: Sequence[dict], *, request_size: int, concurrency: int) -> CompareResult:
        """p(a beats b) of every {messages, a, b} item, in order (POST /v1/compare)."""
        parts = await self._all(self._compare_request, items, request_size, concurrency, None)
        probabilities = [p for part in parts for p in part.probabilities]
        return CompareResult(probabilities, sum(p.forward_passes for p in parts), sum(p.truncated for p in parts))

    async def _all(self, request, items, request_size, concurrency, progress) -> list:
        ranges = chunk(len(items), request_size)
        results: list = [None] * len(ranges)
        gate = asyncio.Semaphore(concurrency)
        async with self._client() as client:

            async def one(k: int, span: range) -> None:
                async with gate:
                    results[k] = await request(client, [items[i] for i in span])
                if progress is not None:
                    progress(len(span))

            try:
                async with asyncio.TaskGroup() as group:
                    for k, span in enumerate(ranges):
                        group.create_task(one(k, span))
            except BaseExceptionGroup as group_error:  # the first failure cancels the rest; report it
                raise group_error.exceptions[0] from None
        return results

    async def score(self, items: Sequence[dict]) -> ScoreResult:
        """One request (with retries)."""
        async with self._client() as client:
            return await self._score_request(client, items)

    async def _score_request(self, client: httpx.AsyncClient, items: Sequence[dict]) -> ScoreResult:
        return await self._request(client, "/v1/score", ScoreRequest, items, _parse)

    async def _compare_request(self, client: httpx.AsyncClient, items: Sequence[dict]) -> CompareResult:
        return await self._request(client, "/v1/compare", CompareRequest, items, _parse_comparisons)

    async def _request(self, client: httpx.AsyncClient, path: str, model, items: Sequence[dict], parse):
        try:
            body = model.model_validate({"items": list(items)}).model_dump_json()
        except ValidationError as exc:
            e = exc.errors()[0]
            raise RewardClientError(f"not a valid scoring request: {'.'.join(map(str, e['loc']))}: {e['msg']}") from None
        for attempt in range(self.retry.max_retries + 1):
            retry_after = None
            try:
                r = await client.post(path, content=body, headers={"content-type": "application/json"})
            except httpx.TransportError as exc:
                problem = _describe_transport(exc)
            else:
                if r.status_code == 200:
                    return parse(r, len(items))
                problem = f"HTTP {r.status_code}: {_server_message(r)}"
                if r.status_code == 401:
                    raise RewardClientError(
                        f"the reward server refused the token ({problem}): {REWARD_TOKEN_ENV} must hold the server's token"
                    )
                if r.status_code not in RETRY_STATUSES:
                    raise RewardClientError(f"the reward server refused a scoring request ({problem})")
                retry_after = _retry_after(r)
            if attempt == self.retry.max_retries:
                raise RewardClientError(
                    f"scoring failed after {attempt + 1} attempts (spec.reward.maxRetries={self.retry.max_retries}); "
                    f"last: {problem}"
                )
            wait = self.retry.delay(attempt, self.rng, retry_after)
            log.warning("scoring request failed (%s); retry %d in %.1f s", problem, attempt + 1, wait)
            await self.sleep(wait)
        raise AssertionError("unreachable")


def client_for(reward, url: str, transport: httpx.AsyncBaseTransport | None = None) -> RewardClient:
    """A client of the server at `url` as a spec's reward section says (timeouts, retries), with
    the bearer token the backend hands every caller in $ITERDPO_REWARD_TOKEN."""
    return RewardClient(url, timeout_seconds=reward.timeout_seconds, retry=RetryPolicy(max_retries=reward.max_retries),
                        transport=transport, token=os.environ.get(REWARD_TOKEN_ENV) or None)  # fmt: skip


def score_everything(reward, url: str, items: list[dict], transport: httpx.AsyncBaseTransport | None = None,
                     who: str = "the reward server") -> ScoreResult:  # fmt: skip
    """Every item scored by the server at `url` once it is ready, with the spec reward section's
    batching and concurrency (progress logged every tenth); a non-finite score is a StageError."""
    client = client_for(reward, url, transport)
    done, step = [0], max(1, len(items) // 10)

    def progress(n: int) -> None:
        before, done[0] = done[0], done[0] + n
        if done[0] // step != before // step or done[0] == len(items):
            log.info("scored %d/%d responses", done[0], len(items))

    async def go() -> ScoreResult:
        await client.wait_ready(reward.startup_timeout_seconds)
        return await client.score_all(items, request_size=reward.request_batch_size, concurrency=reward.concurrency,
                                      progress=progress)  # fmt: skip

    result = asyncio.run(go())
    bad = [s for s in result.scores if s is not None and not math.isfinite(s)]
    if bad:
        raise StageError(f"{who} returned {len(bad)} non-finite scores")
    return result


def _body(r: httpx.Response, model):
    try:
        return model.model_validate_json(r.content)
    except ValidationError as exc:
        raise RewardClientError(f"the reward server's answer is not a {model.__name__}: {exc.errors()[0]['msg']}") from None


def _parse(r: httpx.Response, expected: int) -> ScoreResult:
    body = _body(r, ScoreResponse)
    if len(body.scores) != expected:
        raise RewardClientError(f"the reward server answered {len(body.scores)} scores for {expected} items")
    unscored = {u.index: u.reason for u in body.unscored}
    if any(not 0 <= i < expected for i in unscored) or any((s is None) != (i in unscored) for i, s in enumerate(body.scores)):
        raise RewardClientError("the reward server's answer is inconsistent: a null score must come with its reason in `unscored`")
    if any(len(values) != expected for values in body.details.values()):
        raise RewardClientError(f"the reward server's details do not have one value per item ({expected})")
    return ScoreResult(body.scores, body.truncated, unscored, body.details)


def _parse_comparisons(r: httpx.Response, expected: int) -> CompareResult:
    body = _body(r, CompareResponse)
    if len(body.probabilities) != expected:
        raise RewardClientError(f"the reward server answered {len(body.probabilities)} comparisons for {expected} items")
    if body.unscored or any(p is None or not 0.0 <= p <= 1.0 for p in body.probabilities):
        why = body.unscored[0].reason if body.unscored else "a probability outside [0, 1]"
        raise RewardClientError(f"the reward server could not compare every pair: {why}")
    return CompareResult(body.probabilities, body.forward_passes, body.truncated)  # type: ignore[arg-type]


def _server_message(r: httpx.Response) -> str:
    try:
        body = r.json()
        detail = body.get("detail", r.text)
        omitted = body.get("omitted", 0)
    except (ValueError, AttributeError):
        detail, omitted = r.text, 0
    if isinstance(detail, list):  # validation errors (FastAPI's shape): field path + message
        detail = "; ".join(f"{'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg')}" for d in detail)
        if isinstance(omitted, int) and omitted > 0:
            detail += f"; and {omitted} more"
    return str(detail)[:500]


def _retry_after(r: httpx.Response) -> float | None:
    """Seconds the server asks to wait (a number or an HTTP date), or None if absent or unusable.

    Never trusted blindly: a negative, non-finite or unparsable value counts as absent, and
    `RetryPolicy.delay` caps what is left at `cap_seconds`.
    """
    value = r.headers.get("retry-after", "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.timezone.utc)
        seconds = (when - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _describe_transport(exc: httpx.TransportError) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
