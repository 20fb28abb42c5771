"""The reward server's FastAPI app (factory; routes; the model held in app.state).

The model loads in a background thread started by the lifespan, so `/healthz`
answers while a large checkpoint loads and `/readyz` turns 200 only when it can
score: a client waits on readiness, never on a fixed sleep. Forward passes run
in a worker thread, one at a time (an asyncio lock: waiting requests queue on
the event loop, not in threads), so the loop stays free for probes and many
concurrent clients are served in turn instead of hanging.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
from contextlib import asynccontextmanager
from typing import Callable

import anyio
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

from iterdpo_reward_server.schemas import Liveness, Problem, Readiness, ScoreRequest, ScoreResponse
from iterdpo_reward_server.scorers import Scorer, scorer_kind
from iterdpo_reward_server.scoring import ScoringError, UnscorableItem
from iterdpo_reward_server.settings import Settings

log = logging.getLogger("iterdpo.reward_server")

Loader = Callable[[Settings], Scorer]
router = APIRouter()


def create_app(settings: Settings, *, loader: Loader | None = None, on_fatal: Callable[[str], None] | None = None) -> FastAPI:
    """`loader` builds the scorer (default: the registry's, for `settings.reward.kind`);
    `on_fatal(message)` is called on the event loop if loading fails (the CLI stops the server)."""
    load = loader or scorer_kind(settings.reward.kind).load

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.settings = settings
        app.state.scorer = None
        app.state.load_error = None
        app.state.forward_lock = asyncio.Lock()
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
            log.info("ready: %s", settings.reward.model)

        threading.Thread(target=load_in_background, name="load-reward-model", daemon=True).start()
        yield

    app = FastAPI(title="iterdpo reward server", version="1", lifespan=lifespan)
    app.include_router(router)
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


def authorized(request: Request) -> None:
    """With a token configured, /v1/score needs `Authorization: Bearer <token>` (probes stay open)."""
    token = request.app.state.settings.token
    if token is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), token.encode()):
        raise HTTPException(status_code=401, detail="a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"})


@router.post("/v1/score", response_model=ScoreResponse,
             responses={401: {"model": Problem}, 503: {"model": Problem}, 500: {"model": Problem}})  # fmt: skip
async def score(body: ScoreRequest, request: Request, _: None = Depends(authorized), scorer: Scorer = Depends(ready_scorer)):
    items = [([m.model_dump() for m in item.messages], item.response) for item in body.items]
    async with request.app.state.forward_lock:
        try:
            result = await anyio.to_thread.run_sync(scorer.score, items)
        except UnscorableItem as exc:
            # Same shape as FastAPI's own 422s, so a client reads one format.
            return JSONResponse(
                status_code=422,
                content={
                    "detail": [
                        {"loc": ["body", "items", exc.index, "messages"], "msg": exc.message, "type": "chat_template"}
                    ]
                },
            )
        except ScoringError as exc:
            raise HTTPException(status_code=500, detail=str(exc)) from None
        except Exception as exc:  # e.g. out of memory: say what, so the client's error is actionable
            log.exception("scoring failed")
            raise HTTPException(status_code=500, detail=f"scoring failed: {type(exc).__name__}: {exc}") from None
    return ScoreResponse(scores=result.scores, model=request.app.state.settings.reward.model, truncated=result.truncated)
