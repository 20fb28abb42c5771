"""Prompt sets with bad rows: each bad row is left out with its row number and a short reason;
the rest of the set is used, and no row's id moves."""

import json
from pathlib import Path

import pytest

from iterdpo.errors import UsageError
from iterdpo.prompts import PromptDataError, load_prompt_set, parse_jsonl_line
from iterdpo.spec import PromptSource

ROBOT = "message 0 has role 'robot'; allowed: system, user, assistant"


def good(text: str) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": text}]}).encode()


def write(tmp_path: Path, *lines: bytes, name: str = "p.jsonl", end: bytes = b"\n") -> Path:
    path = tmp_path / name
    path.write_bytes(b"\n".join(lines) + end)
    return path


def load(path: Path, **source):
    return load_prompt_set(PromptSource(dataset=str(path), **source))


def reasons(prompt_set) -> dict[str, str]:
    return {item.prompt_id: item.reason for item in prompt_set.left_out}


def used(prompt_set) -> dict[str, str]:
    return {p.prompt_id: p.messages[-1]["content"] for p in prompt_set.prompts if p is not None}


def test_a_bad_json_line_is_left_out_and_the_rest_is_used(tmp_path):
    path = write(tmp_path, good("a"), b'{"messages": "b",, "x": 1}', good("c"))
    prompt_set = load(path)
    assert reasons(prompt_set) == {"1": "line 2: not valid JSON: Expecting property name enclosed in double quotes "
                                         "at column 18"}  # fmt: skip
    assert used(prompt_set) == {"0": "a", "2": "c"}
    assert prompt_set.prompts[1] is None


def test_the_brief_example_wording(tmp_path):
    path = write(tmp_path, *[good(str(i)) for i in range(6)], b'{"messages" "x"}')
    assert reasons(load(path)) == {"6": "line 7: not valid JSON: Expecting ':' delimiter at column 13"}


def test_a_line_that_is_not_utf8_is_left_out(tmp_path):
    path = write(tmp_path, good("a"), b'{"messages": "caf\xff"}', good("c"))
    prompt_set = load(path)
    assert reasons(prompt_set) == {"1": "line 2: not UTF-8 (byte 0xff at column 18)"}
    assert used(prompt_set) == {"0": "a", "2": "c"}


@pytest.mark.parametrize(("line", "kind"), [(b"[1, 2]", "array"), (b'"hello"', "string"), (b"3", "number"),
                                            (b"null", "null"), (b"true", "boolean")])  # fmt: skip
def test_a_line_that_is_not_an_object_is_left_out(tmp_path, line, kind):
    prompt_set = load(write(tmp_path, good("a"), line))
    assert reasons(prompt_set) == {"1": f"line 2: not a JSON object (got {kind})"}
    assert used(prompt_set) == {"0": "a"}


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_not_json(tmp_path, constant):
    prompt_set = load(write(tmp_path, good("a"), f'{{"messages": "x", "score": {constant}}}'.encode()))
    assert reasons(prompt_set) == {"1": f"line 2: not valid JSON: {constant} is not allowed"}


def test_an_unknown_role_is_left_out_with_its_line(tmp_path):
    robot = json.dumps({"messages": [{"role": "robot", "content": "hi"}]}).encode()
    prompt_set = load(write(tmp_path, good("a"), robot, good("c")))
    assert reasons(prompt_set) == {"1": f"line 2: {ROBOT}"}
    assert used(prompt_set) == {"0": "a", "2": "c"}


