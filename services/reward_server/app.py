"""The reward server's FastAPI app (factory; routes; the model held in app.state).

The model loads in a background thread started by the lifespan, so `/healthz`
answers while a large checkpoint loads and `/readyz` turns 200 only when it can
score: a client waits on readiness, never on a fixed sleep. Forward passes run
in a worker thread, one at a time (`waiting.ForwardQueue`: waiting requests queue
on the event loop, not in threads, and past `max_queue` of them a request gets 429),
so the loop stays free for probes and many concurrent clients are served in turn.

What a client sends is checked in layers, each before the next costs anything: the
`gate` (token, body size and pace) before the body is read, the request model (built
for the settings' limits) before anything is scored; no error body echoes what was
sent (`problems`).

No `from __future__ import annotations` here: the score route's body type is built
per settings inside `create_app`, and FastAPI must see the class itself.
"""

import asyncio
import logging
import threading
from contextlib import asynccontextmanager
from typing import Callable

import anyio
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from iterdpo_reward_server.gate import Gate
from iterdpo_reward_server.problems import on_validation_error, problem, validation_response
from iterdpo_reward_server.schemas import (
    CompareResponse,
    GetRewardResponse,
    Liveness,
    Problem,
    Readiness,
    ScoreResponse,
    Unscored,
    ValidationProblem,
    compare_request_model,
    get_reward_request_model,
    score_request_model,
)
from iterdpo_reward_server.scorers import Scorer, scorer_kind
from iterdpo_reward_server.scoring import CompareInput, ScoreInput, ScoringError, UnscorableItem, compare_by_scores
from iterdpo_reward_server.settings import Settings
from iterdpo_reward_server.waiting import ForwardQueue, QueueFull

log = logging.getLogger("iterdpo.reward_server")

Loader = Callable[[Settings], Scorer]
router = APIRouter()

# Every answer /v1/score can give besides 200; the gate's and the queue's included.
SCORE_RESPONSES: dict[int | str, dict] = {
    400: {"model": Problem, "description": "The body cannot be read (e.g. not UTF-8, or a bad Content-Length)."},
    401: {"model": Problem, "description": "A token is configured and the request lacks `Authorization: Bearer <token>`."},
    408: {"model": Problem, "description": "The body did not all arrive within --body-timeout-seconds; the connection is closed."},
    413: {"model": Problem, "description": "The body is larger than --max-body-bytes (refused before it is read)."},
    422: {"model": ValidationProblem, "description": "Not a valid request (not JSON, a bad field, too many items or "
          "characters, a lone surrogate, a conversation the chat template rejects); names the field, never echoes it."},  # fmt: skip
    429: {"model": Problem, "description": "--max-queue requests already wait for the model; retry after `Retry-After` seconds.",
          "headers": {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}}},  # fmt: skip
    500: {"model": Problem, "description": "A server fault (a non-finite score, out of memory); details in the server's log."},
    503: {"model": Problem, "description": "The model is still loading (or failed to load).",
          "headers": {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}}},  # fmt: skip
}


def create_app(settings: Settings, *, loader: Loader | None = None, on_fatal: Callable[[str], None] | None = None) -> FastAPI:
    """`loader` builds the scorer (default: the registry's, for `settings.reward.kind`);
    `on_fatal(message)` is called on the event loop if loading fails (the CLI stops the server)."""
    load = loader or scorer_kind(settings.reward.kind).load

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.settings = settings
        app.state.scorer = None
        app.state.load_error = None
        app.state.forward_queue = ForwardQueue(settings.max_queue)
        app.state.forward_lock = app.state.forward_queue.lock
        loop = asyncio.get_running_loop()

        def load_in_background() -> None:
            try:
                scorer = load(settings)
            except Exception as exc:  # reported, and the server told to stop
                message = f"cannot load the reward model: {exc}"
                log.error(message)
                app.state.load_error = message
                if on_fatal is not None:
                    try:
                        loop.call_soon_threadsafe(on_fatal, message)
                    except RuntimeError:  # the loop already closed: shutting down anyway
                        pass
                return
            app.state.scorer = scorer
            log.info("ready: %s", settings.reward.model or settings.reward.kind)

        threading.Thread(target=load_in_background, name="load-reward-model", daemon=True).start()
        yield
        close = getattr(app.state.scorer, "close", None)  # e.g. the verifiable kind's checker processes
        if close is not None:
            close()

    app = FastAPI(title="iterdpo reward server", version="1", lifespan=lifespan)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.include_router(router)
    app.add_api_route("/v1/score", _score_route(settings), methods=["POST"], response_model=ScoreResponse,
                      responses=SCORE_RESPONSES)  # fmt: skip
    app.add_api_route("/v1/compare", _compare_route(settings), methods=["POST"], response_model=CompareResponse,
                      responses=SCORE_RESPONSES, summary="Which of two responses is better")  # fmt: skip
    app.add_api_route("/get_reward", _get_reward_route(settings), methods=["POST"], response_model=GetRewardResponse,
                      responses=SCORE_RESPONSES, summary="OpenRLHF-compatible remote reward")  # fmt: skip
    # Outside the routing: it answers before FastAPI reads (and parses) the body.
    app.add_middleware(Gate, token=settings.token, max_body_bytes=settings.max_body_bytes,
                       body_timeout_seconds=settings.body_timeout_seconds)  # fmt: skip
    return app


