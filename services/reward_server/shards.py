"""Read one round's generation shards, trusting nothing the markers do not vouch for.

A shard counts only with its success marker; its line count must equal the
marker's `prompts_out`, and the marker's own counts must add up
(prompts_in == prompts_out + len(left_out), checked by `ShardMarker`), so that every
prompt the generator was given is accounted for downstream and none is dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass

from iterdpo.contracts import GeneratedRecord, LeftOut, ShardMarker, read_lines, read_model
from iterdpo.errors import StageError
from iterdpo.layout import RunLayout


@dataclass(frozen=True)
class RoundGenerations:
    records: list[GeneratedRecord]  # shard order, then line order
    prompts_in: int  # prompts the generator was given (all shards)
    left_out: list[LeftOut]  # what the generator left out, with its reasons


def read_round(layout: RunLayout, iteration: int, shards: int) -> RoundGenerations:
    records: list[GeneratedRecord] = []
    left_out: list[LeftOut] = []
    prompts_in = 0
    seen: dict[str, str] = {}
    for index in range(shards):
        name = f"generation shard {index + 1} of {shards} of round {iteration}"
        marker_path = layout.shard_marker(iteration, index, shards)
        if not marker_path.is_file():
            raise StageError(f"{name} has no success marker ({marker_path}): the Generate stage did not finish")
        marker = read_model(marker_path, ShardMarker, what=f"{name}: marker {marker_path}")
        shard_path = layout.shard_file(iteration, index, shards)
        if not shard_path.is_file():
            raise StageError(f"{name} has a success marker but no output file ({shard_path})")
        shard_records = read_lines(shard_path, GeneratedRecord)
        if len(shard_records) != marker.prompts_out:
            raise StageError(
                f"{name}: {shard_path} has {len(shard_records)} prompts but its marker says "
                f"prompts_out={marker.prompts_out}"
            )
        for record in shard_records:
            if record.prompt_id in seen:
                raise StageError(f"prompt {record.prompt_id!r} appears twice ({seen[record.prompt_id]} and {name})")
            seen[record.prompt_id] = name
        records.extend(shard_records)
        left_out.extend(marker.left_out)
        prompts_in += marker.prompts_in
    return RoundGenerations(records, prompts_in, left_out)
