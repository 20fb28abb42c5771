"""Fast tests of the Score stage's logic: packing, request grouping, retries, shard reading, stats."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import httpx
import pytest

from pydantic import ValidationError

from iterdpo.contracts import GeneratedRecord, LeftOut
from iterdpo.errors import StageError
from iterdpo.layout import RunLayout
from iterdpo.stages import Stage
from iterdpo_reward_server.annotate import pair_round, split, unique_items
from iterdpo_reward_server.client import RetryPolicy, RewardClient, RewardClientError, chunk
from iterdpo_reward_server.scoring import encode, pack
from iterdpo_reward_server.settings import SettingsError, settings_from_args
from iterdpo_reward_server.shards import RoundGenerations, read_round

# --- packing ------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [16, 40, 100, 1000])
def test_pack_respects_budget_and_covers_every_item_once(budget):
    rng = random.Random(budget)
    lengths = [rng.randint(1, 16) for _ in range(57)]
    groups = pack(lengths, budget)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        assert len(g) * max(lengths[i] for i in g) <= budget
    # Longest first: the largest forward pass runs first.
    assert lengths[groups[0][0]] == max(lengths)


def test_pack_fills_groups_greedily():
    assert pack([4, 4, 4, 4, 4], 8) == [[0, 1], [2, 3], [4]]
    assert pack([2, 8, 3], 100) == [[1, 2, 0]]


def test_pack_puts_an_oversized_item_alone():
    assert pack([50, 2, 2], 10) == [[0], [1, 2]]
    assert pack([], 10) == []


def test_pack_then_restore_order():
    lengths = [3, 9, 1, 7, 7, 2]
    groups = pack(lengths, 14)
    # What forward() does: fill by group, read back by index.
    out = [None] * len(lengths)
    for g in groups:
        for i in g:
            out[i] = lengths[i] * 10
    assert out == [30, 90, 10, 70, 70, 20]


# --- tokenizing -----------------------------------------------------------------------------


class _FakeTokenizer:
    """Characters as tokens; 'B' is BOS. Enough to pin encode()'s rules."""

    bos_token, bos_token_id = "B", 66

    def __call__(self, text, add_special_tokens=True):
        ids = [ord(c) for c in text]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}


def test_encode_does_not_double_a_template_bos():
    tok = _FakeTokenizer()
    assert encode(tok, "Bxy", 16).ids == [66, ord("x"), ord("y")]
    assert encode(tok, "xy", 16).ids == [66, ord("x"), ord("y")]  # tokenizer adds it


def test_encode_truncates_from_the_left_and_keeps_bos():
    tok = _FakeTokenizer()
    e = encode(tok, "Babcdefgh", 4)
    assert e.truncated and e.ids == [66, ord("f"), ord("g"), ord("h")]
    assert not encode(tok, "Babc", 4).truncated


# --- request grouping and the HTTP client --------------------------------------------------


def test_chunk_groups_requests():
    assert chunk(7, 3) == [range(0, 3), range(3, 6), range(6, 7)]
    assert chunk(0, 3) == []
    assert chunk(3, 5) == [range(0, 3)]


def test_retry_delay_is_exponential_capped_and_jittered():
    policy = RetryPolicy(max_retries=10, base_seconds=1.0, cap_seconds=8.0)
    rng = random.Random(0)
    for attempt, full in [(0, 1), (1, 2), (2, 4), (3, 8), (6, 8)]:
        for _ in range(20):
            assert full / 2 <= policy.delay(attempt, rng) <= full
    assert policy.delay(0, rng, retry_after=5.0) >= 5.0
    assert policy.delay(0, rng, retry_after=500.0) <= 8.0


def _client(handler, *, retries=3, sleeps=None):
    async def fake_sleep(s):
        if sleeps is not None:
            sleeps.append(s)

    return RewardClient(
        "http://rm.test",
        retry=RetryPolicy(max_retries=retries, base_seconds=0.01),
        transport=httpx.MockTransport(handler),
        sleep=fake_sleep,
        rng=random.Random(0),
    )


