"""Reward kind verifiable (math-verify in checker processes) and OpenRLHF's /get_reward, served for real."""

from __future__ import annotations

import httpx
import pytest
from fastapi.testclient import TestClient

from iterdpo.spec import RewardSpec, VerifiableSpec
from iterdpo_reward_server.app import create_app
from iterdpo_reward_server.process import RewardServerProcess
from iterdpo_reward_server.settings import Settings
from iterdpo_reward_server.verifiable import BAD_GOLD, CORRECT, NO_ANSWER, WRONG, check, last_boxed

pytestmark = pytest.mark.slow

Q = [{"role": "user", "content": "what is 3 + 4"}]


@pytest.mark.parametrize(
    ("response", "gold", "boxed", "any_form"),
    [
        ("so the answer is \\boxed{7}.", "7", CORRECT, CORRECT),
        ("\\boxed{\\frac{1}{2}}", "0.5", CORRECT, CORRECT),  # equal as numbers, not as strings
        ("\\boxed{x^2 - 1}", "(x-1)(x+1)", CORRECT, CORRECT),  # symbolic equality
        ("\\boxed{8}", "7", WRONG, WRONG),
        ("first \\boxed{7}, no wait: \\boxed{8}", "7", WRONG, WRONG),  # the last boxed answer counts
        ("I think it is 7", "7", NO_ANSWER, CORRECT),  # not boxed: no answer in the boxed form
        ("no idea at all", "7", NO_ANSWER, NO_ANSWER),
        ("\\boxed{7}", "???", BAD_GOLD, BAD_GOLD),  # a gold answer math-verify cannot read
    ],
)
def test_check_reads_answers_as_math_verify_does(response, gold, boxed, any_form):
    assert check(response, gold, "boxed", 5) == boxed
    assert check(response, gold, "any", 5) == any_form


def test_last_boxed_balances_braces():
    assert last_boxed("a \\boxed{x^{2}} b \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{unclosed {") is None
    assert last_boxed("nothing here") is None


def _settings(**rule) -> Settings:
    return Settings(reward=RewardSpec(kind="verifiable", verifiable=VerifiableSpec(**rule) if rule else None))


def _ready(client: TestClient) -> None:
    import time

    deadline = time.monotonic() + 120
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "not ready in 120 s"
        time.sleep(0.05)


def test_served_rewards_follow_the_rule_and_its_values():
    items = [
        {"messages": Q, "response": "\\boxed{7}", "answer": "7"},
        {"messages": Q, "response": "\\boxed{6}", "answer": "7"},
        {"messages": Q, "response": "seven, I guess", "answer": "7"},
        {"messages": Q, "response": "\\boxed{7}", "answer": "\\frac{"},  # unparsable gold: no score, a reason
    ]
    with TestClient(create_app(_settings(correct=2.0, wrong_answer=-0.25, no_answer=-3.0))) as client:
        _ready(client)
        assert client.get("/readyz").json() == {"status": "ready", "model": None, "kind": "verifiable"}
        body = client.post("/v1/score", json={"items": items}).json()
    assert body["scores"] == [2.0, -0.25, -3.0, None]
    assert body["unscored"] == [{"index": 3, "reason": "math-verify cannot parse the gold answer (answerField)"}]
    assert body["details"] == {"correct": [1.0, 0.0, 0.0, None], "answered": [1.0, 1.0, 0.0, None]}
    assert body["model"] is None and body["kind"] == "verifiable"


def test_an_item_without_its_gold_answer_is_422_naming_the_field():
    items = [{"messages": Q, "response": "\\boxed{7}", "answer": "7"}, {"messages": Q, "response": "\\boxed{7}"}]
    with TestClient(create_app(_settings())) as client:
        _ready(client)
        r = client.post("/v1/score", json={"items": items})
        assert r.status_code == 422
        assert r.json()["detail"][0]["loc"] == ["body", "items", 1, "answer"]
        r = client.post("/get_reward", json={"query": ["<|user|>q<|assistant|>\\boxed{7}"]})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "labels", 0]


def test_get_reward_checks_only_the_response_part():
    """OpenRLHF sends prompt + response as one text, and the prompts apart: the prompt's own
    numbers must not be taken for the answer."""
    prompt = "<|user|>what is 3 + 4<|assistant|>"
    body = {"query": [prompt + "no idea", prompt + "it is 7"], "prompts": [prompt, prompt], "labels": ["7", "7"]}
    with TestClient(create_app(_settings(answer_format="any"))) as client:
        _ready(client)
        out = client.post("/get_reward", json=body).json()
        assert out["rewards"] == out["scores"] == [-1.0, 1.0]
        assert out["extra_logs"] == {"correct": [0.0, 1.0], "answered": [0.0, 1.0]}
        r = client.post("/get_reward", json={**body, "labels": ["7"]})
        assert r.status_code == 422 and "one entry per query" in r.json()["detail"][0]["msg"]


