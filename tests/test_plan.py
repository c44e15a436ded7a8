"""The shard plan is a pure function: tested with plain lists and dicts, no cluster."""

from __future__ import annotations

import pytest

from daskdl.data import plan_shards, shard_sizes, who_has_to_locations


def test_keeps_partitions_where_they_live():
    sizes = [100, 100, 100, 100]
    locations = [["w0"], ["w1"], ["w0"], ["w1"]]
    plan = plan_shards(sizes, locations, ["w0", "w1"])
    assert plan == [[0, 2], [1, 3]]


def test_balances_by_sample_count_not_partition_count():
    # w0 holds everything; the big partition alone is a fair share.
    sizes = [300, 100, 100, 100]
    plan = plan_shards(sizes, [["w0"]] * 4, ["w0", "w1"])
    assert shard_sizes(plan, sizes) == [300, 300]
    assert sorted(i for part in plan for i in part) == [0, 1, 2, 3]


def test_moves_data_only_when_a_rank_would_otherwise_be_short():
    sizes = [50] * 6
    locations = [["w0"], ["w0"], ["w0"], ["w0"], ["w1"], ["w0"]]
    plan = plan_shards(sizes, locations, ["w0", "w1"])
    assert shard_sizes(plan, sizes) == [150, 150]
    assert 4 in plan[1]  # w1's own partition stays on w1
    moved = [i for i in plan[1] if locations[i] != ["w1"]]
    assert len(moved) == 2


def test_unknown_locations_and_replicas():
    sizes = [10, 20, 30, 40, 50, 60]
    locations = [[], ["w1", "w2"], [], ["gone"], ["w2"], []]
    plan = plan_shards(sizes, locations, ["w0", "w1", "w2"])
    loads = shard_sizes(plan, sizes)
    assert sum(loads) == 210
    assert max(loads) - min(loads) <= 60
    assert all(plan)


def test_every_rank_gets_data_even_if_one_worker_holds_all():
    sizes = [10, 10, 10]
    plan = plan_shards(sizes, [["a"], ["a"], ["a"]], ["a", "b", "c"])
    assert [len(p) for p in plan] == [1, 1, 1]


def test_is_deterministic():
    sizes = [7, 3, 9, 4, 4, 8, 1]
    locations = [["b"], ["a"], [], ["a", "b"], ["b"], ["c"], ["a"]]
    plans = {str(plan_shards(sizes, locations, ["a", "b", "c"])) for _ in range(5)}
    assert len(plans) == 1


def test_more_ranks_than_partitions_is_an_error():
    with pytest.raises(ValueError, match="2 partitions cannot feed 3 ranks"):
        plan_shards([5, 5], [[], []], ["a", "b", "c"])


def test_no_workers_is_an_error():
    with pytest.raises(ValueError, match="no workers"):
        plan_shards([5], [[]], [])


def test_who_has_to_locations_keeps_partition_order():
    who_has = {"k1": ("w1",), "k0": ("w0", "w1")}
    assert who_has_to_locations(["k0", "k1", "k2"], who_has) == [["w0", "w1"], ["w1"], []]
