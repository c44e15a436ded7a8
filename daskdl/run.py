"""The client side of a run: validate, plan shards, start one rank task per worker, watch them,
and hand back a :class:`Run`."""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import torch
from distributed import Client, futures_of, wait

from daskdl import checkpoint, comm, events, models
from daskdl.config import TrainConfig
from daskdl.data import (
    Dataset,
    balanced_shards,
    match_workers,
    shard_sizes,
    who_has_to_locations,
)
from daskdl.engine import RankSpec, evaluate_shard, rank_main


class RunError(RuntimeError):
    """A rank failed; the message names the rank and its worker."""


class Run:
    """A training run on a Dask cluster.

    ``fit(..., block=False)`` returns one at once; ``wait()`` blocks until it ends.
    ``history`` has one row per finished epoch, ``model`` is the trained module (on the CPU).
    """

    def __init__(
        self,
        client: Client,
        run_id: str,
        spec: dict,
        futures: list,
        data: list,
        recorder,
        workers: list[str],
        out: Path | None,
    ):
        self.client = client
        self.run_id = run_id
        self.spec = spec
        self.workers = workers
        self.out = out
        self._futures = futures
        self._data = data
        self._recorder = recorder
        self._result: dict | None = None
        self._error: BaseException | None = None
        self._model: torch.nn.Module | None = None
        self._state = None  # the trained weights, scattered to the workers by evaluate()

    def __repr__(self) -> str:
        return f"<daskdl.Run {self.run_id} {self.status}, {len(self.workers)} ranks>"

    @property
    def done(self) -> bool:
        if self._result is not None or self._error is not None:
            return True
        return all(f.done() for f in self._futures)

    @property
    def status(self) -> str:
        if self._error is not None:
            return "failed"
        if self._result is not None:
            return "stopped" if self._result["stopped"] else "finished"
        return "running"

    @property
    def history(self) -> pd.DataFrame:
        """One row per finished epoch: epoch, step, train_loss, train_accuracy, val_loss,
        val_accuracy, val_perplexity, samples_per_s, epoch_time, lr."""
        if self._result is not None:
            return events.history_frame(self._result["history"])
        return self._recorder.history()

    @property
    def model(self) -> torch.nn.Module:
        """The trained model on the CPU (waits for the run to end)."""
        if self._model is None:
            self.wait()
            model = models.build(
                self.spec["model"], self.spec["input_shape"], self.spec["n_classes"]
            )
            state = {k: torch.from_numpy(v) for k, v in self._result["model"].items()}
            model.load_state_dict(state)
            self._model = model.eval()
        return self._model

    def wait(self, timeout: float | None = None) -> Run:
        """Block until every rank has finished; raise the first rank's error if one failed."""
        if self._error is not None:
            raise self._error
        if self._result is not None:
            return self
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                try:
                    wait(self._futures, timeout=1.0)
                except TimeoutError:
                    pass
                failed = [i for i, f in enumerate(self._futures) if f.status == "error"]
                if failed:
                    self._fail(self._rank_error(failed))
                live = self._live_workers()
                gone = [i for i, w in enumerate(self.workers) if w not in live]
                if gone and not self.done:
                    names = ", ".join(f"rank {i} ({self.workers[i]})" for i in gone)
                    self._fail(RunError(f"run {self.run_id}: worker of {names} left the cluster."))
                if self.done:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"run {self.run_id} still running after {timeout}s")
            self._result = self._futures[0].result()
            self._finish("stopped" if self._result["stopped"] else "finished")
        except KeyboardInterrupt:
            self._fail(RunError(f"run {self.run_id} interrupted"))
        return self

    def dashboard(self):
        """A live dashboard of this run (and the others on the cluster), for a notebook.

        Needs ``pip install "daskdl[app]"``; see :func:`daskdl.dashboard`.
        """
        from daskdl.webapp import dashboard

        app = dashboard(self.client)
        if self.run_id in app.store.runs:
            app.store.selected = self.run_id
        return app

    def stop(self) -> Run:
        """Ask every rank to stop after the current step, and wait for them."""
        self.client.run(comm.request_stop, self.run_id, workers=self.workers, on_error="ignore")
        return self.wait()

    def evaluate(self, data: Dataset, batch_size: int = 512) -> dict[str, float]:
        """Loss and accuracy of the trained model on ``data``, computed on the cluster.

        Each partition is scored where it lives; only three numbers per partition come back.
        """
        _check_compatible(data, self.spec["input_shape"], name="data")
        if self._state is None:
            # One future for the whole state dict, under a fresh key: scattering the dict itself
            # would key each tensor by its bare name, and a content hash would reuse a key that
            # an earlier call may be releasing at this very moment.
            [self._state] = self.client.scatter([self._result_model()], broadcast=True, hash=False)
        state = self._state
        X_parts = data.X.to_delayed(optimize_graph=False).ravel()
        y_parts = data.y.to_delayed(optimize_graph=False).ravel()
        score = dask.delayed(_score_partition, pure=True)
        spec = {k: self.spec[k] for k in ("model", "input_shape", "n_classes")}
        sums = [score(spec, state, x, y, batch_size) for x, y in zip(X_parts, y_parts)]
        total = np.sum(self.client.compute(sums, sync=True), axis=0)
        return {"loss": float(total[0] / total[2]), "accuracy": float(total[1] / total[2])}

    def _result_model(self) -> dict:
        self.wait()
        return self._result["model"]

    def _live_workers(self) -> set[str]:
        return set(self.client.scheduler_info(n_workers=-1)["workers"])

    def _rank_error(self, failed: list[int]) -> BaseException:
        errors = [(i, self._futures[i].exception()) for i in failed]
        # A rank that merely saw its collective aborted is a symptom; report the cause.
        errors.sort(key=lambda e: isinstance(e[1], comm.CollectiveAborted))
        i, exc = errors[0]
        err = RunError(
            f"run {self.run_id}: rank {i} on {self.workers[i]} failed: {type(exc).__name__}: {exc}"
        )
        err.__cause__ = exc
        return err

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self.client.run(
            comm.abort,
            self.run_id,
            str(error),
            workers=list(self._live_workers() & set(self.workers)),
            on_error="ignore",
        )
        self.client.cancel(self._futures, force=True)
        self._finish("failed", error=str(error))
        raise error

    def _finish(self, status: str, **fields) -> None:
        # Release the rank tasks and this run's hold on the partitions now, in order with what
        # the client sends next (say an evaluate() on the same data), not whenever the garbage
        # collector gets to the futures. Data the user persisted stays: they hold it too.
        for f in self._futures + self._data:
            f.release()
        self._data = []
        self._recorder.close()
        self.client.log_event(
            events.topic(self.run_id),
            {"run": self.run_id, "kind": "end", "status": status, **fields},
        )
        events.unsubscribe(self.client, events.topic(self.run_id), self._recorder.handle)
        if self.out is not None and status != "failed":
            self.out.mkdir(parents=True, exist_ok=True)
            self.history.to_csv(self.out / "metrics.csv", index=False)


