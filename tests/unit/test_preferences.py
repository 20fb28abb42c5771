"""Preference data for reward-model training: both formats, configurable fields, margins, and
every row counted in or out with its row id and a short reason."""

import json
import re
from pathlib import Path

import pytest

from iterdpo.errors import UsageError
from iterdpo_trainer.preferences import (
    Message,
    PreferenceDataError,
    PreferenceReader,
    PreferenceSource,
    read_preferences,
)


def u(text: str) -> dict:
    return {"role": "user", "content": text}


def a(text: str) -> dict:
    return {"role": "assistant", "content": text}


def s(text: str) -> dict:
    return {"role": "system", "content": text}


def conv(question: str, good: str = "good", bad: str = "bad", **extra) -> dict:
    """A row of the report's format: two whole conversations sharing all but the last turn."""
    return {"chosen": [u(question), a(good)], "rejected": [u(question), a(bad)], **extra}


def trl(prompt, chosen="good", rejected="bad", **extra) -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **extra}


def jsonl(tmp_path: Path, *rows, name: str = "p.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows))
    return path


def read(path: Path, **source):
    return read_preferences(PreferenceSource(dataset=str(path), **source))


def reasons(result) -> dict[int, str]:
    return {item.row: item.reason for item in result.left_out}


def counted(result) -> bool:
    rows = [p.row for p in result.pairs] + [item.row for item in result.left_out]
    return result.rows_in == result.pairs_out + len(result.left_out) and sorted(rows) == list(range(result.rows_in))


# -- the report's format ------------------------------------------------------------------
def test_the_reports_format_reads_the_shared_turns_as_the_prompt(tmp_path):
    multi = {"chosen": [s("be kind"), u("hi"), a("hello"), u("and?"), a("yes")],
             "rejected": [s("be kind"), u("hi"), a("hello"), u("and?"), a("no")]}  # fmt: skip
    result = read(jsonl(tmp_path, conv("q1"), multi))
    assert (result.format, result.margins, result.rows_in, result.pairs_out) == ("implicit", False, 2, 2)
    first, second = result.pairs
    assert first.row == 0 and first.prompt == (Message("user", "q1"),)
    assert first.chosen == (Message("assistant", "good"),) and first.rejected == (Message("assistant", "bad"),)
    assert first.margin is None
    assert [m.content for m in second.prompt] == ["be kind", "hi", "hello", "and?"]
    assert second.chosen_messages() == multi["chosen"] and second.rejected_messages() == multi["rejected"]


def test_extra_message_keys_are_dropped_and_the_messages_kept(tmp_path):
    row = {"chosen": [{**u("q"), "name": "x"}, a("good")], "rejected": [u("q"), {**a("bad"), "weight": 1}]}
    (pair,) = read(jsonl(tmp_path, row)).pairs
    assert pair.chosen_messages() == [u("q"), a("good")] and pair.rejected_messages() == [u("q"), a("bad")]


# -- TRL's format -------------------------------------------------------------------------
def test_trl_strings_are_a_user_prompt_and_assistant_completions(tmp_path):
    result = read(jsonl(tmp_path, trl("the sky is"), trl("the grass is", " green", " blue")))
    assert result.format == "explicit"
    assert result.pairs[0].chosen_messages() == [u("the sky is"), a("good")]
    assert result.pairs[1].rejected_messages() == [u("the grass is"), a(" blue")]


def test_trl_message_lists(tmp_path):
    row = trl([s("sys"), u("q")], [a("good")], [a("bad")])
    (pair,) = read(jsonl(tmp_path, row)).pairs
    assert pair.prompt == (Message("system", "sys"), Message("user", "q"))
    assert pair.chosen == (Message("assistant", "good"),)
    # A string prompt with message completions, and the reverse, mix fine.
    (pair,) = read(jsonl(tmp_path, trl("q", [a("good")], "bad"), name="m.jsonl")).pairs
    assert pair.rejected_messages() == [u("q"), a("bad")]


def test_a_prompt_field_that_only_repeats_the_conversation_is_the_reports_format(tmp_path):
    # ultrafeedback_binarized: prompt (a string) + chosen and rejected as whole conversations
    result = read(jsonl(tmp_path, conv("q", prompt="q")))
    assert result.format == "implicit"
    assert result.pairs[0].chosen_messages() == [u("q"), a("good")]


def test_an_explicit_format_given_reads_completions_strictly(tmp_path):
    path = jsonl(tmp_path, conv("q", prompt="q"), trl("q2"))
    result = read(path, format="explicit")
    assert reasons(result) == {0: "line 1: chosen message 0 has role 'user': a completion holds assistant turns only"}
    assert result.pairs_out == 1 and counted(result)


def test_an_implicit_format_given_refuses_string_completions(tmp_path):
    result = read(jsonl(tmp_path, trl("q"), conv("q2")), format="implicit")
    assert reasons(result) == {0: "line 1: chosen is a string: without a prompt field it must be a list of messages"}
    assert result.pairs[0].prompt == (Message("user", "q2"),)


# -- columns --------------------------------------------------------------------------------
def test_field_names_are_configurable(tmp_path):
    rows = [{"question": "q", "better": "good", "worse": "bad", "gap": 2},
            {"question": "q", "better": "good", "worse": "bad", "gap": 0.5}]  # fmt: skip
    result = read(jsonl(tmp_path, *rows), chosen_field="better", rejected_field="worse", prompt_field="question",
                  margin_field="gap")  # fmt: skip
    assert (result.format, result.margins) == ("explicit", True)
    assert [p.margin for p in result.pairs] == [2.0, 0.5]
    assert result.pairs[0].chosen_messages() == [u("q"), a("good")]


def test_reasons_name_the_configured_fields(tmp_path):
    rows = [{"better": [u("q"), a("x")], "worse": [u("q"), a("")]}, {"better": [u("q"), a("x")], "worse": [u("q"), a("y")]}]
    result = read(jsonl(tmp_path, *rows), chosen_field="better", rejected_field="worse")
    assert reasons(result) == {0: "line 1: worse is empty (its last turn, the assistant's, has no content)"}


@pytest.mark.parametrize(("setting", "field"), [("chosen_field", "chosenField"), ("rejected_field", "rejectedField")])
def test_a_field_no_row_has_is_an_error_naming_it(tmp_path, setting, field):
    path = jsonl(tmp_path, conv("q"), conv("r"))
    with pytest.raises(PreferenceDataError) as err:
        read(path, **{setting: "typo"})
    assert str(err.value) == (
        f"spec.reward.training.data.{field}: no row of {path} has a field 'typo'; its rows' fields are: chosen, rejected"
    )
    assert isinstance(err.value, UsageError)  # exit 2


def test_a_margin_field_named_by_hand_must_exist(tmp_path):
    with pytest.raises(PreferenceDataError, match=r"data\.marginField: no row of .* has a field 'gap'"):
        read(jsonl(tmp_path, conv("q"), conv("r")), margin_field="gap")


def test_margins_can_be_switched_off(tmp_path):
    result = read(jsonl(tmp_path, conv("q", margin=1.0), conv("r", margin="not read")), margin_field=None)
    assert result.margins is False and [p.margin for p in result.pairs] == [None, None]


def test_an_explicit_format_without_prompts_is_an_error(tmp_path):
    with pytest.raises(PreferenceDataError, match=r"data\.promptField: no row of .* has a field 'prompt'"):
        read(jsonl(tmp_path, conv("q")), format="explicit")


def test_the_field_path_is_the_callers(tmp_path):
    with pytest.raises(PreferenceDataError, match=r"^x\.y\.dataset: .* does not exist"):
        read_preferences(PreferenceSource(dataset=str(tmp_path / "none.jsonl")), field_path="x.y")


@pytest.mark.parametrize(
    ("settings", "message"),
    [({"format": "guess"}, "format: 'guess' is not one of auto, implicit, explicit"),
     ({"max_rows": 0}, "maxRows: must be at least 1 (got 0)"),
     ({"chosen_field": ""}, "chosenField: must not be empty"),
     ({"rejected_field": "chosen"}, "chosenField, rejectedField, promptField and marginField must differ")],
)  # fmt: skip
def test_bad_settings_say_which(settings, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        PreferenceSource(dataset="x.jsonl", **settings)


# -- margins ----------------------------------------------------------------------------------
def test_margins_are_read_when_the_first_row_has_one(tmp_path):
    result = read(jsonl(tmp_path, conv("q", margin=1), conv("r", margin=-0.25)))
    assert result.margins and [p.margin for p in result.pairs] == [1.0, -0.25]
    assert all(isinstance(p.margin, float) for p in result.pairs)


def test_bad_margins_are_left_out(tmp_path):
    rows = [conv("q", margin=1), conv("a", margin="2"), conv("b", margin=None), conv("c", margin=True),
            conv("d", margin=[1]), conv("e"), conv("f", margin=10**400), b'{"chosen": 1, "margin": NaN}']  # fmt: skip
    result = read(jsonl(tmp_path, *rows))
    assert reasons(result) == {
        1: "line 2: margin is not a finite number (got string)",
        2: "line 3: margin is not a finite number (got null)",
        3: "line 4: margin is not a finite number (got boolean)",
        4: "line 5: margin is not a finite number (got array)",
        5: "line 6: no 'margin' field, which line 1 has: margins are all or none",
        6: "line 7: margin is not a finite number (got an integer too large for a float)",
        7: "line 8: not valid JSON: NaN is not allowed",
    }
    assert [p.row for p in result.pairs] == [0] and counted(result)


def test_a_margin_when_the_first_row_had_none_is_left_out(tmp_path):
    result = read(jsonl(tmp_path, conv("q"), conv("r", margin=1.0), conv("s", margin=None)))
    assert result.margins is False
    assert reasons(result) == {1: "line 2: has a 'margin' field, which line 1 has not: margins are all or none"}


def test_a_non_finite_margin_from_parquet_is_left_out(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [conv("q", margin=1.0), conv("r", margin=float("nan")), conv("s", margin=float("inf"))]
    path = tmp_path / "m.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    result = read(path)
    assert reasons(result) == {1: "row 1: margin is not a finite number (got nan)",
                               2: "row 2: margin is not a finite number (got inf)"}  # fmt: skip


# -- every bad-row reason -------------------------------------------------------------------
BAD_ROWS = [
    (conv("q"), None),
    ({"chosen": [u("q"), a("x")], "rejected": [u("other"), a("y")]},
     "chosen and rejected differ before their last turn (turn 0)"),
    ({"chosen": [u("q"), a("x")], "rejected": [u("q"), a("ok"), u("more"), a("y")]},
     "chosen and rejected differ before their last turn (1 turns vs 3)"),
    ({"chosen": [u("q"), a("x")], "rejected": [u("q"), a("  ")]},
     "rejected is empty (its last turn, the assistant's, has no content)"),
    ({"chosen": [u("q"), a("x")], "rejected": []}, "rejected is empty"),
    ({"chosen": [u("q"), a("x")], "rejected": [u("q"), a("x")]}, "chosen and rejected are identical"),
    ({"chosen": [u("q"), {"role": "robot", "content": "x"}], "rejected": [u("q"), a("y")]},
     "chosen message 1 has role 'robot'; allowed: system, user, assistant"),
    ({"chosen": [u("q"), {"role": "assistant", "content": 7}], "rejected": [u("q"), a("y")]},
     "chosen message 1 has no string 'content'"),
    ({"chosen": [u("q"), "x"], "rejected": [u("q"), a("y")]}, "chosen message 1 has no string 'content'"),
    ({"chosen": [u(""), a("x")], "rejected": [u(""), a("y")]}, "chosen message 0 has empty content"),
    ({"chosen": [u("q"), u("x")], "rejected": [u("q"), a("y")]},
     "chosen's last turn is not the assistant's (role 'user')"),
    ({"chosen": [a("x")], "rejected": [a("y")]}, "no prompt: chosen and rejected hold only their last turn"),
    ({"chosen": [u("q"), a("p"), a("x")], "rejected": [u("q"), a("p"), a("y")]},
     "the turn before the last is the assistant's: nothing for chosen and rejected to respond to"),
    ({"chosen": {"role": "user"}, "rejected": [u("q"), a("y")]}, "chosen is not a list of messages (got object)"),
    ({"chosen": None, "rejected": [u("q"), a("y")]}, "chosen is not a list of messages (got null)"),
    ({"rejected": [u("q"), a("y")]}, "no 'chosen' field"),
    ({"chosen": [u("q"), a("y")]}, "no 'rejected' field"),
]  # fmt: skip


def test_every_bad_row_of_the_reports_format_is_left_out_with_its_reason(tmp_path):
    result = read(jsonl(tmp_path, *[row for row, _ in BAD_ROWS], b"", b"[1]", b"{oops"))
    n = len(BAD_ROWS)
    expected = {i: f"line {i + 1}: {why}" for i, (_, why) in enumerate(BAD_ROWS) if why}
    expected |= {n: f"line {n + 1}: blank line", n + 1: f"line {n + 2}: not a JSON object (got array)",
                 n + 2: f"line {n + 3}: not valid JSON: Expecting property name enclosed in double quotes at column 2"}  # fmt: skip
    assert reasons(result) == expected
    assert [p.row for p in result.pairs] == [0]
    assert counted(result)


TRL_BAD_ROWS = [
    (trl("q"), None),
    (trl(""), "prompt is empty"),
    (trl([]), "prompt is empty"),
    (trl("q", ""), "chosen is empty"),
    (trl("q", "x", " \n"), "rejected is empty"),
    (trl("q", [a("")]), "chosen is empty (its last turn, the assistant's, has no content)"),
    (trl("q", "same", "same"), "chosen and rejected are identical"),
    (trl("q", "same", [a("same")]), "chosen and rejected are identical"),
    (trl([u("q"), a("x")]), "prompt ends with an assistant turn: nothing to respond to"),
    (trl([{"role": "tool", "content": "q"}]), "prompt message 0 has role 'tool'; allowed: system, user, assistant"),
    (trl("q", [u("q"), a("x")]), "chosen message 0 has role 'user': a completion holds assistant turns only"),
    (trl(None), "prompt is not a string or a list of messages (got null)"),
    (trl(7), "prompt is not a string or a list of messages (got number)"),
    (trl("q", 3.5), "chosen is not a string or a list of messages (got number)"),
    ({"chosen": "x", "rejected": "y"}, "no 'prompt' field"),
]  # fmt: skip


def test_every_bad_row_of_trls_format_is_left_out_with_its_reason(tmp_path):
    rows = [row for row, _ in TRL_BAD_ROWS]
    result = read(jsonl(tmp_path, *rows))
    assert result.format == "explicit"
    expected = {i: f"line {i + 1}: {why}" for i, (_, why) in enumerate(TRL_BAD_ROWS) if why}
    assert reasons(result) == expected
    assert [p.row for p in result.pairs] == [0] and counted(result)


def test_reasons_stay_short_however_large_the_row(tmp_path):
    huge = "x" * 1_000_000
    rows = [conv("q"), {"chosen": [u("q"), {"role": huge, "content": "x"}], "rejected": [u("q"), a("y")]},
            {"chosen": [u(huge), a("x")], "rejected": [u(huge + "y"), a("y")]},
            {huge: 1, "chosen": [u("q"), a("x")]}, b'{"chosen": "' + huge.encode()]  # fmt: skip
    result = read(jsonl(tmp_path, *rows))
    assert len(result.left_out) == 4
    assert all(len(item.reason) <= 200 for item in result.left_out)
    assert "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx" not in "".join(r.reason for r in result.left_out)


def test_no_usable_pair_is_an_error_quoting_the_first_reasons(tmp_path):
    path = jsonl(tmp_path, *[conv("q", "same", "same")] * 5)
    with pytest.raises(PreferenceDataError) as err:
        read(path)
    assert str(err.value) == (
        f"spec.reward.training.data.dataset: {path} has no usable pair: 5 rows left out (line 1: chosen and rejected "
        "are identical; line 2: chosen and rejected are identical; line 3: chosen and rejected are identical; and 2 more)"
    )
    empty = tmp_path / "e.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(PreferenceDataError, match="has no usable pair: it has no rows"):
        read(empty)


def test_max_rows_reads_only_the_first_rows(tmp_path):
    result = read(jsonl(tmp_path, conv("q"), b"{bad", conv("r"), conv("s")), max_rows=3)
    assert (result.rows_in, result.pairs_out, len(result.left_out)) == (3, 2, 1) and counted(result)


# -- other file types, the same rows ------------------------------------------------------------
ROWS = [conv("q1"), {"chosen": [u("q"), a("x")], "rejected": [u("z"), a("y")]}, conv("q3", "a", "a"), conv("q4")]
ROW_REASONS = {1: "row 1: chosen and rejected differ before their last turn (turn 0)",
               2: "row 2: chosen and rejected are identical"}  # fmt: skip


@pytest.mark.parametrize("kind", ["json", "parquet", "arrow", "folder"])
def test_json_parquet_arrow_and_saved_folders_read_the_same_with_row_ids(tmp_path, kind):
    datasets = pytest.importorskip("datasets")
    data = datasets.Dataset.from_list(ROWS)
    if kind == "json":
        path = tmp_path / "p.json"
        path.write_text(json.dumps(ROWS))
    elif kind == "parquet":
        path = tmp_path / "p.parquet"
        data.to_parquet(str(path))
    elif kind == "arrow":
        data.save_to_disk(str(tmp_path / "saved"))
        (path,) = (tmp_path / "saved").glob("*.arrow")
    else:
        path = tmp_path / "saved"
        data.save_to_disk(str(path))
    result = read(path)
    assert reasons(result) == ROW_REASONS
    assert [p.row for p in result.pairs] == [0, 3] and counted(result)
    assert result.pairs[1].chosen_messages() == ROWS[3]["chosen"]


def test_a_loaded_dataset_without_the_field_is_an_error_at_once(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "p.parquet"
    datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    with pytest.raises(PreferenceDataError) as err:
        read(path, rejected_field="worse")
    assert str(err.value) == (
        "spec.reward.training.data.rejectedField: the dataset has no field 'worse'; its fields are: chosen, rejected"
    )


def test_a_trl_parquet_with_strings(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "p.parquet"
    datasets.Dataset.from_list([trl("q", "x", "y", margin=0.5), trl("r", "z", "z", margin=1.0)]).to_parquet(str(path))
    result = read(path)
    assert (result.format, result.margins) == ("explicit", True)
    assert reasons(result) == {1: "row 1: chosen and rejected are identical"}
    assert result.pairs[0].margin == 0.5


def test_unknown_file_types_and_missing_files_are_errors(tmp_path):
    (tmp_path / "p.csv").write_text("a,b\n")
    with pytest.raises(PreferenceDataError, match=r"data\.dataset: unknown file type '\.csv'"):
        read(tmp_path / "p.csv")
    with pytest.raises(PreferenceDataError, match=r"data\.dataset: .*missing\.jsonl does not exist"):
        read(tmp_path / "missing.jsonl")


# -- streaming ------------------------------------------------------------------------------------
def test_the_reader_streams_a_jsonl_file_row_by_row(tmp_path):
    reader = PreferenceReader(PreferenceSource(dataset=str(jsonl(tmp_path, b"{bad", conv("q"), conv("r")))))
    items = iter(reader)
    first = next(items)
    assert (first.row, reader.rows_in, reader.format) == (0, 1, None)  # nothing read ahead
    second = next(items)
    assert (second.row, reader.rows_in, reader.format, reader.margins) == (1, 2, "implicit", False)
    assert reader.shape_row == "line 2"
    assert [item.row for item in items] == [2] and reader.rows_in == 3
