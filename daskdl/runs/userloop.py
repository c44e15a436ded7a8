"""``daskdl.launch``: the user's own training loop on every rank, with everything daskdl gives
a run (ranks on the workers that hold the data, averaged gradients, events and history, the
dashboard, signed checkpoints, going on without a lost worker).

The loop is a function ``train_fn(ctx)`` of a :class:`daskdl.RankContext`; Lightning Fabric's
``launch(fn)`` and Ray Train's ``train_loop_per_worker`` are the same idea.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from distributed import Client

from daskdl import security
from daskdl.config import options as config_
from daskdl.data import validate
from daskdl.data.dataset import Dataset
from daskdl.models import preflight
from daskdl.objective.task import target_dtype
from daskdl.runs import checks, trackers
from daskdl.runs.launching import Launch, Starting, read_resume, start
from daskdl.runs.run import Run

# The TrainConfig sections that the contract itself uses; the others are fit's loop's.
LOOP_OPTIONS = config_.contract_options()


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
    loggers: Sequence | None = None,
    **options: Any,
) -> Run:
    """Run ``train_fn(ctx)`` on one rank per worker, each with its shard of ``data``.

    ``workers``, ``out``, ``resume``, ``overwrite``, ``signing_key``, ``verify_key``,
    ``block``, ``progress``, ``meta`` and ``loggers`` are as for :func:`daskdl.fit` (what
    ``ctx.log`` reports goes to the trackers, against its step).

    Parameters
    ----------
    train_fn
        ``train_fn(ctx: daskdl.RankContext)``: the training loop. What rank 0 returns (a
        picklable value) is ``run.result``.
    data
        Named data sets, such as ``{"train": train, "val": val}``; each is persisted on the
        cluster (or streamed: ``stream``) and cut into one shard per rank (the first by
        sample counts and where its partitions live; it needs a partition per rank), which
        ``ctx.batches(name, ...)`` iterates.
    config
        A JSON-able dict for the loop (``ctx.config``): learning rate, epochs, ...
    **options
        :class:`daskdl.TrainConfig` fields that the contract uses: ``seed`` (shuffling),
        ``stream``, ``prefetch`` and ``shuffle_buffer`` (streamed data sets),
        ``device``, ``backend``, ``wire_dtype``, ``allreduce``, ``bucket_mb`` (``ctx.prepare``),
        ``sync_every`` and ``outer_*`` (``ctx.averaging``: local SGD), ``on_nonfinite``,
        ``comm_timeout``, ``torch_threads``, ``max_failures`` (workers the run may lose: then
        ``train_fn`` starts again on the survivors from the last ``ctx.checkpoint``, kept in
        memory, or from where they were with ``ctx.follow``).

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
    cfg = checks.train_config(None, options)
    block, progress = config_.flag("block", block), config_.flag("progress", progress)
    checks.check_client(client, "launch")
    checks.check_meta(meta)
    loggers = trackers.check(loggers, out)
    user_config = _check_loop(train_fn, data, config)
    folder = checks.run_folder(out, resume, overwrite, signing_key, verify_key)
    resume_from, _ = read_resume(folder)
    ranks = checks.check_cluster(client, cfg, folder.key, workers)
    names = tuple(data)
    with Starting(client, folder, data.values(), ranks, cfg.stream) as starting:
        held = starting.held
        validate.check_parts({n: (h.counts, h.ds.task) for n, h in zip(names, held)})
        starting.claim()
        plan = starting.plan(
            train_fn=train_fn,
            loop_config=user_config,
            names=names,
            target_dtypes=tuple(str(np.dtype(target_dtype(h.ds.task))) for h in held),
            options=cfg.to_dict(),
            public=_describe(starting, names, train_fn, user_config, cfg, meta),
            grow=workers is None,
        )
        launch = Launch(client, plan, held)
        run = Run(launch, {"loop": True}, start(launch, ranks, resume_from, progress, loggers))
    if block:
        run.wait()
    return run


def _describe(starting: Starting, names, train_fn, user_config: dict, cfg, meta) -> dict:
    """A launch run's public description (its start event, ``config.json``, checkpoints)."""
    epochs = user_config.get("epochs")
    out = starting.folder.out
    return {
        "run": starting.run_id,
        "model": f"train_fn {getattr(train_fn, '__qualname__', 'train_fn')}",
        # The contract's options; epochs are the loop's own (for the dashboard's progress).
        "config": {**cfg.to_dict(), "epochs": epochs if isinstance(epochs, int) else None},
        "loop_config": user_config,
        "data": {n: len(h.ds) for n, h in zip(names, starting.held)},
        "out": str(out) if out else None,
        "meta": meta or {},
        "max_failures": cfg.max_failures,
        "launched_by": "launch",
    }


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
