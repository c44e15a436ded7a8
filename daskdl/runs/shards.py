"""The shard plan: which partitions each training rank gets, and which worker runs each rank.

The shards depend only on the partition sizes, so a seeded run computes the same thing wherever
Dask placed the data; where the data live decides only which worker runs which shard.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple, cast


class ShardPlan(NamedTuple):
    """Partitions per rank, and the worker each rank runs on."""

    shards: list[list[int]]
    workers: list[str]


def balanced_shards(sizes: Sequence[int], n_ranks: int) -> list[list[int]]:
    """Group partitions into ``n_ranks`` shards of nearly equal sample counts.

    Largest partitions first, each to the lightest shard (ties to the lower index): a pure
    function of the sizes, so the same data always gives the same shards, wherever Dask happens
    to keep it, and a seeded run is reproducible.

    Examples
    --------
    >>> balanced_shards([300, 100, 100, 100], 2)
    [[0], [1, 2, 3]]
    """
    if n_ranks < 1:
        raise ValueError("No ranks to plan for: the cluster has no workers.")
    if len(sizes) < n_ranks:
        raise ValueError(
            f"{len(sizes)} partitions cannot feed {n_ranks} ranks: every rank needs at "
            f"least one partition. Use fewer workers or repartition the data (for example "
            f"Dataset.from_numpy(..., chunks=len(X) // {n_ranks}))."
        )
    shards: list[list[int]] = [[] for _ in range(n_ranks)]
    loads = [0] * n_ranks
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        # A shard without any partition yet goes first, so no rank is left empty.
        r = min(range(n_ranks), key=lambda r: (bool(shards[r]), loads[r], r))
        shards[r].append(i)
        loads[r] += sizes[i]
    return [sorted(s) for s in shards]


def spread_shards(sizes: Sequence[int], n_ranks: int) -> list[list[int]]:
    """Shards of a data set that every rank may or may not get a part of (validation): as
    :func:`balanced_shards` where there is a partition per rank, else one partition each to
    the first ranks and none to the rest.

    >>> spread_shards([10, 10], 3)
    [[0], [1], []]
    """
    if len(sizes) >= n_ranks:
        return balanced_shards(sizes, n_ranks)
    return [[i] for i in range(len(sizes))] + [[] for _ in range(n_ranks - len(sizes))]


def match_workers(
    shards: Sequence[Sequence[int]],
    sizes: Sequence[int],
    locations: Sequence[Sequence[str]],
    workers: Sequence[str],
) -> list[int]:
    """For each shard, the index of the worker that should hold it: one shard per worker,
    chosen so that as many samples as possible are already where they are needed.

    Greedy on the (shard, worker) pairs with the most samples in place; ties go to the lower
    shard and worker indices, so the answer depends only on the arguments.
    """
    if len(shards) != len(workers):
        raise ValueError(f"{len(shards)} shards for {len(workers)} workers.")
    index = {w: j for j, w in enumerate(workers)}
    local = [[0] * len(workers) for _ in shards]
    for r, shard in enumerate(shards):
        for i in shard:
            for w in set(locations[i]):
                if w in index:
                    local[r][index[w]] += sizes[i]
    pairs = sorted(
        ((local[r][j], r, j) for r in range(len(shards)) for j in range(len(workers))),
        key=lambda t: (-t[0], t[1], t[2]),
    )
    chosen: list[int | None] = [None] * len(shards)
    taken: set[int] = set()
    for _, r, j in pairs:
        if chosen[r] is None and j not in taken:
            chosen[r] = j
            taken.add(j)
    # As many workers as shards: the greedy pass gives every shard one.
    return [int(cast(int, j)) for j in chosen]


def plan_shards(
    sizes: Sequence[int],
    locations: Sequence[Sequence[str]],
    workers: Sequence[str],
) -> ShardPlan:
    """Assign partitions to ranks and ranks to workers.

    Parameters
    ----------
    sizes
        Number of samples in each partition.
    locations
        For each partition, the workers that hold it now (``Client.who_has``); may be empty.
    workers
        The workers that get a rank.

    Returns
    -------
    ``ShardPlan(shards, workers)``: rank ``r`` trains on partitions ``shards[r]`` on worker
    ``workers[r]``.

    The shards depend only on the partition sizes (:func:`balanced_shards`), so a seeded run
    computes the same thing wherever Dask placed the data; the data's location decides which
    worker runs which shard (:func:`match_workers`), so as little as possible moves.

    Examples
    --------
    >>> plan_shards([10, 10, 10, 10], [["b"], ["a"], ["b"], ["a"]], ["a", "b"])
    ShardPlan(shards=[[0, 2], [1, 3]], workers=['b', 'a'])
    """
    shards = balanced_shards(sizes, len(workers))
    matched = match_workers(shards, sizes, locations, workers)
    return ShardPlan(shards, [workers[j] for j in matched])


def shard_sizes(plan: Sequence[Sequence[int]], sizes: Sequence[int]) -> list[int]:
    return [sum(sizes[i] for i in part) for part in plan]


def who_has_to_locations(
    keys: Sequence[str], who_has: Mapping[str, Sequence[str]]
) -> list[list[str]]:
    """``Client.who_has()`` output, in partition order."""
    return [list(who_has.get(k, ())) for k in keys]
