"""``daskdl.launch``: the user's own training loop on every rank, with everything daskdl gives
a run (ranks on the workers that hold the data, averaged gradients, events and history, the
dashboard, signed checkpoints, going on without a lost worker).

The loop is a function ``train_fn(ctx)`` of a :class:`daskdl.RankContext`; Lightning Fabric's
``launch(fn)`` and Ray Train's ``train_loop_per_worker`` are the same idea.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import dask
import numpy as np
from distributed import Client

from daskdl import checkpoint, events, preflight, rundir, security
from daskdl import config as config_
from daskdl.context import LoopSpec, loop_main
from daskdl.data import Dataset
from daskdl.launcher import (
    _locations,
    _persist,
    _train_config,
    announce,
    check_client,
    check_cluster,
    check_meta,
    check_parts,
    run_folder,
)
from daskdl.objective import target_dtype
from daskdl.run import Run
from daskdl.shards import balanced_shards, match_workers, shard_sizes, spread_shards

# The TrainConfig fields that the contract itself uses; the others are fit's loop's.
LOOP_OPTIONS = (
    "seed",
    "device",
    "backend",
    "wire_dtype",
    "bucket_mb",
    "on_nonfinite",
    "comm_timeout",
    "torch_threads",
    "max_failures",
)


def launch(
    client: Client,
    train_fn: Callable,
    data: Mapping[str, Dataset],
    config: Mapping | None = None,
    *,
    workers: list[str] | int | None = None,
    out: str | os.PathLike | None = None,
    resume: str | os.PathLike | bool | None = None,
    overwrite: bool = False,
    signing_key: str | os.PathLike | security.Key | None = None,
    verify_key: str | os.PathLike | security.Key | None = None,
    block: bool = True,
    progress: bool = True,
    meta: dict | None = None,
    **options,
) -> Run:
    """Run ``train_fn(ctx)`` on one rank per worker, each with its shard of ``data``.

    Parameters
    ----------
    train_fn
        ``train_fn(ctx: daskdl.RankContext)``: the training loop. What rank 0 returns (a
        picklable value) is ``run.result``.
    data
        Named data sets, such as ``{"train": train, "val": val}``; each is persisted on the
        cluster and cut into one shard per rank (the first by sample counts and where its
        partitions live; it needs a partition per rank), which ``ctx.batches(name, ...)``
        iterates.
    config
        A JSON-able dict for the loop (``ctx.config``): learning rate, epochs, ...
    **options
        :class:`daskdl.TrainConfig` fields that the contract uses: ``seed`` (shuffling),
        ``device``, ``backend``, ``wire_dtype``, ``bucket_mb`` (``ctx.prepare``),
        ``on_nonfinite``, ``comm_timeout``, ``torch_threads``, ``max_failures`` (workers the
        run may lose: then ``train_fn`` starts again on the survivors from the last
        ``ctx.checkpoint``, kept in memory).

    ``workers``, ``out``, ``resume``, ``overwrite``, ``signing_key``, ``verify_key``,
    ``block``, ``progress`` and ``meta`` are as for :func:`daskdl.fit`.

    Examples
    --------
    >>> def train_fn(ctx):                                                # doctest: +SKIP
    ...     model = ctx.prepare(torch.nn.Linear(4, 2))
    ...     opt = torch.optim.SGD(model.parameters(), lr=ctx.config["lr"])
    ...     for epoch in range(ctx.restore(model, opt), ctx.config["epochs"]):
    ...         for xb, yb in ctx.batches("train", batch_size=32, epoch=epoch):
    ...             loss = torch.nn.functional.cross_entropy(model(xb), yb)
    ...             loss.backward(); opt.step(); opt.zero_grad()
    ...         ctx.log(epoch=epoch, train_loss=ctx.mean(loss))
    ...         ctx.checkpoint(epoch=epoch, model=model, optimizer=opt)
    >>> run = daskdl.launch(client, train_fn, {"train": train},          # doctest: +SKIP
    ...                     config={"lr": 0.1, "epochs": 3})
    """
    config_.check_names(options)
    builtin = sorted(set(options) - set(LOOP_OPTIONS))
    if builtin:
        raise ValueError(
            f"{builtin} are options of fit's built-in loop; a launch() loop takes its own "
            f"settings in config= (ctx.config[...]). launch's options are {list(LOOP_OPTIONS)}."
        )
    cfg = _train_config(None, options)
    block, progress = config_.flag("block", block), config_.flag("progress", progress)
    check_client(client, "launch")
    check_meta(meta)
    user_config = _check_loop(train_fn, data, config)
    out_path, resume, key, verify_key = run_folder(out, resume, overwrite, signing_key, verify_key)
    resume_state = None
    if resume is not None:
        _, model_t, opt_state, manifest = checkpoint.load_latest(resume, verify_key)
        resume_state = {
            "epoch": manifest["epoch"],
            "model": model_t,
            "optimizer": opt_state if opt_state.get("param_groups") else None,
            "history": manifest.get("history", []),
        }
    ranks = check_cluster(client, cfg, key, workers)
    names = list(data)
    persisted = _persist(client, *data.values())
    futures = [f for _, xs, ys in persisted for f in xs + ys]
    staging = None
    try:
        check_parts(client, {n: (xs, ys, ds.task) for n, (ds, xs, ys) in zip(names, persisted)})
        run_id = uuid.uuid4().hex[:8]
        staging = rundir.claim(out_path, resume, overwrite, run_id) if out_path else None
        loop = LoopLaunch(
            client=client,
            run_id=run_id,
            train_fn=train_fn,
            user_config=user_config,
            names=names,
            persisted=persisted,
            config=cfg.to_dict(),
            out=str(out_path.resolve()) if out_path else None,
            out_arg=str(out_path) if out_path else None,
            staging=str(staging.resolve()) if staging else None,
            elastic=cfg.max_failures > 0,
            signing_key=key,
        )
        run = _start(loop, ranks, resume_state, futures, meta or {}, progress)
        run._max_failures, run._grow = cfg.max_failures, False
    except BaseException:
        for f in futures:
            f.release()
        if staging is not None:
            rundir.abandon(out_path, staging, "could not start")
        raise
    if block:
        run.wait()
    return run


def _check_loop(train_fn, data, config) -> dict:
    if not callable(train_fn):
        raise TypeError(f"train_fn must be a function of a RankContext, got {train_fn!r}.")
    preflight.check_picklable(train_fn, f"train_fn {getattr(train_fn, '__qualname__', '')}")
    if not isinstance(data, Mapping) or not data:
        raise TypeError(
            "data must be a dict of named daskdl.Dataset objects, such as "
            "{'train': train, 'val': val}."
        )
    for name, ds in data.items():
        if not isinstance(name, str) or not isinstance(ds, Dataset):
            raise TypeError(
                f"data[{name!r}] must be a daskdl.Dataset under a str name, got "
                f"{type(ds).__name__}."
            )
    if config is not None and not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict, got {type(config).__name__}.")
    try:
        json.dumps(dict(config or {}))
    except TypeError as e:
        raise TypeError(f"config must be JSON-able (str, numbers, lists, dicts): {e}") from None
    return dict(config or {})


def _start(loop: LoopLaunch, ranks, resume_state, futures, meta: dict, progress: bool) -> Run:
    client = loop.client
    epochs = loop.user_config.get("epochs")
    loop.public = public = {
        "run": loop.run_id,
        "model": f"train_fn {getattr(loop.train_fn, '__qualname__', 'train_fn')}",
        # The contract's options; epochs are the loop's own (for the dashboard's progress).
        "config": {**loop.config, "epochs": epochs if isinstance(epochs, int) else None},
        "loop_config": loop.user_config,
        "world_size": len(ranks),
        "workers": ranks,
        "data": {n: len(ds) for n, (ds, _, _) in zip(loop.names, loop.persisted)},
        "start_epoch": resume_state["epoch"] if resume_state else 0,
        "out": loop.out_arg,
        "meta": meta,
        "max_failures": loop.config["max_failures"],
        "launched_by": "launch",
    }
    recorder = events.Recorder(loop.run_id, epochs, public["start_epoch"], progress, unit="epoch")
    recorder.epochs.extend(resume_state["history"] if resume_state else [])
    announce(loop, recorder)
    ranks, rank_plans, steps = loop.plan(ranks)
    history = resume_state["history"] if resume_state else []
    epoch = public["start_epoch"]
    run_futures = loop.submit(ranks, rank_plans, steps, resume_state, epoch, 0, history)
    out = Path(loop.out_arg) if loop.out_arg else None
    staging = Path(loop.staging) if loop.staging else None
    run = Run(
        client, loop.run_id, {"loop": True}, run_futures, futures, recorder, ranks, out, staging
    )
    run._launch = loop
    return run


@dataclass
class LoopLaunch:
    """What it takes to start (and, after losing a worker, restart) a user loop's ranks: the
    same interface as :class:`daskdl.launcher.Launch`, which the run's coordinator drives."""

    client: Client
    run_id: str
    train_fn: Callable
    user_config: dict
    names: list[str]
    persisted: list
    config: dict
    out: str | None
    elastic: bool
    signing_key: security.Key | None = None
    out_arg: str | None = None
    staging: str | None = None
    public: dict = field(default_factory=dict)
    generation: int = 0

    @property
    def comm_id(self) -> str:
        return self.run_id if self.generation == 0 else f"{self.run_id}.{self.generation}"

    @property
    def all_futures(self) -> list:
        return [f for _, xs, ys in self.persisted for f in xs + ys]

    def resume_from(self, state: dict) -> dict | None:
        """A regrouped loop starts from the last ``ctx.checkpoint`` (a survivor holds it in
        memory), or afresh when there was none yet."""
        if state.get("model") is None:
            return None
        opt = state.get("optimizer")
        return {
            "epoch": state["epoch"],
            "model": state["model"],
            "optimizer": checkpoint.optimizer_state(*opt) if opt else None,
        }

    def plan(self, ranks: list[str], plan=None):
        """Shards of every data set for ``ranks``: the first by sizes and where its partitions
        live (which decides which worker is which rank), the others by sizes, some ranks
        getting none where a data set has fewer partitions than ranks."""
        first, first_x, _ = self.persisted[0]
        sizes = [int(c) for c in first.X.chunks[0]]
        if len(sizes) < len(ranks):
            raise ValueError(
                f"The data set {self.names[0]!r} has {len(sizes)} partitions for {len(ranks)} "
                "ranks; each rank needs at least one. Repartition it, or use fewer workers."
            )
        shards = balanced_shards(sizes, len(ranks))
        order = match_workers(shards, sizes, _locations(self.client, first_x), ranks)
        ranks = [ranks[j] for j in order]
        plans = [[shard] for shard in shards]
        self._sizes = {self.names[0]: shard_sizes(shards, sizes)}
        for name, (ds, xs, _) in zip(self.names[1:], self.persisted[1:]):
            sizes = [int(c) for c in ds.X.chunks[0]]
            shards = spread_shards(sizes, len(ranks))
            for r, shard in enumerate(shards):
                plans[r].append(shard)
            self._sizes[name] = shard_sizes(shards, sizes)
        return ranks, plans, 1

    def submit(self, ranks, rank_plans, steps, resume, start_epoch, start_step, history):
        if resume is not None:
            [resume] = self.client.scatter([resume], workers=ranks[:1], hash=False)
        manifest = {**self.public}
        futures = []
        for r, (addr, plans) in enumerate(zip(ranks, rank_plans)):
            spec = LoopSpec(
                run_id=self.run_id,
                rank=r,
                peers=ranks,
                train_fn=self.train_fn,
                config=self.user_config,
                options=self.config,
                names=self.names,
                n_parts=[len(p) for p in plans],
                target_dtypes=[str(np.dtype(target_dtype(ds.task))) for ds, _, _ in self.persisted],
                shard_sizes=self._sizes,
                out=self.out,
                staging=self.staging,
                manifest=manifest,
                history=history,
                comm_id=self.comm_id,
                elastic=self.elastic,
                keep_checkpoints=dask.config.get("daskdl.keep-checkpoints"),
                signing_key=self.signing_key if r == 0 else None,
            )
            parts = [
                f
                for (_, xs, ys), shard in zip(self.persisted, plans)
                for i in shard
                for f in (xs[i], ys[i])
            ]
            futures.append(
                self.client.submit(
                    loop_main,
                    spec,
                    resume,
                    *parts,
                    key=f"daskdl-loop-{r}-{self.comm_id}",
                    workers=[addr],
                    allow_other_workers=False,
                    pure=False,
                    retries=0,
                )
            )
        return futures
