"""Shards cover every prompt exactly once, for awkward counts too."""

import pytest

from iterdpo.sharding import shard_range


@pytest.mark.parametrize("total", [0, 1, 2, 7, 10, 64, 101, 20000])
@pytest.mark.parametrize("count", [1, 2, 3, 7, 8, 13, 200])
def test_shards_partition_the_prompts(total, count):
    covered = [i for index in range(count) for i in shard_range(total, index, count)]
    assert covered == list(range(total))
    sizes = [len(shard_range(total, index, count)) for index in range(count)]
    assert max(sizes) - min(sizes) <= 1


def test_remainder_goes_to_the_first_shards():
    assert [len(shard_range(10, i, 4)) for i in range(4)] == [3, 3, 2, 2]


@pytest.mark.parametrize(("index", "count"), [(-1, 2), (2, 2), (0, 0)])
def test_bad_shard_arguments(index, count):
    with pytest.raises(ValueError):
        shard_range(10, index, count)