def _score_partition(spec: dict, state: dict, X: np.ndarray, y: np.ndarray, batch_size: int):
    model = models.build(spec["model"], spec["input_shape"], spec["n_classes"])
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    X = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
    y = torch.from_numpy(np.asarray(y, dtype=np.int64))
    return evaluate_shard(model, X, y, batch_size, autocast=torch.autocast("cpu", enabled=False))


def _check_compatible(data, input_shape, name: str) -> None:
    if not isinstance(data, Dataset):
        raise TypeError(
            f"{name} must be a daskdl.Dataset, got {type(data).__name__}. "
            "Wrap arrays with daskdl.Dataset.from_numpy(X, y) or Dataset.from_dask(X, y)."
        )
    if tuple(data.sample_shape) != tuple(input_shape):
        raise ValueError(
            f"{name} has samples of shape {data.sample_shape}, but the model takes "
            f"{tuple(input_shape)}."
        )


def _validate_labels(train: Dataset, val: Dataset | None, n_classes: int | None) -> int:
    """Check labels and features on the cluster (only a few numbers come back)."""
    checks = []
    for ds in [train] + ([val] if val is not None else []):
        y = ds.y
        checks += [
            y.min(),
            y.max(),
            (y != y.astype(np.int64)).sum() if np.issubdtype(y.dtype, np.floating) else 0,
            (~dask.array.isfinite(ds.X)).sum(),
        ]
    values = dask.compute(*checks)
    lo = min(values[0::4])
    hi = max(values[1::4])
    n_classes = n_classes or max(2, int(hi) + 1)
    for which, (_, _, fractional, bad) in zip(("train", "val"), np.reshape(values, (-1, 4))):
        if bad:
            raise ValueError(
                f"The {which} features contain {int(bad)} NaN or infinite values. Clean them, "
                "or drop those samples with dataset.dropna()."
            )
        if fractional:
            raise ValueError(f"The {which} labels contain {int(fractional)} non-integer values.")
    if lo < 0 or hi >= n_classes:
        raise ValueError(
            f"Labels must be in [0, {n_classes}) but range over [{lo:g}, {hi:g}]. "
            "Map class labels to 0..n_classes-1, or pass n_classes to the Dataset."
        )
    return n_classes