def _ok(request):
    items = json.loads(request.content)["items"]
    return httpx.Response(200, json={"scores": [float(len(i["response"])) for i in items], "model": "m", "truncated": 0})


ITEMS = [{"messages": [{"role": "user", "content": "q"}], "response": "x" * n} for n in range(1, 11)]


def test_retries_503_then_succeeds():
    calls, sleeps = [], []

    def handler(request):
        calls.append(1)
        if len(calls) <= 2:
            return httpx.Response(503, json={"detail": "the reward model is still loading"})
        return _ok(request)

    batch = asyncio.run(_client(handler, sleeps=sleeps).score(ITEMS[:2]))
    assert batch.scores == [1.0, 2.0]
    assert len(calls) == 3 and len(sleeps) == 2
    assert sleeps[1] > 0


def test_retries_connection_errors_then_gives_up_naming_max_retries():
    calls = []

    def handler(request):
        calls.append(1)
        raise httpx.ConnectError("connection refused")

    with pytest.raises(RewardClientError, match=r"after 3 attempts.*maxRetries=2.*ConnectError"):
        asyncio.run(_client(handler, retries=2).score(ITEMS[:1]))
    assert len(calls) == 3


@pytest.mark.parametrize("status", [400, 422, 500])
def test_other_errors_fail_at_once_with_the_servers_message(status):
    calls = []

    def handler(request):
        calls.append(1)
        return httpx.Response(status, json={"detail": "bad things in items.0"})

    with pytest.raises(RewardClientError, match=rf"HTTP {status}: bad things in items.0"):
        asyncio.run(_client(handler).score(ITEMS[:1]))
    assert len(calls) == 1


def test_validation_detail_is_shown_with_its_field_path():
    def handler(request):
        return httpx.Response(422, json={"detail": [{"loc": ["body", "items", 0, "response"], "msg": "Field required"}]})

    with pytest.raises(RewardClientError, match=r"body\.items\.0\.response: Field required"):
        asyncio.run(_client(handler).score(ITEMS[:1]))


def test_a_wrong_number_of_scores_is_an_error():
    def handler(request):
        return httpx.Response(200, json={"scores": [1.0], "model": "m", "truncated": 0})

    with pytest.raises(RewardClientError, match="1 scores for 2 items"):
        asyncio.run(_client(handler).score(ITEMS[:2]))


def test_score_all_groups_requests_bounds_concurrency_and_keeps_order():
    sizes, in_flight, peak = [], [0], [0]

    async def handler(request):
        sizes.append(len(json.loads(request.content)["items"]))
        in_flight[0] += 1
        peak[0] = max(peak[0], in_flight[0])
        await asyncio.sleep(0.01 * random.random())
        in_flight[0] -= 1
        return _ok(request)

    batch = asyncio.run(_client(handler).score_all(ITEMS, request_size=3, concurrency=2))
    assert batch.scores == [float(n) for n in range(1, 11)]
    assert sorted(sizes) == [1, 3, 3, 3]
    assert peak[0] <= 2


def test_wait_ready_polls_until_200_and_times_out_clearly():
    answers = iter([503, 503, 200])

    def handler(request):
        assert request.url.path == "/readyz"
        code = next(answers)
        return httpx.Response(code, json={"status": "ready", "model": "m"} if code == 200 else {"detail": "loading"})

    assert asyncio.run(_client(handler).wait_ready(10))["status"] == "ready"

    def never(request):
        return httpx.Response(503, json={"detail": "still loading"})

    client = RewardClient("http://rm.test", transport=httpx.MockTransport(never))
    with pytest.raises(RewardClientError, match=r"not ready within 0.2 s.*startupTimeoutSeconds.*still loading"):
        asyncio.run(client.wait_ready(0.2))


# --- reading shards -------------------------------------------------------------------------


