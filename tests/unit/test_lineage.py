"""Lineage: digests of files, folders and Hub ids; the ledger that refuses a changed input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from iterdpo.errors import UsageError
from iterdpo.layout import RunLayout
from iterdpo.lineage import MISSING, Lineage, digest, open_ledger
from iterdpo.stages import STAGE_TABLE, EvaluateSummary, GenerateSummary, Stage, SummaryError
from iterdpo.status import RunStatus, stage_finished, stage_started
from iterdpo.summary import MAX_MESSAGE_BYTES


def test_a_file_digest_is_its_sha256(tmp_path):
    f = tmp_path / "prompts.jsonl"
    f.write_text('{"prompt": "hi"}\n')
    assert digest(f) == "sha256:" + hashlib.sha256(f.read_bytes()).hexdigest()


def test_a_folder_digest_covers_names_and_contents_but_not_dot_entries(tmp_path):
    model = tmp_path / "policy"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "sub" / "weights.bin").write_bytes(b"\x00\x01")
    first = digest(model)
    (model / ".model.safetensors.tmp-123").write_text("half written")
    (model / ".cache").mkdir()
    (model / ".cache" / "x").write_text("y")
    assert digest(model) == first
    (model / "sub" / "weights.bin").write_bytes(b"\x00\x02")
    assert digest(model) != first
    (model / "sub" / "weights.bin").write_bytes(b"\x00\x01")
    (model / "sub" / "weights.bin").rename(model / "sub" / "other.bin")  # same bytes, another name
    assert digest(model) != first


def test_a_hub_id_is_pinned_to_its_cached_commit_else_only_named(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    refs = tmp_path / "models--org--model" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("0123abcd\n")
    assert digest("org/model") == "hf:org/model@0123abcd"
    assert digest("org/not-cached") == "name:org/not-cached"
    assert digest(tmp_path / "no-such-file") == MISSING


def _layout(tmp_path: Path) -> RunLayout:
    return RunLayout(tmp_path / "runs" / "r")


def test_a_later_process_reading_a_changed_input_is_refused_naming_it(tmp_path):
    layout = _layout(tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("a\n")
    shard = layout.shard_file(1, 0, 1)
    ledger = open_ledger(layout, 1, Stage.GENERATE, reads=[prompts, None], process="shard-0")
    shard.parent.mkdir(parents=True, exist_ok=True)
    shard.write_text("responses\n")
    lineage = ledger.close(wrote=[shard])
    assert lineage.read == {str(prompts): digest(prompts)} and lineage.wrote == {str(shard): digest(shard)}
    assert json.loads((layout.stage_dir(1, Stage.GENERATE) / "lineage-shard-0.json").read_text())["process"] == "shard-0"

    # The next stage reads what Generate wrote, unchanged: fine; the same input again: fine.
    open_ledger(layout, 1, Stage.SCORE, reads=[shard])
    open_ledger(layout, 1, Stage.GENERATE, reads=[prompts], process="shard-0")

    before = digest(prompts)
    prompts.write_text("b\n")  # changed under the same name
    with pytest.raises(UsageError) as refused:
        open_ledger(layout, 2, Stage.GENERATE, reads=[prompts], process="shard-0")
    message = str(refused.value)
    assert str(prompts) in message and before in message and digest(prompts) in message
    assert "round 1 Generate (shard-0)" in message and "new name" in message
    shard.write_text("edited by hand\n")
    with pytest.raises(UsageError, match="scored|shard-00000-of-00001"):
        open_ledger(layout, 1, Stage.SCORE, reads=[shard])
    shard.unlink()  # gone: also a change, said as such
    with pytest.raises(UsageError, match="now missing"):
        open_ledger(layout, 1, Stage.SCORE, reads=[shard])


def test_a_damaged_ledger_file_is_named(tmp_path):
    layout = _layout(tmp_path)
    bad = layout.stage_dir(1, Stage.TRAIN) / "lineage-main.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("{not json")
    with pytest.raises(Exception, match="lineage-main.json: not a lineage record"):
        open_ledger(layout, 1, Stage.GENERATE, reads=[])


def test_a_stage_record_merges_its_processes_and_refuses_two_contents_for_one_path():
    gen = STAGE_TABLE[Stage.GENERATE]

    class Run:  # what _generation_figures reads
        class spec:
            class generation:
                shards = 2

    def shard(i: int, policy_digest: str) -> GenerateSummary:
        lineage = Lineage(read={"/p": policy_digest, "/prompts": "sha256:a"}, wrote={f"/s{i}": f"sha256:{i}"})
        return GenerateSummary(shard=i, shards=2, prompts=1, prompts_out=1, samples=2, prompts_left_out=0,
                               seconds=1.0, lineage=lineage)  # fmt: skip

    figures, lineage = gen.record([shard(0, "sha256:p"), shard(1, "sha256:p")], 2.0, Run)
    assert figures.samples == 4
    assert lineage.read == {"/p": "sha256:p", "/prompts": "sha256:a"} and set(lineage.wrote) == {"/s0", "/s1"}
    with pytest.raises(SummaryError, match="/p has two contents"):
        gen.record([shard(0, "sha256:p"), shard(1, "sha256:q")], 2.0, Run)


def test_status_keeps_each_rounds_lineage_and_a_rerun_stage_records_anew():
    from iterdpo.stages import GenerationFigures, ScoringFigures

    st = stage_started(RunStatus(), 1, Stage.GENERATE, "/p", "t")
    gen = GenerationFigures(prompts=1, samples=2, seconds=1.0)
    st = stage_finished(st, 1, Stage.GENERATE, gen, "t", lineage=Lineage(read={"/p": "sha256:1"}, wrote={"/s": "sha256:2"}))
    scoring = ScoringFigures(mean_reward=0.0, pairs=1, ties_dropped=0, prompts_left_out=0, seconds=1.0)
    st = stage_finished(st, 1, Stage.SCORE, scoring, "t", lineage=Lineage(read={"/s": "sha256:2"}, wrote={"/pairs": "sha256:3"}))
    assert st.iteration(1).lineage.read == {"/p": "sha256:1", "/s": "sha256:2"}
    assert st.iteration(1).lineage.wrote == {"/s": "sha256:2", "/pairs": "sha256:3"}
    st = stage_finished(st, 1, Stage.SCORE, scoring, "t", lineage=Lineage(wrote={"/pairs": "sha256:4"}))
    assert st.iteration(1).lineage.wrote["/pairs"] == "sha256:4"
    assert st.to_json()["iterations"][0]["lineage"]["read"]["/p"] == "sha256:1"
    assert "lineage" not in stage_finished(stage_started(RunStatus(), 1, Stage.GENERATE, "/p", "t"), 1,
                                           Stage.GENERATE, gen, "t").to_json()["iterations"][0]  # fmt: skip


def test_the_largest_summary_with_its_lineage_fits_a_termination_message():
    """Evaluate reads the most: its prompts, the policy, the initial policy, the reward model, the
    judge and round 0's responses, and writes its responses; with long paths it still fits."""
    root = "/iterdpo/" + "x" * 60
    reads = {f"{root}/iter-12/evaluate/input-{i}": "sha256:" + "f" * 64 for i in range(6)}
    lineage = Lineage(read=reads, wrote={f"{root}/iter-12/evaluate/responses.jsonl": "sha256:" + "e" * 64})
    summary = EvaluateSummary(policy=f"{root}/iter-12/train/policy", prompts=500, prompts_left_out=5,
                              left_out_reasons=["row 12: prompt longer than training.maxPromptLength " * 2] * 5,
                              overlap=0, samples=500, mean_reward=1.0, judge_reward=1.0, win_rate=0.5,
                              win_rate_low=0.4, win_rate_high=0.6, judged_by="judge", length_mean=1.0,
                              length_p90=1.0, length_ratio=1.0, truncated_share=0.0, kl=0.1, seconds=1.0,
                              lineage=lineage)  # fmt: skip
    assert len(summary.to_message().encode()) <= MAX_MESSAGE_BYTES
