"""Streamed data sets: each rank computes its own partitions, on its own worker, as it trains.

A data set held in memory is persisted before training; a streamed one is not. Its lazy graph
is cut here, on the client, into one small graph per partition (reading the Parquet file or
the Zarr chunk, preprocessing, standardising, encoding categories), and the rank runs the
graphs of its shard in a background thread (:class:`PartitionReader`), ``prefetch``
partitions ahead of training. What every partition depends on, such as the standardisation
statistics (a reduction over the whole data set), is computed once on the cluster and
reaches each rank as a task input: :func:`sources` finds those keys from the graph alone.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import dask
import numpy as np
from dask._task_spec import DataNode, Task, TaskRef
from dask.base import collections_to_expr
from dask.core import get_deps, toposort
from dask.local import get_sync
from distributed import Client, Future

from daskdl.cluster import workers_info
from daskdl.data.dataset import Dataset

logger = logging.getLogger(__name__)

# Data may take up to this fraction of the ranks' memory limits before fit streams it: the
# rest is for the model, its optimizer, activations and Dask itself.
MEMORY_FRACTION = 0.5


@dataclass(frozen=True)
class Partition:
    """How a rank computes one partition: a graph without the keys that every partition
    shares (``inputs``: those come computed, with the rank task)."""

    graph: dict
    keys: tuple  # (X's block, y's block)
    inputs: tuple  # keys of shared, persisted results that the graph reads

    def reading(self, values: dict) -> dict:
        """The graph with its inputs given (``values``: by key, futures or data nodes)."""
        return {**self.graph, **{k: values[k] for k in self.inputs}}


@dataclass(frozen=True)
class Shard:
    """A rank's streamed shard of one data set: what its task carries."""

    partitions: list[Partition]
    sizes: list[int]
    sample_shape: tuple
    target_shape: tuple


@dataclass
class StreamSource:
    """A streamed data set: its partitions' graphs and the shared results they read."""

    partitions: list[Partition]
    inputs: dict  # key -> Future
    sample_shape: tuple
    target_shape: tuple
    sizes: list[int] | None = None  # samples per partition, once counted

    def for_shard(self, shard: Sequence[int]) -> tuple[Shard, dict]:
        """One rank's shard, and the futures of the inputs its partitions read."""
        parts = [self.partitions[i] for i in shard]
        keys = {k for p in parts for k in p.inputs}
        if self.sizes is None:
            raise RuntimeError("the partitions' sizes are not counted yet: count them first")
        sizes = [self.sizes[i] for i in shard]
        shapes = (self.sample_shape, self.target_shape)
        return Shard(parts, sizes, *shapes), {k: self.inputs[k] for k in keys}

    def head(self, client: Client, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The first ``k`` samples, computed from the partitions' own graphs (the collections'
        optimised graph would give the shared keys other tasks)."""
        xs, ys, n = [], [], 0
        for part in self.partitions:
            X, y = client.get(part.reading(self.inputs), list(part.keys))
            xs.append(X)
            ys.append(y)
            n += len(X)
            if n >= k:
                break
        return np.concatenate(xs)[:k], np.concatenate(ys)[:k]

    def map_partitions(self, func, name: str) -> tuple[dict, list]:
        """A graph of ``func(X, y)`` for every partition, reading the persisted inputs, and
        the keys of its results: a pass over the data that keeps nothing but the results."""
        dsk = dict(self.inputs)
        keys = []
        for i, part in enumerate(self.partitions):
            dsk.update(part.graph)
            key = (name, i)
            dsk[key] = Task(key, func, *(TaskRef(k) for k in part.keys))
            keys.append(key)
        return dsk, keys


def should_stream(client: Client, datasets: Sequence[Dataset], workers: Sequence[str], stream):
    """Whether a run streams its data: as asked (``stream=True/False``), else when the data
    would take more than half the ranks' memory limits (workers without a limit: never).
    Unknown partition lengths (a dataframe's) are estimated from the first partition's."""
    if stream is not None:
        return bool(stream)
    info = workers_info(client)
    limits = [info[w].get("memory_limit") or 0 for w in workers if w in info]
    if not limits or not all(limits):
        return False
    nbytes = sum(_estimated_nbytes(client, ds) for ds in datasets)
    streamed = nbytes > MEMORY_FRACTION * sum(limits)
    if streamed:
        logger.info(
            "Streaming the data: %.1f GB against %d workers' memory limits of %.1f GB in all",
            nbytes / 1e9, len(limits), sum(limits) / 1e9,
        )  # fmt: skip
    return streamed


def _estimated_nbytes(client: Client, ds: Dataset) -> float:
    if not math.isnan(ds.X.shape[0]):
        return ds.X.nbytes + ds.y.nbytes
    first = client.compute(ds.X.blocks[0]).result()  # one partition, as a sample of the rest
    per_sample = (
        math.prod(ds.X.shape[1:]) * ds.X.itemsize + math.prod(ds.y.shape[1:]) * ds.y.itemsize
    )
    return len(first) * ds.npartitions * per_sample


def sources(client: Client, datasets: Sequence[Dataset]) -> list[StreamSource]:
    """Each data set's partitions as graphs a rank can run, with the keys that all the
    partitions of a data set share (and their persisted results, computed once, here)
    cut out as inputs, for every data set that reads them (a test set standardised with
    the training set's statistics); keys that a few partitions share (a rechunk's) are
    computed by each."""
    graphs = [_graph(ds) for ds in datasets]
    merged = {k: v for dsk, _ in graphs for k, v in dsk.items()}
    deps, _ = get_deps(merged)  # each data set's graph is closed: its keys' deps are its own
    for k, v in merged.items():
        if isinstance(v, Future):  # a persisted result: a reference to its own key, no cycle
            deps[k] = set()
    shared = set().union(*(_shared_inputs(dsk, outputs, deps) for dsk, outputs in graphs))
    todo = [k for k in shared if not isinstance(merged[k], Future)]
    # The run's own handles on results the user persisted: the run releases its handles when
    # it ends, and the user's persisted data set must stay.
    futures: dict = {k: Future(k, client) for k in shared if isinstance(merged[k], Future)}
    if todo:
        culled, _ = _cull(merged, deps, todo)
        futures.update(zip(todo, client.get(culled, todo, sync=False)))
    out = []
    for ds, (dsk, outputs) in zip(datasets, graphs):
        parts = [_partition(dsk, deps, pair, shared) for pair in outputs]
        inputs = {k: futures[k] for p in parts for k in p.inputs}
        out.append(StreamSource(parts, inputs, tuple(ds.X.shape[1:]), tuple(ds.y.shape[1:])))
    return out


def _graph(ds: Dataset) -> tuple[dict, list[tuple]]:
    """The data set's graph as it is (unoptimised, so that shared keys are the ones other
    computations on the same collections use) and each partition's (X, y) keys."""
    dsk = dict(collections_to_expr([ds.X, ds.y], optimize_graph=False).__dask_graph__())
    xs = list(dask.core.flatten(ds.X.__dask_keys__()))
    ys = list(dask.core.flatten(ds.y.__dask_keys__()))
    return dsk, list(zip(xs, ys))


