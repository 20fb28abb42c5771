"""Load a round's prompt set as chat messages, counting every row in and out.

A row whose prompt field is malformed is left out with its reason, never
dropped silently; a dataset that lacks the field altogether is an error
(otherwise a typo in `messagesField` would leave out everything).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from iterdpo.contracts import LeftOut
from iterdpo.errors import UsageError
from iterdpo.spec import PromptSource

ROLES = ("system", "user", "assistant")
_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}


@dataclass(frozen=True)
class Prompt:
    prompt_id: str
    messages: list[dict]


@dataclass(frozen=True)
class PromptSet:
    prompts: list[Prompt | None]  # None where the row was left out (same index as the row)
    left_out: list[LeftOut]


class PromptDataError(UsageError):
    """The prompt data the run file names cannot be read as prompts (exit 2)."""


def load_prompt_set(source: PromptSource, *, field_path: str = "spec.prompts") -> PromptSet:
    rows = _read_rows(source, field_path)
    prompts: list[Prompt | None] = []
    left_out = []
    for index, row in enumerate(rows):
        prompt_id = str(index)
        messages, reason = to_messages(row.get(source.messages_field))
        if reason:
            prompts.append(None)
            left_out.append(LeftOut(prompt_id=prompt_id, reason=reason))
        else:
            prompts.append(Prompt(prompt_id, messages))
    return PromptSet(prompts, left_out)


def to_messages(value: object) -> tuple[list[dict], str | None]:
    """Normalise a row's prompt into messages, or say why it cannot be used."""
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        return [], f"prompt is not a non-empty list of messages or a string (got {type(value).__name__})"
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            return [], f"message {i} has no string 'content'"
        if message.get("role") not in ROLES:
            return [], f"message {i} has role {message.get('role')!r}; allowed: {', '.join(ROLES)}"
        messages.append({"role": message["role"], "content": message["content"]})
    if messages[-1]["role"] == "assistant":
        return [], "the last message is the assistant's: nothing to respond to"
    return messages, None


def _read_rows(source: PromptSource, field_path: str) -> list[dict]:
    import datasets

    datasets.disable_progress_bars()
    location = source.dataset
    path = Path(location)
    try:
        if path.is_absolute() or path.exists():
            if not path.exists():
                raise PromptDataError(f"{field_path}.dataset: {location} does not exist")
            if path.is_dir() and (path / "dataset_info.json").exists():
                loaded = datasets.load_from_disk(str(path))
                if isinstance(loaded, datasets.DatasetDict):
                    loaded = loaded[source.split]
            else:
                fmt = _FORMATS.get(path.suffix) if path.is_file() else None
                if path.is_file() and fmt is None:
                    raise PromptDataError(
                        f"{field_path}.dataset: unknown file type {path.suffix!r}; allowed: "
                        f"{', '.join(_FORMATS)} (or a folder saved with datasets)"
                    )
                loaded = (
                    datasets.load_dataset(fmt, data_files={source.split: str(path)}, split=source.split)
                    if fmt
                    else datasets.load_dataset(str(path), split=source.split)
                )
        else:
            loaded = datasets.load_dataset(location, split=source.split)
    except PromptDataError:
        raise
    except Exception as exc:  # datasets raises many types; the user needs the message
        raise PromptDataError(f"{field_path}.dataset: cannot load {location!r} (split {source.split!r}): {exc}") from None
    if source.messages_field not in loaded.column_names:
        raise PromptDataError(
            f"{field_path}.messagesField: the dataset has no field {source.messages_field!r}; "
            f"its fields are: {', '.join(loaded.column_names)}"
        )
    if source.max_prompts is not None:
        loaded = loaded.select(range(min(source.max_prompts, len(loaded))))
    return loaded.to_list()
