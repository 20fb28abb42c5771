"""Read one round's generation shards, trusting nothing the markers do not vouch for.

A shard counts only with its success marker; its line count must equal the
marker's `prompts_out`, and the marker's own counts must add up
(prompts_in == prompts_out + len(left_out)), so that every prompt the
generator was given is accounted for downstream and none is dropped silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from iterdpo.layout import RunLayout


class AnnotateError(RuntimeError):
    """The Score stage cannot go on; the message says why and where."""


@dataclass(frozen=True)
class Generated:
    prompt_id: str
    prompt: list[dict]
    responses: list[str]


@dataclass(frozen=True)
class RoundGenerations:
    records: list[Generated]  # shard order, then line order
    prompts_in: int  # prompts the generator was given (all shards)
    left_out: list[dict]  # {prompt_id, reason} the generator left out


def read_round(layout: RunLayout, iteration: int, shards: int) -> RoundGenerations:
    records: list[Generated] = []
    left_out: list[dict] = []
    prompts_in = 0
    seen: dict[str, str] = {}
    for index in range(shards):
        name = f"generation shard {index + 1} of {shards} of round {iteration}"
        marker_path = layout.shard_marker(iteration, index, shards)
        if not marker_path.is_file():
            raise AnnotateError(
                f"{name} has no success marker ({marker_path}): the Generate stage did not finish"
            )
        marker = _read_marker(marker_path, name)
        shard_path = layout.shard_file(iteration, index, shards)
        if not shard_path.is_file():
            raise AnnotateError(f"{name} has a success marker but no output file ({shard_path})")
        shard_records = [_parse_line(shard_path, n, line) for n, line in _lines(shard_path)]
        if len(shard_records) != marker["prompts_out"]:
            raise AnnotateError(
                f"{name}: {shard_path} has {len(shard_records)} prompts but its marker says "
                f"prompts_out={marker['prompts_out']}"
            )
        for record in shard_records:
            if record.prompt_id in seen:
                raise AnnotateError(f"prompt {record.prompt_id!r} appears twice ({seen[record.prompt_id]} and {name})")
            seen[record.prompt_id] = name
        records.extend(shard_records)
        left_out.extend(marker["left_out"])
        prompts_in += marker["prompts_in"]
    return RoundGenerations(records, prompts_in, left_out)


def _read_marker(path: Path, name: str) -> dict:
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AnnotateError(f"{name}: cannot read its marker {path}: {exc}") from None
    problems = [f"{k} must be a non-negative integer" for k in ("prompts_in", "prompts_out")
                if not (isinstance(marker.get(k), int) and marker[k] >= 0)]
    left_out = marker.get("left_out", [])
    if not isinstance(left_out, list) or not all(
        isinstance(e, dict) and isinstance(e.get("prompt_id"), str) and isinstance(e.get("reason"), str)
        for e in left_out
    ):
        problems.append("left_out must be a list of {prompt_id, reason}")
    if problems:
        raise AnnotateError(f"{name}: marker {path} is malformed: {'; '.join(problems)}")
    if marker["prompts_in"] != marker["prompts_out"] + len(left_out):
        raise AnnotateError(
            f"{name}: marker {path} does not add up: prompts_in={marker['prompts_in']} but "
            f"prompts_out={marker['prompts_out']} + left_out={len(left_out)}"
        )
    return {"prompts_in": marker["prompts_in"], "prompts_out": marker["prompts_out"],
            "left_out": [{"prompt_id": e["prompt_id"], "reason": e["reason"]} for e in left_out]}


def _lines(path: Path):
    with open(path) as fh:
        for n, line in enumerate(fh, start=1):
            if line.strip():
                yield n, line


def _parse_line(path: Path, n: int, line: str) -> Generated:
    where = f"{path}:{n}"
    try:
        row = json.loads(line)
    except ValueError as exc:
        raise AnnotateError(f"{where} is not JSON: {exc}") from None
    if not isinstance(row, dict):
        raise AnnotateError(f"{where}: expected an object")
    prompt_id, prompt, responses = row.get("prompt_id"), row.get("prompt"), row.get("responses")
    if not isinstance(prompt_id, str) or not prompt_id:
        raise AnnotateError(f"{where}: prompt_id must be a non-empty string")
    if not isinstance(prompt, list) or not prompt or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt
    ):
        raise AnnotateError(f"{where}: prompt must be a non-empty list of {{role, content}} messages")
    if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
        raise AnnotateError(f"{where}: responses must be a list of strings")
    return Generated(prompt_id, [{"role": m["role"], "content": m["content"]} for m in prompt], responses)