def _shared_inputs(dsk: dict, outputs: list[tuple], deps: dict) -> set:
    """The keys a rank gets computed: the nearest keys to the partitions that every
    partition reads (what they read through such a key, such as the chunks a statistic
    was reduced from, is not theirs to read), and results persisted already (futures)."""
    own = {k for pair in outputs for k in pair}
    # One partition shares nothing: it computes it all.
    everyone = (1 << len(outputs)) - 1 if len(outputs) > 1 else -1
    readers = dict.fromkeys(dsk, 0)  # as bits: the partitions that need each key
    for i, pair in enumerate(outputs):
        for k in pair:
            readers[k] |= 1 << i
    shared = set()
    for k in reversed(toposort(dsk, dependencies=deps)):  # every key after its dependents
        if readers[k] == everyone and k not in own:
            shared.add(k)
            continue
        for d in deps[k]:
            readers[d] |= readers[k]
    return shared | {k for k, v in dsk.items() if isinstance(v, Future) and readers[k]}


def _partition(dsk: dict, deps: dict, keys: tuple, inputs: set) -> Partition:
    graph, needed = _cull(dsk, deps, keys, inputs)
    return Partition(graph, tuple(keys), tuple(needed))


def _cull(dsk: dict, deps: dict, keys, stop=frozenset()) -> tuple[dict, set]:
    """The tasks ``keys`` need, not looking past the keys in ``stop`` (which it returns)."""
    graph, reached, todo = {}, set(), list(keys)
    while todo:
        k = todo.pop()
        if k in graph or k in reached:
            continue
        if k in stop:
            reached.add(k)
            continue
        graph[k] = dsk[k]
        todo.extend(deps[k])
    return graph, reached


class PartitionReader:
    """A rank's streamed partitions of one data set, computed on its worker.

    ``read(i)`` computes partition ``i`` now; ``stream(order)`` yields the partitions in
    ``order``, each computed in a background thread while the one before is in use, with at
    most ``prefetch`` of them computed ahead (and nothing kept after it is handed over)."""

    def __init__(self, name: str, shard: Shard, inputs: dict, y_dtype, prefetch: int):
        self.name, self.shard, self.parts = name, shard, shard.partitions
        self.y_dtype, self.prefetch = y_dtype, prefetch
        self.inputs = {k: DataNode(k, v) for k, v in inputs.items()}

    def __len__(self) -> int:
        return len(self.parts)

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        part = self.parts[i]
        try:
            X, y = get_sync(part.reading(self.inputs), list(part.keys))
        except Exception as e:
            raise RuntimeError(
                f"Could not compute partition {i} of this rank's shard of {self.name!r} "
                f"(keys {part.keys}): {type(e).__name__}: {e}"
            ) from e
        expected = self.shard.sizes[i]
        if len(X) != expected or len(y) != expected:
            # The plan placed this partition's samples by the count made when the run started.
            raise RuntimeError(
                f"Partition {i} of this rank's shard of {self.name!r} (keys {part.keys}) has "
                f"{len(X)} samples now, {expected} when the run counted them: its files "
                "changed during the run. Keep the files as they are while a run reads them "
                "(write new data to new files), and start the run again."
            )
        return np.ascontiguousarray(X, np.float32), np.ascontiguousarray(y, self.y_dtype)

    def stream(self, order: Iterable[int]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        order = iter(order)
        if self.prefetch == 0:
            yield from map(self.read, order)
            return
        with ThreadPoolExecutor(1, thread_name_prefix=f"daskdl-read-{self.name}") as pool:
            pending = deque(pool.submit(self.read, i) for _, i in zip(range(self.prefetch), order))
            try:
                while pending:
                    part = pending.popleft().result()
                    nxt = next(order, None)
                    if nxt is not None:
                        pending.append(pool.submit(self.read, nxt))
                    yield part
                    del part
            finally:
                for f in pending:  # an epoch cut short: nothing more is read
                    f.cancel()
