"""The contract a training loop runs against on its rank: :class:`RankContext`.

``daskdl.launch(client, train_fn, data=...)`` runs ``train_fn(ctx)`` once per rank, one rank per
worker. The context gives the loop what daskdl gives every run: its place among the ranks, the
device, the run's config, a model whose gradients are averaged on backward
(:meth:`RankContext.prepare`), batches of this rank's shard of each data set, all-reduces,
events (``log``: the run's history and the dashboard), and signed, atomic checkpoints that
also let the run go on without a lost worker (``checkpoint``/``restore``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from distributed import get_worker

from daskdl import averaging, checkpoint, events, rundir, security
from daskdl.comm import CollectiveError, make_group
from daskdl.config import TrainConfig
from daskdl.loader import ShardLoader, concat
from daskdl.worker import manager


@dataclass
class LoopSpec:
    """Everything one rank of a user loop needs besides its data."""

    run_id: str
    rank: int
    peers: list[str]
    train_fn: Callable
    config: dict  # the user's own, as given to launch
    options: dict  # TrainConfig fields: device, backend, wire_dtype, seed, ...
    names: list[str]  # the data sets, in the order their partitions come
    n_parts: list[int]  # partitions of each data set for this rank
    target_dtypes: list[str]
    shard_sizes: dict[str, list[int]]  # every rank's shard size, per data set
    out: str | None = None
    staging: str | None = None
    manifest: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    comm_id: str = ""
    elastic: bool = False
    keep_checkpoints: int | None = 3
    signing_key: security.Key | None = None


class RankContext:
    """What a training loop can ask of daskdl on its rank.

    ``rank``, ``world_size``, ``is_main`` (rank 0), ``device``, ``config`` (the dict given to
    ``launch``). Every rank must make the same collective calls in the same order
    (``prepare``'s backward, ``all_reduce``, ``mean``, ``checkpoint``), as with
    ``torch.distributed``; ``batches(..., full=True)`` gives every rank the same number of
    batches so that a training loop's steps line up.
    """

    def __init__(self, spec: LoopSpec, resume: dict | None, parts: tuple[np.ndarray, ...]):
        self.worker = get_worker()
        self.spec = spec
        self.options = TrainConfig.from_dict(spec.options)
        self.rank, self.world_size = spec.rank, len(spec.peers)
        self.config = copy.deepcopy(spec.config)
        torch.set_num_threads(self.options.torch_threads or max(1, self.worker.state.nthreads))
        from daskdl.engine import resolve_device

        self.device = resolve_device(self.options.device)
        # The same random state on every rank: a model built in train_fn starts alike on all
        # of them (prepare() makes sure, from rank 0's), and a seeded run is reproducible.
        torch.manual_seed(self.options.seed)
        self._data, i = {}, 0
        for name, n, dtype in zip(spec.names, spec.n_parts, spec.target_dtypes):
            xs, ys = parts[i : i + 2 * n : 2], parts[i + 1 : i + 2 * n : 2]
            self._data[name] = (concat(xs, np.float32), concat(ys, np.dtype(dtype)))
            i += 2 * n
        self.group = make_group(
            self.options.backend,
            self.worker,
            spec.comm_id or spec.run_id,
            self.rank,
            spec.peers,
            self.options.timeout,
        )
        self._resume = resume
        self._averaging: list[averaging.GradientAveraging] = []
        self._saved: dict | None = None  # the last checkpoint, for a regroup without disk
        self.history = list(spec.history)
        self.steps_done = 0
        self.stopped = False
        self._loaders: dict = {}

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ model

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` on this rank's device, with the same initial weights as on every rank
        (rank 0's), and its gradients averaged over the ranks by every ``backward()``: in
        buckets that start while backward still runs, over daskdl's collective (the run's
        ``backend`` and ``wire_dtype``). A non-finite loss or gradient on any rank raises
        ``FloatingPointError`` from ``backward()`` on every rank (``on_nonfinite="skip"``:
        no gradient at all, so ``optimizer.step()`` changes nothing, and a ``nonfinite``
        event)."""
        model = model.to(self.device)
        self._broadcast_parameters(model)
        sync = averaging.GradientAveraging(
            model,
            None,
            self.group,
            self.options.wire_dtype,
            int(self.options.bucket_mb * 2**20),
            copy_grads=True,
            on_step=self._after_backward,
        )
        self._averaging.append(sync)
        return model

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

    def _after_backward(self, sync: averaging.GradientAveraging) -> None:
        if not sync.bad_ranks:
            return
        where = f"step {self.steps_done} (rank(s) {sync.bad_ranks})"
        if self.options.on_nonfinite == "raise":
            raise FloatingPointError(
                f"Non-finite loss or gradient at {where}. Lower the learning rate, check the "
                "data, or launch with on_nonfinite='skip' to skip such steps."
            )
        for p in sync.params:
            p.grad = None  # optimizer.step() leaves every parameter as it is
        if self.rank == sync.bad_ranks[0]:
            self.emit("nonfinite", step=self.steps_done, ranks=sync.bad_ranks)

    @property
    def should_stop(self) -> bool:
        """Whether the run was asked to stop (``run.stop()``): agreed by every rank at the
        last backward, so all of them see it after the same step."""
        if self._averaging:
            stop = any(sync.stop_agreed for sync in self._averaging)
        else:
            stop = self.all_reduce(float(self.group.box.stop_requested)) > 0
        self.stopped = self.stopped or stop
        return stop

    # ------------------------------------------------------------------ data

    def batches(
        self,
        name: str,
        batch_size: int,
        epoch: int = 0,
        shuffle: bool = True,
        full: bool = True,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of this rank's shard of the data set ``name``, on ``ctx.device``.

        ``full=True`` (training): every rank gets the same number of full batches, the
        largest shard's ceil(n / batch_size), smaller shards wrapping around; shuffled per
        ``epoch`` (seeded by the run's ``seed``, the epoch and the rank). ``full=False``
        (evaluation): each sample of the shard once, in order, the last batch smaller, and a
        number of batches that differs between ranks (sum the results with ``all_reduce``).
        """
        if name not in self._data:
            raise KeyError(f"No data set {name!r}; this run has {sorted(self._data)}.")
        X, y = self._data[name]
        if not full:
            for start in range(0, len(X), batch_size):
                yield (
                    X[start : start + batch_size].to(self.device),
                    y[start : start + batch_size].to(self.device),
                )
            return
        loader = self._loaders.get((name, batch_size, shuffle))
        if loader is None:
            steps = math.ceil(max(self.spec.shard_sizes[name]) / batch_size)
            loader = ShardLoader(
                [X.numpy()], [y.numpy()], batch_size, steps, self.options.seed, self.rank,
                shuffle, False, self.device, y_dtype=y.numpy().dtype,
            )  # fmt: skip
            self._loaders[(name, batch_size, shuffle)] = loader
        for batch in loader.epoch(epoch):
            self.steps_done += 1
            yield batch

    # ------------------------------------------------------------------ collectives

    def all_reduce(self, value, op: str = "sum"):
        """Sum (``op="sum"``) or mean (``"mean"``) of a number, array or tensor over the
        ranks: the same value on every rank, of the type given (a float for a number or a
        one-element tensor)."""
        if op not in ("sum", "mean"):
            raise ValueError(f"op must be 'sum' or 'mean', got {op!r}.")
        scalar = not hasattr(value, "shape") or math.prod(value.shape) == 1
        tensor = torch.as_tensor(value.detach() if torch.is_tensor(value) else value)
        buf = tensor.to("cpu", torch.float64).reshape(-1).numpy().copy()
        self.group.allreduce_(buf)
        if op == "mean":
            buf /= self.world_size
        if scalar:
            return float(buf[0])
        if torch.is_tensor(value):
            return torch.from_numpy(buf).to(value.dtype).reshape(value.shape).to(value.device)
        return buf.reshape(np.shape(value))

    def mean(self, value) -> float:
        """The mean over the ranks of a number or a one-element tensor (a loss, say)."""
        return self.all_reduce(value, "mean")

    # ------------------------------------------------------------------ events

    def emit(self, kind: str, **fields) -> None:
        events.emit(self.worker, self.spec.run_id, kind, rank=self.rank, **fields)

    def log(self, epoch: int, **metrics) -> None:
        """Report an epoch's metrics (numbers; compute them with ``mean``/``all_reduce`` so
        that they hold for the whole run): a row of ``run.history`` and the dashboard's
        curves. ``epoch`` counts from 0, as in ``range(epochs)``; the history's counts epochs
        done (``epoch + 1``), as ``fit``'s does. Only rank 0's call is recorded."""
        row = {k: _number(k, v) for k, v in metrics.items()}
        row.update(epoch=int(epoch) + 1, step=self.steps_done)
        self.history.append(row)
        if self.is_main:
            self.emit("epoch", **row)

    # ------------------------------------------------------------------ checkpoints

    def checkpoint(self, epoch: int, model: torch.nn.Module, optimizer=None) -> None:
        """Keep ``model`` and ``optimizer`` as they are after ``epoch`` (from 0): rank 0
        writes them to the run's folder (signed, atomic, the newest few kept) when the run has
        ``out=``, and every rank keeps them in memory, so that a run that loses a worker
        starts ``train_fn`` again on the survivors from here. Call it on every rank."""
        state = {
            "epoch": int(epoch) + 1,
            "model": checkpoint.model_tensors(model),
            "optimizer": checkpoint.optimizer_tensors(optimizer) if optimizer else None,
            "history": list(self.history),
        }
        self._saved = state
        if self.is_main and self.spec.out:
            path = rundir.save_checkpoint(
                self.spec.out,
                self.spec.staging,
                state["epoch"],
                state["model"],
                state["optimizer"] or ({}, []),
                {**self.spec.manifest, "step": self.steps_done, "history": self.history},
                self.spec.keep_checkpoints,
                self.spec.signing_key,
            )
            self.emit("checkpoint", epoch=state["epoch"], path=str(path))

    def restore(self, model: torch.nn.Module, optimizer=None) -> int:
        """Load the state this run starts from (``launch(resume=...)``, or the last
        ``checkpoint`` after a regroup) into ``model`` (and ``optimizer``); the epoch to start
        from: 0 when there is none."""
        if self._resume is None:
            return 0
        state = self._resume
        model.load_state_dict({k: torch.from_numpy(v) for k, v in state["model"].items()})
        if optimizer is not None and state.get("optimizer"):
            opt_state = state["optimizer"]
            optimizer.load_state_dict(
                copy.deepcopy({k: opt_state[k] for k in ("state", "param_groups")})
            )
        return int(state["epoch"])

    # ------------------------------------------------------------------ end

    def elastic_state(self, error: Exception) -> dict:
        """What the coordinator needs to start the loop again on the survivors: the last
        checkpoint this rank holds (``None``: from the start)."""
        saved = self._saved or {}
        return {
            "elastic": f"{type(error).__name__}: {error}",
            "rank": self.rank,
            "epoch": saved.get("epoch", 0),
            "step": 0,
            "steps_per_epoch": 1,
            "model": saved.get("model"),
            "optimizer": saved.get("optimizer"),
            "history": saved.get("history", []),
        }

    def close(self) -> None:
        for sync in self._averaging:
            sync.close()
        self.group.close()


def _number(name: str, value) -> float:
    if torch.is_tensor(value):
        if value.numel() != 1:
            raise ValueError(f"log({name}=...) takes numbers; got a tensor of {value.numel()}.")
        return float(value.detach().cpu())
    if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"log({name}=...) takes numbers, got {type(value).__name__}.")


def loop_main(spec: LoopSpec, resume: dict | None, *parts: np.ndarray) -> dict | None:
    """The body of one rank task of ``daskdl.launch``: the user's ``train_fn(ctx)``."""
    tuning = manager().tuning
    with tuning.malloc(), tuning.denormals(), tuning.profiler_paused(get_worker(), True):
        ctx = RankContext(spec, resume, parts)
        try:
            result = spec.train_fn(ctx)
        except CollectiveError as e:
            if not spec.elastic:
                raise
            return ctx.elastic_state(e)  # a peer is gone: the coordinator regroups
        finally:
            ctx.close()
    if not ctx.is_main:
        return None
    return {"history": ctx.history, "result": result, "stopped": ctx.stopped}