def _write_shard(layout, i, n, rows, prompts_in=None, left_out=()):
    layout.stage_dir(1, Stage.GENERATE).mkdir(parents=True, exist_ok=True)
    layout.shard_file(1, i, n).write_text("".join(json.dumps(r) + "\n" for r in rows))
    marker = {  # raw, so that a test can write one that does not add up
        "iteration": 1, "shard": i, "shards": n, "policy": "/p", "seconds": 1.0,
        "prompts_in": len(rows) + len(left_out) if prompts_in is None else prompts_in,
        "prompts_out": len(rows),
        "samples": sum(len(r["responses"]) for r in rows),
        "left_out": list(left_out),
    }
    layout.shard_marker(1, i, n).write_text(json.dumps(marker))


def _row(pid, responses):
    return {"prompt_id": pid, "prompt": [{"role": "user", "content": pid}], "responses": responses, "finish_reasons": []}


def test_read_round_counts_and_orders(tmp_path: Path):
    layout = RunLayout(tmp_path / "run")
    _write_shard(layout, 0, 2, [_row("a", ["1", "2"])], left_out=[{"prompt_id": "z", "reason": "too long"}])
    _write_shard(layout, 1, 2, [_row("b", ["3"]), _row("c", [])])
    got = read_round(layout, 1, 2)
    assert [r.prompt_id for r in got.records] == ["a", "b", "c"]
    assert got.prompts_in == 4
    assert got.left_out == [LeftOut(prompt_id="z", reason="too long")]


def test_read_round_names_the_shard_without_a_marker(tmp_path: Path):
    layout = RunLayout(tmp_path / "run")
    _write_shard(layout, 0, 2, [_row("a", ["1", "2"])])
    with pytest.raises(StageError, match=r"generation shard 2 of 2 of round 1 has no success marker .* did not finish"):
        read_round(layout, 1, 2)


def test_read_round_checks_line_count_marker_sums_and_duplicates(tmp_path: Path):
    layout = RunLayout(tmp_path / "run")
    _write_shard(layout, 0, 1, [_row("a", ["1", "2"])])
    with open(layout.shard_file(1, 0, 1), "a") as fh:
        fh.write(json.dumps(_row("b", ["x"])) + "\n")
    with pytest.raises(StageError, match="has 2 prompts but its marker says prompts_out=1"):
        read_round(layout, 1, 1)

    _write_shard(layout, 0, 1, [_row("a", ["1", "2"])], prompts_in=5)
    with pytest.raises(StageError, match="does not add up: prompts_in=5"):
        read_round(layout, 1, 1)

    _write_shard(layout, 0, 2, [_row("a", ["1"])])
    _write_shard(layout, 1, 2, [_row("a", ["2"])])
    with pytest.raises(StageError, match="'a' appears twice"):
        read_round(layout, 1, 2)


def test_read_round_names_a_malformed_line(tmp_path: Path):
    layout = RunLayout(tmp_path / "run")
    _write_shard(layout, 0, 1, [{"prompt_id": "a", "prompt": [], "responses": []}])
    with pytest.raises(StageError, match=r"shard-00000-of-00001.jsonl:1 is not a valid GeneratedRecord: prompt: List should have at least 1 item"):
        read_round(layout, 1, 1)


# --- pairing and stats -----------------------------------------------------------------------


def _gen(pid, n, responses=None):
    responses = [f"{pid}-{i}" + "!" * i for i in range(n)] if responses is None else responses
    return GeneratedRecord(prompt_id=pid, prompt=[{"role": "user", "content": pid}], responses=responses)


