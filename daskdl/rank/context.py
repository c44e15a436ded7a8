"""The contract a training loop runs against on its rank: :class:`RankContext`.

``daskdl.launch(client, train_fn, data=...)`` runs ``train_fn(ctx)`` once per rank, one rank per
worker; ``daskdl.fit`` is one such loop (:mod:`daskdl.training.fitloop`). The context gives the
loop what daskdl gives every run: its place among the ranks, the device, the run's config, a model
whose gradients are averaged on backward (:meth:`RankContext.prepare`), batches of this rank's shard
of each data set, all-reduces, events (``log``: the run's history and the dashboard), and
signed, atomic checkpoints that also let the run go on without a lost worker.
"""

from __future__ import annotations

import copy
import gc
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast, overload

import numpy as np
import torch
from distributed import get_worker, secede

from daskdl import events, security
from daskdl.checkpoint import files as checkpoint
from daskdl.checkpoint import rundir
from daskdl.collectives.base import PointToPoint
from daskdl.collectives.comm import CollectiveError, make_group
from daskdl.config import options as config_
from daskdl.config.options import TrainConfig
from daskdl.data.streaming import PartitionReader, Shard
from daskdl.parallel import averaging
from daskdl.parallel.base import Averager
from daskdl.parallel.layouts import layout_of
from daskdl.parallel.pipeline import Pipeline, Stage, split_layers
from daskdl.parallel.sharding import SHARDS, ShardedOptimizer
from daskdl.rank.loader import ShardLoader, StreamLoader, concat
from daskdl.worker.extension import manager

logger = logging.getLogger(__name__)

# What all_reduce and mean take: a number, numbers, an array, a tensor.
Reducible = float | int | list | np.ndarray | torch.Tensor


@dataclass
class LoopSpec:
    """Everything one rank needs besides its data: small, so it travels with the task."""

    run_id: str
    rank: int
    peers: list[str]
    train_fn: Callable
    config: dict  # the loop's own, as given to launch
    options: dict  # TrainConfig fields: device, backend, wire_dtype, seed, ...
    names: list[str]  # the data sets
    target_dtypes: list[str]
    shard_sizes: dict[str, list[int]]  # every rank's shard size, per data set
    out: str | None = None
    staging: str | None = None  # a replacing run's folder until its first checkpoint
    manifest: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    # Elastic training: the ranks of one membership talk under their own comm id, and a
    # regrouped run starts where the survivors were, possibly part-way through an epoch.
    comm_id: str = ""
    start_step: int = 0
    elastic: bool = False
    # Resolved from the client's dask.config: workers may have other settings.
    keep_checkpoints: int | None = 3
    pause_profiler: bool = True
    epoch_gate: bool = False
    signing_key: security.Key | None = None  # signs the checkpoints rank 0 writes
    # Streamed data sets: this rank's partitions, as graphs it computes (daskdl.data.streaming).
    streams: dict[str, Shard] = field(default_factory=dict)


class Regroup(Exception):
    """Raised by :meth:`RankContext.regroup`: hand this rank's state back to regroup."""