def test_get_reward_on_a_bradley_terry_model_scores_the_text_as_sent(tiny):
    """The same conversation formatted by the client (OpenRLHF) or by the server (/v1/score)
    gets the same score (fp32, within 1e-5)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny.reward)
    conversation = [{"role": "user", "content": "tell me about the river"}]
    responses = ["the river is kind and calm", "the river is cruel", "river"]
    texts = [tok.apply_chat_template([*conversation, {"role": "assistant", "content": r}], tokenize=False) for r in responses]
    with RewardServerProcess(["--model", str(tiny.reward), "--max-length", "256"]) as server:
        score = httpx.post(f"{server.url}/v1/score", timeout=60,
                           json={"items": [{"messages": conversation, "response": r} for r in responses]}).json()  # fmt: skip
        got = httpx.post(f"{server.url}/get_reward", json={"query": texts}, timeout=60).json()
        spec = httpx.get(f"{server.url}/openapi.json").json()
    assert got["rewards"] == pytest.approx(score["scores"], abs=1e-5)
    assert got["scores"] == got["rewards"] and got["unscored"] == []
    assert set(spec["paths"]) >= {"/v1/score", "/get_reward", "/healthz", "/readyz"}
    assert set(spec["paths"]["/get_reward"]["post"]["responses"]) == set(spec["paths"]["/v1/score"]["post"]["responses"])


def test_serve_reward_verifiable_needs_no_model_over_real_http():
    with RewardServerProcess(["--kind", "verifiable"]) as server:
        ready = httpx.get(f"{server.url}/readyz").json()
        body = httpx.post(f"{server.url}/v1/score", timeout=60,
                          json={"items": [{"messages": Q, "response": "\\boxed{7}", "answer": "7"}]}).json()  # fmt: skip
    assert ready["kind"] == "verifiable" and ready["model"] is None
    assert body["scores"] == [1.0]


# --- composite: a weighted sum of terms, each served as if alone -----------------------------------


def test_composite_is_the_weighted_sum_of_its_terms_each_reported(tiny):
    from iterdpo.spec import RewardComponent

    components = [
        RewardComponent(name="rm", kind="bradley-terry", model=str(tiny.reward), weight=0.5),
        RewardComponent(name="math", kind="verifiable", weight=2.0, verifiable=VerifiableSpec(answer_format="any")),
        RewardComponent(name="len", kind="length", weight=-0.01),
    ]
    composite = Settings(reward=RewardSpec(kind="composite", components=components, max_length=256))
    alone = Settings(reward=RewardSpec(model=str(tiny.reward), max_length=256))
    items = [
        {"messages": Q, "response": "it is 7, kind and calm", "answer": "7"},
        {"messages": Q, "response": "cruel 8", "answer": "7"},
        {"messages": Q, "response": "no idea", "answer": "7"},
        {"messages": Q, "response": "7", "answer": "??"},  # the verifiable term cannot score it
    ]
    with TestClient(create_app(alone)) as client:
        _ready(client)
        rm = client.post("/v1/score", json={"items": items}).json()["scores"]
    with TestClient(create_app(composite)) as client:
        _ready(client)
        body = client.post("/v1/score", json={"items": items}).json()
    rule = [1.0, -0.5, -1.0]
    for i in range(3):
        expected = 0.5 * rm[i] + 2.0 * rule[i] - 0.01 * len(items[i]["response"])
        assert body["scores"][i] == pytest.approx(expected, abs=1e-5)
    assert body["scores"][3] is None
    assert body["unscored"] == [{"index": 3, "reason": "math: math-verify cannot parse the gold answer (answerField)"}]
    assert body["details"]["rm"] == pytest.approx(rm, abs=1e-5)
    assert body["details"]["math"] == [1.0, -0.5, -1.0, None]
    assert body["details"]["len"] == [float(len(i["response"])) for i in items]
    assert body["details"]["math.correct"] == [1.0, 0.0, 0.0, None]


def test_a_composite_term_that_cannot_be_served_fails_at_start_naming_it(tiny, capsys, tmp_path):
    import yaml

    from iterdpo_reward_server.cli import main as serve_main

    run = {"apiVersion": "iterdpo.io/v1alpha1", "kind": "IterativeDPORun", "metadata": {"name": "c"},
           "spec": {"policy": {"model": str(tiny.policy)}, "prompts": {"dataset": str(tiny.prompts[0])},
                    "reward": {"kind": "composite", "maxLength": 256, "components": [
                        {"name": "rm", "kind": "bradley-terry", "model": str(tiny.policy)},  # a causal LM: no score head
                        {"name": "len", "kind": "length", "weight": -0.01}]}}}  # fmt: skip
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run))
    assert serve_main(["--spec", str(path)]) == 1
    err = capsys.readouterr().err
    assert "spec.reward.components[0] (rm): kind bradley-terry" in err and "exactly one output label" in err


# --- multi-objective: ArmoRM's layout read by the in-tree head -------------------------------------


def _direct_armo(folder, texts_ids, pattern):
    """ArmoRM's forward written out from the checkpoint's tensors, one conversation at a time."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, LlamaModel

    config = AutoConfig.from_pretrained(folder)
    backbone = LlamaModel.from_pretrained(folder).eval()
    w = load_file(str(folder / "model.safetensors"))
    out = []
    for ids in texts_ids:
        gate_at = max(j for j in range(len(ids) - len(pattern) + 1) if ids[j : j + len(pattern)] == pattern)
        with torch.no_grad():
            hidden = backbone(input_ids=torch.tensor([ids])).last_hidden_state[0]
            rewards = w["regression_layer.weight"] @ hidden[-1]
            x = hidden[gate_at]
            for i in range(config.gating_n_hidden + 1):
                x = w[f"gating.layers.{i}.weight"] @ x + w[f"gating.layers.{i}.bias"]
                if i < config.gating_n_hidden:
                    x = torch.relu(x)
            gating = torch.softmax(x / config.gating_temperature, dim=-1) * w["gating.logit_scale"][0]
            out.append(((gating * (rewards @ w["reward_transform_matrix"])).sum().item(), rewards.tolist()))
    return out


