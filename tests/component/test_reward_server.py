"""The reward server with the tiny reward model: over real HTTP (uvicorn process) and in-process."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import signal
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from iterdpo.spec import RewardSpec
from iterdpo.tiny import KIND_WORDS, NEUTRAL_WORDS, POLICY_TEMPLATE, UNKIND_WORDS
from iterdpo_reward_server.app import create_app
from iterdpo_reward_server.cli import main as serve_main
from iterdpo_reward_server.process import RewardServerProcess
from iterdpo_reward_server.scorers import BradleyTerryScorer
from iterdpo_reward_server.settings import Settings

pytestmark = pytest.mark.slow

MAX_LENGTH = 64
BATCH_TOKENS = 128  # small: a request of a dozen items needs several forward passes
# The module server's limits: small, so that passing them is cheap (and the flags are tested).
MAX_BODY_BYTES = 1_000_000
MAX_ITEMS = 100
MAX_ITEM_CHARS = 5_000
BODY_TIMEOUT = 2.0
LIMITS = ["--max-body-bytes", str(MAX_BODY_BYTES), "--max-items", str(MAX_ITEMS), "--max-item-chars", str(MAX_ITEM_CHARS),
          "--body-timeout-seconds", str(BODY_TIMEOUT)]  # fmt: skip


@pytest.fixture(scope="module")
def server(tiny):
    args = ["--model", str(tiny.reward), "--max-length", str(MAX_LENGTH), "--batch-tokens", str(BATCH_TOKENS), *LIMITS]
    with RewardServerProcess(args) as proc:
        yield proc


@pytest.fixture(scope="module")
def direct(tiny):
    """Scores computed straight with transformers, one conversation at a time."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny.reward)
    model = AutoModelForSequenceClassification.from_pretrained(tiny.reward).eval()

    def score(messages, response, template=None, max_length=MAX_LENGTH):
        text = tok.apply_chat_template(
            [*messages, {"role": "assistant", "content": response}], chat_template=template, tokenize=False
        )
        ids = tok(text, add_special_tokens=not text.startswith(tok.bos_token))["input_ids"]
        if len(ids) > max_length:
            ids = [ids[0], *ids[len(ids) - max_length + 1 :]]
        with torch.no_grad():
            return model(input_ids=torch.tensor([ids])).logits[0, 0].item()

    score.tokenizer = tok
    return score


def _items(n: int = 13) -> list[dict]:
    words = KIND_WORDS + UNKIND_WORDS + NEUTRAL_WORDS
    items = []
    for i in range(n):
        response = " ".join(words[(i * 7 + j) % len(words)] for j in range(1 + (i * 5) % 17))
        messages = [{"role": "user", "content": f"tell me about the {NEUTRAL_WORDS[14 + i % 10]}"}]
        if i % 3 == 0:
            messages.insert(0, {"role": "system", "content": "be kind"})
        items.append({"messages": messages, "response": response})
    return items


def _score(url: str, items: list[dict]) -> dict:
    r = httpx.post(f"{url}/v1/score", json={"items": items}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_probes(server, tiny):
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "alive"}
    ready = httpx.get(f"{server.url}/readyz").json()
    assert ready == {"status": "ready", "model": str(tiny.reward), "kind": "bradley-terry"}


def test_batched_scores_equal_one_by_one_in_order(server):
    items = _items()
    batched = _score(server.url, items)
    assert batched["model"] and batched["truncated"] == 0
    singles = [_score(server.url, [item])["scores"][0] for item in items]
    assert batched["scores"] == pytest.approx(singles, abs=1e-5)
    assert len(set(round(s, 4) for s in singles)) > 5  # the items really differ: order is tested
    reversed_scores = _score(server.url, items[::-1])["scores"]
    assert reversed_scores[::-1] == pytest.approx(batched["scores"], abs=1e-5)