def test_pair_round_accounts_for_every_prompt():
    generations = RoundGenerations(
        records=[_gen("best-worst", 4), _gen("tie", 4), _gen("one", 1), _gen("none", 0), _gen("short", 2)],
        prompts_in=7,
        left_out=[LeftOut(prompt_id="gen1", reason="prompt too long"), LeftOut(prompt_id="gen2", reason="x")],
    )
    rewards = [[0.5, 2.0, -1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [3.0], [], [0.1, 0.2]]
    out = pair_round(
        generations, rewards, strategy="max_min", length_penalty=0.0, seed=1, iteration=1,
        samples_per_prompt=4, truncated=3,
    )
    s = out.stats
    assert s.prompts_in == s.pairs + s.ties_dropped + s.prompts_left_out == 7
    assert (s.pairs, s.ties_dropped, s.prompts_left_out, s.prompts_not_k) == (2, 1, 4, 3)
    assert s.responses_scored == 11
    assert s.min_reward == -1.0 and s.max_reward == 3.0
    assert s.mean_reward == pytest.approx(sum(sum(r) for r in rewards) / 11)
    assert s.truncated == 3 and s.strategy == "max_min"
    assert [e.prompt_id for e in s.left_out] == ["gen1", "gen2", "one", "none"]
    assert "fewer than 2 responses (1) of K=4" in s.left_out[2].reason
    first = out.pairs[0]
    assert (first.chosen, first.rejected) == ("best-worst-1!", "best-worst-2!!")
    assert first.margin == 3.0 and first.chosen_reward == 2.0 and first.rejected_reward == -1.0
    assert out.pairs[1].prompt_id == "short" and out.pairs[1].chosen == "short-1!"
    assert [r.prompt_id for r in out.scored] == ["best-worst", "tie", "one", "none", "short"]
    assert out.scored[0].rewards == rewards[0]


def test_pair_round_random_strategy_is_reproducible():
    generations = RoundGenerations([_gen(f"p{i}", 6) for i in range(10)], 10, [])
    rewards = [[float(j * (i + 1) % 7) for j in range(6)] for i in range(10)]
    kw = dict(strategy="random", length_penalty=0.0, seed=7, iteration=2, samples_per_prompt=6, truncated=0)
    assert pair_round(generations, rewards, **kw).pairs == pair_round(generations, rewards, **kw).pairs


def test_pair_round_refuses_inconsistent_counts():
    generations = RoundGenerations([_gen("a", 2)], prompts_in=3, left_out=[])
    with pytest.raises(ValidationError, match="promptsIn=3"):
        pair_round(generations, [[1.0, 0.0]], strategy="max_min", length_penalty=0.0, seed=1, iteration=1,
                   samples_per_prompt=2, truncated=0)
    with pytest.raises(ValueError, match="do not match"):
        pair_round(generations, [[1.0]], strategy="max_min", length_penalty=0.0, seed=1, iteration=1,
                   samples_per_prompt=2, truncated=0)


def test_unique_items_scores_identical_responses_once():
    generations = RoundGenerations([_gen("a", 0), _gen("b", 0, ["x", "y", "x"]), _gen("c", 0, ["x"])], 3, [])
    items, where = unique_items(generations)
    assert [(i["messages"][0]["content"], i["response"]) for i in items] == [("b", "x"), ("b", "y"), ("c", "x")]
    assert where == [0, 1, 0, 2]


def test_split():
    assert split([1, 2, 3, 4, 5], [2, 0, 3]) == [[1, 2], [], [3, 4, 5]]


# --- server settings ------------------------------------------------------------------------


def test_settings_name_the_flag_at_fault(tmp_path: Path):
    with pytest.raises(SettingsError, match=r"^--batch-tokens: must be at least reward.maxLength \(4096\)"):
        settings_from_args(["--model", "m", "--batch-tokens", "100"])
    with pytest.raises(SettingsError, match=r"^--max-length: must be >= 16|^--max-length: Input should be greater"):
        settings_from_args(["--model", "m", "--max-length", "8"])
    with pytest.raises(SettingsError, match=r"^--dtype: "):
        settings_from_args(["--model", "m", "--dtype", "float16"])
    with pytest.raises(SettingsError, match=r"^--kind: "):
        settings_from_args(["--model", "m", "--kind", "armo"])
    with pytest.raises(SettingsError, match=r"^--model: required without --spec"):
        settings_from_args(["--max-length", "64"])
    with pytest.raises(SettingsError, match=r"^--chat-template: cannot read"):
        settings_from_args(["--model", "m", "--chat-template", str(tmp_path / "nope.jinja")])
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages }}")
    s = settings_from_args(["--model", "m", "--chat-template", str(template), "--max-length", "64", "--batch-tokens", "64"])
    assert s.reward.chat_template == "{{ messages }}" and s.reward.max_length == 64
    assert settings_from_args(["--model", "m", "--chat-template", "none"]).reward.chat_template is None
    assert s.resolved_dtype("cpu") == "float32" and s.resolved_dtype("cuda") == "bfloat16"