class RankContext:
    """What a training loop can ask of daskdl on its rank.

    ``rank``, ``world_size``, ``is_main`` (rank 0), ``device``, ``config`` (the dict given to
    ``launch``), ``options`` (the run's :class:`daskdl.TrainConfig`), ``datasets`` (the names
    of ``launch``'s data sets), ``history`` (the rows logged so far), ``resume_state`` and
    ``resume_step`` (where a resumed or regrouped run starts), ``group`` (the ranks'
    collective, :class:`daskdl.collectives.comm.DaskGroup`: ``allreduce_`` of an array in place).

    Every rank must make the same collective calls in the same order (``prepare``'s
    backward, ``all_reduce``, ``mean``, ``should_regroup``), as with ``torch.distributed``;
    ``batches(..., full=True)`` gives every rank the same number of batches so that a training
    loop's steps line up.

    A streamed data set (``stream=True``, or data larger than the workers' memory) is never
    held whole: ``batches`` and ``partitions`` compute its partitions on this worker as they
    go, ``prefetch`` ahead, and ``shard`` refuses it.
    """

    def __init__(self, spec: LoopSpec, resume: dict | None, data: dict):
        self.worker = get_worker()
        self._task_key = self.worker.get_current_task()
        self.spec = spec
        self.options = TrainConfig.from_dict(spec.options)
        self.rank, self.world_size = spec.rank, len(spec.peers)
        self.config = copy.deepcopy(spec.config)
        torch.set_num_threads(self.options.torch_threads or max(1, self.worker.state.nthreads))
        self.device = resolve_device(self.options.device)
        # The same random state on every rank: a model built in train_fn starts alike on all
        # of them (prepare() makes sure, from rank 0's), and a seeded run is reproducible.
        torch.manual_seed(self.options.seed)
        self._data, self._readers = {}, {}
        for name, dtype in zip(spec.names, spec.target_dtypes):
            if name in spec.streams:  # data[name]: the results its partitions' graphs read
                self._readers[name] = PartitionReader(
                    name, spec.streams[name], data[name], np.dtype(dtype), self.options.prefetch
                )
            else:  # data[name]: this rank's (X, y) blocks
                xs, ys = [x for x, _ in data[name]], [y for _, y in data[name]]
                self._data[name] = (concat(xs, np.float32), concat(ys, np.dtype(dtype)))
        self.group = make_group(
            self.options.backend,
            self.worker,
            spec.comm_id or spec.run_id,
            self.rank,
            spec.peers,
            self.options.timeout,
            self.options.allreduce,
        )
        self.resume_state = resume
        self.resume_step = spec.start_step if resume is not None else 0
        self.history = list(spec.history)
        self.steps_done = 0
        self.stopped = False
        self._averaging: list = []
        self._loaders: dict = {}
        self._saved: dict | None = None  # the last checkpoint, for a regroup without disk
        self._live: tuple | None = None  # what follow() named: handed back as it is
        self._position = (resume["epoch"], self.resume_step) if resume else (0, 0)
        self._steps_per_epoch = 1
        self._batches: list | None = None  # [name, batch size] of the last training batches
        self._spread = False  # the loop sharded or pipelined its state over the ranks

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def datasets(self) -> list[str]:
        """The names of the run's data sets (the keys of ``launch``'s ``data``)."""
        return list(self.spec.names)

    # ------------------------------------------------------------------ model

    def prepare(
        self,
        model: torch.nn.Module,
        optimizer: Callable[[list], torch.optim.Optimizer] | None = None,
        *,
        shard: str | None = None,
    ) -> torch.nn.Module | tuple[torch.nn.Module, torch.optim.Optimizer | ShardedOptimizer]:
        """``model`` on this rank's device, with the same initial weights as on every rank
        (rank 0's), and its gradients averaged over the ranks by every ``backward()``: in
        buckets that start while backward still runs, over daskdl's collective (the run's
        ``backend`` and ``wire_dtype``). A non-finite loss or gradient on any rank raises
        ``FloatingPointError`` from ``backward()`` on every rank (``on_nonfinite="skip"``:
        no gradient at all, so ``optimizer.step()`` changes nothing, and a ``nonfinite``
        event).

        With ``shard`` (default: the run's ``shard`` option), the training state is spread
        over the ranks (:mod:`daskdl.parallel.sharding`), and the optimizer must be built over this
        rank's part of it: pass ``optimizer``, a function of the parameters it updates (say
        ``lambda ps: torch.optim.AdamW(ps, lr=1e-3)``), and get ``(model, optimizer)`` back;
        the ranks then agree on stopping and non-finite steps in ``optimizer.step()``. Every
        rank must run the same forward passes (``shard="full"`` gathers each module's
        parameters as forward reaches it): score uneven shards inside
        ``optimizer.gathered()``.
        """
        cfg = self.options
        shard = cfg.shard if shard is None else config_.choice("shard", shard, SHARDS)
        if cfg.sync_every != 1 or cfg.outer_optimizer is not None:
            raise ValueError(
                f"sync_every={cfg.sync_every} (local SGD) averages parameters and the "
                "optimizer's state, not gradients: use ctx.averaging(model, optimizer) and "
                "call its zero_grad/backward_done/step_done around each step, as fit's loop does."
            )
        if shard is not None and not callable(optimizer):
            raise TypeError(
                f"shard={shard!r} builds the optimizer over this rank's part of the parameters: "
                "pass optimizer=, a function of them, e.g. "
                "ctx.prepare(model, lambda ps: torch.optim.AdamW(ps, lr=1e-3), shard=...), "
                "and use the (model, optimizer) it returns."
            )
        model = model.to(self.device)
        self._broadcast_parameters(model)
        if shard is not None and optimizer is not None:  # checked above: given with shard=
            sharded = self.sharded(model, optimizer, shard)
            return model, sharded
        sync = averaging.GradientAveraging(
            model,
            None,
            self.group,
            cfg.wire_dtype,
            int(cfg.bucket_mb * 2**20),
            copy_grads=True,
            on_step=self._after_backward,
        )
        self._averaging.append(sync)
        return model if optimizer is None else (model, optimizer(list(model.parameters())))

    def sharded(
        self, model: torch.nn.Module, make: Callable[[list], torch.optim.Optimizer], shard: str
    ) -> ShardedOptimizer:
        """``make(params)``'s optimizer over this rank's part of ``model``'s training state
        (see :class:`daskdl.parallel.sharding.ShardedOptimizer`), which also agrees with the other
        ranks on stopping and non-finite steps. The model must start alike on every rank."""
        cfg = self.options
        self._spread = True
        sharded = ShardedOptimizer(
            model, make, self.group, shard, cfg.wire_dtype, int(cfg.bucket_mb * 2**20),
            on_bad=self._after_backward,
        )  # fmt: skip
        self._averaging.append(sharded)
        return sharded

    def pipeline(
        self,
        model: torch.nn.Module | Sequence[torch.nn.Module],
        pipe: Pipeline,
        sample: torch.Tensor | None = None,
    ) -> Stage:
        """This rank's stage of ``model`` (an ``nn.Sequential`` or a list of modules, built
        alike on every rank) cut by ``pipe`` (:class:`daskdl.Pipeline`): rank ``r`` is stage
        ``r % pipe.stages`` of replica ``r // pipe.stages``. Build the optimizer over
        ``stage.parameters()``; each step, ``stage.train_step(xb, yb, loss_fn)`` (the batch
        on the first stage, nothing elsewhere) leaves the gradients of the batch's mean loss
        in them. ``sample``: a batch for ``balance="time"``. See :mod:`daskdl.parallel.pipeline`."""
        if self.device.type != "cpu":
            raise ValueError("Pipelines run on the CPU so far: launch with device='cpu'.")
        if not isinstance(self.group, PointToPoint):  # stages talk point to point
            raise ValueError(
                "Pipelines send activations over daskdl's own comms: launch with "
                "backend='dask' (the default), not backend='torch'."
            )
        layers, bounds = split_layers(model, pipe, self.group, sample)
        self._spread = True
        return Stage(layers, pipe, self.group, bounds)

    def averaging(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | ShardedOptimizer
    ) -> Averager:
        """For a loop that drives the averaging step by step, as ``fit``'s does: the run's
        averager for ``model`` (its ``sync_every``: every step's gradients, or local SGD),
        whose ``zero_grad()``, ``backward_done(stop, loss)`` and ``step_done(step, last)`` the
        loop calls around each step (see :mod:`daskdl.parallel.averaging`); a
        :class:`daskdl.parallel.sharding.ShardedOptimizer` is its own. The model must start alike on
        every rank, as it does when built from the context's seeded random state."""
        sync = layout_of(model, optimizer).averager(self.group, self.options)
        if sync is not optimizer:  # a sharded optimizer is the loop's to close
            self._averaging.append(sync)
        return sync

    def _broadcast_parameters(self, model: torch.nn.Module) -> None:
        tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
        if self.world_size == 1 or not tensors:
            return
        flat = torch.cat([t.detach().reshape(-1).float().cpu() for t in tensors])
        if not self.is_main:
            flat.zero_()
        self.group.allreduce_(flat.numpy())  # rank 0's values, everyone else's zeros
        offset = 0
        with torch.no_grad():
            for t in tensors:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()

    def _after_backward(self, sync: Averager) -> None:
        if not sync.bad_ranks:
            return
        where = f"step {self.steps_done} (rank(s) {sync.bad_ranks})"
        if self.options.on_nonfinite == "raise":
            raise FloatingPointError(
                f"Non-finite loss or gradient at {where}. Lower the learning rate, check the "
                "data, or launch with on_nonfinite='skip' to skip such steps."
            )
        sync.skip_step()
        if self.rank == sync.bad_ranks[0]:
            self.emit("nonfinite", step=self.steps_done, ranks=sync.bad_ranks)

    # ------------------------------------------------------------------ stopping

    @property
    def stop_requested(self) -> bool:
        """Whether this rank was asked to stop (``run.stop()``, or the client that started the
        run is gone): not yet agreed with the other ranks (see ``should_stop``)."""
        self._notice_orphaned()
        return self.group.box.stop_requested

    def _notice_orphaned(self) -> None:
        """Whether the scheduler released this rank's task (its client is gone): then nobody
        wants the result any more, so stop after the next agreed step, on every rank alike,
        as run.stop() does."""
        box = self.group.box
        task = self.worker.state.tasks.get(self._task_key)
        if not box.stop_requested and (
            task is None or task.state in ("cancelled", "released", "forgotten")
        ):
            box.stop_requested = True

    @property
    def should_stop(self) -> bool:
        """Whether the run was asked to stop: agreed by every rank (at the last averaged
        backward or synchronisation, else by an all-reduce now), so all of them see it after
        the same step."""
        if self._averaging:
            stop = any(sync.stop_agreed for sync in self._averaging)
        else:
            stop = self.all_reduce(float(self.stop_requested)) > 0
        self.stopped = self.stopped or stop
        return stop

    # ------------------------------------------------------------------ data

    def streamed(self, name: str) -> bool:
        """Whether the data set ``name`` is streamed (see the class's doc)."""
        if name not in self.spec.names:
            raise KeyError(f"No data set {name!r}; this run has {sorted(self.spec.names)}.")
        return name in self._readers

    def shard(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's shard of the data set ``name``: all its samples and targets, on the CPU
        (empty where the data set has fewer partitions than there are ranks)."""
        if self.streamed(name):
            raise ValueError(
                f"The data set {name!r} is streamed, so this rank never holds its whole shard: "
                f"iterate ctx.batches({name!r}, ...) or ctx.partitions({name!r}), or launch "
                "with stream=False where it fits in memory."
            )
        return self._data[name]

    def partitions(self, name: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's shard of ``name`` piece by piece, on the CPU, in order: the whole shard
        at once where it is held in memory, each partition as it is computed where it is
        streamed (for evaluation: every sample once)."""
        if not self.streamed(name):
            X, y = self.shard(name)
            if len(X):
                yield X, y
            return
        for xs, ys in self._readers[name].stream(range(len(self._readers[name]))):
            yield torch.from_numpy(xs), torch.from_numpy(ys)

    def steps_per_epoch(self, name: str, batch_size: int) -> int:
        """How many batches ``batches(name, batch_size)`` gives each rank per epoch."""
        self.streamed(name)
        return math.ceil(max(self.spec.shard_sizes[name]) / batch_size)

    def batches(
        self,
        name: str,
        batch_size: int,
        epoch: int = 0,
        shuffle: bool = True,
        full: bool = True,
        *,
        start: int = 0,
        augment: bool = False,
        channels_last: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of this rank's shard of the data set ``name``, on ``ctx.device``.

        ``full=True`` (training): every rank gets the same number of full batches
        (``steps_per_epoch``: the largest shard's ceil(n / batch_size), smaller shards
        wrapping around), shuffled per ``epoch`` (seeded by the run's ``seed``, the epoch and
        the rank), from batch ``start`` on (``ctx.resume_step`` in the epoch a regrouped run
        resumes within); ``augment`` crops and flips images on the device. ``full=False``
        (evaluation): each sample of the shard once, in order, the last batch smaller (and,
        streamed, the last of each partition), and a number of batches that differs between
        ranks (sum the results with ``all_reduce``).

        Streamed, an epoch reads the shard's partitions in a seeded order (reshuffled every
        epoch) and draws each batch at random from a pool of the run's ``shuffle_buffer``
        samples across the partitions in flight.
        """
        if not full:
            for X, y in self.partitions(name):
                for first in range(0, len(X), batch_size):
                    yield (
                        X[first : first + batch_size].to(self.device),
                        y[first : first + batch_size].to(self.device),
                    )
            return
        key = (name, batch_size, shuffle, augment, channels_last)
        loader = self._loaders.get(key)
        if loader is None:
            loader = self._loader(name, batch_size, shuffle, augment, channels_last)
            self._loaders[key] = loader
        self._steps_per_epoch, self._batches = loader.steps, [name, batch_size]
        for s, batch in enumerate(loader.epoch(epoch, start), start):
            self._position = (epoch, s)  # steps of this epoch every rank has finished
            self._notice_orphaned()
            self.steps_done += 1
            yield batch
        self._position = (epoch, loader.steps)

    def steps_before(self, epoch: int, steps_per_epoch: int) -> int:
        """The run's step count when ``epoch`` (from 0) began: as the history logged it,
        whatever each epoch's membership made of an epoch's steps (a regrouped run's step
        count goes on from where it was, never back), else ``epoch * steps_per_epoch``."""
        logged = [row["step"] for row in self.history if row.get("epoch") == epoch]
        return int(logged[-1]) if logged and logged[-1] is not None else epoch * steps_per_epoch

    def idle_batches(self, epoch: int, steps: int, start: int = 0) -> Iterator[tuple[None, None]]:
        """The steps of ``epoch`` for a rank that reads no batches (a pipeline's later
        stages, which the first one feeds): ``(None, None)`` for each of steps ``start`` to
        ``steps - 1``, counted as :meth:`batches` counts, so that a regroup knows which steps
        this rank finished."""
        self._steps_per_epoch = steps
        for s in range(start, steps):
            self._position = (epoch, s)
            self.steps_done += 1
            yield None, None
        self._position = (epoch, steps)

    def _loader(self, name, batch_size, shuffle, augment, channels_last):
        steps = self.steps_per_epoch(name, batch_size)
        seed = self.options.seed
        if not self.streamed(name):
            X, y = self.shard(name)
            return ShardLoader(
                [X.numpy()], [y.numpy()], batch_size, steps, seed, self.rank, shuffle,
                augment, self.device, channels_last, y_dtype=y.numpy().dtype,
            )  # fmt: skip
        return StreamLoader(
            self._readers[name], batch_size, steps, seed, self.rank, shuffle,
            self.options.shuffle_buffer, augment, self.device, channels_last,
        )  # fmt: skip

    # ------------------------------------------------------------------ collectives

    @overload
    def all_reduce(self, value: float, op: str = "sum") -> float: ...
    @overload
    def all_reduce(self, value: torch.Tensor, op: str = "sum") -> torch.Tensor: ...
    @overload
    def all_reduce(self, value: Reducible, op: str = "sum") -> Any: ...
    def all_reduce(self, value: Reducible, op: str = "sum") -> Any:
        """Sum (``op="sum"``) or mean (``"mean"``) of a number, array or tensor over the
        ranks: the same value on every rank, of the type given, as ``torch.distributed`` and
        Lightning Fabric return it: a tensor for a tensor (its shape, dtype and device; a
        one-element tensor too, so ``ctx.all_reduce(t).item()`` works), an array for an
        array, a float for a number."""
        if op not in ("sum", "mean"):
            raise ValueError(f"op must be 'sum' or 'mean', got {op!r}.")
        tensor = torch.as_tensor(value.detach() if torch.is_tensor(value) else value)
        buf = tensor.to("cpu", torch.float64).reshape(-1).numpy().copy()
        self.group.allreduce_(buf)
        if op == "mean":
            buf /= self.world_size
        if torch.is_tensor(value):
            # A mean of integers is not an integer (torch.distributed refuses to average them).
            keep = value.is_floating_point() or op == "sum"
            dtype = value.dtype if keep else torch.get_default_dtype()
            return torch.from_numpy(buf).to(dtype).reshape(value.shape).to(value.device)
        if isinstance(value, np.ndarray):
            return buf.reshape(value.shape)
        if len(buf) == 1:  # a number (Python's or numpy's)
            return float(buf[0])
        return buf.reshape(np.shape(value))

    def mean(self, value: Reducible) -> Any:
        """The mean over the ranks of a number or a one-element tensor (a loss, say), as a
        float (for ``log``); of a larger array or tensor, as ``all_reduce`` gives it."""
        out = self.all_reduce(value, "mean")
        return float(out) if np.size(out) == 1 else out

    # ------------------------------------------------------------------ events

    def emit(self, kind: str, **fields: Any) -> None:
        """An event of this run (``step``, ``nonfinite``, ...): the dashboard and the CLI
        show them; ``log`` is the one for epochs."""
        events.emit(self.worker, self.spec.run_id, kind, rank=self.rank, **fields)

    def log(self, epoch: int | None = None, step: int | None = None, **metrics: Any) -> None:
        """Report metrics (numbers, lists of numbers or ``None``; compute them with
        ``mean``/``all_reduce`` so that they hold for the whole run). Only rank 0's call is
        recorded; ``step`` defaults to the batches this rank has trained on.

        With ``epoch`` (counted from 0, as in ``range(epochs)``), an epoch's metrics: a row
        of ``run.history`` (whose ``epoch`` counts epochs done, ``epoch + 1``, as ``fit``'s
        does) and the dashboard's curves. Without it (per-step values, final test metrics),
        a row of ``run.logs`` logged against the step, as Lightning Fabric's ``log_dict``."""
        step = self.steps_done if step is None else int(step)
        if epoch is None:
            row = {"step": step, **{k: _loggable(k, v) for k, v in metrics.items()}}
            if self.is_main:
                self.emit("log", **row)
            return
        row = {"epoch": int(epoch) + 1, "step": step}
        row.update({k: _loggable(k, v) for k, v in metrics.items()})
        self.history.append(row)
        self._position = (int(epoch) + 1, 0)  # a regroup goes on with the next epoch
        if self.is_main:
            self.emit("epoch", **row)

    # ------------------------------------------------------------------ checkpoints

    def checkpoint(
        self,
        epoch: int,
        model: torch.nn.Module | Stage,
        optimizer: torch.optim.Optimizer | ShardedOptimizer | None = None,
        *,
        averaging: Averager | None = None,
        step: int | None = None,
    ) -> None:
        """Keep ``model`` and ``optimizer`` as they are after ``epoch`` (from 0): rank 0
        writes them to the run's folder (signed, atomic, the newest few kept) when the run has
        ``out=``, and with ``max_failures`` every rank keeps them in memory, so that a run
        that loses a worker starts ``train_fn`` again on the survivors from here. Call it on
        every rank. ``averaging`` (from :meth:`averaging`) adds local SGD's outer state; a
        :class:`daskdl.parallel.sharding.ShardedOptimizer` is gathered (on every rank) into the
        plain optimizer's state, which any layout resumes from, and so is a pipeline's ``model``
        (its :class:`daskdl.parallel.pipeline.Stage`; replica 0's stages send theirs to rank 0).
        Held whole on every rank, sharded state would take the memory that sharding saves,
        so a sharded or pipelined run keeps none: it regroups from the checkpoint on disk
        (with ``out=``), else from its start (a pipeline whose stage is followed, :meth:`follow`,
        goes on from a complete replica among the survivors first)."""
        sharded = layout_of(model, optimizer).spread
        keep = self.spec.elastic and self._live is None and not sharded
        writes = self.is_main and self.spec.out
        if not keep and not (self.spec.out if sharded else writes):
            return  # alike on every rank: a sharded state is gathered by all of them or none
        state = self._state(model, optimizer, averaging)
        state.update(epoch=int(epoch) + 1, step=0)
        if keep:
            self._saved = state
        elif sharded and self.spec.elastic:  # where a regroup finds it: on disk
            self._saved = {**state, "model": None, "optimizer": None, "on_disk": True}
        if not writes:
            return
        step = self.steps_done if step is None else int(step)
        path = rundir.save_checkpoint(
            cast(str, self.spec.out),  # set: this rank writes, or a sharded state goes to disk
            self.spec.staging,
            state["epoch"],
            state["model"],
            state["optimizer"] or ({}, []),
            {**self.spec.manifest, "step": step, "history": self.history},
            self.spec.keep_checkpoints,
            self.spec.signing_key,
        )
        self.emit("checkpoint", epoch=state["epoch"], path=str(path))

    def follow(
        self,
        model: torch.nn.Module | Stage,
        optimizer: torch.optim.Optimizer | ShardedOptimizer | None = None,
        *,
        averaging: Averager | None = None,
    ) -> None:
        """Hand ``model`` and ``optimizer`` back as they are when the run regroups, instead of
        the last checkpoint: the survivors of a lost worker go on from the last step every
        rank finished (a failed collective never reaches the optimizer), part-way through an
        epoch (``ctx.resume_step``), losing no step.

        A pipeline's :class:`daskdl.parallel.pipeline.Stage` hands back its own part: the run goes
        on from a complete replica among the survivors (every stage's part at the same step;
        stages that read no batches count their steps with :meth:`idle_batches`), else from
        its last checkpoint on disk."""
        layout_of(model, optimizer).check_followable()
        self._live = (model, optimizer, averaging)

    def _state(self, model, optimizer, averaging_) -> dict:
        outer = averaging_.state_tensors() if averaging_ is not None else None
        tensors, opt = layout_of(model, optimizer).state(keep=self.is_main)
        return {
            "model": tensors,
            "optimizer": checkpoint.state_tensors(opt, outer) if opt is not None else None,
            "history": list(self.history),
        }

    def restore(
        self,
        model: torch.nn.Module | Stage,
        optimizer: torch.optim.Optimizer | ShardedOptimizer | None = None,
        *,
        averaging: Averager | None = None,
    ) -> int:
        """Load the state this run starts from (``resume=``, or where the survivors were after
        a regroup) into ``model`` (and ``optimizer``, and ``averaging``'s outer state); the
        epoch to start from: 0 when there is none (see also ``resume_step``)."""
        state = self.resume_state
        if state is None:
            return 0
        layout_of(model, optimizer).load(state)
        if averaging is not None and state.get("optimizer"):
            averaging.load_state(state["optimizer"].get("outer", {}))
        return int(state["epoch"])

    def wait_for_release(self, epochs_done: int) -> None:
        """In a run with ``epoch_gate``: wait until the client has seen ``epochs_done`` epochs
        and released the ranks (with a stop request, if it decided to stop the run); after
        ``comm_timeout`` without a word, go on as if released."""
        if not self.spec.epoch_gate:
            return
        if not self.group.box.wait_released(epochs_done, self.options.timeout):
            logger.warning(
                "rank %d: no release of epoch %d from the client within %gs: going on",
                self.rank, epochs_done, self.options.timeout,
            )  # fmt: skip

    # ------------------------------------------------------------------ regrouping

    @property
    def should_regroup(self) -> bool:
        """Whether workers joined the cluster and the run should take them in now (agreed by
        every rank; an all-reduce, so call it on every rank, at an epoch's end)."""
        if not self.spec.elastic:
            return False
        # A followed spread state is a pipeline's: its stages hand back their parts.
        followed = self._live is not None and layout_of(*self._live[:2]).spread
        if self._spread and not followed and (self._saved or {}).get("epoch") != self._position[0]:
            # Sharded state regroups from disk: only from this epoch's checkpoint (with out=,
            # written now), or the joiners would cost the epochs since the last.
            return False
        return self.all_reduce(float(self.group.box.regroup_requested)) > 0

    def regroup(self) -> None:
        """Hand this rank's state back (what ``follow`` named, else the last checkpoint: call
        it after ``checkpoint``) and let the run start ``train_fn`` again on its new workers;
        does not return."""
        raise Regroup()

    def elastic_state(self, error: Exception | None) -> dict:
        """What the coordinator needs to start the loop again on a new set of workers."""
        epoch, step = self._position
        part = layout_of(*self._live[:2]).handed_back() if self._live is not None else None
        if part is not None:
            # Its own part only: gathering the replica would need the peer that is gone.
            state: dict[str, Any] = {"model": None, "optimizer": None}
            state.update(history=list(self.history), stage=part)
            saved = self._saved or {}
            if saved.get("on_disk"):  # if no replica is whole among the survivors
                state["disk"] = {"epoch": saved["epoch"], "history": saved["history"]}
        elif self._live is not None:
            state = self._state(*self._live)
        else:
            state = self._saved or {"model": None, "optimizer": None, "history": []}
            epoch, step = state.get("epoch", 0), 0
        return {
            **state,
            "elastic": "join" if error is None else f"{type(error).__name__}: {error}",
            "rank": self.rank,
            "epoch": epoch,
            "step": step,
            "steps_per_epoch": self._steps_per_epoch,
            "batches": self._batches,
        }

    def close(self) -> None:
        for sync in self._averaging:
            sync.close()
        # Let go of what the loop trained (a sharded optimizer's state, say) before the rank
        # hands freed memory back: the context itself outlives the loop a little.
        self._averaging, self._saved, self._live = [], None, None
        self.group.close()


def _loggable(name: str, value):
    if value is None:
        return None
    if torch.is_tensor(value):
        if value.numel() != 1:
            raise ValueError(f"log({name}=...) takes numbers; got a tensor of {value.numel()}.")
        return float(value.detach().cpu())
    if isinstance(value, (list, tuple)):
        return [_loggable(name, v) for v in value]
    if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"log({name}=...) takes numbers, got {type(value).__name__}.")