def test_uses_the_reward_models_own_chat_template(server, direct):
    items = _items(6)
    served = _score(server.url, items)["scores"]
    assert served == pytest.approx([direct(i["messages"], i["response"]) for i in items], abs=1e-5)
    # The check has teeth: the policy's template gives other scores for the same conversations.
    with_policy_template = [direct(i["messages"], i["response"], template=POLICY_TEMPLATE) for i in items]
    assert max(abs(a - b) for a, b in zip(served, with_policy_template)) > 1e-3
    text = direct.tokenizer.apply_chat_template(items[1]["messages"], tokenize=False)
    assert text.startswith("<|bos|>[USER]") and text.count("<|bos|>") == 1


def test_truncates_from_the_left_and_counts_it(server, direct):
    messages = [{"role": "user", "content": " ".join(["cruel"] * 100)}]
    response = "kind " * 10
    body = _score(server.url, [{"messages": messages, "response": response}, _items(1)[0]])
    assert body["truncated"] == 1
    assert body["scores"][0] == pytest.approx(direct(messages, response), abs=1e-5)


@pytest.mark.parametrize(
    "body, loc",
    [
        ({"items": [{"messages": [{"role": "user", "content": "q"}]}]}, ["body", "items", 0, "response"]),
        ({"items": []}, ["body", "items"]),
        ({"items": [{"messages": [{"role": 3, "content": "q"}], "response": "a"}]}, ["body", "items", 0, "messages", 0, "role"]),
        ({"items": [{"messages": [{"role": "robot", "content": "q"}], "response": "a"}]}, ["body", "items", 0, "messages", 0, "role"]),
        ({"items": [{"messages": [], "response": "a"}]}, ["body", "items", 0, "messages"]),
        ({"items": [{"messages": [{"role": "user", "content": "q"}], "respones": "a"}]}, ["body", "items", 0, "respones"]),
        ({}, ["body", "items"]),
    ],
)
def test_bad_bodies_are_422_with_the_field_path(server, body, loc):
    r = httpx.post(f"{server.url}/v1/score", json=body)
    assert r.status_code == 422
    assert loc in [d["loc"] for d in r.json()["detail"]]


def test_too_many_items_is_422(server):
    item = {"messages": [{"role": "user", "content": "q"}], "response": "a"}
    assert _score(server.url, [item] * MAX_ITEMS)["scores"]
    r = httpx.post(f"{server.url}/v1/score", json={"items": [item] * (MAX_ITEMS + 1)})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "items"]
    assert f"at most {MAX_ITEMS} items" in r.json()["detail"][0]["msg"]


def test_concurrent_requests_are_all_answered_and_probes_stay_responsive(server):
    items = _items()
    expected = _score(server.url, items)["scores"]

    async def go():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            scoring = [client.post("/v1/score", json={"items": items[i % 5 :]}) for i in range(16)]
            tasks = [asyncio.ensure_future(c) for c in scoring]
            health = await client.get("/healthz", timeout=5)
            return health, await asyncio.gather(*tasks)

    health, answers = asyncio.run(go())
    assert health.status_code == 200
    assert [a.status_code for a in answers] == [200] * 16
    for i, a in enumerate(answers):
        assert a.json()["scores"] == pytest.approx(expected[i % 5 :], abs=1e-5)


def test_sigterm_stops_it_cleanly(tiny):
    proc = RewardServerProcess(["--model", str(tiny.reward), "--max-length", str(MAX_LENGTH)]).start()
    try:
        proc.wait_ready()
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(30) == 0, proc.output()
        assert "Shutting down" in proc.output()
    finally:
        proc.close()


# --- start-up failures: fast, in-process, before any port opens -----------------------------


def test_wrong_kind_for_the_checkpoint_fails_at_start_naming_kind(tiny, tmp_path, capsys):
    model = tmp_path / "two-labels"
    shutil.copytree(tiny.reward, model)
    config = json.loads((model / "config.json").read_text())
    config.update(id2label={"0": "A", "1": "B"}, label2id={"A": 0, "B": 1})
    (model / "config.json").write_text(json.dumps(config))
    assert serve_main(["--model", str(model), "--max-length", str(MAX_LENGTH), "--port", "1"]) == 1
    err = capsys.readouterr().err
    assert "kind bradley-terry (spec.reward.kind)" in err and "num_labels=2" in err