def test_settings_from_the_run_file_are_spec_reward(tmp_path: Path):
    """The planner starts the server with --spec: spec.reward is the one declaration of what it serves."""
    from types import SimpleNamespace

    from tests.runfiles import write_tiny_run

    rm = tmp_path / "rm"
    rm.mkdir()
    (rm / "config.json").write_text('{"max_position_embeddings": 128}')
    tiny = SimpleNamespace(policy="/models/p", reward=str(rm), prompts=["/data/q.jsonl"])
    run_file = write_tiny_run(tmp_path / "run.yaml", tiny, name="r", reward={"maxLength": 64, "batchTokens": 128,
                                                                             "chatTemplate": "{{ messages }}"})  # fmt: skip
    s = settings_from_args(["--spec", str(run_file), "--port", "9000"])
    assert (s.reward.model, s.reward.max_length, s.reward.batch_tokens, s.reward.chat_template, s.port) == (
        str(rm), 64, 128, "{{ messages }}", 9000)
    # A local reward model that is not there is a local-path error, never a hub one (issue 11).
    missing = write_tiny_run(tmp_path / "missing.yaml", SimpleNamespace(policy="/p", reward="/models/rm", prompts=["/q.jsonl"]),
                             name="r")  # fmt: skip
    with pytest.raises(SettingsError, match=r"^spec.reward.model: /models/rm does not exist"):
        settings_from_args(["--spec", str(missing)])
    with pytest.raises(SettingsError, match=r"^--max-length: 256 is more than the model's context, 128 tokens"):
        settings_from_args(["--model", str(rm), "--max-length", "256", "--batch-tokens", "512"])
    with pytest.raises(SettingsError, match=r"^--max-length: with --spec, spec.reward is the one place for it"):
        settings_from_args(["--spec", str(run_file), "--max-length", "32"])


# --- rule rewards: unscored items, named details, gold answers -----------------------------------


def test_an_unscored_record_is_left_out_with_the_servers_reason_and_details_are_averaged():
    from iterdpo_reward_server.annotate import detail_means, record_rewards
    from iterdpo_reward_server.scoring import ScoreResult

    generations = RoundGenerations([_gen("a", 2), _gen("bad-gold", 2), _gen("c", 2)], 3, [])
    _, where = unique_items(generations)
    batch = ScoreResult(
        scores=[1.0, -1.0, None, None, -0.5, -0.5], truncated=0, unscored={2: "gold?", 3: "gold?"},
        details={"correct": [1.0, 0.0, None, None, 0.0, 0.0], "answered": [1.0, 0.0, None, None, 1.0, 1.0]},
    )  # fmt: skip
    spans = split(where, [2, 2, 2])
    rewards = record_rewards(spans, batch)
    assert rewards == [[1.0, -1.0], "not scored: gold?", [-0.5, -0.5]]
    means = detail_means(batch, spans, rewards)
    assert means == {"correct": pytest.approx(1 / 4), "answered": pytest.approx(3 / 4)}
    out = pair_round(generations, rewards, strategy="max_min", length_penalty=0.0, seed=1, iteration=1,
                     samples_per_prompt=2, truncated=0, details=means)  # fmt: skip
    s = out.stats
    assert (s.pairs, s.ties_dropped, s.prompts_left_out) == (1, 1, 1)
    assert s.left_out == [LeftOut(prompt_id="bad-gold", reason="not scored: gold?")]
    assert s.responses_scored == 4 and s.details == means
    assert [r.prompt_id for r in out.scored] == ["a", "c"]  # scored.jsonl holds what was scored


