"""Starting a run: :func:`fit` checks its inputs (in the order that ``docs/errors.md``
describes), persists the data, plans the shards and submits one rank task per worker.
:class:`Launch` keeps what it takes to start the rank tasks again when a run regroups."""

from __future__ import annotations

import json
import math
import numbers
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dask
import numpy as np
import torch
from distributed import Client, futures_of

from daskdl import categorical, checkpoint, comm, events, models, preflight, rundir, security
from daskdl import config as config_
from daskdl import metrics as metrics_
from daskdl.cluster import workers_info
from daskdl.config import TrainConfig
from daskdl.data import Dataset
from daskdl.engine import RankSpec, rank_main
from daskdl.objective import Objective, Scale, check_loss, describe_loss
from daskdl.run import Run, check_categories, check_compatible, target_scale
from daskdl.shards import (
    balanced_shards,
    match_workers,
    shard_sizes,
    spread_shards,
    who_has_to_locations,
)


def fit(
    client: Client,
    model: models.ModelSpec,
    train: Dataset,
    val: Dataset | None = None,
    *,
    config: TrainConfig | Mapping | None = None,
    loss: str | Callable | None = None,
    metrics: str | Sequence | Mapping | None = None,
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
    """Train ``model`` on ``train`` data-parallel, one rank per Dask worker.

    Parameters
    ----------
    client
        Any ``distributed.Client``: a LocalCluster, ``dask scheduler``/``dask worker``, ...
    model
        A name from ``daskdl.models.REGISTRY`` (``"mlp"``, ``"small_cnn"``, ``"resnet18"``,
        ``"vgg11"``, ``"vgg16"``, ...) or a factory ``f(input_shape, n_outputs) -> nn.Module``.
    train, val
        :class:`daskdl.Dataset`. Each rank trains on the partitions the shard plan gives it and
        evaluates its share of ``val`` after every epoch. The data set's ``task``
        (classification, multilabel or regression) decides the model's outputs, the default
        loss and the default metrics.
    config
        A :class:`daskdl.TrainConfig` (or a dict of its fields); ``options`` override it.
    loss
        ``"cross_entropy"`` (classification's default), ``"bce"`` (multi-label's, on logits),
        ``"mse"`` (regression's), ``"l1"``, ``"huber"``, or a function
        ``loss(outputs, targets) -> scalar tensor`` (the batch's mean).
    metrics
        Validation metrics, reported per epoch as ``val_<name>``: built-in names (``accuracy``,
        ``top5``, ``f1``, ``precision``, ``recall``; multi-label ``accuracy``, ``exact_match``,
        ``f1``, ...; regression ``mae``, ``mse``, ``rmse``, ``r2``), ``torchmetrics.Metric``
        objects, or a dict of names to either. Each is computed over the whole validation set
        (metric states are combined over the ranks), regression ones in the targets' units.
    workers
        Which workers get a rank (addresses, or a count); default all.
    out
        Run directory for checkpoints (``out/checkpoints/epoch-NNNN``) and ``metrics.csv``.
        Rank 0 writes the checkpoints, so on a multi-machine cluster it must be a shared path.
    resume
        A run directory or checkpoint to continue from (the newest checkpoint that verifies);
        ``True``: the run in ``out``.
    overwrite
        Replace the run in ``out`` (once this run has written its first checkpoint).
    signing_key, verify_key
        Checkpoints are signed with ``signing_key`` (a key file from ``daskdl keygen``, or a
        :class:`daskdl.security.Key`; default: ``DASKDL_SIGNING_KEY`` or
        ``DASKDL_SIGNING_KEY_FILE``); the key travels with the rank that writes them, so use
        a TLS cluster across machines. ``resume`` checks signatures with ``verify_key``
        (default: ``DASKDL_VERIFY_KEY_FILE``, else the signing key) and refuses an unsigned or
        modified checkpoint; with no key at all it warns.
    block
        ``False`` returns the :class:`Run` at once; call ``run.wait()``.
    progress
        A progress bar (tqdm) on the client.
    meta
        JSON-able facts to keep with the run (its ``start`` event, ``config.json`` and
        checkpoints), such as the name of the data set; the dashboard reads them.
    **options
        Any :class:`daskdl.TrainConfig` field (below).

    Other Parameters
    ----------------
    <options>

    Examples
    --------
    >>> client = daskdl.local_cluster(n_workers=2)                      # doctest: +SKIP
    >>> train, test = daskdl.datasets.digits().split(0.2, seed=0)       # doctest: +SKIP
    >>> run = daskdl.fit(client, "small_cnn", train, val=test, epochs=15)  # doctest: +SKIP
    >>> run.history[["epoch", "val_accuracy"]].tail(1)                  # doctest: +SKIP
    """
    cfg = _train_config(config, options)
    block, progress = config_.flag("block", block), config_.flag("progress", progress)
    check_meta(meta)
    check_client(client, "fit")
    out_path, resume, key, verify_key = run_folder(out, resume, overwrite, signing_key, verify_key)
    model, metric_specs = _what_to_learn(train, val, model, loss, metrics, cfg)
    resume_state, manifest, history = None, None, []
    if resume is not None:
        resume_state, manifest = _checkpoint_to_resume(resume, verify_key, cfg)
        history = manifest.get("history", [])
    ranks = check_cluster(client, cfg, key, workers)
    persisted = _persist(client, train, *([val] if val is not None else []))
    data = [f for _, xs, ys in persisted for f in xs + ys]
    staging = None
    try:
        objective, scales, n_params = _dry_run(
            client, persisted, model, loss, metric_specs, cfg, manifest, resume_state
        )
        run_id = uuid.uuid4().hex[:8]
        staging = rundir.claim(out_path, resume, overwrite, run_id) if out_path else None
        (train, x_futs, y_futs), *rest = persisted
        (val, xv_futs, yv_futs) = rest[0] if rest else (None, [], [])
        launch = Launch(
            client=client,
            run_id=run_id,
            model=model,
            train=train,
            val=val,
            x_futs=x_futs,
            y_futs=y_futs,
            xv_futs=xv_futs,
            yv_futs=yv_futs,
            objective=objective,
            metrics=metric_specs,
            val_scale=scales[1] if val is not None else None,
            config=cfg.to_dict(),
            out=str(out_path.resolve()) if out_path else None,
            out_arg=str(out_path) if out_path else None,
            staging=str(staging.resolve()) if staging else None,
            elastic=cfg.max_failures > 0,
            signing_key=key,
        )
        facts = {"n_params": n_params, "meta": meta or {}, "max_failures": cfg.max_failures}
        run = _start(launch, ranks, manifest, resume_state, history, data, facts, progress)
        run._max_failures, run._grow = cfg.max_failures, workers is None
    except BaseException:
        for f in data:  # nothing started: this call's hold on the data goes
            f.release()
        if staging is not None:
            rundir.abandon(out_path, staging, "could not start")
        raise
    if block:
        run.wait()
    return run


fit.__doc__ = fit.__doc__.replace("    <options>", config_.options_doc())


def check_meta(meta) -> None:
    if meta is not None and not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict of JSON-able facts, got {type(meta).__name__}.")
    try:
        json.dumps(meta or {})
    except TypeError as e:
        raise TypeError(f"meta must be JSON-able (str, numbers, lists, dicts): {e}") from None


def check_client(client, what: str) -> None:
    if not isinstance(client, Client):
        raise TypeError(
            f"{what} needs a distributed.Client as its first argument, got "
            f"{type(client).__name__}. HINT: client = daskdl.local_cluster(n_workers=2)."
        )
    if client.status in ("closing", "closed"):
        raise RuntimeError(
            f"{what} was given a closed client. Start a new one: daskdl.local_cluster(...) or "
            "distributed.Client(address)."
        )


def run_folder(out, resume, overwrite, signing_key, verify_key):
    """The run's folder and the checkpoint it resumes, checked, with the keys that sign and
    verify: read here, on the client, so that a bad key file fails before any training."""
    out_path, resume = _run_paths(out, resume, overwrite)
    if out_path is not None:
        rundir.check(out_path, resume, overwrite)
    key = security.signing_key(signing_key) if out_path is not None else None
    verify_key = security.verify_key(verify_key) if resume is not None else None
    return out_path, resume, key, verify_key


def check_cluster(client: Client, cfg: TrainConfig, key, workers) -> list[str]:
    """The workers that get ranks, after what the cluster itself must allow."""
    if cfg.backend == "torch" and client.scheduler.address.startswith("tls://"):
        raise ValueError(
            "backend='torch' would send gradients over plain TCP (gloo and NCCL do not use "
            "the cluster's TLS), and this cluster encrypts its connections: use "
            "backend='dask' (the default), whose all-reduce runs over the cluster's TLS comms."
        )
    if key is not None:
        security.warn_if_sent_in_clear(client, "The checkpoint signing key")
    ranks = _choose_workers(client, workers)
    if cfg.device == "cuda":
        _check_gpus(client, ranks)
    return ranks


def _what_to_learn(train, val, model, loss, metrics, cfg: TrainConfig):
    """The data sets, the model, the loss and the metrics, checked before the cluster is
    touched; the model (the mlp told of categorical features) and the metrics by name."""
    check_compatible(train, getattr(train, "sample_shape", None), name="train")
    if val is not None:
        check_compatible(val, train.sample_shape, name="val", task=train.task)
        check_categories(val, train.categories, name="val")
    model = _with_embeddings(model, train)
    check_loss(loss, train.task)
    metric_specs = metrics_.normalize(metrics, train.task)
    for what, obj in [
        ("The loss", loss),
        *[(f"The metric {n!r}", m) for n, m in metric_specs.items()],
    ]:
        if obj is not None and not isinstance(obj, str):
            preflight.check_picklable(obj, f"{what} {describe_loss(obj)}")
    if cfg.augment and not train.is_image:
        raise ValueError(
            f"augment=True needs images (n, C, H, W); the data's samples are {train.sample_shape}."
        )
    preflight.check_factory(model)
    return model, metric_specs


def _checkpoint_to_resume(resume, verify_key, cfg: TrainConfig) -> tuple[dict, dict]:
    path, model_t, opt_state, manifest = checkpoint.load_latest(resume, verify_key)
    if manifest["epoch"] >= cfg.epochs:
        raise ValueError(
            f"Checkpoint {path} has already finished epoch {manifest['epoch']}; ask "
            f"for more than {manifest['epoch']} epochs to continue it."
        )
    return {"model": model_t, "optimizer": opt_state, "path": path}, manifest


def _dry_run(client, persisted, model, loss, metric_specs, cfg, manifest, resume_state):
    """Check the persisted data, then build one replica here and train it on a few real
    samples: a bad model fails now, naming what it saw, not on every worker from deep inside
    torch. Returns the objective, the data sets' target scales and the parameter count."""
    train = persisted[0][0]
    parts = {name: (xs, ys) for name, (_, xs, ys) in zip(("train", "val"), persisted)}
    n_outputs = _validate_labels(client, parts, train)
    scales = _target_scales(client, persisted)
    objective = Objective(train.task, n_outputs, loss, scales[0], train.y.ndim)
    k = min(preflight.DRY_RUN_SAMPLES, cfg.batch_size, len(train))
    sample_x, sample_y = client.compute([train.X[:k], train.y[:k]], sync=True)
    probe = preflight.dry_run(model, sample_x, sample_y, objective, cfg.seed, metric_specs)
    if manifest is not None:
        preflight.check_resume(
            probe,
            resume_state["model"],
            manifest,
            resume_state["path"],
            train.sample_shape,
            objective,
            cfg.to_dict(),
            train.categories,
        )
    return objective, scales, sum(p.numel() for p in probe.parameters())


def _train_config(config, options: dict) -> TrainConfig:
    """``config`` (a TrainConfig, a dict or None) with ``options`` over it, and the
    client's configured comm timeout in place of ``None``."""
    if config is not None and not isinstance(config, (TrainConfig, Mapping)):
        raise TypeError(
            f"config must be a daskdl.TrainConfig or a dict of its options, got "
            f"{type(config).__name__}."
        )
    values = config.to_dict() if isinstance(config, TrainConfig) else dict(config or {})
    cfg = TrainConfig.from_dict({**values, **options})
    # Settings from the client's dask.config travel with the run: workers may differ.
    cfg.comm_timeout = cfg.timeout
    cfg.validate()  # the configured default too: a NaN or infinite timeout is an endless wait
    return cfg


def _with_embeddings(model: models.ModelSpec, train: Dataset) -> models.ModelSpec:
    """The registered mlp, told which features are categorical (and how many codes each
    has), so that it embeds them; other models get the codes as numbers."""
    name, options = (model, {}) if isinstance(model, str) else (None, {})
    if isinstance(model, (tuple, list)) and len(model) == 2 and isinstance(model[0], str):
        name, options = model[0], dict(model[1])
    if name != "mlp" or not train.categories or "categorical" in options:
        return model
    return ("mlp", {**options, "categorical": categorical.layout(train.features, train.categories)})


def _run_paths(out, resume, overwrite) -> tuple[Path | None, Path | None]:
    """``out`` and ``resume`` as paths, in the forms users pass them: ``resume=True``
    continues the run in ``out``."""
    overwrite = config_.flag("overwrite", overwrite)
    for name, value in (("out", out), ("resume", resume)):
        if value is not None and not isinstance(value, (str, os.PathLike, bool)):
            raise TypeError(f"{name} must be a folder path, got {type(value).__name__}.")
    if isinstance(out, bool):
        raise TypeError(f"out must be a folder path, got {out!r}.")
    for name, value in (("out", out), ("resume", resume)):
        if isinstance(value, str) and not value.strip():
            raise ValueError(f"{name}={value!r} names no folder; give a path such as 'runs/x'.")
    if resume is True:
        if out is None:
            raise ValueError("resume=True continues the run in out=, but out is not given.")
        resume = out
    elif resume is False:
        resume = None
    if overwrite and out is None:
        raise ValueError("overwrite=True replaces the run in out=, but out is not given.")
    if overwrite and resume is not None:
        raise ValueError(
            "overwrite=True replaces the run in out=, and resume= continues one: choose one."
        )
    return (Path(out) if out is not None else None), (Path(resume) if resume else None)


def _start(
    launch: Launch, ranks, manifest, resume_state, history, data, facts: dict, progress
) -> Run:
    """Plan the shards of a checked run, write its config and submit its rank tasks.
    ``facts`` join the run's public description (its start event and ``config.json``)."""
    client, train, cfg = launch.client, launch.train, TrainConfig.from_dict(launch.config)
    sizes = [int(c) for c in train.X.chunks[0]]
    plan = None
    if (
        manifest is not None
        and len(manifest["plan"]) == len(ranks)
        and manifest["partition_sizes"] == sizes
    ):
        plan = manifest["plan"]  # the same shards as before, so the resumed run is identical
    start_epoch = manifest["epoch"] if manifest else 0
    ranks, rank_plans, steps = launch.plan(ranks, plan)
    out = Path(launch.out_arg) if launch.out_arg else None
    launch.public = {
        "run": launch.run_id,
        "model": models.describe(launch.model),
        "config": launch.config,
        "world_size": len(ranks),
        "workers": ranks,
        "steps_per_epoch": steps,
        "n_train": sum(sizes),
        "input_shape": list(train.sample_shape),
        "features": train.features,
        "categories": train.categories,
        **launch.objective.describe(),
        "n_classes": launch.objective.n_outputs if launch.objective.is_classifier else None,
        "metrics": list(launch.metrics),
        "start_epoch": start_epoch,
        "out": launch.out_arg,
        **facts,
    }
    recorder = events.Recorder(launch.run_id, steps * cfg.epochs, start_epoch * steps, progress)
    recorder.epochs.extend(history)
    announce(launch, recorder)

    futures = launch.submit(ranks, rank_plans, steps, resume_state, start_epoch, 0, history)
    spec = {
        "model": launch.model,
        "input_shape": train.sample_shape,
        "objective": launch.objective,
        "metrics": launch.metrics,
        "categories": train.categories,
    }
    staging = Path(launch.staging) if launch.staging else None
    run = Run(client, launch.run_id, spec, futures, data, recorder, ranks, out, staging)
    run._launch = launch
    return run


def announce(launch, recorder: events.Recorder) -> None:
    """Before a run's ranks start: its ``config.json`` (with ``out``), its recorder on its
    events, its ``start`` event, and daskdl's extension on every worker."""
    client, public = launch.client, launch.public
    if launch.out is not None:
        folder = rundir.writing_to(launch.out, launch.staging)
        (folder / rundir.CONFIG).write_text(json.dumps(public, indent=1))
    events.subscribe(client, events.topic(launch.run_id), recorder.handle)
    client.log_event(events.topic(launch.run_id), {"kind": "start", **public})
    client.log_event(events.RUNS_TOPIC, {"kind": "start", **public})
    comm.ensure_plugin(client)


def _choose_workers(client: Client, workers: list[str] | int | None) -> list[str]:
    info = workers_info(client)
    if not info:
        client.wait_for_workers(1, timeout=dask.config.get("distributed.comm.timeouts.connect"))
        info = workers_info(client)
    available = sorted(info)
    if workers is None:
        return available
    if isinstance(workers, str):
        workers = [workers]  # one address, not its characters
    if isinstance(workers, numbers.Number):
        workers = config_.integer("workers", workers, minimum=1)
        if workers > len(available):
            raise ValueError(
                f"workers={workers}, but the cluster has {len(available)} workers. Start more "
                "workers or ask for fewer ranks."
            )
        return available[:workers]
    if not isinstance(workers, (list, tuple, set)) or not all(isinstance(w, str) for w in workers):
        raise TypeError(
            f"workers must be a count or a list of worker addresses, got {workers!r}. "
            f"The cluster's workers are {available}."
        )
    workers = list(workers)
    if not workers:
        raise ValueError(f"workers=[] names no worker; the cluster has {available}.")
    twice = sorted({w for w in workers if workers.count(w) > 1})
    if twice:
        raise ValueError(
            f"workers lists {twice} more than once; a worker runs one rank of a run. List each "
            "once, or start more workers."
        )
    unknown = [w for w in workers if w not in info]
    if unknown:
        raise ValueError(f"Workers {unknown} are not in the cluster; it has {available}.")
    return workers


def _check_gpus(client: Client, ranks: list[str]) -> None:
    counts = client.run(_cuda_device_count, workers=ranks)
    missing = sorted(w for w, n in counts.items() if n == 0)
    if missing:
        raise RuntimeError(
            f"device='cuda', but workers {missing} see no CUDA GPU. Start GPU workers "
            "(daskdl.local_cluster(gpus=True), or `dask cuda worker`), or use device='auto', "
            "which trains on the CPU where there is no GPU."
        )


def _cuda_device_count() -> int:
    return torch.cuda.device_count()


def check_parts(client: Client, parts: dict[str, tuple[list, list, str]]) -> dict:
    """Check each named data set's targets (for its task) and features where its persisted
    partitions live: a few numbers of each partition come back
    (:func:`daskdl.preflight.value_counts`), in one round trip for all. Returns each data
    set's totals."""
    futures = [client.map(preflight.value_counts, xs, ys) for xs, ys, _ in parts.values()]
    counts = {name: preflight.total_counts(c) for name, c in zip(parts, client.gather(futures))}
    for name, (_, _, task) in parts.items():
        preflight.check_values(name, counts[name], task)
    return counts


def _validate_labels(client: Client, parts: dict[str, tuple[list, list]], train: Dataset) -> int:
    """Check targets and features where each persisted partition lives (a few numbers of each
    come back, :func:`daskdl.preflight.value_counts`, as ``Run.evaluate`` checks them);
    ``parts`` maps "train" (and "val") to their X and y futures. Returns the number of model
    outputs (classes, labels or targets)."""
    counts = check_parts(client, {which: (xs, ys, train.task) for which, (xs, ys) in parts.items()})
    if train.task != "classification":
        return train.n_outputs
    lo = min(c[0] for c in counts.values())
    hi = max(c[1] for c in counts.values())
    return preflight.class_count("train", lo, hi, counts["train"][4], train._n_classes)


def _target_scales(client: Client, persisted) -> list[Scale | None]:
    """Each data set's target scale (persisted with it), or None where its targets were not
    standardised."""
    return [target_scale(client, ds) for ds, _, _ in persisted]


def _persist(client: Client, *datasets: Dataset) -> list[tuple[Dataset, list, list]]:
    """Persist the data sets in one graph (they share keys, such as standardisation stats).

    Unoptimised, so that each key keeps the task it has in the user's collections: a later
    computation on them (``Run.evaluate``, the user's own) then agrees with the scheduler about
    every shared key instead of resubmitting it fused differently.
    """
    collections = [(ds.X, ds.y, *(ds.target_scale or ())) for ds in datasets]
    arrays = client.persist([a for c in collections for a in c], optimize_graph=False)
    out, i = [], 0
    for ds, c in zip(datasets, collections):
        X, y, *scale = arrays[i : i + len(c)]
        i += len(c)
        with client.as_current():  # chunk sizes from this client's futures, not the default's
            persisted = ds._persisted(X, y, tuple(scale) or None)
        out.append((persisted, _block_futures(persisted.X), _block_futures(persisted.y)))
    return out


def _block_futures(arr) -> list:
    by_key = {f.key: f for f in futures_of(arr)}
    return [by_key[k] for k in dask.core.flatten(arr.__dask_keys__())]


def _locations(client: Client, futures: list) -> list[list[str]]:
    return who_has_to_locations([f.key for f in futures], client.who_has(futures))


@dataclass
class Launch:
    """What it takes to start (and, after losing a worker, restart) a run's rank tasks."""

    client: Client
    run_id: str
    model: models.ModelSpec
    train: Dataset
    val: Dataset | None
    x_futs: list
    y_futs: list
    xv_futs: list
    yv_futs: list
    objective: Objective
    metrics: dict
    val_scale: Scale | None
    config: dict
    out: str | None
    elastic: bool
    signing_key: security.Key | None = None
    out_arg: str | None = None  # out as the user gave it (relative paths stay relative)
    staging: str | None = None  # where a replacing run writes until its first checkpoint
    public: dict = field(default_factory=dict)
    generation: int = 0

    @property
    def all_futures(self) -> list:
        return self.x_futs + self.y_futs + self.xv_futs + self.yv_futs

    def resume_from(self, state: dict) -> dict:
        """What the ranks of a regrouped run start from: a survivor's replica."""
        return {
            "model": state["model"],
            "optimizer": checkpoint.optimizer_state(*state["optimizer"]),
        }

    @property
    def comm_id(self) -> str:
        # Each membership talks under its own id: a survivor's mailbox for the old one was
        # aborted, and stays so.
        return self.run_id if self.generation == 0 else f"{self.run_id}.{self.generation}"

    def plan(self, ranks: list[str], plan: list[list[int]] | None = None):
        """Shards for ``ranks``: (ranks in rank order, (train, val) partitions per rank,
        steps per epoch)."""
        cfg = TrainConfig.from_dict(self.config)
        sizes = [int(c) for c in self.train.X.chunks[0]]
        if len(sizes) < len(ranks):
            raise ValueError(
                f"The training data has {len(sizes)} partitions for {len(ranks)} ranks; each "
                "rank needs at least one. Repartition it (Dataset.from_numpy(..., chunks=...)) "
                f"or use workers={len(sizes)}."
            )
        plan = plan or balanced_shards(sizes, len(ranks))
        # Rank r always trains on shard r; where the data lives only decides which worker is r.
        where = _locations(self.client, self.x_futs)
        ranks = [ranks[j] for j in match_workers(plan, sizes, where, ranks)]
        shards = shard_sizes(plan, sizes)
        if cfg.batch_size > min(shards):
            r = int(np.argmin(shards))
            raise ValueError(
                f"batch_size={cfg.batch_size} is larger than rank {r}'s shard ({shards[r]} "
                f"samples). Use batch_size <= {min(shards)}, or fewer workers."
            )
        steps = math.ceil(max(shards) / cfg.batch_size)
        val_plan = [[] for _ in ranks]
        if self.val is not None:
            val_sizes = [int(c) for c in self.val.X.chunks[0]]
            val_shards = spread_shards(val_sizes, len(ranks))
            where = _locations(self.client, self.xv_futs)
            for shard, r in zip(val_shards, match_workers(val_shards, val_sizes, where, ranks)):
                val_plan[r] = shard
        self._plan, self._sizes = plan, sizes
        return ranks, list(zip(plan, val_plan)), steps

    def submit(self, ranks, rank_plans, steps, resume, start_epoch, start_step, history):
        # Checkpoints record the shard plan, so that a resumed run trains on the same shards.
        manifest = {**self.public, "plan": self._plan, "partition_sizes": self._sizes}
        if resume is not None:
            # Model and optimizer state (85 MiB for ResNet-18 with momentum) inside each rank's
            # task would pass through the scheduler once per rank as graph. Scattered once to
            # the first rank's worker instead, it reaches the others worker-to-worker.
            [resume] = self.client.scatter([resume], workers=ranks[:1], hash=False)
        futures = []
        for r, (addr, (train_parts, val_parts)) in enumerate(zip(ranks, rank_plans)):
            rank_spec = RankSpec(
                run_id=self.run_id,
                rank=r,
                peers=ranks,
                model=self.model,
                input_shape=self.train.sample_shape,
                objective=self.objective,
                config=self.config,
                n_train_parts=len(train_parts),
                has_val=self.val is not None,
                metrics=self.metrics,
                val_scale=self.val_scale,
                steps_per_epoch=steps,
                start_epoch=start_epoch,
                out=self.out,
                staging=self.staging,
                manifest=manifest,
                history=history,
                log_interval=dask.utils.parse_timedelta(dask.config.get("daskdl.log-interval")),
                keep_checkpoints=dask.config.get("daskdl.keep-checkpoints"),
                pause_profiler=dask.config.get("daskdl.pause-dask-profiler"),
                comm_id=self.comm_id,
                start_step=start_step,
                elastic=self.elastic,
                signing_key=self.signing_key if r == 0 else None,  # only rank 0 writes
            )
            parts = [f for i in train_parts for f in (self.x_futs[i], self.y_futs[i])]
            parts += [f for i in val_parts for f in (self.xv_futs[i], self.yv_futs[i])]
            futures.append(
                self.client.submit(
                    rank_main,
                    rank_spec,
                    resume,
                    *parts,
                    key=f"daskdl-rank-{r}-{self.comm_id}",
                    workers=[addr],
                    allow_other_workers=False,
                    pure=False,
                    retries=0,
                )
            )
        return futures
