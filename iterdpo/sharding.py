"""Split N prompts into shards that cover each prompt exactly once.

The anchors' `int(n / world_size)` loses the remainder; here the first
`n % count` shards take one extra prompt instead.
"""

from __future__ import annotations


def shard_range(total: int, index: int, count: int) -> range:
    """Prompt indices of shard `index` (0-based) of `count` over `total` prompts."""
    if count < 1:
        raise ValueError(f"shard count must be >= 1 (got {count})")
    if not 0 <= index < count:
        raise ValueError(f"shard index must be in [0, {count}) (got {index})")
    if total < 0:
        raise ValueError(f"total must be >= 0 (got {total})")
    base, extra = divmod(total, count)
    start = index * base + min(index, extra)
    return range(start, start + base + (1 if index < extra else 0))
