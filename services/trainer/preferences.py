"""Read preference data (for reward-model training) into typed pairs, counting every row.

Two formats, decided once per dataset (`format="auto"`) or given:
- "implicit" (the report's, e.g. hendrydong/preference_700K): `chosen` and `rejected` are
  full conversations `[{role, content}, ...]` that share every turn but the last, which is
  the assistant's in both. The shared turns are the prompt.
- "explicit" (TRL's preference format): `prompt` + `chosen` + `rejected`, each a string or a
  message list; a string prompt is one user message, a string completion one assistant
  message, and a completion holds assistant turns only.
"auto" reads the first row that is a JSON object: with a (non-null) prompt field it is
explicit, unless its `chosen` is a conversation that starts with a user or system turn (then
the prompt field only repeats it, as in ultrafeedback_binarized, and is not read); without
one it is implicit. An optional numeric margin field (TRL's `margin`): the default name is read
when that first row has it, a name set by hand must be there; margins are all or none: a row
that disagrees is left out, never guessed.

As in `iterdpo.prompts` (whose row reader this shares), a row that cannot be a pair is left
out with its row id (0-based, stable: JSONL line n is row n - 1) and a short reason that starts
with where it is ("line 18: ..." for JSONL, "row 17: ..." otherwise), never dropped silently;
`Read.rows_in == pairs_out + len(left_out)`. Errors instead (exit 2, naming the field): a
dataset whose rows never have the chosen or rejected field (a typo must not leave out
everything), and one with no usable pair. JSONL is streamed: `PreferenceReader` yields pair by
pair, holding one line at a time.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

from iterdpo.errors import UsageError
from iterdpo.prompts import clipped, field_names, json_kind, message_problem, quoted, read_rows
from iterdpo.spec import PromptSource

FORMATS = ("auto", "implicit", "explicit")
DEFAULT_MARGIN_FIELD = "margin"
DEFAULT_SPLIT = PromptSource.model_fields["split"].default  # the split a prompt set reads by default
FIELD_PATH = "spec.reward.training.data"  # where these settings are expected to live in the run file
_SHOWN = 3  # reasons quoted in the "no usable pair" error
_NAME_CHARS = 40  # a configured field name, as it appears in a reason


class PreferenceDataError(UsageError):
    """The preference data cannot be read as pairs at all (exit 2); the message names the field."""


@dataclass(frozen=True)
class PreferenceSource:
    """Where the pairs are and how their rows are laid out (field names are the columns)."""

    dataset: str  # a local .jsonl/.json/.parquet/.arrow file, a folder, or a hub id
    split: str = DEFAULT_SPLIT
    format: str = "auto"  # one of FORMATS
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    prompt_field: str = "prompt"  # read in the explicit format only
    margin_field: str | None = DEFAULT_MARGIN_FIELD  # None: never read a margin
    max_rows: int | None = None  # only the first N rows (ids 0..N-1), rows left out included

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"format: {quoted(self.format)} is not one of {', '.join(FORMATS)}")
        if self.max_rows is not None and self.max_rows < 1:
            raise ValueError(f"maxRows: must be at least 1 (got {self.max_rows})")
        names = {"chosenField": self.chosen_field, "rejectedField": self.rejected_field,
                 "promptField": self.prompt_field, "marginField": self.margin_field}  # fmt: skip
        for name, value in names.items():
            if value is not None and not value:
                raise ValueError(f"{name}: must not be empty")
        used = [v for v in names.values() if v is not None]
        if len(set(used)) != len(used):
            raise ValueError(f"chosenField, rejectedField, promptField and marginField must differ (got {used})")


@dataclass(frozen=True)
class Message:
    role: str  # one of iterdpo.prompts.ROLES
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class PreferencePair:
    """One usable pair: the shared prompt turns, then each side's assistant turn(s)."""

    row: int  # 0-based row id in the dataset
    prompt: tuple[Message, ...]
    chosen: tuple[Message, ...]  # assistant turn(s) only
    rejected: tuple[Message, ...]
    margin: float | None = None

    def chosen_messages(self) -> list[dict[str, str]]:
        """The whole chosen conversation, as a chat template takes it."""
        return [m.as_dict() for m in (*self.prompt, *self.chosen)]

    def rejected_messages(self) -> list[dict[str, str]]:
        return [m.as_dict() for m in (*self.prompt, *self.rejected)]