def _block_futures(arr) -> list:
    by_key = {f.key: f for f in futures_of(arr)}
    return [by_key[k] for k in dask.core.flatten(arr.__dask_keys__())]


def _persist(client: Client, *datasets: Dataset) -> list[tuple[Dataset, list, list]]:
    """Persist the data sets in one graph (they share keys, such as standardisation stats).

    Unoptimised, so that each key keeps the task it has in the user's collections: a later
    computation on them (``Run.evaluate``, the user's own) then agrees with the scheduler about
    every shared key instead of resubmitting it fused differently.
    """
    arrays = client.persist([a for ds in datasets for a in (ds.X, ds.y)], optimize_graph=False)
    out = []
    for i, ds in enumerate(datasets):
        persisted = ds._persisted(arrays[2 * i], arrays[2 * i + 1])
        out.append((persisted, _block_futures(persisted.X), _block_futures(persisted.y)))
    return out


def _locations(client: Client, futures: list) -> list[list[str]]:
    return who_has_to_locations([f.key for f in futures], client.who_has(futures))


def _choose_workers(client: Client, workers: list[str] | int | None) -> list[str]:
    info = client.scheduler_info(n_workers=-1)["workers"]
    if not info:
        client.wait_for_workers(1, timeout=dask.config.get("distributed.comm.timeouts.connect"))
        info = client.scheduler_info(n_workers=-1)["workers"]
    available = sorted(info)
    if workers is None:
        return available
    if isinstance(workers, int):
        if not 1 <= workers <= len(available):
            raise ValueError(
                f"workers={workers}, but the cluster has {len(available)} workers. Start more "
                "workers or ask for fewer ranks."
            )
        return available[:workers]
    unknown = [w for w in workers if w not in info]
    if unknown:
        raise ValueError(f"Workers {unknown} are not in the cluster; it has {available}.")
    return list(workers)


def _cuda_device_count() -> int:
    return torch.cuda.device_count()


def _check_gpus(client: Client, ranks: list[str]) -> None:
    counts = client.run(_cuda_device_count, workers=ranks)
    missing = sorted(w for w, n in counts.items() if n == 0)
    if missing:
        raise RuntimeError(
            f"device='cuda', but workers {missing} see no CUDA GPU. Start GPU workers "
            "(daskdl.local_cluster(gpus=True), or `dask cuda worker`), or use device='auto', "
            "which trains on the CPU where there is no GPU."
        )