def test_empty_content_is_left_out(tmp_path):
    path = write(
        tmp_path,
        good("a"),
        good(""),
        good("  \n "),
        b'{"messages": ""}',
        b'{"messages": []}',
        json.dumps({"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "q"}]}).encode(),
    )
    assert reasons(load(path)) == {
        "1": "line 2: message 0 has empty content",
        "2": "line 3: message 0 has empty content",
        "3": "line 4: prompt is an empty string",
        "4": "line 5: prompt is not a non-empty list of messages or a string (got array)",
        "5": "line 6: message 0 has empty content",
    }


def test_a_row_without_the_field_is_left_out_and_names_it(tmp_path):
    prompt_set = load(write(tmp_path, good("a"), b'{"prompt": "b"}', b'{"messages": null}'))
    assert reasons(prompt_set) == {
        "1": "line 2: no 'messages' field",
        "2": "line 3: prompt is not a non-empty list of messages or a string (got null)",
    }


def test_blank_lines_are_rows_left_out_and_the_final_newline_is_not_a_row(tmp_path):
    path = write(tmp_path, good("a"), b"", b" \t\r", good("d"))
    prompt_set = load(path)
    assert len(prompt_set.prompts) == 4
    assert reasons(prompt_set) == {"1": "line 2: blank line", "2": "line 3: blank line"}
    assert used(prompt_set) == {"0": "a", "3": "d"}
    # A file without the final newline reads the same; one more newline is one more (blank) row.
    assert used(load(write(tmp_path, good("a"), b"", b" \t\r", good("d"), name="n.jsonl", end=b""))) == {"0": "a", "3": "d"}  # fmt: skip
    assert reasons(load(write(tmp_path, good("a"), name="x.jsonl", end=b"\n\n"))) == {"1": "line 2: blank line"}


def test_ids_are_line_based_and_stable(tmp_path):
    lines = [good(f"p{i}") for i in range(8)]
    lines[1], lines[4] = b"{oops", b""
    path = write(tmp_path, *lines, end=b"\r\n")
    prompt_set = load(path)
    assert [p and p.prompt_id for p in prompt_set.prompts] == ["0", None, "2", "3", None, "5", "6", "7"]
    assert used(prompt_set) == {str(i): f"p{i}" for i in (0, 2, 3, 5, 6, 7)}
    # Every row is counted once, in or out (the generator's prompts_in == prompts_out + len(left_out)).
    assert set(reasons(prompt_set)) == {str(i) for i, p in enumerate(prompt_set.prompts) if p is None}


def test_a_bom_on_the_first_line_is_stripped(tmp_path):
    prompt_set = load(write(tmp_path, b"\xef\xbb\xbf" + good("a"), b"\xef\xbb\xbf" + good("b"), b"[]"))
    assert used(prompt_set) == {"0": "a"}
    assert reasons(prompt_set)["1"].startswith("line 2: not valid JSON: Unexpected UTF-8 BOM")


def test_a_huge_bad_line_gives_a_short_reason(tmp_path):
    huge = 10_000_000
    path = write(
        tmp_path,
        good("a"),
        b'{"messages": "' + b"x" * huge,  # unterminated string
        b'{"messages": "' + b"x" * huge + b'\xff"}',
        b"[" + b"1," * (huge // 2) + b"1]",
        json.dumps({"messages": [{"role": "r" * huge, "content": "hi"}]}).encode(),
        json.dumps({"prompt": "x" * huge}).encode(),
        b"[" * 100_000,
        b'{"n": ' + b"9" * 10_000 + b"}",
    )
    prompt_set = load(path)
    got = reasons(prompt_set)
    assert set(got) == {"1", "2", "3", "4", "5", "6", "7"}
    assert all(len(reason) <= 200 for reason in got.values()), got
    assert got["1"] == "line 2: not valid JSON: Unterminated string starting at column 14"
    assert got["2"] == f"line 3: not UTF-8 (byte 0xff at column {15 + huge})"
    assert got["4"].startswith("line 5: message 0 has role 'rrrr") and got["4"].endswith("'; allowed: system, user, assistant")
    assert got["6"].startswith("line 7: not valid JSON:") and got["7"].startswith("line 8: not valid JSON:")


def test_all_rows_bad_is_an_error_naming_the_file_and_the_field(tmp_path):
    path = write(tmp_path, b"{bad", b"", b'{"messages": "caf\xff"}')
    with pytest.raises(PromptDataError) as caught:
        load(path)
    assert isinstance(caught.value, UsageError) and caught.value.exit_code == 2
    assert str(caught.value) == (
        f"spec.prompts.dataset: {path} has no usable prompt: 3 rows left out (line 1: not valid JSON: Expecting "
        "property name enclosed in double quotes at column 2; line 2: blank line; line 3: not UTF-8 (byte 0xff at "
        "column 18))"
    )


def test_the_no_usable_prompt_error_stays_short(tmp_path):
    path = write(tmp_path, *[json.dumps({"messages": [{"role": "x" * 5000, "content": "hi"}]}).encode()] * 500)
    with pytest.raises(PromptDataError) as caught:
        load_prompt_set(PromptSource(dataset=str(path)), field_path="spec.prompts.perIteration[1]")
    message = str(caught.value)
    assert message.startswith(f"spec.prompts.perIteration[1].dataset: {path} has no usable prompt: 500 rows left out")
    assert message.endswith("; and 497 more)") and len(message) < 500 + len(str(path))


@pytest.mark.parametrize("content", [b"", b"\n"])
def test_an_empty_file_is_an_error(tmp_path, content):
    path = tmp_path / "p.jsonl"
    path.write_bytes(content)
    with pytest.raises(PromptDataError, match="^spec.prompts.dataset: .*p.jsonl has no usable prompt: "):
        load(path)


def test_max_prompts_counts_rows_left_out_too(tmp_path):
    path = write(tmp_path, good("a"), b"{bad", good("c"), good("d"), b"{never read")
    prompt_set = load(path, max_prompts=3)
    assert len(prompt_set.prompts) == 3
    assert used(prompt_set) == {"0": "a", "2": "c"}
    assert set(reasons(prompt_set)) == {"1"}
    assert len(load(path, max_prompts=4).prompts) == 4 and len(load(path, max_prompts=99).prompts) == 5
    with pytest.raises(PromptDataError, match=r"no usable prompt: the first 2 rows \(spec.prompts.maxPrompts\)"):
        load(write(tmp_path, b"", b"{bad", good("c"), name="q.jsonl"), max_prompts=2)


def test_a_field_no_row_has_is_a_messages_field_error(tmp_path):
    path = write(tmp_path, b'{"prompt": "a", "id": 1}', b"{bad", b'{"prompt": "c"}')
    with pytest.raises(PromptDataError) as caught:
        load(path)
    assert str(caught.value) == (
        f"spec.prompts.messagesField: no row of {path} has a field 'messages'; its rows' fields are: prompt, id"
    )
    assert used(load(path, messages_field="prompt")) == {"0": "a", "2": "c"}


def test_parse_jsonl_line_is_pure():
    assert parse_jsonl_line(b'{"messages": "hi"}\n', 3) == {"messages": "hi"}
    assert parse_jsonl_line(b"\xef\xbb\xbf{}", 1) == {}
    assert parse_jsonl_line(b"\n", 9) == "line 9: blank line"
    assert parse_jsonl_line(b'{"a": 1} x', 2) == "line 2: not valid JSON: Extra data at column 10"


# -- through `datasets`: Parquet, save_to_disk folders ------------------------------------------
ROWS = [
    {"messages": [{"role": "user", "content": "a"}]},
    {"messages": [{"role": "robot", "content": "b"}]},
    {"messages": [{"role": "user", "content": ""}]},
    {"messages": [{"role": "user", "content": "d"}]},
]


def test_parquet_rows_are_left_out_by_row_index(tmp_path):
    import datasets

    path = tmp_path / "p.parquet"
    datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    prompt_set = load(path)
    assert reasons(prompt_set) == {"1": f"row 1: {ROBOT}", "2": "row 2: message 0 has empty content"}
    assert used(prompt_set) == {"0": "a", "3": "d"}
    assert used(load(path, max_prompts=2)) == {"0": "a"}


def test_a_saved_dataset_with_no_usable_row_is_an_error(tmp_path):
    import datasets

    folder = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS[1:3]).save_to_disk(str(folder))
    with pytest.raises(PromptDataError) as caught:
        load(folder)
    assert str(caught.value) == (
        f"spec.prompts.dataset: {folder} has no usable prompt: 2 rows left out (row 0: {ROBOT}; "
        "row 1: message 0 has empty content)"
    )


def test_a_file_datasets_cannot_read_is_a_short_one_line_error(tmp_path, monkeypatch):
    import datasets

    def fail(*args, **kwargs):
        raise ValueError("An error occurred while generating the dataset\n" + "the row was: " + "x" * 50_000)

    monkeypatch.setattr(datasets, "load_dataset", fail)
    path = tmp_path / "p.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(PromptDataError) as caught:
        load(path)
    message = str(caught.value)
    assert message.startswith(f"spec.prompts.dataset: cannot load '{path}' (split 'train'): An error occurred while "
                              "generating the dataset the row was: xxx")  # fmt: skip
    assert message.endswith("...") and len(message) <= 200 + 60 + len(str(path)) and "\n" not in message


def test_a_json_array_file_goes_through_datasets_and_leaves_out_by_row(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(ROWS))
    assert reasons(load(path)) == {"1": f"row 1: {ROBOT}", "2": "row 2: message 0 has empty content"}


# --- gold answers (spec.prompts.answerField, for reward kind verifiable) ---------------------------


def _with_answer(text: str, answer) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": text}], "answer": answer}).encode()


def test_gold_answers_are_read_and_a_row_without_a_usable_one_is_left_out(tmp_path):
    from iterdpo.spec import RoundPromptSource

    path = write(tmp_path, _with_answer("1+1", "2"), _with_answer("2+2", 4), good("no answer"), _with_answer("x", ""),
                 _with_answer("y", [1]), _with_answer("z", True))  # fmt: skip
    prompt_set = load_prompt_set(RoundPromptSource(dataset=str(path), answer_field="answer"))
    assert [(p.prompt_id, p.answer) for p in prompt_set.prompts if p] == [("0", "2"), ("1", "4")]
    assert reasons(prompt_set) == {
        "2": "line 3: no 'answer' field (answerField)",
        "3": "line 4: the answer ('answer') is empty",
        "4": "line 5: the answer ('answer') is not a string or a number (got array)",
        "5": "line 6: the answer ('answer') is not a string or a number (got boolean)",
    }
    assert all(p.answer is None for p in load(path).prompts if p)  # no answerField: no answers


def test_an_answer_field_no_row_has_is_an_error_naming_it(tmp_path):
    from iterdpo.spec import RoundPromptSource

    path = write(tmp_path, good("a"), good("b"))
    with pytest.raises(PromptDataError, match=r"^spec.prompts.answerField: no row of .* has a field 'solution'"):
        load_prompt_set(RoundPromptSource(dataset=str(path), answer_field="solution"))
    import datasets

    parquet = tmp_path / "p.parquet"
    datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "a"}]}]).to_parquet(str(parquet))
    with pytest.raises(PromptDataError, match=r"^spec.prompts.answerField: the dataset has no field 'solution'"):
        load_prompt_set(RoundPromptSource(dataset=str(parquet), answer_field="solution"))