def test_a_causal_lm_is_refused(tiny, tmp_path, capsys):
    model = tmp_path / "causal"
    shutil.copytree(tiny.reward, model)
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    (model / "config.json").write_text(json.dumps(config))
    assert serve_main(["--model", str(model), "--max-length", str(MAX_LENGTH), "--port", "1"]) == 1
    assert "score head would be random" in capsys.readouterr().err


def test_missing_chat_template_fails_at_start(tiny, tmp_path, capsys):
    model = tmp_path / "no-template"
    shutil.copytree(tiny.reward, model)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    assert serve_main(["--model", str(model), "--max-length", str(MAX_LENGTH), "--port", "1"]) == 1
    assert "has no chat template" in capsys.readouterr().err
    # ... and the override makes it servable.
    template = tmp_path / "t.jinja"
    template.write_text("{{ bos_token }}{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    settings = Settings(reward=RewardSpec(model=str(model), chat_template=template.read_text(), max_length=64, batch_tokens=64))
    BradleyTerryScorer.preflight(settings)


def test_bad_flag_fails_naming_it(capsys):
    """A usage mistake: exit 2 with one line, before the model is touched."""
    assert serve_main(["--model", "m", "--batch-tokens", "8", "--max-length", "16"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("iterdpo serve-reward: error: --batch-tokens:") and "\n" not in err


# --- in-process (TestClient): readiness transitions, template override ----------------------


def _settings(tiny, chat_template: str | None = None, **kw) -> Settings:
    reward = RewardSpec(model=str(tiny.reward), max_length=MAX_LENGTH, batch_tokens=BATCH_TOKENS, chat_template=chat_template)
    return Settings(reward=reward, **kw)


def _wait_ready(client: TestClient) -> None:
    deadline = time.monotonic() + 60
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "not ready in 60 s"
        time.sleep(0.05)


def test_not_ready_until_loaded_then_ready(tiny):
    release = threading.Event()

    def slow_loader(settings):
        release.wait(30)
        return BradleyTerryScorer.load(settings)

    item = _items(1)[0]
    with TestClient(create_app(_settings(tiny), loader=slow_loader)) as client:
        assert client.get("/healthz").status_code == 200
        r = client.get("/readyz")
        assert r.status_code == 503 and "loading" in r.json()["detail"]
        assert r.headers["retry-after"] == "1"
        assert client.post("/v1/score", json={"items": [item]}).status_code == 503
        release.set()
        _wait_ready(client)
        assert client.post("/v1/score", json={"items": [item]}).status_code == 200


def test_a_failed_load_stays_unready_and_calls_on_fatal(tiny):
    fatal = []

    def broken(settings):
        raise RuntimeError("disk on fire")

    with TestClient(create_app(_settings(tiny), loader=broken, on_fatal=fatal.append)) as client:
        deadline = time.monotonic() + 10
        while not fatal and time.monotonic() < deadline:
            time.sleep(0.01)
        r = client.get("/readyz")
    assert r.status_code == 503 and "disk on fire" in r.json()["detail"]
    assert fatal and "disk on fire" in fatal[0]


def test_chat_template_override_is_used(tiny, direct):
    items = _items(4)
    with TestClient(create_app(_settings(tiny, chat_template=POLICY_TEMPLATE))) as client:
        _wait_ready(client)
        scores = client.post("/v1/score", json={"items": items}).json()["scores"]
    expected = [direct(i["messages"], i["response"], template=POLICY_TEMPLATE) for i in items]
    assert scores == pytest.approx(expected, abs=1e-5)


def test_a_conversation_the_template_rejects_is_422_naming_the_item(tiny):
    template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system messages') }}{% endif %}"
        "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    )
    items = [
        {"messages": [{"role": "user", "content": "q"}], "response": "a"},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}], "response": "a"},
    ]
    with TestClient(create_app(_settings(tiny, chat_template=template))) as client:
        _wait_ready(client)
        r = client.post("/v1/score", json={"items": items})
    assert r.status_code == 422
    detail = r.json()["detail"][0]
    assert detail["loc"] == ["body", "items", 1, "messages"] and "no system messages" in detail["msg"]


