"""Fast tests of the reward server's defences, piece by piece: the ASGI gate (token, body size
and pace), sanitized error bodies, the request limits, the bounded queue, and how the client
reads Retry-After. The same defences over real HTTP: tests/component/test_reward_server.py."""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time

import httpx
import pytest

from iterdpo_reward_server.client import RetryPolicy, RewardClient, _retry_after, _server_message
from iterdpo_reward_server.gate import Gate
from iterdpo_reward_server.problems import MAX_PROBLEMS, validation_body, validation_response
from iterdpo_reward_server.schemas import ScoreRequest, score_request_model, valid_unicode
from iterdpo_reward_server.settings import MAX_ITEMS_PER_REQUEST, SettingsError, settings_from_args
from iterdpo_reward_server.waiting import MAX_RETRY_AFTER_SECONDS, ForwardQueue, QueueFull

# --- the gate ---------------------------------------------------------------------------------


class _Recorder:
    """The app behind the gate: records what it was given, answers 200."""

    def __init__(self):
        self.calls: list[tuple[dict, bytes]] = []

    async def __call__(self, scope, receive, send):
        message = await receive()
        self.calls.append((scope, message["body"]))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def _scope(path="/v1/score", headers=()):
    return {"type": "http", "method": "POST", "path": path, "headers": [(k.lower(), v) for k, v in headers]}


def _pieces(*chunks: bytes, then=None):
    """A receive that gives `chunks` (the last with more_body False, unless `then` says what
    comes next), counting its calls."""
    queue = list(chunks)

    async def receive():
        receive.calls += 1
        if not queue:
            if then is not None:
                return await then()
            return {"type": "http.disconnect"}
        chunk = queue.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(queue) or then is not None}

    receive.calls = 0
    return receive


