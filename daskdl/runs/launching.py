"""Putting a planned run on the cluster: :class:`Launch` submits one rank task per worker (the
loop, the rank's partitions, the state it starts from) and, when the run regroups, the next
membership's; :func:`start` is what ``fit`` and ``launch`` share once their inputs are checked.
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import dask
import numpy as np
from distributed import Client, futures_of

from daskdl import events
from daskdl.checkpoint import files as checkpoint
from daskdl.checkpoint import rundir
from daskdl.collectives import comm
from daskdl.data import preprocess, streaming, validate
from daskdl.data.dataset import Dataset
from daskdl.parallel import pipeline
from daskdl.rank.context import LoopSpec, loop_main
from daskdl.runs import trackers
from daskdl.runs.checks import RunFolder
from daskdl.runs.plan import LaunchPlan, Layout, layout
from daskdl.runs.shards import who_has_to_locations

logger = logging.getLogger(__name__)


@dataclass
class Held:
    """A data set as a run holds it: persisted on the workers (its blocks' futures ``xs``
    and ``ys``), or streamed (``stream``: its partitions' graphs); and every partition's
    :func:`daskdl.data.validate.value_counts`."""

    ds: Dataset
    xs: list = field(default_factory=list)
    ys: list = field(default_factory=list)
    stream: streaming.StreamSource | None = None
    counts: np.ndarray | None = None

    @property
    def futures(self) -> list:
        inputs = list(self.stream.inputs.values()) if self.stream else []
        return self.xs + self.ys + inputs

    def locations(self, client: Client) -> list[list[str]]:
        if self.stream is not None:  # computed where it is used: nothing to be near
            return [[] for _ in range(self.ds.npartitions)]
        return _locations(client, self.xs)

    def head(self, client: Client, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The first ``k`` samples, here."""
        if self.stream is not None:
            return self.stream.head(client, k)
        return client.compute([self.ds.X[:k], self.ds.y[:k]], sync=True)

    def for_shard(self, shard: Sequence[int]):
        """What a rank task gets for its shard: its blocks, or its partitions' inputs (and
        the partitions' graphs, for its spec)."""
        if self.stream is not None:
            return self.stream.for_shard(shard)
        return None, [(self.xs[i], self.ys[i]) for i in shard]


class Launch:
    """A plan's rank tasks: the data they read, the membership's generation (each talks
    under its own comm id), and the description of the run as it now is."""

    def __init__(self, client: Client, plan: LaunchPlan, held: list[Held]):
        self.client, self.plan, self.held = client, plan, held
        self.generation = 0
        self.public = dict(plan.public)

    @property
    def comm_id(self) -> str:
        # A survivor's mailbox for the old membership was aborted, and stays so.
        p = self.plan
        return p.run_id if self.generation == 0 else f"{p.run_id}.{self.generation}"

    @property
    def config(self) -> dict:
        return self.plan.options

    @property
    def all_futures(self) -> list:
        return [f for h in self.held for f in h.futures]

    def layout(self, workers: list[str], shards=None) -> Layout:
        sizes = [[int(c) for c in h.ds.X.chunks[0]] for h in self.held]
        where = [h.locations(self.client) for h in self.held]
        stages = self.plan.options.get("pipeline_stages", 1)
        return layout(self.plan.names, sizes, where, workers, self.plan.batch_size, shards, stages)

    def regroup_state(self, states: list[dict]) -> dict:
        """Where a regrouped run goes on from, of the states its surviving ranks handed back:
        the last step every survivor finished (replicas agree up to it). A pipeline's ranks
        hand back their own stage's part: put together from a part of every stage at that
        step (from any replica), else the run goes on from its checkpoint on disk, else from
        its start."""
        state = min(states, key=lambda st: (st["epoch"], st["step"], st["rank"]))
        if "stage" not in state:
            return state
        at = (state["epoch"], state["step"])
        parts = {st["stage"]["index"]: st for st in states if (st["epoch"], st["step"]) == at}
        if len(parts) == state["stage"]["stages"]:
            merged = {k: v for st in parts.values() for k, v in st["stage"]["tensors"].items()}
            first = parts[0]  # it reads the batches: their size and count are its
            whole = pipeline.whole_state(
                merged, first["stage"]["param_groups"], first["stage"]["n_params"]
            )
            opt = whole["optimizer"]
            return {
                **first,
                "model": whole["model"],
                "optimizer": checkpoint.state_tensors(opt) if opt is not None else None,
            }
        missing = sorted(set(range(state["stage"]["stages"])) - set(parts))
        disk = state.get("disk")
        logger.warning(
            "run %s: no survivor holds stage(s) %s as of epoch %d step %d: going on from %s",
            self.plan.run_id, missing, at[0] + 1, at[1],
            "the checkpoint on disk" if disk else "the start",
        )  # fmt: skip
        if disk:
            return {**state, "on_disk": True, "epoch": disk["epoch"], "step": 0,
                    "history": disk["history"]}  # fmt: skip
        return {**state, "epoch": 0, "step": 0, "history": []}

    def resume_from(self, state: dict) -> dict | None:
        """What a regrouped run's ranks start from: the state a survivor handed back (its
        replica, or its last checkpoint), or nothing when it had none yet. A sharded run's
        survivors hold only their chunks of it: its newest checkpoint on disk, then."""
        if state.get("on_disk"):
            # out is set: a sharded run regroups from the checkpoints it saves there.
            path, model, optimizer, manifest = checkpoint.load_latest(
                cast(str, self.plan.out), self.plan.signing_key
            )
            logger.info("run %s regroups from %s", self.plan.run_id, path)
            state = resume_state(manifest, model, optimizer)
            return {k: state[k] for k in ("epoch", "model", "optimizer")}
        if state.get("model") is None:
            return None
        opt = state.get("optimizer")
        return {
            "epoch": state["epoch"],
            "model": state["model"],
            "optimizer": checkpoint.optimizer_state(*opt) if opt else None,
        }

    def submit(self, lay: Layout, resume: dict | None, start_step: int, history: list) -> list:
        plan = self.plan
        # Checkpoints record the shard plan, so that a resumed run trains on the same shards.
        manifest = {
            **self.public,
            "plan": [list(s) for s in lay.shards],
            "partition_sizes": list(lay.partition_sizes),
        }
        if resume is not None:
            # Model and optimizer state (85 MiB for ResNet-18 with momentum) inside each rank's
            # task would pass through the scheduler once per rank as graph. Scattered once to
            # the first rank's worker instead, it reaches the others worker-to-worker.
            [resume] = self.client.scatter([resume], workers=list(lay.ranks[:1]), hash=False)
        futures = []
        for r, (addr, shards) in enumerate(zip(lay.ranks, lay.parts)):
            streams, data = {}, {}
            for name, held, shard in zip(plan.names, self.held, shards):
                stream, data[name] = held.for_shard(shard)
                if stream is not None:
                    streams[name] = stream
            spec = LoopSpec(
                run_id=plan.run_id,
                rank=r,
                peers=list(lay.ranks),
                train_fn=plan.train_fn,
                config=plan.loop_config,
                options=plan.options,
                names=list(plan.names),
                target_dtypes=list(plan.target_dtypes),
                shard_sizes=lay.shard_sizes,
                out=plan.out,
                staging=plan.staging,
                manifest=manifest,
                history=history,
                comm_id=self.comm_id,
                start_step=start_step,
                elastic=plan.elastic,
                keep_checkpoints=plan.keep_checkpoints,
                pause_profiler=plan.pause_profiler,
                epoch_gate=plan.epoch_gate,
                signing_key=plan.signing_key if r == 0 else None,  # only rank 0 writes
                streams=streams,
            )
            futures.append(
                self.client.submit(
                    loop_main,
                    spec,
                    resume,
                    data,
                    key=f"daskdl-rank-{r}-{self.comm_id}",
                    workers=[addr],
                    allow_other_workers=False,
                    pure=False,
                    retries=0,
                )
            )
        return futures


class Starting:
    """What a run holds while it starts, given up if it does not: its data (persisted on the
    cluster, or ready to stream: ``stream`` is the run's option, None to decide by size),
    counted and checked, and its folder, claimed once every check has passed
    (:meth:`claim`).

    >>> with Starting(client, folder, [train], workers, None) as starting:  # doctest: +SKIP
    ...     ...  # checks on starting.held
    ...     launch = Launch(client, starting.plan(...), starting.held)
    ...     run = Run(launch, spec, start(launch, ...))
    """

    def __init__(self, client: Client, folder: RunFolder, datasets, workers, stream):
        self.client, self.folder = client, folder
        datasets = list(datasets)
        streamed = streaming.should_stream(client, datasets, workers, stream)
        self.held = (stream_data if streamed else persist)(client, *datasets)
        if not streamed:  # a single file is the most common thing a user has
            self.held[0] = enough_partitions(client, self.held[0], len(workers))
        self.run_id = uuid.uuid4().hex[:8]
        self.staging: Path | None = None

    def __enter__(self) -> Starting:
        return self

    def __exit__(self, kind, error, tb) -> None:
        if kind is not None:
            for f in (f for h in self.held for f in h.futures):
                f.release()  # nothing started: this call's hold on the data goes
            if self.staging is not None and self.folder.out is not None:
                rundir.abandon(self.folder.out, self.staging, "could not start")

    def claim(self) -> None:
        self.staging = self.folder.claim(self.run_id)

    def plan(self, **fields) -> LaunchPlan:
        """The run's frozen plan: ``fields`` and what every run has (id, folder, key)."""
        out = self.folder.out
        return LaunchPlan(
            run_id=self.run_id,
            out=str(out.resolve()) if out else None,
            out_arg=str(out) if out else None,
            staging=str(self.staging.resolve()) if self.staging else None,
            signing_key=self.folder.key,
            keep_checkpoints=dask.config.get("daskdl.keep-checkpoints"),
            pause_profiler=dask.config.get("daskdl.pause-dask-profiler"),
            **fields,
        )


@dataclass
class Started:
    """A run whose rank tasks are submitted: what its :class:`daskdl.Run` follows."""

    futures: list
    recorder: events.Recorder
    ranks: list[str]


def start(launch: Launch, workers: list[str], resume: dict | None, progress, loggers=()) -> Started:
    """Lay out a checked run's shards, describe it (its ``config.json`` and ``start`` event)
    and submit its rank tasks. ``resume`` is the state it starts from (``epoch``, ``model``,
    ``optimizer``, ``history``, ``shards``, ``trackers``), ``loggers`` its experiment trackers
    (checked)."""
    plan = launch.plan
    sizes = [int(c) for c in launch.held[0].ds.X.chunks[0]]
    shards = None
    if resume and resume.get("partition_sizes") == sizes and len(resume["shards"]) == len(workers):
        shards = resume["shards"]  # the same shards as before, so the resumed run is identical
    lay = launch.layout(workers, shards)
    start_epoch = resume["epoch"] if resume else 0
    launch.public.update(world_size=len(lay.ranks), workers=list(lay.ranks))
    launch.public["start_epoch"] = start_epoch
    launch.public["streamed"] = [n for n, h in zip(plan.names, launch.held) if h.stream]
    epochs = plan.public["config"].get("epochs")
    # An earlier attempt logged up to its checkpoint's last epoch, at least.
    done = resume["history"][-1] if resume and resume.get("history") else {"step": -1, "epoch": 0}
    tracking = trackers.open_trackers(
        list(loggers), plan.out_arg, plan.run_id, resume and resume.get("trackers"),
        done["step"], done["epoch"],
    )  # fmt: skip
    launch.public["trackers"] = tracking.identities()
    if plan.batch_size is not None:
        launch.public["steps_per_epoch"] = lay.steps
        recorder = events.Recorder(
            plan.run_id, lay.steps * epochs, start_epoch * lay.steps, progress, trackers=tracking
        )
    else:
        recorder = events.Recorder(
            plan.run_id, epochs, start_epoch, progress, unit="epoch", trackers=tracking
        )
    tracking.hyperparams(launch.public)
    history = resume["history"] if resume else []
    recorder.epochs.extend(history)
    announce(launch, recorder)
    return Started(launch.submit(lay, resume, 0, history), recorder, list(lay.ranks))


def announce(launch: Launch, recorder: events.Recorder) -> None:
    """Before a run's ranks start: its ``config.json`` (with ``out``), its recorder on its
    events, its ``start`` event, and daskdl's extension on every worker."""
    client, public, plan = launch.client, launch.public, launch.plan
    if plan.out is not None:
        folder = rundir.writing_to(plan.out, plan.staging)
        (folder / rundir.CONFIG).write_text(json.dumps(public, indent=1))
    events.subscribe(client, events.topic(plan.run_id), recorder.handle)
    client.log_event(events.topic(plan.run_id), {"kind": "start", **public})
    client.log_event(events.RUNS_TOPIC, {"kind": "start", **public})
    comm.ensure_plugin(client)


def persist(client: Client, *datasets: Dataset) -> list[Held]:
    """Persist the data sets in one graph (they share keys, such as standardisation stats),
    and count every partition's values where it lives.

    Unoptimised, so that each key keeps the task it has in the user's collections: a later
    computation on them (``Run.evaluate``, the user's own) then agrees with the scheduler about
    every shared key instead of resubmitting it fused differently.
    """
    collections = [(ds.X, ds.y, *(ds.target_scale or ()), *_stats(ds)) for ds in datasets]
    arrays = client.persist([a for c in collections for a in c], optimize_graph=False)
    out, i = [], 0
    for ds, c in zip(datasets, collections):
        X, y, *rest = arrays[i : i + len(c)]
        i += len(c)
        scale = rest[: len(ds.target_scale or ())]
        with client.as_current():  # chunk sizes from this client's futures, not the default's
            persisted = ds._persisted(X, y, tuple(scale) or None)
        if len(rest) > len(scale):  # the same statistics (the same keys), held on the cluster
            persisted.standardized = preprocess.Standardization(*rest[len(scale) :])
        out.append(Held(persisted, _block_futures(persisted.X), _block_futures(persisted.y)))
    counts = client.gather([client.map(validate.value_counts, h.xs, h.ys) for h in out])
    for h, c in zip(out, counts):
        h.counts = np.asarray(c, dtype=np.float64)
    return out


def enough_partitions(client: Client, held: Held, n_ranks: int) -> Held:
    """A held data set with a non-empty partition for each of ``n_ranks`` ranks: one with
    fewer (a single file, or one partition and empty ones) is cut into ``n_ranks`` equal
    partitions on the cluster, instead of being refused."""
    sizes = [int(n) for n in held.ds.X.chunks[0]]
    filled = sum(1 for n in sizes if n)
    if filled >= n_ranks or sum(sizes) < n_ranks:
        return held  # enough already; too few samples is the layout's error to name
    chunk = math.ceil(sum(sizes) / n_ranks)
    logger.info(
        "the data set has %d non-empty partitions for %d ranks: split into partitions of %d "
        "samples", filled, n_ranks, chunk,
    )  # fmt: skip
    ds = held.ds
    split = ds._like(ds.X.rechunk({0: chunk}), ds.y.rechunk({0: chunk}))
    [again] = persist(client, split)
    for f in held.futures:
        f.release()  # the cut copy is computed (persist counted it): the first one goes
    return again


def _stats(ds: Dataset) -> tuple:
    """The lazy statistics a data set's features were standardised with, if any."""
    stats = ds.standardized
    return () if stats is None else tuple(a for a in (stats.mean, stats.std) if hasattr(a, "dask"))


def stream_data(client: Client, *datasets: Dataset) -> list[Held]:
    """The data sets to be streamed: their shared inputs persisted (one graph: they may
    share statistics), and one pass over them on the cluster that keeps nothing but every
    partition's counts, from which unknown partition lengths follow."""
    sources = streaming.sources(client, datasets)
    graph, keys = {}, []
    for n, source in enumerate(sources):
        dsk, ks = source.map_partitions(validate.value_counts, f"daskdl-count-{n}")
        graph.update(dsk)
        keys.append(ks)
    flat = client.gather(client.get(graph, [k for ks in keys for k in ks], sync=False))
    out, i = [], 0
    for ds, source, ks in zip(datasets, sources, keys):
        counts = np.asarray(flat[i : i + len(ks)], dtype=np.float64)
        i += len(ks)
        source.sizes = [int(n) for n in counts[:, 4]]
        out.append(Held(ds._with_lengths(source.sizes), stream=source, counts=counts))
    return out


def read_resume(folder: RunFolder) -> tuple[dict | None, dict | None]:
    """The state a run starts from (``resume=``: the newest checkpoint there that verifies)
    and that checkpoint's manifest; ``(None, None)`` for a fresh run."""
    if folder.resume is None:
        return None, None
    path, model, optimizer, manifest = checkpoint.load_latest(folder.resume, folder.verify_key)
    return {**resume_state(manifest, model, optimizer), "path": path}, manifest


def resume_state(manifest: dict, model: dict, optimizer: dict) -> dict:
    """A checkpoint read from disk as the state a run starts from."""
    return {
        "epoch": manifest["epoch"],
        "model": model,
        "optimizer": optimizer if optimizer.get("param_groups") else None,
        "history": manifest.get("history", []),
        "shards": manifest.get("plan"),
        "partition_sizes": manifest.get("partition_sizes"),
        "trackers": manifest.get("trackers"),
    }


def _block_futures(arr) -> list:
    by_key = {f.key: f for f in futures_of(arr)}
    return [by_key[k] for k in dask.core.flatten(arr.__dask_keys__())]


def _locations(client: Client, futures: list) -> list[list[str]]:
    return who_has_to_locations([f.key for f in futures], client.who_has(futures))