def ready_scorer(request: Request) -> Scorer:
    """The loaded scorer, or 503 while loading (or after a failed load)."""
    scorer = request.app.state.scorer
    if scorer is None:
        detail = request.app.state.load_error or "the reward model is still loading"
        raise HTTPException(status_code=503, detail=detail, headers={"Retry-After": "1"})
    return scorer


@router.get("/healthz", response_model=Liveness)
async def healthz() -> Liveness:
    return Liveness()


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Problem}})
async def readyz(request: Request, scorer: Scorer = Depends(ready_scorer)) -> Readiness:
    settings: Settings = request.app.state.settings
    return Readiness(model=settings.reward.model, kind=settings.reward.kind)


async def _run(request: Request, work: Callable, items: list, where: Callable[[UnscorableItem], list]):
    """`work(items)` in the model's turn; its result, or the error response (`where`: an
    unscorable item's location in the request body)."""
    try:
        async with request.app.state.forward_queue.turn():
            return await anyio.to_thread.run_sync(work, items)
    except QueueFull as full:
        raise HTTPException(status_code=429, headers={"Retry-After": str(full.retry_after)},
                            detail=f"{full.waiting} requests are already waiting for the model (--max-queue)") from None  # fmt: skip
    except UnscorableItem as exc:
        # Same shape as the other 422s, so a client reads one format.
        kind = "chat_template" if exc.field == "messages" else "unscorable"
        return validation_response([problem(where(exc), exc.message, kind)])
    except ScoringError as exc:
        raise HTTPException(status_code=500, detail=str(exc)) from None
    except Exception as exc:  # e.g. out of memory: the kind of fault here, the rest in the log
        log.exception("scoring failed")
        raise HTTPException(status_code=500, detail=f"scoring failed ({type(exc).__name__}); see the server's log") from None


def _unscored(reasons: dict[int, str]) -> list[Unscored]:
    return [Unscored(index=i, reason=why) for i, why in sorted(reasons.items())]


def _score_route(settings: Settings):
    """POST /v1/score, its body validated against the settings' limits."""
    ScoreRequest = score_request_model(settings.max_items, settings.max_item_chars)

    async def score(body: ScoreRequest, request: Request, scorer: Scorer = Depends(ready_scorer)):
        items = [ScoreInput([m.model_dump() for m in item.messages], item.response, item.answer) for item in body.items]
        result = await _run(request, scorer.score, items, lambda exc: ["body", "items", exc.index, exc.field])
        if isinstance(result, JSONResponse):
            return result
        reward = request.app.state.settings.reward
        return ScoreResponse(scores=result.scores, model=reward.model, kind=reward.kind, truncated=result.truncated,
                             unscored=_unscored(result.unscored), details=result.details)  # fmt: skip

    return score


def _compare(scorer, items):
    """A pairwise scorer compares itself; any other kind through its scores (Bradley-Terry)."""
    compare = getattr(scorer, "compare", None)
    return compare(items) if compare is not None else compare_by_scores(scorer, items)


def _compare_route(settings: Settings):
    """POST /v1/compare: which of two responses is better, per item."""
    CompareRequest = compare_request_model(settings.max_items, settings.max_item_chars)

    async def compare(body: CompareRequest, request: Request, scorer: Scorer = Depends(ready_scorer)):
        items = [CompareInput([m.model_dump() for m in item.messages], item.a, item.b, item.answer) for item in body.items]
        result = await _run(request, lambda batch: _compare(scorer, batch), items,
                            lambda exc: ["body", "items", exc.index, exc.field])  # fmt: skip
        if isinstance(result, JSONResponse):
            return result
        reward = request.app.state.settings.reward
        return CompareResponse(probabilities=result.probabilities, model=reward.model, kind=reward.kind,
                               forward_passes=result.forward_passes, truncated=result.truncated,
                               unscored=_unscored(result.unscored))  # fmt: skip

    return compare


def _get_reward_route(settings: Settings):
    """POST /get_reward, OpenRLHF's remote reward API: formatted conversations in, rewards out."""
    GetRewardRequest = get_reward_request_model(settings.max_items, settings.max_item_chars)
    field_of = {"messages": "query", "response": "query", "answer": "labels"}

    async def get_reward(body: GetRewardRequest, request: Request, scorer: Scorer = Depends(ready_scorer)):
        prompts = body.prompts or [""] * len(body.query)
        labels = body.labels or [None] * len(body.query)
        items = [ScoreInput((), query.removeprefix(prompt), label, text=query)
                 for query, prompt, label in zip(body.query, prompts, labels)]  # fmt: skip
        result = await _run(request, scorer.score, items, lambda exc: ["body", field_of.get(exc.field, "query"), exc.index])
        if isinstance(result, JSONResponse):
            return result
        return GetRewardResponse(rewards=result.scores, scores=result.scores, extra_logs=result.details,
                                 unscored=_unscored(result.unscored))  # fmt: skip

    return get_reward