def resolve_device(name: str) -> torch.device:
    """``"auto"``: the worker's GPU if it sees one, else the CPU. dask-cuda puts each worker's
    own GPU first in ``CUDA_VISIBLE_DEVICES``, so that is always ``cuda:0``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device='cuda', but this worker sees no CUDA GPU.")
        torch.cuda.set_device(0)
        return torch.device("cuda", 0)
    return torch.device("cpu")


def _malloc(tuning, returns_freed: bool):
    """The ranks' allocator settings; ``returns_freed``: glibc hands freed memory back at once
    (low thresholds), for models that gather and free their parameters all the time."""
    if returns_freed:
        return tuning.malloc(mmap_threshold=2**20, trim_threshold=2**20, top_pad=128 * 2**10)
    return tuning.malloc()


def loop_main(spec: LoopSpec, resume: dict | None, data: dict) -> dict | None:
    """The body of every rank task: ``train_fn(ctx)``. ``data`` holds, per data set, this
    rank's (X, y) blocks, or for a streamed one the shared results its partitions read;
    Dask delivered them to this worker before the task started."""
    # A rank runs for the whole run: out of the worker's pool of task threads (as Dask asks
    # of long-running tasks), so that the worker still runs the short tasks others need of
    # its data meanwhile, such as a tuning study's next trial starting on another worker.
    secede()
    tuning = manager().tuning
    # Sharded parameters are gathered and freed all the time, by models too big to spare
    # memory: glibc hands what is freed back at once (its thresholds low), for a fifth of
    # the step's speed in page faults, instead of keeping up to 256 MB for reuse.
    returns = spec.options.get("shard") == "full"
    with (
        _malloc(tuning, returns),
        tuning.denormals(),
        tuning.profiler_paused(get_worker(), spec.pause_profiler),
    ):
        ctx = RankContext(spec, resume, data)
        try:
            result = spec.train_fn(ctx)
        except Regroup:
            return ctx.elastic_state(None)  # workers joined: go on with more ranks
        except CollectiveError as e:
            if not spec.elastic:
                raise
            # A peer is gone: the coordinator regroups the survivors and carries on.
            return ctx.elastic_state(e)
        finally:
            ctx.close()
            # The loop's objects hold each other (modules, hooks, optimizers): freed now,
            # while the settings above still hand what is freed back to the OS.
            gc.collect()
    if not ctx.is_main:
        return None
    return {"history": ctx.history, "result": result, "stopped": ctx.stopped}
