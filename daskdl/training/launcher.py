"""``fit``: the built-in loop (:class:`daskdl.training.fitloop.FitLoop`) launched like any
``train_fn``, after the checks only it needs (in the order that ``docs/errors.md`` describes): the
data sets and the model, the loss and metrics, a checkpoint to resume, and a dry run of the model
on a few real samples."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import dask
import numpy as np
from distributed import Client

from daskdl import models, security
from daskdl.config import options as config_
from daskdl.config.options import TrainConfig
from daskdl.config.pipeline import Pipeline
from daskdl.data import categorical, inputs, validate
from daskdl.data.dataset import Dataset
from daskdl.models import preflight
from daskdl.objective import metrics as metrics_
from daskdl.objective.task import Objective, check_loss, describe_loss
from daskdl.runs import checks, trackers
from daskdl.runs.launching import Launch, Starting, read_resume, start
from daskdl.runs.run import Run, target_scale
from daskdl.training.fitloop import FitLoop

logger = logging.getLogger(__name__)


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
    pipeline: Pipeline | None = None,
    epoch_gate: bool = False,
    loggers: Sequence | None = None,
    **options: Any,
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
    pipeline
        A :class:`daskdl.Pipeline`: cut the model (an ``nn.Sequential``) into stages, one
        rank each, replicated over the rest of the workers (the ``pipeline_*`` options and
        ``microbatches``, below, in one object).
    meta
        JSON-able facts to keep with the run (its ``start`` event, ``config.json`` and
        checkpoints), such as the name of the data set; the dashboard reads them.
    loggers
        Experiment trackers the run's metrics go to, from the client: ``"tensorboard"``
        (``out/tensorboard``), ``"mlflow"`` (MLflow's tracking URI), ``"csv"``
        (``out/metrics.csv``, written anyway), or objects with Lightning's logger methods
        (``log_hyperparams``, ``log_metrics``, ``finalize``). See :mod:`daskdl.runs.trackers`.
    epoch_gate
        Ranks wait after each epoch until :meth:`Run.release_epoch` lets them go on (for at
        most ``comm_timeout``): a driver such as :func:`daskdl.tune` decides between epochs,
        and a stop it asks for takes effect at the next epoch's first step.
    **options
        Any :class:`daskdl.TrainConfig` field (listed below as Other Parameters).

    Examples
    --------
    >>> client = daskdl.local_cluster(n_workers=2)                      # doctest: +SKIP
    >>> train, test = daskdl.datasets.digits().split(0.2, seed=0)       # doctest: +SKIP
    >>> run = daskdl.fit(client, "small_cnn", train, val=test, epochs=15)  # doctest: +SKIP
    >>> run.history[["epoch", "val_accuracy"]].tail(1)                  # doctest: +SKIP
    """
    if pipeline is not None:
        options = {**options, **pipeline.as_options()}
    cfg = checks.train_config(config, options)
    block, progress = config_.flag("block", block), config_.flag("progress", progress)
    checks.check_meta(meta)
    checks.check_client(client, "fit")
    loggers = trackers.check(loggers, out)
    folder = checks.run_folder(out, resume, overwrite, signing_key, verify_key)
    if isinstance(train, Dataset) and isinstance(val, Dataset):
        # Validated as the model will be applied: the training features, standardised once.
        trained = inputs.Trained(
            train.features, train.categories, train.standardized, train.sample_shape
        )
        val = inputs.conform(client, val, trained, "val")
    model, metric_specs = _what_to_learn(train, val, model, loss, metrics, cfg)
    resume_state, manifest = _checkpoint_to_resume(folder, cfg)
    ranks = checks.check_cluster(client, cfg, folder.key, workers)
    if cfg.shard and cfg.max_failures and folder.out is None:
        logger.warning(
            "shard=%r spreads the training state over the ranks, so a lost worker takes part "
            "of it along: without out= such a run regroups from its start; with out= from its "
            "last checkpoint.",
            cfg.shard,
        )
    datasets = [train, *([val] if val is not None else [])]
    with Starting(client, folder, datasets, ranks, cfg.stream) as starting:
        held = starting.held
        objective, scales, probe = _dry_run(
            client, held, model, loss, metric_specs, cfg, manifest, resume_state
        )
        checks.check_pipeline(probe, cfg)
        checks.check_shard(probe, cfg)
        checks.check_memory(client, probe, cfg, ranks)
        n_params = sum(p.numel() for p in probe.parameters())
        starting.claim()
        plan, spec = _plan(
            starting, model, objective, metric_specs, scales, cfg, meta, n_params,
            grow=workers is None,  # workers that join get ranks, unless these were chosen
            gate=config_.flag("epoch_gate", epoch_gate),
        )  # fmt: skip
        launch = Launch(client, plan, held)
        run = Run(launch, spec, start(launch, ranks, resume_state, progress, loggers))
    if block:
        run.wait()
    return run


