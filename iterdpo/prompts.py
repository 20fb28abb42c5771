"""Load a round's prompt set as chat messages, counting every row in and out.

A row that cannot be a prompt (a JSONL line that is blank, not UTF-8, not JSON or
not an object; a prompt field that is missing, malformed or empty) is left out
with its row number and the reason, never dropped silently: one bad line in a
large file costs one prompt, not the run. Row ids are stable (JSONL line n is
row n - 1, whatever the lines around it), so a left-out row never shifts the
others' ids, seeds or shards. Two cases are errors instead: a dataset in which
no row has `messagesField` at all (a typo must not leave out everything), and
one with no usable prompt.
"""

from __future__ import annotations

import json
import reprlib
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import NoReturn

from iterdpo.contracts import LeftOut
from iterdpo.errors import UsageError
from iterdpo.spec import PromptSource, RoundPromptSource

ROLES = ("system", "user", "assistant")
_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
REASON_CHARS = 200  # a reason never echoes a whole row, however large
_SHOWN = 3  # reasons quoted in the "no usable prompt" error
_BOM = b"\xef\xbb\xbf"
_REPR = reprlib.Repr()  # bounded, even for a 10 MB value
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 2, 36, 36, 36
_JSON_KINDS = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}

Row = tuple[str, dict | str]  # (where: "line 7" / "row 6", the row's object or why it has none)


@dataclass(frozen=True)
class Prompt:
    prompt_id: str
    messages: list[dict]
    answer: str | None = None  # the gold answer (answerField), for rule rewards


@dataclass(frozen=True)
class PromptSet:
    prompts: list[Prompt | None]  # indexed by row id; None where the row was left out
    left_out: list[LeftOut]


class PromptDataError(UsageError):
    """The prompt data the run file names cannot be read as prompts (exit 2)."""


def load_prompt_set(source: PromptSource, *, field_path: str = "spec.prompts", conversations: bool = False) -> PromptSet:
    field = source.messages_field
    answer_field = source.answer_field if isinstance(source, RoundPromptSource) else None
    prompts: list[Prompt | None] = []
    left_out: list[LeftOut] = []
    has_object = has_field = has_answer = False
    fields_seen: dict[str, None] = {}  # a few, for the messagesField and answerField errors
    for index, (where, row) in enumerate(_read_rows(source, field_path)):
        messages, answer, reason = [], None, None
        if isinstance(row, str):
            reason = row
        else:
            has_object = True
            has_answer = has_answer or (answer_field is not None and answer_field in row)
            if len(fields_seen) < 20:
                fields_seen.update(dict.fromkeys(islice(row, 20)))
            if field not in row:
                reason = f"{where}: no {_quote(field)} field"
            else:
                has_field = True
                messages, why = to_messages(row[field], conversation=conversations)
                if not why and answer_field is not None:
                    answer, why = to_answer(row, answer_field)
                reason = why and f"{where}: {why}"
        if reason:
            prompts.append(None)
            left_out.append(LeftOut(prompt_id=str(index), reason=_clip(reason)))
        else:
            prompts.append(Prompt(str(index), messages, answer))
    if has_object and not has_field:
        raise PromptDataError(
            f"{field_path}.messagesField: no row of {source.dataset} has a field {_quote(field)}; "
            f"its rows' fields are: {_names(fields_seen)}"
        )
    if answer_field is not None and has_object and not has_answer:
        raise PromptDataError(
            f"{field_path}.answerField: no row of {source.dataset} has a field {_quote(answer_field)}; "
            f"its rows' fields are: {_names(fields_seen)}"
        )
    if len(left_out) == len(prompts):
        why = _none_usable(source, left_out, field_path)
        raise PromptDataError(f"{field_path}.dataset: {source.dataset} has no usable prompt: {why}")
    return PromptSet(prompts, left_out)


def to_answer(row: dict, field: str) -> tuple[str | None, str | None]:
    """A row's gold answer as text, or why it has none usable (a string or a number)."""
    if field not in row:
        return None, f"no {_quote(field)} field (answerField)"
    value = row[field]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return None, f"the answer ({_quote(field)}) is not a string or a number (got {_kind(value)})"
    text = str(value).strip()
    if not text:
        return None, f"the answer ({_quote(field)}) is empty"
    return text, None