def test_multi_objective_serves_armos_forward_and_names_each_objective(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny.armo)
    pattern = tok.convert_tokens_to_ids(["<|eos|>", "<|assistant|>"])  # the tiny template's user end + header
    conversation = [{"role": "user", "content": "tell me about the river"}]
    responses = ["the river is kind and calm", "the river is cruel and sad", "river"]
    items = [{"messages": conversation, "response": r} for r in responses]
    ids = [tok(tok.apply_chat_template([*conversation, {"role": "assistant", "content": r}], tokenize=False),
               add_special_tokens=False)["input_ids"] for r in responses]  # fmt: skip
    direct = _direct_armo(tiny.armo, ids, pattern)
    settings = Settings(reward=RewardSpec(kind="multi-objective", model=str(tiny.armo), max_length=256))
    with TestClient(create_app(settings)) as client:
        _ready(client)
        body = client.post("/v1/score", json={"items": items}).json()
    assert body["scores"] == pytest.approx([d[0] for d in direct], abs=1e-5)
    assert set(body["details"]) == {"kindness", "harshness", "brevity"}
    assert body["details"]["kindness"] == pytest.approx([d[1][0] for d in direct], abs=1e-5)
    assert body["scores"][0] > body["scores"][2] > body["scores"][1]  # the gate leans on kindness
    weighted = Settings(reward=RewardSpec(kind="multi-objective", model=str(tiny.armo), max_length=256,
                                          objective_weights={"harshness": 2.0, "brevity": -1.0}))  # fmt: skip
    with TestClient(create_app(weighted)) as client:
        _ready(client)
        scores = client.post("/v1/score", json={"items": items}).json()["scores"]
    assert scores == pytest.approx([2.0 * d[1][1] - d[1][2] for d in direct], abs=1e-5)


def test_multi_objective_refuses_other_layouts_and_unknown_objectives(tiny, tmp_path):
    import json
    import shutil

    from iterdpo_reward_server.armo import MultiObjectiveError, MultiObjectiveScorer

    odd = shutil.copytree(tiny.armo, tmp_path / "armo")
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "objective_names": ["kindness", "harshness"]}))
    with pytest.raises(MultiObjectiveError, match="objective_names lists 2 names for num_objectives 3"):
        MultiObjectiveScorer.preflight(Settings(reward=RewardSpec(kind="multi-objective", model=str(odd))))

    with pytest.raises(MultiObjectiveError, match="reads ArmoRM's checkpoint layout"):
        MultiObjectiveScorer.preflight(Settings(reward=RewardSpec(kind="multi-objective", model=str(tiny.reward))))
    bad = RewardSpec(kind="multi-objective", model=str(tiny.armo), objective_weights={"helpfulness": 1.0})
    with pytest.raises(MultiObjectiveError, match="no objective 'helpfulness'; its objectives: kindness, harshness, brevity"):
        MultiObjectiveScorer.preflight(Settings(reward=bad))


def test_multi_objective_leaves_out_a_conversation_without_the_gating_tokens(tiny):
    """Cut from the left past the assistant header, the gating network has nothing to read."""
    settings = Settings(reward=RewardSpec(kind="multi-objective", model=str(tiny.armo), max_length=16, batch_tokens=64))
    items = [{"messages": Q, "response": "kind " * 40}, {"messages": Q, "response": "kind"}]
    with TestClient(create_app(settings)) as client:
        _ready(client)
        body = client.post("/v1/score", json={"items": items}).json()
    assert body["scores"][0] is None and body["scores"][1] is not None
    assert body["unscored"][0]["reason"].endswith("(cut off by maxLength)") and body["truncated"] == 1