def _run(gate: Gate, scope, receive) -> tuple[int, dict, bytes]:
    sent = []

    async def send(message):
        sent.append(message)

    asyncio.run(gate(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body


def _gate(app=None, token=None, limit=100, timeout=5.0) -> Gate:
    return Gate(app or _Recorder(), token=token, max_body_bytes=limit, body_timeout_seconds=timeout)


@pytest.mark.parametrize("auth", [None, b"Bearer nope", b"Basic s3cret", b"Bearer", b"s3cret", b"Bearer s3cret-and-more"])
def test_a_missing_or_wrong_token_is_401_before_the_body_is_read(auth):
    app = _Recorder()
    receive = _pieces(b"x" * 50)
    headers = [(b"content-length", b"50")] + ([(b"authorization", auth)] if auth else [])
    status, headers, body = _run(_gate(app, token="s3cret"), _scope(headers=headers), receive)
    assert status == 401 and headers["www-authenticate"] == "Bearer" and headers["connection"] == "close"
    assert json.loads(body) == {"detail": "a valid bearer token is required"}
    assert receive.calls == 0 and not app.calls


def test_the_right_token_passes_and_the_app_gets_the_whole_body():
    app = _Recorder()
    headers = [(b"Authorization", b"bearer  s3cret ")]
    status, _, _ = _run(_gate(app, token="s3cret"), _scope(headers=headers), _pieces(b"ab", b"cd", b"e"))
    assert status == 200 and app.calls[0][1] == b"abcde"


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_the_probes_need_no_token(path):
    status, _, _ = _run(_gate(token="s3cret"), _scope(path), _pieces(b""))
    assert status == 200


def test_a_declared_length_past_the_limit_is_413_unread_even_with_the_token():
    app, receive = _Recorder(), _pieces(b"{}")
    headers = [(b"content-length", b"1000000000000"), (b"authorization", b"Bearer s3cret")]
    status, headers, body = _run(_gate(app, token="s3cret", limit=100), _scope(headers=headers), receive)
    assert status == 413 and headers["connection"] == "close" and b"at most 100" in body
    assert receive.calls == 0 and not app.calls


def test_a_content_length_that_is_not_a_number_is_400():
    status, _, _ = _run(_gate(), _scope(headers=[(b"content-length", b"lots")]), _pieces(b""))
    assert status == 400


def test_a_body_of_unknown_length_is_counted_and_cut_once_past_the_limit():
    app, receive = _Recorder(), _pieces(*[b"x" * 40] * 100)
    status, _, _ = _run(_gate(app, limit=100), _scope(), receive)
    assert status == 413 and receive.calls == 3 and not app.calls  # 40 + 40 + 40 > 100: nothing more read
    status, _, _ = _run(_gate(app, limit=100), _scope(), _pieces(b"x" * 60, b"x" * 40))
    assert status == 200 and len(app.calls[0][1]) == 100  # exactly the limit is fine


def test_a_body_that_stops_arriving_is_408():
    async def never():
        await asyncio.sleep(3600)

    app = _Recorder()
    status, headers, body = _run(_gate(app, timeout=0.1), _scope(), _pieces(b"{", then=never))
    assert status == 408 and headers["connection"] == "close" and b"--body-timeout-seconds" in body
    assert not app.calls


def test_a_body_trickled_in_small_pieces_is_408_at_the_deadline():
    """Each piece comes well within the timeout, but the whole body does not: cut all the same."""
    pieces = iter(range(1000))

    async def slowly():
        await asyncio.sleep(0.02)
        next(pieces)
        return {"type": "http.request", "body": b" ", "more_body": True}

    app = _Recorder()
    status, _, body = _run(_gate(app, timeout=0.2, limit=10_000), _scope(), _pieces(b"{", then=slowly))
    assert status == 408 and b"did not arrive within 0.2 s" in body and not app.calls


def test_a_client_gone_mid_body_gets_no_answer():
    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.disconnect"}

    app = _Recorder()
    asyncio.run(_gate(app)(_scope(), receive, send))
    assert not sent and not app.calls


def test_after_the_body_the_app_reads_the_connection_itself():
    """A second receive (Starlette's disconnect check) reaches the real connection."""
    seen = []

    async def app(scope, receive, send):
        seen.append(await receive())
        seen.append(await receive())
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    _run(_gate(app), _scope(), _pieces(b"{}"))
    assert seen == [{"type": "http.request", "body": b"{}", "more_body": False}, {"type": "http.disconnect"}]


def test_lifespan_passes_through():
    seen = []

    async def app(scope, receive, send):
        seen.append(scope["type"])

    asyncio.run(_gate(app, token="t")({"type": "lifespan"}, None, None))
    assert seen == ["lifespan"]


# --- error bodies ---------------------------------------------------------------------------------


def test_validation_bodies_keep_loc_msg_type_only_short_and_encodable():
    errors = [
        {"loc": ("body", "items", i, "k" * 500 + "\ud800"), "msg": "m" * 5000, "type": "t", "input": "SECRET" * 1000,
         "ctx": {"error": "SECRET"}, "url": "https://errors.pydantic.dev"}  # fmt: skip
        for i in range(25)
    ]
    body = validation_body(errors)
    assert len(body["detail"]) == MAX_PROBLEMS and body["omitted"] == 25 - MAX_PROBLEMS
    first = body["detail"][0]
    assert set(first) == {"loc", "msg", "type"} and first["loc"][:3] == ["body", "items", 0]
    assert len(first["loc"][3]) == 64 and len(first["msg"]) == 200
    rendered = validation_response(errors).body  # JSON with ensure_ascii=False: must encode
    assert b"SECRET" not in rendered and len(rendered) < 5000


def test_a_lone_surrogate_is_named_in_words():
    assert validation_body([{"loc": ("body",), "msg": "unable to parse raw data", "type": "string_unicode"}])["detail"][0][
        "msg"
    ] == "not valid Unicode (a lone surrogate)"


# --- request limits -------------------------------------------------------------------------------


def test_the_request_model_takes_its_limits_and_the_default_is_4096_items():
    item = {"messages": [{"role": "user", "content": "q"}], "response": "a"}
    assert MAX_ITEMS_PER_REQUEST == 4096
    ScoreRequest.model_validate({"items": [item] * 4096})
    with pytest.raises(ValueError, match="at most 4096 items"):
        ScoreRequest.model_validate({"items": [item] * 4097})
    small = score_request_model(2, 3)
    assert small is score_request_model(2, 3)  # one class per pair of limits
    with pytest.raises(ValueError, match="at most 3 characters"):
        small.model_validate({"items": [{**item, "response": "abcd"}]})
    with pytest.raises(ValueError, match="at most 3 characters"):
        small.model_validate({"items": [{"messages": [{"role": "user", "content": "abcd"}], "response": "a"}]})


def test_valid_unicode():
    assert valid_unicode("plain") == "plain" and valid_unicode("héllo ✓") == "héllo ✓"
    with pytest.raises(ValueError, match="lone surrogate"):
        valid_unicode("a\ud800b")


def test_limit_flags_are_settings_and_a_bad_one_is_named():
    s = settings_from_args(["--model", "m", "--max-body-bytes", "1000", "--max-items", "5", "--max-item-chars", "9",
                            "--max-queue", "0", "--body-timeout-seconds", "0.5"])  # fmt: skip
    assert (s.max_body_bytes, s.max_items, s.max_item_chars, s.max_queue, s.body_timeout_seconds) == (1000, 5, 9, 0, 0.5)
    defaults = settings_from_args(["--model", "m"])
    assert (defaults.max_body_bytes, defaults.max_items, defaults.max_queue) == (32 * 1024 * 1024, 4096, 64)
    with pytest.raises(SettingsError, match="^--max-queue:"):
        settings_from_args(["--model", "m", "--max-queue", "-1"])
    with pytest.raises(SettingsError, match="^--body-timeout-seconds:"):
        settings_from_args(["--model", "m", "--body-timeout-seconds", "0"])


# --- the queue ------------------------------------------------------------------------------------


def test_the_queue_admits_max_waiting_behind_the_running_one():
    async def go(max_waiting):
        queue = ForwardQueue(max_waiting)
        release = asyncio.Event()
        outcomes = []

        async def request():
            try:
                async with queue.turn():
                    await release.wait()
                outcomes.append("served")
            except QueueFull as full:
                outcomes.append(full.retry_after)

        tasks = [asyncio.ensure_future(request()) for _ in range(4)]
        await asyncio.sleep(0.05)
        release.set()
        await asyncio.gather(*tasks)
        return outcomes

    assert asyncio.run(go(0)) == [1, 1, 1, "served"]  # refused at once; only the idle model serves
    outcomes = asyncio.run(go(2))
    assert outcomes.count("served") == 3 and len([o for o in outcomes if isinstance(o, int)]) == 1


def test_a_cancelled_waiter_leaves_the_line():
    async def go():
        queue = ForwardQueue(1)
        async with queue.turn():
            waiter = asyncio.ensure_future(queue.turn().__aenter__())
            await asyncio.sleep(0.01)
            assert queue.waiting == 1
            waiter.cancel()
            await asyncio.sleep(0.01)
            return queue.waiting

    assert asyncio.run(go()) == 0


def test_retry_after_is_whole_seconds_and_bounded():
    queue = ForwardQueue(8)
    queue.turn_seconds, queue.waiting = 0.01, 0
    assert queue.retry_after() == 1
    queue.turn_seconds, queue.waiting = 2.5, 3
    assert queue.retry_after() == 10
    queue.turn_seconds, queue.waiting = 1e9, 64
    assert queue.retry_after() == MAX_RETRY_AFTER_SECONDS


# --- the client: Retry-After honoured, never trusted blindly --------------------------------------


def _date(seconds_from_now: float):
    """An HTTP date, made when the test runs (not when it is collected)."""
    return lambda: email.utils.formatdate(time.time() + seconds_from_now, usegmt=True)


@pytest.mark.parametrize(
    "header, low, high",
    [
        ("7", 7.0, 7.0),  # honoured
        ("100000", 30.0, 30.0),  # capped at cap_seconds
        ("inf", 0.0, 0.5), ("nan", 0.0, 0.5), ("-5", 0.0, 0.5), ("soon", 0.0, 0.5),  # unusable: the backoff
        (None, 0.0, 0.5),
        (_date(-3600), 0.0, 0.5),  # a date in the past
        (_date(12), 9.0, 12.5),  # a date ahead
    ],
    ids=["seconds", "huge", "inf", "nan", "negative", "word", "absent", "past-date", "future-date"],
)  # fmt: skip
def test_the_client_waits_what_retry_after_says_within_the_cap(header, low, high):
    sleeps, calls = [], []
    header = header() if callable(header) else header

    def handler(request):
        calls.append(1)
        if len(calls) == 1:
            headers = {"Retry-After": header} if header is not None else {}
            return httpx.Response(429, json={"detail": "64 requests are already waiting"}, headers=headers)
        items = json.loads(request.content)["items"]
        return httpx.Response(200, json={"scores": [0.0] * len(items), "model": "m", "truncated": 0})

    async def fake_sleep(seconds):
        sleeps.append(seconds)

    client = RewardClient("http://rm.test", retry=RetryPolicy(max_retries=2, base_seconds=0.5, cap_seconds=30.0),
                          transport=httpx.MockTransport(handler), sleep=fake_sleep, rng=random.Random(0))  # fmt: skip
    batch = asyncio.run(client.score([{"messages": [{"role": "user", "content": "q"}], "response": "a"}]))
    assert batch.scores == [0.0] and len(sleeps) == 1
    assert low <= sleeps[0] <= high


def test_retry_after_parsing():
    def r(value):
        return httpx.Response(429, headers={"Retry-After": value})

    assert _retry_after(r("3")) == 3.0 and _retry_after(r(" 2.5 ")) == 2.5
    assert _retry_after(r("")) is None and _retry_after(r("garbage")) is None and _retry_after(r("-1")) is None
    assert _retry_after(httpx.Response(429)) is None


def test_the_client_reads_the_sanitized_422():
    body = {"detail": [{"loc": ["body", "items", 3, "response"], "msg": "String should have at most 9 characters",
                        "type": "string_too_long"}], "omitted": 4}  # fmt: skip
    assert _server_message(httpx.Response(422, json=body)) == (
        "body.items.3.response: String should have at most 9 characters; and 4 more"
    )
    assert _server_message(httpx.Response(413, json={"detail": "too big"})) == "too big"
    assert _server_message(httpx.Response(500, text="Internal Server Error")) == "Internal Server Error"