def parse_jsonl_line(line: bytes, line_no: int) -> dict | str:
    """Line `line_no` (1-based) of a JSONL file as a JSON object, or why it is not one."""
    where = f"line {line_no}"
    line = line.rstrip(b"\r\n")  # the line's end is not part of its JSON
    if line_no == 1:
        line = line.removeprefix(_BOM)  # utf-8-sig, as editors on Windows write it
    if not line or line.isspace():
        return f"{where}: blank line"
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"{where}: not UTF-8 (byte 0x{line[exc.start]:02x} at column {exc.start + 1})"
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        return f"{where}: not valid JSON: {_clip(exc.msg.removesuffix(' at'), 80)} at column {exc.colno}"
    except _Constant as exc:
        return f"{where}: not valid JSON: {exc} is not allowed"
    except (ValueError, RecursionError) as exc:  # e.g. an integer of 5000 digits, nesting too deep
        return f"{where}: not valid JSON: {_clip(str(exc) or type(exc).__name__, 80)}"
    if not isinstance(value, dict):
        return f"{where}: not a JSON object (got {_kind(value)})"
    return value


def to_messages(value: object, *, conversation: bool = False) -> tuple[list[dict], str | None]:
    """Normalise a row's prompt into messages, or say why it cannot be used. A whole
    `conversation` (SFT data) is a list of messages that may end with the assistant's turn."""
    if conversation and not isinstance(value, list):
        return [], f"a conversation is a non-empty list of messages (got {_kind(value)})"
    if isinstance(value, str):
        if not value.strip():
            return [], "prompt is an empty string"
        value = [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        return [], f"prompt is not a non-empty list of messages or a string (got {_kind(value)})"
    messages = []
    for i, message in enumerate(value):
        if why := message_problem(message, i):
            return [], why
        messages.append({"role": message["role"], "content": message["content"]})
    if messages[-1]["role"] == "assistant" and not conversation:
        return [], "the last message is the assistant's: nothing to respond to"
    return messages, None


def message_problem(message: object, index: int) -> str | None:
    """Why `message` (number `index` of its list) is not a {role, content} chat message; None if it is one."""
    if not isinstance(message, dict) or not isinstance(message.get("content"), str):
        return f"message {index} has no string 'content'"
    if not message["content"].strip():
        return f"message {index} has empty content"
    if message.get("role") not in ROLES:
        return f"message {index} has role {_quote(message.get('role'))}; allowed: {', '.join(ROLES)}"
    return None


def read_rows(
    location: str,
    *,
    split: str,
    limit: int | None = None,
    field_path: str,
    error: type[UsageError] = PromptDataError,
) -> tuple[list[str] | None, Iterator[Row]]:
    """The first `limit` rows (all when None) of a dataset, with its column names (None for JSONL).

    JSONL is streamed line by line (a bad line is one row, its reason naming the line);
    anything else (JSON, Parquet, Arrow, a saved folder, a hub id) goes through `datasets`,
    imported only then. Problems with the dataset as a whole raise `error` naming
    `{field_path}.dataset`. Shared by the prompt sets and the preference data.
    """
    path = Path(location)
    if path.is_absolute() or path.exists():
        if not path.exists():
            raise error(f"{field_path}.dataset: {location} does not exist")
        if path.is_file() and path.suffix not in _FORMATS:
            raise error(
                f"{field_path}.dataset: unknown file type {_quote(path.suffix)}; allowed: "
                f"{', '.join(_FORMATS)} (or a folder saved with datasets)"
            )
        if path.is_file() and path.suffix == ".jsonl":
            return None, _jsonl_rows(path, limit, field_path, error)
    loaded = _load_dataset(location, split, field_path, error)
    return list(loaded.column_names), _dataset_rows(loaded, limit)


def _read_rows(source: PromptSource, field_path: str) -> Iterator[Row]:
    """The first `maxPrompts` rows (all when unset): JSONL line by line, anything else through `datasets`."""
    columns, rows = read_rows(source.dataset, split=source.split, limit=source.max_prompts, field_path=field_path)
    if columns is not None and source.messages_field not in columns:
        raise PromptDataError(
            f"{field_path}.messagesField: the dataset has no field {_quote(source.messages_field)}; "
            f"its fields are: {_names(columns)}"
        )
    answer_field = source.answer_field if isinstance(source, RoundPromptSource) else None
    if columns is not None and answer_field is not None and answer_field not in columns:
        raise PromptDataError(
            f"{field_path}.answerField: the dataset has no field {_quote(answer_field)}; its fields are: {_names(columns)}"
        )
    return rows


def _jsonl_rows(path: Path, limit: int | None, field_path: str, error: type[UsageError]) -> Iterator[Row]:
    """Stream the file: memory stays bounded by its largest line, and a bad line costs one row."""
    try:
        with open(path, "rb") as lines:
            for line_no, line in enumerate(islice(lines, limit), 1):
                yield f"line {line_no}", parse_jsonl_line(line, line_no)
    except OSError as exc:
        raise error(f"{field_path}.dataset: cannot read {path}: {exc.strerror or exc}") from None


def _load_dataset(location: str, split: str, field_path: str, error: type[UsageError]):
    import datasets

    datasets.disable_progress_bars()
    path = Path(location)
    try:
        if path.is_dir() and (path / "dataset_info.json").exists():
            loaded = datasets.load_from_disk(str(path))
            return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        if path.is_file():
            return datasets.load_dataset(_FORMATS[path.suffix], data_files={split: str(path)}, split=split)
        return datasets.load_dataset(str(path) if path.exists() else location, split=split)
    except Exception as exc:  # datasets raises many types; the user needs the gist, not a page of it
        raise error(
            f"{field_path}.dataset: cannot load {location!r} (split {split!r}): "
            f"{_clip(str(exc) or type(exc).__name__)}"
        ) from None


def _dataset_rows(loaded, limit: int | None) -> Iterator[Row]:
    """A loaded dataset's rows; a shape problem is left out by its 0-based row index (= its id)."""
    loaded = loaded.with_format(None)  # plain Python values, whatever format it was saved with
    if limit is not None:
        loaded = loaded.select(range(min(limit, len(loaded))))
    index = 0
    for batch in loaded.iter(batch_size=1024):
        for values in zip(*batch.values()):
            yield f"row {index}", dict(zip(batch, values))
            index += 1


def _none_usable(source: PromptSource, left_out: list[LeftOut], field_path: str) -> str:
    if not left_out:
        return "it has no rows"
    rows = f"{len(left_out)} row{'s' if len(left_out) != 1 else ''}"
    if source.max_prompts is not None and len(left_out) == source.max_prompts:
        rows = f"the first {rows} ({field_path}.maxPrompts)"
    shown = [_clip(item.reason, 100) for item in left_out[:_SHOWN]]
    more = f"; and {len(left_out) - _SHOWN} more" if len(left_out) > _SHOWN else ""
    return f"{rows} left out ({'; '.join(shown)}{more})"


class _Constant(ValueError):
    pass


def _refuse_constant(name: str) -> NoReturn:
    raise _Constant(name)  # NaN, Infinity, -Infinity: not JSON, and never a prompt


def json_kind(value: object) -> str:
    """The JSON name of a value's type ("object", "string", "null", ...), for reasons."""
    return _kind(value)


def quoted(value: object, limit: int = 40) -> str:
    """A bounded repr of `value`, however large, for reasons."""
    return _quote(value, limit)


def clipped(text: str, limit: int = REASON_CHARS) -> str:
    """`text` on one line and at most `limit` characters: a reason never echoes a whole row."""
    return _clip(text, limit)


def field_names(names) -> str:
    """At most ten names, each clipped, for an error listing a dataset's fields."""
    return _names(names)


def _kind(value: object) -> str:
    return "null" if value is None else _JSON_KINDS.get(type(value), type(value).__name__)


def _quote(value: object, limit: int = 40) -> str:
    return _clip(_REPR.repr(value), limit)


def _names(names) -> str:
    names = list(names)
    if not names:
        return "(none)"
    more = f", ... ({len(names)} in all)" if len(names) > 10 else ""
    return ", ".join(_clip(str(n), 40) for n in names[:10]) + more


def _clip(text: str, limit: int = REASON_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
