"""Packing: several tokenized sequences in one row, attention never crossing them.

A row is the concatenation of its sequences with position ids that restart at 0 for each.
The model gets those position ids and no attention mask: transformers (masking_utils'
packed-sequence detection for eager and SDPA attention; flash-attention's variable-length
path on GPUs) then lets each token attend only to the earlier tokens of its own sequence, so
a packed sequence's logits are its logits alone. Padding after the last sequence restarts
the positions too: it is a sequence of its own that no real token attends to.

`pack` chooses the rows: best-fit decreasing (longest sequence first, into the fullest row it
still fits), deterministic, every sequence in exactly one row.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into rows of at most `capacity` tokens, each index once.

    Rows come out in the order they were opened (the first holds the longest sequence); within a
    row, indices are ascending. A length over `capacity` is refused (the caller truncates first)."""
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    too_long = [i for i, n in enumerate(lengths) if n > capacity or n < 1]
    if too_long:
        i = too_long[0]
        raise ValueError(f"sequence {i} has {lengths[i]} tokens; each must have 1..{capacity}")
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (tokens left, row), sorted: the fullest row that fits is the first >= n
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        at = bisect.bisect_left(room, (n, -1))
        if at == len(room):
            rows.append([i])
            left, row = capacity - n, len(rows) - 1
        else:
            left, row = room.pop(at)
            rows[row].append(i)
            left -= n
        if left > 0:
            bisect.insort(room, (left, row))
    return [sorted(r) for r in rows]


def position_ids(lengths: Sequence[int]) -> list[int]:
    """0..n-1 for each sequence of the row, one after the other."""
    return [p for n in lengths for p in range(n)]


def collate_rows(rows: Sequence[Sequence[Sequence[int]]], pad_token_id: int) -> tuple[object, object]:
    """(input_ids, position_ids) of a micro-batch whose rows each hold sequences of token ids,
    right-padded to its longest row; the padding's positions restart at 0 (see the module)."""
    import torch

    width = max(sum(len(s) for s in row) for row in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        lengths = [len(s) for s in row]
        used = sum(lengths)
        ids[r, :used] = torch.tensor([t for s in row for t in s], dtype=torch.long)
        positions[r] = torch.tensor(position_ids([*lengths, width - used] if width > used else lengths))
    return ids, positions
