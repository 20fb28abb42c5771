"""The reward server with the tiny reward model: over real HTTP (uvicorn process) and in-process."""

from __future__ import annotations

import asyncio
import json
import shutil
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


@pytest.fixture(scope="module")
def server(tiny):
    args = ["--model", str(tiny.reward), "--max-length", str(MAX_LENGTH), "--batch-tokens", str(BATCH_TOKENS)]
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
    r = httpx.post(f"{server.url}/v1/score", json={"items": [item] * 4097})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "items"]


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
    proc = RewardServerProcess(["--model", str(tiny.reward)]).start()
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
    assert serve_main(["--model", str(model), "--port", "1"]) == 1
    err = capsys.readouterr().err
    assert "kind bradley-terry (spec.reward.kind)" in err and "num_labels=2" in err


def test_a_causal_lm_is_refused(tiny, tmp_path, capsys):
    model = tmp_path / "causal"
    shutil.copytree(tiny.reward, model)
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    (model / "config.json").write_text(json.dumps(config))
    assert serve_main(["--model", str(model), "--port", "1"]) == 1
    assert "score head would be random" in capsys.readouterr().err


def test_missing_chat_template_fails_at_start(tiny, tmp_path, capsys):
    model = tmp_path / "no-template"
    shutil.copytree(tiny.reward, model)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    assert serve_main(["--model", str(model), "--port", "1"]) == 1
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
        good = asyncio.run(RewardClient(server.url, token="env-token").score([item]))
        assert len(good.scores) == 1
        with pytest.raises(RewardClientError, match="refused the token.*ITERDPO_REWARD_TOKEN"):
            asyncio.run(RewardClient(server.url, token="other").score([item]))