def test_forward_batched_equals_unbatched_on_a_position_sensitive_model(tiny):
    """The tiny RM attends uniformly over the sequence; a random Llama mixes tokens by
    content and position, so a padding or pooling mistake in `forward` would show here."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from iterdpo_reward_server.scoring import forward, pack

    tok = AutoTokenizer.from_pretrained(tiny.reward)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(
        LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_labels=1,
                    pad_token_id=tok.pad_token_id)
    ).eval()
    sequences = [tok(i["response"] or "x")["input_ids"] for i in _items(11)]
    assert len({len(s) for s in sequences}) > 3
    groups = pack([len(s) for s in sequences], 64)
    assert len(groups) > 1 and any(len(g) > 1 for g in groups)
    batched = forward(model, sequences, groups, pad_id=tok.pad_token_id, device="cpu")
    singles = [forward(model, [s], [[0]], pad_id=tok.pad_token_id, device="cpu")[0] for s in sequences]
    assert batched == pytest.approx(singles, abs=1e-5)


# --- the bearer token ---------------------------------------------------------------------------
def test_with_a_token_score_needs_it_and_probes_stay_open(tiny):
    item = _items(1)[0]
    with TestClient(create_app(_settings(tiny, token="s3cret-token"))) as client:
        _wait_ready(client)
        assert client.get("/healthz").status_code == 200  # kubelet probes carry no token
        missing = client.post("/v1/score", json={"items": [item]})
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        wrong = client.post("/v1/score", json={"items": [item]}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        ok = client.post("/v1/score", json={"items": [item]}, headers={"Authorization": "Bearer s3cret-token"})
        assert ok.status_code == 200 and len(ok.json()["scores"]) == 1


def test_the_server_reads_its_token_from_the_environment_only(tiny):
    """Over real HTTP: the token comes from ITERDPO_REWARD_TOKEN (never argv), and the
    annotator's client sends it; a client with another token gets a clear, final error."""
    from iterdpo_reward_server.client import RewardClient, RewardClientError

    args = ["--model", str(tiny.reward), "--max-length", str(MAX_LENGTH), "--batch-tokens", str(BATCH_TOKENS)]
    with RewardServerProcess(args, env={"ITERDPO_REWARD_TOKEN": "env-token"}) as server:
        assert "env-token" not in " ".join(server.proc.args)
        item = _items(1)[0]
        assert httpx.post(f"{server.url}/v1/score", json={"items": [item]}).status_code == 401
        # The token is checked from the headers, before the body is read: a terabyte announced, none sent.
        for auth, status in ([], b"401"), ([b"Authorization: Bearer nope"], b"401"), ([b"Authorization: Bearer env-token"], b"413"):
            answer, _ = _raw(server, _post_head(10**12, *auth), wait=10)  # had it waited for the body: 408
            assert answer.startswith(b"HTTP/1.1 " + status), auth
            assert (b"www-authenticate: bearer" in answer.lower()) == (status == b"401")
        good = asyncio.run(RewardClient(server.url, token="env-token").score([item]))
        assert len(good.scores) == 1
        with pytest.raises(RewardClientError, match="refused the token.*ITERDPO_REWARD_TOKEN"):
            asyncio.run(RewardClient(server.url, token="other").score([item]))


# --- hostile and careless clients: 4xx (never 5xx), short answers that echo nothing, same scores --


@pytest.fixture(scope="module")
def baseline(server):
    """A fixed batch's scores, taken before any abuse: every abuse test ends by comparing."""
    return _score(server.url, _items())["scores"]


def _unchanged(server, baseline) -> None:
    assert _score(server.url, _items())["scores"] == baseline


