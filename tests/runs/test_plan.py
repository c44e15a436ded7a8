"""The shard plan is pure functions: tested with plain lists and dicts, no cluster."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from daskdl.runs.shards import (
    ShardPlan,
    balanced_shards,
    match_workers,
    plan_shards,
    shard_sizes,
    who_has_to_locations,
)


def test_shards_balance_sample_counts_not_partition_counts():
    sizes = [300, 100, 100, 100]
    shards = balanced_shards(sizes, 2)
    assert shard_sizes(shards, sizes) == [300, 300]
    assert sorted(itertools.chain(*shards)) == [0, 1, 2, 3]


def test_shards_are_as_even_as_the_partitions_allow():
    sizes = [57, 3, 91, 44, 44, 80, 12, 9, 60, 33]
    for n in [2, 3, 4]:
        loads = shard_sizes(balanced_shards(sizes, n), sizes)
        assert sum(loads) == sum(sizes)
        # Greedy largest-first is within the largest partition of the ideal.
        assert max(loads) - min(loads) <= max(sizes)


def test_every_rank_gets_a_partition():
    sizes = [1000, 1, 1]
    assert [len(s) for s in balanced_shards(sizes, 3)] == [1, 1, 1]


def test_workers_are_matched_to_the_data_they_hold():
    sizes = [100] * 4
    locations = [["w1"], ["w0"], ["w1"], ["w0"]]
    plan = plan_shards(sizes, locations, ["w0", "w1"])
    assert plan == ShardPlan([[0, 2], [1, 3]], ["w1", "w0"])  # nothing moves


def test_the_shards_do_not_depend_on_where_the_data_is():
    """Wherever Dask put the partitions, rank r trains on the same samples: seeded runs repeat."""
    sizes = [50, 70, 20, 90, 40, 10]
    workers = ["a", "b", "c"]
    placements = [
        [["a"], ["b"], ["c"], ["a"], ["b"], ["c"]],
        [["c"], ["c"], ["a"], ["b"], [], ["a", "b"]],
        [[]] * 6,
    ]
    plans = [plan_shards(sizes, where, workers) for where in placements]
    assert all(p.shards == plans[0].shards for p in plans)
    assert all(sorted(p.workers) == workers for p in plans)


def test_matching_maximises_samples_in_place():
    shards = [[0, 1], [2], [3]]
    sizes = [10, 10, 30, 5]
    locations = [["x"], ["y"], ["y"], ["z"]]
    # Shard 1 (30 samples on y) gets y; shard 0 then goes to x (10 in place), shard 2 to z.
    workers = ["x", "y", "z"]
    matched = match_workers(shards, sizes, locations, workers)
    assert matched == [0, 1, 2]

    def in_place(assignment):
        return sum(
            sizes[i]
            for r, j in enumerate(assignment)
            for i in shards[r]
            if workers[j] in locations[i]
        )

    assert in_place(matched) == max(map(in_place, itertools.permutations(range(3)))) == 45


def test_unknown_holders_and_replicas_are_fine():
    sizes = [10, 20, 30, 40]
    locations = [[], ["w1", "w0"], ["gone"], ["w1"]]
    plan = plan_shards(sizes, locations, ["w0", "w1"])
    assert sorted(plan.workers) == ["w0", "w1"]
    assert sorted(itertools.chain(*plan.shards)) == [0, 1, 2, 3]


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


def test_a_layout_is_planned_from_sizes_and_locations_alone():
    from daskdl.runs.plan import Layout, layout

    first, second = balanced_shards([100] * 4, 2)
    where = [["w1"] if i in first else ["w0"] for i in range(4)]  # shard 0 lives on w1
    lay = layout(
        ["train", "val"], [[100, 100, 100, 100], [30, 30]], [where, [["w0"], ["w1"]]],
        ["w0", "w1"], batch_size=32,
    )  # fmt: skip
    assert isinstance(lay, Layout) and lay.steps == 7  # ceil(200 / 32)
    assert lay.ranks == ("w1", "w0")
    # Rank r's training shard is where most of its samples are; val follows where it lives.
    for r, worker in enumerate(lay.ranks):
        train_parts, val_parts = lay.parts[r]
        assert all(where[i] == [worker] for i in train_parts)
        assert val_parts == ((0,) if worker == "w0" else (1,))
    assert lay.shard_sizes == {"train": [200, 200], "val": [30, 30]}
    with pytest.raises(dataclasses.FrozenInstanceError):
        lay.steps = 1  # a regroup makes a new layout; nothing changes one
    # A resumed run's shards are kept as they were.
    again = layout(["train"], [[100] * 4], [where], ["w0", "w1"], shards=[[3], [0, 1, 2]])
    assert again.shards == ((3,), (0, 1, 2)) and again.shard_sizes["train"] == [100, 300]
    with pytest.raises(ValueError, match="batch_size=300 is larger than rank 0's shard"):
        layout(["train"], [[100] * 4], [where], ["w0", "w1"], batch_size=300)
    with pytest.raises(ValueError, match=r"has 4 non-empty partitions \(4 in all\) for 5 ranks"):
        layout(["train"], [[100] * 4], [where], ["a", "b", "c", "d", "e"])
    with pytest.raises(ValueError, match=r"has 1 non-empty partitions \(3 in all\) for 2 ranks"):
        layout(["train"], [[300, 0, 0]], [where[:3]], ["a", "b"])
