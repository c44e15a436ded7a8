"""What a run is, decided before any rank starts, with no cluster in sight.

``fit`` and ``launch`` check their inputs and describe the run as a frozen :class:`LaunchPlan`:
the loop, its data sets' names, its options, its folder and keys, its public description.
:func:`layout` cuts the data sets into one shard per rank from partition sizes and locations
alone; a run that regroups gets a new :class:`Layout` of the same plan.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from daskdl import security
from daskdl.runs.shards import balanced_shards, match_workers, shard_sizes, spread_shards


@dataclass(frozen=True)
class LaunchPlan:
    """A checked run: the same for every membership it has."""

    run_id: str
    train_fn: Callable  # train_fn(ctx): fit's FitLoop, or the user's
    loop_config: dict  # ctx.config
    names: tuple[str, ...]  # the data sets; the first decides which worker is which rank
    target_dtypes: tuple[str, ...]
    options: dict  # TrainConfig.to_dict(), with the client's comm timeout
    public: dict  # the run's description: its start event, config.json, checkpoints
    out: str | None = None  # the run's folder, absolute (ranks may run elsewhere)
    out_arg: str | None = None  # as the user gave it (relative paths stay relative)
    staging: str | None = None  # where a replacing run writes until its first checkpoint
    signing_key: security.Key | None = None
    batch_size: int | None = None  # fit's: every shard holds a batch; steps per epoch follow
    grow: bool = False  # whether workers that join the cluster get ranks
    keep_checkpoints: int | None = 3
    pause_profiler: bool = True
    epoch_gate: bool = False  # ranks wait after each epoch for the client's release

    @property
    def max_failures(self) -> int:
        return int(self.options["max_failures"])

    @property
    def elastic(self) -> bool:
        return self.max_failures > 0

    @property
    def comm_timeout(self) -> float:
        return float(self.options["comm_timeout"])


@dataclass(frozen=True)
class Layout:
    """Which worker is which rank, and which partitions of each data set each rank gets."""

    ranks: tuple[str, ...]
    parts: tuple[tuple[tuple[int, ...], ...], ...]  # [rank][data set]: partition indices
    shard_sizes: dict[str, list[int]]  # per data set: every rank's shard size
    steps: int  # batches per epoch (1 where the loop's batch size is its own)
    shards: tuple[tuple[int, ...], ...]  # the first data set's, kept in checkpoints
    partition_sizes: tuple[int, ...]  # the first data set's


def layout(
    names: Sequence[str],
    sizes: Sequence[Sequence[int]],
    locations: Sequence[Sequence[Sequence[str]]],
    workers: Sequence[str],
    batch_size: int | None = None,
    shards: Sequence[Sequence[int]] | None = None,
    stages: int = 1,
) -> Layout:
    """Shards for ``workers``: the first data set's balanced by sample counts (or ``shards``,
    a resumed run's), matched to the workers that hold most of them; every other data set
    spread over the ranks, some getting none where it has fewer partitions than ranks.
    ``sizes`` and ``locations`` are each data set's partition sizes and holders.

    A pipeline of ``stages`` reads its data on each replica's first stage: shards for
    ``len(workers) // stages`` replicas, and ranks ``r * stages + s`` for stage ``s`` of
    replica ``r``, the later stages with no data (workers beyond whole replicas idle)."""
    if stages > 1:
        return _pipeline_layout(names, sizes, locations, workers, batch_size, shards, stages)
    first = [int(n) for n in sizes[0]]
    filled = sum(1 for n in first if n)
    if filled < len(workers):
        raise ValueError(
            f"The data set {names[0]!r} has {filled} non-empty partitions ({len(first)} in "
            f"all) for {len(workers)} ranks; each rank needs one. Give it more partitions "
            f"(ddf.repartition(npartitions={len(workers)}), Dataset.from_numpy(..., "
            f"chunks=...), or more files; streamed data are not split for you) or use "
            f"workers={max(filled, 1)} (CLI: --workers {max(filled, 1)})."
        )
    shards = [list(s) for s in shards] if shards else balanced_shards(first, len(workers))
    # Rank r always trains on shard r; where the data lives only decides which worker is r.
    order = match_workers(shards, first, locations[0], workers)
    ranks = [workers[j] for j in order]
    per_rank = [[tuple(shard)] for shard in shards]
    all_sizes = {names[0]: shard_sizes(shards, first)}
    steps = 1
    if batch_size is not None:
        counts = all_sizes[names[0]]
        if batch_size > min(counts):
            r = counts.index(min(counts))
            raise ValueError(
                f"batch_size={batch_size} is larger than rank {r}'s shard ({counts[r]} "
                f"samples). Use batch_size <= {min(counts)}, or fewer workers."
            )
        steps = math.ceil(max(counts) / batch_size)
    for name, part_sizes, where in zip(names[1:], sizes[1:], locations[1:]):
        part_sizes = [int(n) for n in part_sizes]
        spread = spread_shards(part_sizes, len(ranks))
        placed: list[tuple[int, ...]] = [()] * len(ranks)
        for shard, r in zip(spread, match_workers(spread, part_sizes, where, ranks)):
            placed[r] = tuple(shard)
        for r, mine in enumerate(placed):
            per_rank[r].append(mine)
        all_sizes[name] = shard_sizes(placed, part_sizes)
    return Layout(
        ranks=tuple(ranks),
        parts=tuple(tuple(p) for p in per_rank),
        shard_sizes=all_sizes,
        steps=steps,
        shards=tuple(tuple(s) for s in shards),
        partition_sizes=tuple(first),
    )


def _pipeline_layout(names, sizes, locations, workers, batch_size, shards, stages) -> Layout:
    replicas = len(workers) // stages
    if replicas == 0:
        raise ValueError(
            f"A pipeline of {stages} stages needs {stages} workers, and the run has "
            f"{len(workers)}: start more workers or use fewer stages."
        )
    if shards is not None and len(shards) != replicas:
        shards = None  # a resumed run of another layout: balanced for this one
    first = layout(names, sizes, locations, workers[:replicas], batch_size, shards)
    later = iter(workers[replicas : replicas * stages])
    ranks, parts = [], []
    for r in range(replicas):
        ranks += [first.ranks[r], *(next(later) for _ in range(stages - 1))]
        parts += [first.parts[r], *([((),) * len(names)] * (stages - 1))]
    sizes_ = {
        name: [n if s == 0 else 0 for n in counts for s in range(stages)]
        for name, counts in first.shard_sizes.items()
    }
    return Layout(
        ranks=tuple(ranks),
        parts=tuple(tuple(p) for p in parts),
        shard_sizes=sizes_,
        steps=first.steps,
        shards=first.shards,
        partition_sizes=first.partition_sizes,
    )
