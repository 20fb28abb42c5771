"""Right padding of token-id rows into a batch: what the trainer and the reward server share.

With causal attention and default positions, a right-padded row's real tokens see exactly
what they see unbatched. torch is imported on call (the operator's image has none).
"""

from __future__ import annotations

from collections.abc import Sequence


def right_padded(rows: Sequence[Sequence[int]], pad_id: int, device=None):
    """(input_ids, attention_mask), [N, longest]: each row's tokens first, padding after."""
    import torch

    longest = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), longest), dtype=torch.long)
    for row, ids in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(list(ids), dtype=torch.long)
        attention[row, : len(ids)] = 1
    if device is not None:
        return input_ids.to(device), attention.to(device)
    return input_ids, attention