def _plan(
    starting: Starting, model, objective, metric_specs, scales, cfg, meta, n_params, grow, gate
):
    """The run's frozen plan (its loop: :class:`FitLoop`), and what its Run needs to rebuild
    and score the trained model."""
    held = starting.held
    train = held[0].ds
    recorded, reference = inputs.record(starting.client, train)
    loop = FitLoop(
        model,
        train.sample_shape,
        objective,
        metric_specs,
        val_scale=scales[1] if len(held) > 1 else None,
        log_interval=dask.utils.parse_timedelta(dask.config.get("daskdl.log-interval")),
    )
    plan = starting.plan(
        train_fn=loop,
        loop_config={},
        names=("train", "val")[: len(held)],
        target_dtypes=(str(np.dtype(objective.target_dtype)),) * len(held),
        options=cfg.to_dict(),
        public={
            **_describe(starting.run_id, loop, train, cfg, starting.folder, meta, n_params),
            **recorded,
        },
        batch_size=cfg.batch_size,
        grow=grow,
        epoch_gate=gate,
    )
    spec = {
        "model": model,
        "input_shape": train.sample_shape,
        "objective": objective,
        "metrics": metric_specs,
        "categories": train.categories,
        "features": train.features,
        "standardized": reference,
    }
    return plan, spec


def _describe(run_id, loop: FitLoop, train: Dataset, cfg, folder, meta, n_params) -> dict:
    """A fit run's public description (its start event, ``config.json``, checkpoints)."""
    objective = loop.objective
    return {
        "run": run_id,
        "model": models.describe(loop.model),
        # A registered model's name and options rebuild it (daskdl.predict); a factory's not.
        "model_spec": _json_spec(loop.model),
        "config": cfg.to_dict(),
        "n_train": len(train),
        "input_shape": list(train.sample_shape),
        "features": train.features,
        "categories": train.categories,
        **objective.describe(),
        "n_classes": objective.n_outputs if objective.is_classifier else None,
        "metrics": list(loop.metrics),
        "out": str(folder.out) if folder.out else None,
        "n_params": n_params,
        "meta": meta or {},
        "max_failures": cfg.max_failures,
    }


# The options, from their one definition (TrainConfig), where help(fit) shows them.
fit.__doc__ = (fit.__doc__ or "").replace(
    "\n    Examples\n",
    f"\n    Other Parameters\n    ----------------\n{config_.options_doc()}\n\n    Examples\n",
    1,
)


def _json_spec(model: models.ModelSpec):
    if isinstance(model, str):
        return model
    if isinstance(model, (tuple, list)) and len(model) == 2 and isinstance(model[0], str):
        try:
            return json.loads(json.dumps([model[0], dict(model[1])]))
        except TypeError:
            return None
    return None


def _what_to_learn(train, val, model, loss, metrics, cfg: TrainConfig):
    """The data sets, the model, the loss and the metrics, checked before the cluster is
    touched; the model (the mlp told of categorical features) and the metrics by name."""
    validate.check_compatible(train, getattr(train, "sample_shape", None), name="train")
    if val is not None:
        validate.check_compatible(val, train.sample_shape, name="val", task=train.task)
        validate.check_categories(val, train.categories, name="val")
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


def _checkpoint_to_resume(folder, cfg: TrainConfig) -> tuple[dict | None, dict | None]:
    """The state and manifest of the checkpoint that ``resume=`` names, verified, with
    epochs left to train."""
    state, manifest = read_resume(folder)
    if state is not None and manifest is not None and manifest["epoch"] >= cfg.epochs:
        raise ValueError(
            f"Checkpoint {state['path']} has already finished epoch {manifest['epoch']}; ask "
            f"for more than {manifest['epoch']} epochs to continue it."
        )
    return state, manifest


def _dry_run(client, held, model, loss, metric_specs, cfg, manifest, resume_state):
    """Check the data's counts, then build one replica here and train it on a few real
    samples: a bad model fails now, naming what it saw, not on every worker from deep inside
    torch. Returns the objective, the data sets' target scales and the model."""
    train = held[0].ds
    n_outputs = _validate_labels(dict(zip(("train", "val"), held)), train)
    scales = [target_scale(client, h.ds) for h in held]
    objective = Objective(train.task, n_outputs, loss, scales[0], train.y.ndim)
    k = min(preflight.DRY_RUN_SAMPLES, cfg.batch_size, len(train))
    sample_x, sample_y = held[0].head(client, k)
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
    return objective, scales, probe


def _with_embeddings(model: models.ModelSpec, train: Dataset) -> models.ModelSpec:
    """The registered mlp, told which features are categorical (and how many codes each
    has), so that it embeds them; other models get the codes as numbers."""
    name, options = (model, {}) if isinstance(model, str) else (None, {})
    if isinstance(model, (tuple, list)) and len(model) == 2 and isinstance(model[0], str):
        name, options = model[0], dict(model[1])
    if name != "mlp" or not train.categories or "categorical" in options:
        return model
    layout = categorical.layout(list(train.features or ()), train.categories)
    return ("mlp", {**options, "categorical": layout})


def _validate_labels(held: dict, train: Dataset) -> int:
    """Check targets and features from each partition's counts (as ``Run.evaluate`` checks
    them); ``held`` maps "train" (and "val") to them. Returns the number of model outputs
    (classes, labels or targets)."""
    counts = validate.check_parts({which: (h.counts, train.task) for which, h in held.items()})
    if train.task != "classification":
        return train.n_outputs
    lo = min(c[0] for c in counts.values())
    hi = max(c[1] for c in counts.values())
    return validate.class_count("train", lo, hi, counts["train"][4], train.known_n_classes)