def _raw(server, head: bytes, body: bytes = b"", *, wait: float = 30.0) -> tuple[bytes, float]:
    """Send `head` + `body` over a plain socket, read until the server closes; (answer, seconds)."""
    start = time.monotonic()
    with socket.create_connection((server.host, server.port), timeout=wait) as sock:
        sock.sendall(head + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer, time.monotonic() - start


def _post_head(length: int, *extra: bytes) -> bytes:
    lines = [b"POST /v1/score HTTP/1.1", b"Host: rm", b"Content-Type: application/json", b"Content-Length: %d" % length, *extra]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def test_a_declared_oversize_body_is_413_before_it_is_read(server, baseline):
    """A terabyte announced, two bytes sent: 413, not the 408 a server waiting for the body would give."""
    answer, _ = _raw(server, _post_head(10**12), b"{}")
    assert answer.startswith(b"HTTP/1.1 413 ") and b"--max-body-bytes" in answer
    _unchanged(server, baseline)


def test_a_chunked_oversize_body_is_413(server, baseline):
    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(4 * MAX_BODY_BYTES // 65536):
            yield b" " * 65536

    r = httpx.post(f"{server.url}/v1/score", content=chunks(), headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413 and r.headers["connection"] == "close"
    assert "--max-body-bytes" in r.json()["detail"]
    _unchanged(server, baseline)


def test_a_half_sent_body_is_408_after_the_body_timeout(server, baseline):
    answer, _ = _raw(server, _post_head(100), b'{"items": [')
    assert answer.startswith(b"HTTP/1.1 408 ") and b"--body-timeout-seconds" in answer
    _unchanged(server, baseline)


def test_an_item_with_too_many_characters_is_422_naming_it_without_echo(server, baseline):
    items = _items(5)
    items[3] = {**items[3], "response": "kind " * (MAX_ITEM_CHARS // 5) + "SENTINEL"}
    r = httpx.post(f"{server.url}/v1/score", json={"items": items})
    assert r.status_code == 422 and len(r.text) < 1000 and "SENTINEL" not in r.text and "kind kind" not in r.text
    (detail,) = r.json()["detail"]
    assert detail["loc"] == ["body", "items", 3, "response"] and f"at most {MAX_ITEM_CHARS} characters" in detail["msg"]
    assert set(detail) == {"loc", "msg", "type"}
    _unchanged(server, baseline)


SENT = "SENTINEL-" * 50  # must never come back whole


@pytest.mark.parametrize(
    "body, loc",
    [
        (b"not json " + SENT.encode(), None),  # not JSON
        (b'{"items": NaN, "x": "' + SENT.encode() + b'"}', ["body", "items"]),
        (b'{"items": [{"messages": [{"role": "user", "content": Infinity}], "response": -Infinity}]}',
         ["body", "items", 0, "messages", 0, "content"]),
        (b'{"items": [{"messages": [{"role": "user", "content": "q"}], "response": 1e999}]}', ["body", "items", 0, "response"]),
        (b'{"items": "\xff\xfe"}', None),  # not UTF-8
        (b"[" * 100_000 + b"]" * 100_000, None),  # nested past any parser's recursion
        (json.dumps({"items": [{"messages": [{"role": "user", "content": "q"}], SENT: "a"}]}).encode(),
         ["body", "items", 0, SENT[:63] + "…"]),  # a made-up field name: named, cut short
        (json.dumps({"items": [{"messages": [{"role": "user", "content": "q"}], "response": "a"}] * 30 + [{"x": SENT}] * 50}).encode(),
         ["body", "items", 30, "messages"]),  # many problems: the first few, and a count
    ],
    ids=["not-json", "nan", "infinity", "overflow-to-inf", "not-utf8", "deep", "long-key", "many-errors"],
)  # fmt: skip
def test_unparsable_or_non_finite_bodies_are_4xx_without_echo(server, body, loc):
    r = httpx.post(f"{server.url}/v1/score", content=body, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500 and len(r.text) < 3000, r.text[:3000]
    assert SENT not in r.text and '"input"' not in r.text and '"ctx"' not in r.text  # a field name: cut to 64
    if loc is not None:
        assert r.status_code == 422 and loc in [d["loc"] for d in r.json()["detail"]]
        assert all(set(d) == {"loc", "msg", "type"} and len(d["msg"]) <= 200 for d in r.json()["detail"])


def test_many_problems_are_cut_to_ten_and_counted(server):
    body = {"items": [{"x": SENT}] * MAX_ITEMS}
    r = httpx.post(f"{server.url}/v1/score", json=body)
    assert r.status_code == 422 and len(r.text) < 3000
    assert len(r.json()["detail"]) == 10 and r.json()["omitted"] == 3 * MAX_ITEMS - 10  # messages, response, x


def test_a_lone_surrogate_is_422_naming_the_item(server, baseline):
    """JSON allows "\\ud800"; Python then holds a str no tokenizer can encode (it was a 500)."""
    items = _items(4)
    text = json.dumps({"items": items})  # ASCII: the escape below stays an escape
    bad = text.replace('"response": "' + items[2]["response"], '"response": "\\ud800' + items[2]["response"], 1)
    assert bad != text
    r = httpx.post(f"{server.url}/v1/score", content=bad, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == [{"loc": ["body", "items", 2, "response"], "msg": "not valid Unicode (a lone surrogate)",
                                   "type": "string_unicode"}]  # fmt: skip
    _unchanged(server, baseline)


def test_the_openapi_schema_declares_every_answer_of_score(server):
    spec = httpx.get(f"{server.url}/openapi.json").json()
    responses = spec["paths"]["/v1/score"]["post"]["responses"]
    assert set(responses) == {"200", "400", "401", "408", "413", "422", "429", "500", "503"}
    assert responses["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ValidationProblem")
    assert "Retry-After" in responses["429"]["headers"]
    fields = spec["components"]["schemas"]["ValidationProblem"]["properties"]
    assert set(fields) == {"detail", "omitted"}
    assert set(spec["components"]["schemas"]["FieldProblem"]["properties"]) == {"loc", "msg", "type"}
    # ... and the request's limits are the ones served.
    assert spec["components"]["schemas"]["ScoreRequest"]["properties"]["items"]["maxItems"] == MAX_ITEMS
    assert spec["components"]["schemas"]["ScoreItem"]["properties"]["response"]["maxLength"] == MAX_ITEM_CHARS


def test_schemathesis_finds_no_server_error_and_the_scores_stay(server, baseline):
    """Bounded and derandomized (the same cases every run): valid and invalid bodies from the
    schema, each answer checked against the schema (status declared, body shape) and never 5xx."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [not_a_server_error, status_code_conformance, response_schema_conformance, content_type_conformance]
    operation = schemathesis.openapi.from_url(f"{server.url}/openapi.json")["/v1/score"]["POST"]
    answered: dict[tuple[str, int], int] = {}
    for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

        @settings(max_examples=30, derandomize=True, deadline=None, database=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(case=operation.as_strategy(generation_mode=mode))
        def fuzz(case):
            r = case.call_and_validate(checks=checks, timeout=60)
            answered[(mode.value, r.status_code)] = answered.get((mode.value, r.status_code), 0) + 1

        fuzz()
    assert answered.get(("positive", 200)) and answered.get(("negative", 422)), answered
    _unchanged(server, baseline)


# --- the queue of waiting requests (in-process: a scorer that blocks until told) ------------------


class _BlockingScorer:
    def __init__(self):
        self.entered = threading.Event()
        self.release = threading.Event()

    def score(self, items):
        from iterdpo_reward_server.scoring import ScoreResult

        self.entered.set()
        assert self.release.wait(30)
        return ScoreResult([float(len(item.response)) for item in items], 0)


def test_past_max_queue_waiting_requests_get_429_with_retry_after(tiny):
    scorer = _BlockingScorer()
    app = create_app(_settings(tiny, max_queue=2), loader=lambda settings: scorer)
    body = {"items": _items(1)}

    async def go():
        async with app.router.lifespan_context(app):
            while app.state.scorer is None:
                await asyncio.sleep(0.01)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://rm") as client:
                running = asyncio.ensure_future(client.post("/v1/score", json=body))
                while not scorer.entered.is_set():
                    await asyncio.sleep(0.01)
                waiting = [asyncio.ensure_future(client.post("/v1/score", json=body)) for _ in range(2)]
                while app.state.forward_queue.waiting < 2:
                    await asyncio.sleep(0.01)
                refused = await client.post("/v1/score", json=body)
                probe = await client.get("/readyz")
                scorer.release.set()
                return refused, probe, await asyncio.gather(running, *waiting)

    refused, probe, served = asyncio.run(go())
    assert refused.status_code == 429 and "--max-queue" in refused.json()["detail"]
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert probe.status_code == 200  # a full queue never blocks the probes
    assert [r.status_code for r in served] == [200, 200, 200]