@dataclass(frozen=True)
class LeftOutRow:
    row: int  # 0-based row id
    reason: str  # starts with where: "line 18: ..." (JSONL) or "row 17: ..."


@dataclass(frozen=True)
class Read:
    """All of a dataset's pairs; every row read is in `pairs` or in `left_out`."""

    pairs: list[PreferencePair]
    left_out: list[LeftOutRow]
    rows_in: int  # rows read (counted as read, not derived from the two lists)
    format: str  # "implicit" or "explicit": what "auto" decided
    margins: bool  # whether every pair carries a margin

    @property
    def pairs_out(self) -> int:
        return len(self.pairs)


_Turns = tuple[tuple[Message, ...], tuple[Message, ...], tuple[Message, ...]]  # prompt, chosen, rejected


@dataclass
class _Seen:
    objects: int = 0
    chosen: int = 0
    rejected: int = 0
    prompt: int = 0
    margin: int = 0
    fields: dict[str, None] = field(default_factory=dict)  # a few, for the field error


class PreferenceReader:
    """Iterate a dataset's rows as `PreferencePair | LeftOutRow`, one row at a time.

    `format` and `margins` are settled by the first row that is an object (or given);
    `rows_in` counts rows as they are read. At the end of the iteration a dataset whose
    rows never had the chosen or rejected field raises `PreferenceDataError`.
    """

    def __init__(self, source: PreferenceSource, *, field_path: str = FIELD_PATH):
        self.source = source
        self.field_path = field_path
        self.format: str | None = None if source.format == "auto" else source.format
        # The default margin field is read when the first row has it; one named by hand must be there.
        margin = source.margin_field
        self.margins: bool | None = None if margin == DEFAULT_MARGIN_FIELD else margin is not None
        self.shape_row: str | None = None  # "line 1" / "row 0": where format and margins were read
        self.rows_in = 0

    def __iter__(self) -> Iterator[PreferencePair | LeftOutRow]:
        source = self.source
        self.rows_in = 0
        columns, rows = read_rows(
            source.dataset, split=source.split, limit=source.max_rows, field_path=self.field_path,
            error=PreferenceDataError,
        )  # fmt: skip
        if columns is not None:
            self._check_columns(columns)
        seen = _Seen()
        for index, (where, row) in enumerate(rows):
            self.rows_in += 1
            if isinstance(row, str):
                yield LeftOutRow(index, clipped(row))
                continue
            self._note(row, seen)
            if self.format is None or self.margins is None:
                self._settle(row, where)
            pair, why = self._pair(index, row)
            yield pair if pair is not None else LeftOutRow(index, clipped(f"{where}: {why}"))
        self._check_seen(seen)

    # -- the dataset as a whole ------------------------------------------------------------
    def _check_columns(self, columns: list[str]) -> None:
        """A loaded dataset's columns: a missing field is a typo until proven otherwise."""
        s = self.source
        wanted = [("chosenField", s.chosen_field), ("rejectedField", s.rejected_field)]
        if s.format == "explicit":
            wanted.append(("promptField", s.prompt_field))
        if s.margin_field not in (None, DEFAULT_MARGIN_FIELD):
            wanted.append(("marginField", s.margin_field))  # set by hand: it must exist
        for name, column in wanted:
            if column not in columns:
                raise PreferenceDataError(
                    f"{self.field_path}.{name}: the dataset has no field {quoted(column)}; "
                    f"its fields are: {field_names(columns)}"
                )

    def _note(self, row: dict, seen: _Seen) -> None:
        s = self.source
        seen.objects += 1
        seen.chosen += s.chosen_field in row
        seen.rejected += s.rejected_field in row
        seen.prompt += s.prompt_field in row
        seen.margin += s.margin_field is not None and s.margin_field in row
        if len(seen.fields) < 20:
            seen.fields.update(dict.fromkeys(list(row)[:20]))

    def _check_seen(self, seen: _Seen) -> None:
        if not seen.objects:
            return
        s = self.source
        missing = [("chosenField", s.chosen_field, seen.chosen), ("rejectedField", s.rejected_field, seen.rejected)]
        if s.format == "explicit":
            missing.append(("promptField", s.prompt_field, seen.prompt))
        if s.margin_field not in (None, DEFAULT_MARGIN_FIELD):
            missing.append(("marginField", s.margin_field, seen.margin))
        for name, column, count in missing:
            if not count:
                raise PreferenceDataError(
                    f"{self.field_path}.{name}: no row of {s.dataset} has a field {quoted(column)}; "
                    f"its rows' fields are: {field_names(seen.fields)}"
                )

    def _settle(self, row: dict, where: str) -> None:
        """Format and margins, from the first object row (a loaded dataset's rows all have the same keys)."""
        s = self.source
        self.shape_row = where
        if self.format is None:
            self.format = "explicit" if _has_explicit_prompt(row, s) else "implicit"
        if self.margins is None:
            self.margins = s.margin_field in row

    # -- one row -----------------------------------------------------------------------------
    def _pair(self, index: int, row: dict) -> tuple[PreferencePair | None, str | None]:
        s = self.source
        for column in (s.chosen_field, s.rejected_field):
            if column not in row:
                return None, f"no {quoted(column)} field"
        turns = self._explicit(row) if self.format == "explicit" else self._implicit(row)
        if isinstance(turns, str):
            return None, turns
        prompt, chosen, rejected = turns
        if chosen == rejected:
            return None, f"{_name(s.chosen_field)} and {_name(s.rejected_field)} are identical"
        margin, why = self._margin(row)
        if why:
            return None, why
        return PreferencePair(index, prompt, chosen, rejected, margin), None

    def _explicit(self, row: dict) -> _Turns | str:
        """prompt + completions; a string prompt is a user turn, a string completion an assistant turn."""
        s = self.source
        if s.prompt_field not in row:
            return f"no {quoted(s.prompt_field)} field"
        prompt, why = _messages(row[s.prompt_field], _name(s.prompt_field), string_role="user")
        if why:
            return why
        if prompt[-1].role == "assistant":
            return f"{_name(s.prompt_field)} ends with an assistant turn: nothing to respond to"
        sides = []
        for column in (s.chosen_field, s.rejected_field):
            completion, why = _messages(row[column], _name(column), string_role="assistant")
            if why:
                return why
            other = next((i for i, m in enumerate(completion) if m.role != "assistant"), None)
            if other is not None:
                role = quoted(completion[other].role)
                return f"{_name(column)} message {other} has role {role}: a completion holds assistant turns only"
            sides.append(completion)
        return prompt, sides[0], sides[1]

    def _implicit(self, row: dict) -> _Turns | str:
        """Two whole conversations: the turns they share are the prompt, each last turn a completion."""
        s = self.source
        c, r = _name(s.chosen_field), _name(s.rejected_field)
        chosen, why = _messages(row[s.chosen_field], c, string_role=None)
        if why:
            return why
        rejected, why = _messages(row[s.rejected_field], r, string_role=None)
        if why:
            return why
        for name, messages in ((c, chosen), (r, rejected)):
            if messages[-1].role != "assistant":
                return f"{name}'s last turn is not the assistant's (role {quoted(messages[-1].role)})"
        if chosen[:-1] != rejected[:-1]:
            turn = next((i for i, (a, b) in enumerate(zip(chosen[:-1], rejected[:-1])) if a != b), None)
            at = f"turn {turn}" if turn is not None else f"{len(chosen) - 1} turns vs {len(rejected) - 1}"
            return f"{c} and {r} differ before their last turn ({at})"
        prompt = chosen[:-1]
        if not prompt:
            return f"no prompt: {c} and {r} hold only their last turn"
        if prompt[-1].role == "assistant":
            return f"the turn before the last is the assistant's: nothing for {c} and {r} to respond to"
        return prompt, chosen[-1:], rejected[-1:]

    def _margin(self, row: dict) -> tuple[float | None, str | None]:
        name = self.source.margin_field
        if not self.margins:
            if name is not None and row.get(name) is not None:
                return None, f"has a {quoted(name)} field, which {self.shape_row} has not: margins are all or none"
            return None, None
        if name not in row:
            if name == DEFAULT_MARGIN_FIELD:
                return None, f"no {quoted(name)} field, which {self.shape_row} has: margins are all or none"
            return None, f"no {quoted(name)} field"
        value = row[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None, f"{_name(name)} is not a finite number (got {json_kind(value)})"
        try:
            number = float(value)
        except OverflowError:  # an integer of 400 digits is valid JSON
            return None, f"{_name(name)} is not a finite number (got an integer too large for a float)"
        if not math.isfinite(number):  # NaN and infinities (Parquet holds them; JSONL lines refuse them)
            return None, f"{_name(name)} is not a finite number (got {number})"
        return number, None


def read_preferences(source: PreferenceSource, *, field_path: str = FIELD_PATH) -> Read:
    """Every row of the dataset, as pairs or left out; an error when no row is a usable pair."""
    reader = PreferenceReader(source, field_path=field_path)
    pairs: list[PreferencePair] = []
    left_out: list[LeftOutRow] = []
    for item in reader:
        (pairs if isinstance(item, PreferencePair) else left_out).append(item)
    if not pairs:
        why = _none_usable(left_out)
        raise PreferenceDataError(f"{field_path}.dataset: {source.dataset} has no usable pair: {why}")
    return Read(pairs, left_out, reader.rows_in, reader.format or "implicit", bool(reader.margins))


def _has_explicit_prompt(row: dict, source: PreferenceSource) -> bool:
    """A prompt field is read unless `chosen` already holds the whole conversation."""
    if row.get(source.prompt_field) is None:
        return False
    chosen = row.get(source.chosen_field)
    first = chosen[0] if isinstance(chosen, list) and chosen else None
    return not (isinstance(first, dict) and first.get("role") in ("system", "user"))


def _messages(value: object, name: str, *, string_role: str | None) -> tuple[tuple[Message, ...], str | None]:
    """A field as messages (a string is one `string_role` message where allowed), or why not."""
    if isinstance(value, str) and string_role is not None:
        if not value.strip():
            return (), f"{name} is empty"
        return (Message(string_role, value),), None
    if isinstance(value, str):
        return (), f"{name} is a string: without a prompt field it must be a list of messages"
    if not isinstance(value, list):
        wanted = "a string or a list of messages" if string_role else "a list of messages"
        return (), f"{name} is not {wanted} (got {json_kind(value)})"
    if not value:
        return (), f"{name} is empty"
    messages = []
    for i, message in enumerate(value):
        if why := message_problem(message, i):
            if i == len(value) - 1 and _empty_reply(message):
                return (), f"{name} is empty (its last turn, the assistant's, has no content)"
            return (), f"{name} {why}"
        messages.append(Message(message["role"], message["content"]))
    return tuple(messages), None


def _empty_reply(message: object) -> bool:
    if not isinstance(message, dict) or message.get("role") != "assistant":
        return False
    content = message.get("content")
    return isinstance(content, str) and not content.strip()


def _name(column: str) -> str:
    return clipped(column, _NAME_CHARS)


def _none_usable(left_out: list[LeftOutRow]) -> str:
    if not left_out:
        return "it has no rows"
    rows = f"{len(left_out)} row{'s' if len(left_out) != 1 else ''}"
    shown = [clipped(item.reason, 100) for item in left_out[:_SHOWN]]
    more = f"; and {len(left_out) - _SHOWN} more" if len(left_out) > _SHOWN else ""
    return f"{rows} left out ({'; '.join(shown)}{more})"