# --- pairwise: the report's pair-pm reading, and /v1/compare ------------------------------------


def test_pairwise_text_is_the_reports_byte_for_byte(tiny):
    from transformers import AutoTokenizer

    from iterdpo.pairwise_prompt import CONTEXT_TEMPLATE, pairwise_text

    tok = AutoTokenizer.from_pretrained(tiny.policy)
    one = [{"role": "user", "content": "q"}]
    three = [*one, {"role": "assistant", "content": "r"}, {"role": "user", "content": "q2"}]
    # Hugging Face's compiler (trim_blocks, lstrip_blocks), as the report's code renders it ...
    assert tok.apply_chat_template(one, chat_template=CONTEXT_TEMPLATE, tokenize=False) == "\n\n<turn> user\n q\n"
    assert tok.apply_chat_template(three, chat_template=CONTEXT_TEMPLATE, tokenize=False) == (
        "\n\n<turn> user\n q\n<turn> assistant\n r\n<turn> user\n q2\n")
    # ... and then one user turn of the judge's own template, no generation prompt, no BOS.
    assert pairwise_text(tok, one, "x", "y") == "<|user|>[CONTEXT] \n\n<turn> user\n q\n [RESPONSE A] x [RESPONSE B] y \n<|eos|>"
    bos_template = "{{ bos_token }}" + tok.chat_template
    assert pairwise_text(tok, one, "x", "y", bos_template) == pairwise_text(tok, one, "x", "y")


def test_pairwise_compare_averages_both_orders_of_a_direct_forward(tiny):
    """A causal LM read as a pairwise judge (the tiny policy: its preferences are arbitrary,
    the reading is what is checked): served probabilities equal p(A) computed by hand."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from iterdpo.pairwise_prompt import pairwise_text

    tok = AutoTokenizer.from_pretrained(tiny.policy)
    model = AutoModelForCausalLM.from_pretrained(tiny.policy).eval()
    a_id, b_id = tok.encode("A", add_special_tokens=False)[0], tok.encode("B", add_special_tokens=False)[0]

    def p_a(first, second):
        ids = tok(pairwise_text(tok, Q, first, second), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1, [a_id, b_id]]
        return torch.softmax(logits, -1)[0].item()

    pairs = [("the river is kind", "the river is cruel"), ("calm", "a much longer answer about the stone"), ("same", "same")]
    settings = Settings(reward=RewardSpec(kind="pairwise", model=str(tiny.policy), max_length=256))
    with TestClient(create_app(settings)) as client:
        _ready(client)
        body = client.post("/v1/compare", json={"items": [{"messages": Q, "a": a, "b": b} for a, b in pairs]}).json()
        flipped = client.post("/v1/compare", json={"items": [{"messages": Q, "a": b, "b": a} for a, b in pairs]}).json()
        r = client.post("/v1/score", json={"items": [{"messages": Q, "response": "x"}]})
    expected = [(p_a(a, b) + 1 - p_a(b, a)) / 2 for a, b in pairs]
    assert body["probabilities"] == pytest.approx(expected, abs=1e-5)
    assert [p + q for p, q in zip(body["probabilities"], flipped["probabilities"])] == pytest.approx([1.0] * 3, abs=1e-6)
    assert body["probabilities"][2] == 0.5 and body["forward_passes"] == 6 and body["kind"] == "pairwise"
    assert r.status_code == 422 and "POST /v1/compare" in r.json()["detail"][0]["msg"]


def test_compare_on_a_scoring_kind_is_the_bradley_terry_probability(tiny):
    import math

    settings = Settings(reward=RewardSpec(model=str(tiny.reward), max_length=256))
    responses = ["the river is kind and calm", "the river is cruel"]
    with TestClient(create_app(settings)) as client:
        _ready(client)
        s = client.post("/v1/score", json={"items": [{"messages": Q, "response": r} for r in responses]}).json()["scores"]
        p = client.post("/v1/compare", json={"items": [{"messages": Q, "a": responses[0], "b": responses[1]}]}).json()
    assert p["probabilities"] == pytest.approx([1 / (1 + math.exp(s[1] - s[0]))], abs=1e-6)
    assert p["forward_passes"] == 2


def test_pairwise_refuses_a_classifier(tiny):
    from iterdpo_reward_server.pairwise import PairwiseError, PairwiseScorer

    with pytest.raises(PairwiseError, match="reads a causal LM's next-token logits"):
        PairwiseScorer.preflight(Settings(reward=RewardSpec(kind="pairwise", model=str(tiny.reward))))