def fit(
    client: Client,
    model: models.ModelSpec,
    train: Dataset,
    val: Dataset | None = None,
    *,
    epochs: int = 10,
    batch_size: int = 32,
    lr: float = 0.05,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 5e-4,
    schedule: str = "cosine",
    warmup_epochs: float = 0.0,
    precision: str = "fp32",
    augment: bool | None = None,
    shuffle: bool = True,
    seed: int = 0,
    checkpoint_every: int = 1,
    backend: str = "dask",
    sync_every: int = 1,
    wire_dtype: str = "fp32",
    bucket_mb: float = 25.0,
    outer_optimizer: str | None = None,
    outer_lr: float = 0.7,
    outer_momentum: float = 0.9,
    comm_timeout: float | None = None,
    torch_threads: int | None = None,
    device: str = "auto",
    channels_last: bool | None = None,
    compile: bool = False,
    on_nonfinite: str = "raise",
    workers: list[str] | int | None = None,
    out: str | os.PathLike | None = None,
    resume: str | os.PathLike | None = None,
    block: bool = True,
    progress: bool = True,
    meta: dict | None = None,
) -> Run:
    """Train ``model`` on ``train`` data-parallel, one rank per Dask worker.

    Parameters
    ----------
    client
        Any ``distributed.Client``: a LocalCluster, ``dask scheduler``/``dask worker``, ...
    model
        A name from ``daskdl.models.REGISTRY`` (``"mlp"``, ``"small_cnn"``, ``"resnet18"``,
        ``"vgg11"``, ``"vgg16"``) or a factory ``f(input_shape, n_classes) -> nn.Module``.
    train, val
        :class:`daskdl.Dataset`. Each rank trains on the partitions the shard plan gives it and
        evaluates its share of ``val`` after every epoch.
    batch_size
        Per rank; the global batch is ``batch_size * number of ranks``.
    workers
        Which workers get a rank (addresses, or a count); default all.
    out
        Run directory for checkpoints (``out/checkpoints/epoch-NNNN``) and ``metrics.csv``.
        Rank 0 writes the checkpoints, so on a multi-machine cluster it must be a shared path.
    resume
        A run directory or checkpoint to continue from (the newest checkpoint that verifies).
    block
        ``False`` returns the :class:`Run` at once; call ``run.wait()``.
    meta
        JSON-able facts to keep with the run (its ``start`` event, ``config.json`` and
        checkpoints), such as the name of the data set; the dashboard reads them.

    backend
        ``"dask"``: the all-reduce over Dask's worker-to-worker comms (encrypted with the
        cluster's TLS); ``"torch"``: a ``torch.distributed`` gloo process group over the same
        ranks.
    sync_every
        1 averages gradients after every backward pass; ``H > 1`` is local SGD: each rank
        takes H steps on its own, then parameters and optimizer momentum are averaged.
    wire_dtype
        ``"bf16"`` sends gradients as bfloat16 between ranks: half the bytes.
    bucket_mb
        Gradients are all-reduced in buckets of about this many MB (the first is 1 MB), each
        starting as soon as backward has produced it, as in DDP (``bucket_cap_mb``).
    outer_optimizer
        ``"nesterov"``: a DiLoCo-style outer step on the averaged change at each
        synchronisation (``outer_lr``, ``outer_momentum``), which lets large H work.
    device
        ``"auto"`` (each rank on its worker's GPU where it has one, else the CPU), ``"cpu"``
        or ``"cuda"`` (an error before training if a worker has no GPU). Use
        ``daskdl.local_cluster(gpus=True)`` for one worker per GPU.
    on_nonfinite
        A NaN or infinite loss or gradient on any rank is caught before the optimizer step
        (on every rank alike): ``"raise"`` ends the run with an error naming the rank(s), step
        and batch; ``"skip"`` skips that step everywhere and logs a ``nonfinite`` event.
    channels_last, compile
        CUDA speed-ups: channels-last memory format for conv nets (default: on for images on
        CUDA) and ``torch.compile``.

    The remaining options are :class:`daskdl.config.TrainConfig`'s.

    Examples
    --------
    >>> client = daskdl.local_cluster(n_workers=2)                      # doctest: +SKIP
    >>> train, test = daskdl.datasets.digits().split(0.2, seed=0)       # doctest: +SKIP
    >>> run = daskdl.fit(client, "small_cnn", train, val=test, epochs=15)  # doctest: +SKIP
    >>> run.history[["epoch", "val_accuracy"]].tail(1)                  # doctest: +SKIP
    """
    cfg = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        optimizer=optimizer,
        momentum=momentum,
        nesterov=nesterov,
        weight_decay=weight_decay,
        schedule=schedule,
        warmup_epochs=warmup_epochs,
        precision=precision,
        augment=augment,
        shuffle=shuffle,
        seed=seed,
        checkpoint_every=checkpoint_every,
        backend=backend,
        sync_every=sync_every,
        wire_dtype=wire_dtype,
        bucket_mb=bucket_mb,
        outer_optimizer=outer_optimizer,
        outer_lr=outer_lr,
        outer_momentum=outer_momentum,
        comm_timeout=comm_timeout,
        torch_threads=torch_threads,
        device=device,
        channels_last=channels_last,
        compile=compile,
        on_nonfinite=on_nonfinite,
    )
    # Settings from the client's dask.config travel with the run: workers may differ.
    cfg.comm_timeout = cfg.timeout
    try:
        json.dumps(meta or {})
    except TypeError as e:
        raise TypeError(f"meta must be JSON-able (str, numbers, lists, dicts): {e}") from None
    if not isinstance(client, Client):
        raise TypeError(
            f"fit needs a distributed.Client as its first argument, got {type(client).__name__}."
            " HINT: client = daskdl.local_cluster(n_workers=2)."
        )
    _check_compatible(train, getattr(train, "sample_shape", None), name="train")
    if val is not None:
        _check_compatible(val, train.sample_shape, name="val")
    if cfg.augment and not train.is_image:
        raise ValueError(
            f"augment=True needs images (n, C, H, W); the data's samples are {train.sample_shape}."
        )
    resume_state, manifest, history = None, None, []
    if resume is not None:
        path, model_t, opt_state, manifest = checkpoint.load_latest(resume)
        if manifest["epoch"] >= cfg.epochs:
            raise ValueError(
                f"Checkpoint {path} has already finished epoch {manifest['epoch']}; ask for more "
                f"than {manifest['epoch']} epochs to continue it."
            )
        resume_state = {"model": model_t, "optimizer": opt_state}
        history = manifest.get("history", [])

    ranks = _choose_workers(client, workers)
    if cfg.device == "cuda":
        _check_gpus(client, ranks)
    persisted = _persist(client, train, *([val] if val is not None else []))
    train, x_futs, y_futs = persisted[0]
    if val is not None:
        val, xv_futs, yv_futs = persisted[1]
    n_classes = _validate_labels(train, val, train._n_classes)
    # Build one replica here: a bad model or shape fails now, not on every worker.
    probe = models.build(model, train.sample_shape, n_classes)
    n_params = sum(p.numel() for p in probe.parameters())
    del probe

    sizes = [int(c) for c in train.X.chunks[0]]
    if len(sizes) < len(ranks):
        raise ValueError(
            f"The training data has {len(sizes)} partitions for {len(ranks)} ranks; each rank "
            "needs at least one. Repartition it (Dataset.from_numpy(..., chunks=...)) or use "
            f"workers={len(sizes)}."
        )
    if (
        manifest is not None
        and len(manifest["plan"]) == len(ranks)
        and manifest["partition_sizes"] == sizes
    ):
        plan = manifest["plan"]  # the same shards as before, so the resumed run is identical
    else:
        plan = balanced_shards(sizes, len(ranks))
    # Rank r always trains on shard r; where the data lives only decides which worker is rank r.
    ranks = [ranks[j] for j in match_workers(plan, sizes, _locations(client, x_futs), ranks)]
    shards = shard_sizes(plan, sizes)
    if cfg.batch_size > min(shards):
        r = int(np.argmin(shards))
        raise ValueError(
            f"batch_size={cfg.batch_size} is larger than rank {r}'s shard ({shards[r]} samples). "
            f"Use batch_size <= {min(shards)}, or fewer workers."
        )
    steps = math.ceil(max(shards) / cfg.batch_size)
    val_plan = [[] for _ in ranks]
    if val is not None:
        val_sizes = [int(c) for c in val.X.chunks[0]]
        if len(val_sizes) >= len(ranks):
            val_shards = balanced_shards(val_sizes, len(ranks))
        else:  # some ranks evaluate nothing
            val_shards = [[i] for i in range(len(val_sizes))]
            val_shards += [[] for _ in range(len(ranks) - len(val_sizes))]
        matched = match_workers(val_shards, val_sizes, _locations(client, xv_futs), ranks)
        for shard, r in zip(val_shards, matched):
            val_plan[r] = shard

    run_id = uuid.uuid4().hex[:8]
    out_path = Path(out) if out is not None else None
    if out_path is not None:
        out_path.mkdir(parents=True, exist_ok=True)
    start_epoch = manifest["epoch"] if manifest else 0
    spec = {"model": model, "input_shape": train.sample_shape, "n_classes": n_classes}
    config = cfg.to_dict()
    public = {
        "run": run_id,
        "model": models.describe(model),
        "config": config,
        "world_size": len(ranks),
        "workers": ranks,
        "steps_per_epoch": steps,
        "n_params": n_params,
        "n_train": sum(sizes),
        "input_shape": list(train.sample_shape),
        "n_classes": n_classes,
        "start_epoch": start_epoch,
        "out": str(out_path) if out_path else None,
        "meta": meta or {},
    }
    if out_path is not None:
        (out_path / "config.json").write_text(json.dumps(public, indent=1))

    recorder = events.Recorder(run_id, steps * cfg.epochs, start_epoch * steps, progress)
    recorder.epochs.extend(history)
    events.subscribe(client, events.topic(run_id), recorder.handle)
    client.log_event(events.topic(run_id), {"kind": "start", **public})
    client.log_event(events.RUNS_TOPIC, {"kind": "start", **public})
    comm.ensure_plugin(client)

    # Checkpoints record the shard plan, so that a resumed run trains on the same shards.
    manifest_out = {**public, "plan": plan, "partition_sizes": sizes}
    futures = []
    for r, addr in enumerate(ranks):
        rank_spec = RankSpec(
            run_id=run_id,
            rank=r,
            peers=ranks,
            model=model,
            input_shape=train.sample_shape,
            n_classes=n_classes,
            config=config,
            n_train_parts=len(plan[r]),
            has_val=val is not None,
            steps_per_epoch=steps,
            start_epoch=start_epoch,
            out=str(out_path.resolve()) if out_path else None,
            manifest=manifest_out,
            history=history,
            log_interval=dask.utils.parse_timedelta(dask.config.get("daskdl.log-interval")),
            keep_checkpoints=dask.config.get("daskdl.keep-checkpoints"),
        )
        parts = [f for i in plan[r] for f in (x_futs[i], y_futs[i])]
        parts += [f for i in val_plan[r] for f in (xv_futs[i], yv_futs[i])]
        futures.append(
            client.submit(
                rank_main,
                rank_spec,
                resume_state,
                *parts,
                key=f"daskdl-rank-{r}-{run_id}",
                workers=[addr],
                allow_other_workers=False,
                pure=False,
                retries=0,
            )
        )
    data = x_futs + y_futs + (xv_futs + yv_futs if val is not None else [])
    run = Run(client, run_id, spec, futures, data, recorder, ranks, out_path)
    if block:
        run.wait()
    return run