def test_unique_items_carry_the_gold_answer_only_when_there_is_one():
    with_answer = GeneratedRecord(prompt_id="a", prompt=[{"role": "user", "content": "1+1"}], responses=["2"], answer="2")
    items, _ = unique_items(RoundGenerations([with_answer, _gen("b", 1)], 2, []))
    assert items[0]["answer"] == "2" and "answer" not in items[1]


def test_concat_shifts_unscored_indices_and_fills_missing_details():
    from iterdpo_reward_server.client import concat
    from iterdpo_reward_server.scoring import ScoreResult

    a = ScoreResult([1.0, None], 1, {1: "why"}, {"correct": [1.0, None]})
    b = ScoreResult([None, 2.0], 0, {0: "why not"}, {})
    out = concat([a, b])
    assert out.scores == [1.0, None, None, 2.0] and out.truncated == 1
    assert out.unscored == {1: "why", 2: "why not"}
    assert out.details == {"correct": [1.0, None, None, None]}


def test_a_null_score_without_its_reason_is_refused():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"scores": [1.0, None], "model": None, "truncated": 0})

    with pytest.raises(RewardClientError, match="null score must come with its reason"):
        asyncio.run(_client(handler).score(ITEMS[:2]))


def test_pairwise_annotation_runs_tournaments_over_compare_and_counts_them(tmp_path: Path):
    """Kind pairwise, server mocked as a judge that prefers the longer response: each prompt's
    pair is its longest vs its shortest (a bracket finds both), identical responses tie without
    a request, and stats count comparisons and forward passes."""
    from iterdpo.runfile import parse_run
    from iterdpo.tournament import expected_comparisons
    from iterdpo_reward_server.annotate import annotate

    run = parse_run({"apiVersion": "iterdpo.io/v1alpha1", "kind": "IterativeDPORun", "metadata": {"name": "pw"},
                     "spec": {"policy": {"model": "/m/p"}, "prompts": {"dataset": "/d/p.jsonl"},
                              "generation": {"samplesPerPrompt": 4}, "storage": {"root": str(tmp_path)},
                              "reward": {"kind": "pairwise", "model": "/m/pm"}, "pairing": {"selection": "bracket"}}})  # fmt: skip
    layout = RunLayout.of(run)
    _write_shard(layout, 0, 1, [_row("a", ["xx", "x", "xxxx", "xxx"]), _row("same", ["y"] * 4)])
    sent = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/readyz":
            return httpx.Response(200, json={"status": "ready", "model": "/m/pm", "kind": "pairwise"})
        assert request.url.path == "/v1/compare"
        items = json.loads(request.content)["items"]
        sent.extend(items)
        probs = [1.0 if len(i["a"]) > len(i["b"]) else 0.0 for i in items]
        return httpx.Response(200, json={"probabilities": probs, "model": "/m/pm", "kind": "pairwise",
                                         "forward_passes": 2 * len(items), "truncated": 0})  # fmt: skip

    stats = annotate(run, 1, "http://rm.test", transport=httpx.MockTransport(handler))
    per_prompt = expected_comparisons("bracket", 4)
    assert stats.comparisons == 2 * per_prompt and stats.forward_passes == 2 * per_prompt  # "same" asked nothing
    assert len(sent) == per_prompt and stats.strategy == "bracket"
    assert (stats.pairs, stats.ties_dropped) == (1, 1)
    (pair,) = [json.loads(line) for line in layout.pairs_file(1).read_text().splitlines()]
    assert (pair["chosen"], pair["rejected"]) == ("xxxx", "x") and pair["chosen_reward"] == 1.0
