"""A study's pieces: pruners, samplers and storage by name, tune's checks, a trial's data and
run. Tuning is many trials, each a daskdl run, sharing one cluster, with Optuna underneath
(``pip install "daskdl[tune]"``).

The client drives Optuna by ask-and-tell: a :class:`Study` asks for a trial, turns the
parameters ``space(trial)`` returns into a :func:`daskdl.fit` on a free group of
``ranks_per_trial`` workers, reports the trial's validation metric after every epoch (from the
run's events) and, when the pruner says so, stops the run through its own stop request, which
every rank of the trial sees at the same step. As soon as a trial ends, its workers start the
next one. The ranks of a trial never talk to Optuna: they all train with the parameters the
client sampled once.

With ``storage=`` (a journal file, which needs no database server, or an RDB URL) the study
outlives its driver: ``tune(..., resume=True)`` goes on with it, the pruner's rungs intact
(they are the trials' stored intermediate values), and trials that were running when the driver
died are queued again with the same parameters.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distributed import Client

from daskdl.cluster import workers_info
from daskdl.config import options as config
from daskdl.data import streaming
from daskdl.data.dataset import Dataset
from daskdl.runs import checks, trackers
from daskdl.runs.run import Run

PRUNERS = ("asha", "hyperband", "median", "none")
SAMPLERS = ("tpe", "random")
DIRECTIONS = ("maximize", "minimize")
# Words in a metric's name that say which way is better (a name with neither needs direction=).
LOWER_IS_BETTER = ("loss", "error", "mae", "mse", "rmse", "perplexity")
HIGHER_IS_BETTER = ("accuracy", "acc", "r2", "f1", "auroc", "auc", "precision", "recall", "ap")
# What a trial's options may hold besides TrainConfig's fields: fit's own arguments.
FIT_ARGUMENTS = ("model", "standardize", "loss", "metrics", "pipeline", "meta")
# tune's own arguments, which a trial cannot change.
TUNE_OWN = ("epochs", "workers", "out", "resume", "overwrite", "block", "progress", "loggers",
            "epoch_gate", "signing_key", "verify_key", "config")  # fmt: skip
MARKER = "study.json"  # in out=: which study's trials the folder holds


def _optuna():
    try:
        import optuna
    except ImportError:
        raise ImportError(
            'daskdl.tune needs Optuna: pip install "daskdl[tune]" (or pip install optuna).'
        ) from None
    return optuna


def make_pruner(pruner, epochs: int):
    """An Optuna pruner from a short name (``"asha"``, ``"hyperband"``, ``"median"``,
    ``"none"``) or the pruner itself."""
    pruners = _optuna().pruners
    if pruner is None:
        pruner = "none"
    if not isinstance(pruner, str):
        return pruner
    if pruner not in PRUNERS:
        raise ValueError(f"pruner must be one of {PRUNERS} or an Optuna pruner, got {pruner!r}.")
    if pruner == "asha":
        # From the first epoch on, as Ray Tune's ASHA (grace period 1): Optuna's "auto"
        # waits for a whole trial to end first, which on a small cluster is most of the study.
        return pruners.SuccessiveHalvingPruner(min_resource=1)
    if pruner == "hyperband":
        return pruners.HyperbandPruner(min_resource=1, max_resource=epochs)
    if pruner == "median":
        return pruners.MedianPruner(n_warmup_steps=1)
    return pruners.NopPruner()


def make_sampler(sampler, seed: int):
    """An Optuna sampler from a short name (``"tpe"``, ``"random"``) or the sampler itself."""
    optuna = _optuna()
    if not isinstance(sampler, str):
        return sampler
    if sampler not in SAMPLERS:
        raise ValueError(
            f"sampler must be one of {SAMPLERS} or an Optuna sampler, got {sampler!r}."
        )
    if sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_storage(storage: str | Path | None):
    """Optuna's storage: in memory, a journal file (a path), or a database URL."""
    if storage is None:
        return None
    text = str(storage)
    if "://" in text:
        return text
    optuna = _optuna()
    from optuna.storages.journal import JournalFileBackend

    Path(text).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(text))


# ------------------------------------------------------------------ checks before a study exists


def check_storage(storage) -> None:
    """A storage that can be opened: a journal file's path (not a folder, its parent not a
    file) or a database URL SQLAlchemy can parse, with its driver installed."""
    if storage is None:
        return
    if not isinstance(storage, (str, Path)) or not str(storage):
        raise TypeError(
            f"storage must be a journal file's path or a database URL, got {storage!r}."
        )
    text = str(storage)
    if "://" in text:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError, NoSuchModuleError

        try:
            make_url(text).get_dialect()
        except (ArgumentError, NoSuchModuleError, ImportError) as e:
            raise ValueError(
                f"storage={text!r} is not a database URL this machine can open ({e}). Give a "
                "journal file's path (storage='study.log') or an SQLAlchemy URL such as "
                "'sqlite:///study.db'."
            ) from None
        return
    path = Path(text)
    if path.is_dir():
        raise ValueError(
            f"storage={text!r} is a folder; give a file in it, such as {str(path / 'study.log')!r}."
        )
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ValueError(f"storage={text!r}: {parent} is a file, not a folder.")


def direction_for(metric: str, direction: str | None) -> str:
    """The study's direction: as given, or from the metric's name (losses and errors are
    minimised, accuracies and scores maximised); refused where the name does not say."""
    if direction is not None:
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be 'maximize' or 'minimize', got {direction!r}.")
        return direction
    words = metric.lower().replace("-", "_").split("_")
    if any(w in LOWER_IS_BETTER for w in words):
        return "minimize"
    if any(w in HIGHER_IS_BETTER for w in words):
        return "maximize"
    raise ValueError(
        f"metric={metric!r} does not say whether higher or lower is better: pass "
        "direction='maximize' or direction='minimize'."
    )


def check_options(params: dict, where: str) -> None:
    """A trial's options (the space's values over the fixed ones) are ``fit``'s: known
    names, valid values; none of ``tune``'s own."""
    if not isinstance(params, dict):
        raise TypeError(f"{where} must be a dict of fit options, got {type(params).__name__}.")
    own = [k for k in params if k in TUNE_OWN]
    if own:
        raise ValueError(
            f"{where} sets {own[0]!r}, which is tune()'s own: pass it to tune() "
            f"({own[0]}=...), not per trial."
        )
    fields = {f.name for f in config.fields()}
    unknown = [k for k in params if k not in fields and k not in FIT_ARGUMENTS]
    if unknown:
        raise ValueError(
            f"{where} sets {unknown[0]!r}, which is no fit option; the options are "
            f"{sorted(fields | set(FIT_ARGUMENTS))}."
        )
    checks.train_config(None, {k: v for k, v in params.items() if k in fields})


def probe_space(space: Callable, fixed: dict) -> dict:
    """``space`` called once on a throwaway trial, its options checked: a space that fails
    or gives bad options does so before any study is created. Returns the parameters'
    distributions."""
    optuna = _optuna()
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    params = space(trial)
    if not isinstance(params, dict):
        raise TypeError(
            f"space(trial) must return a dict of fit options, got {type(params).__name__}."
        )
    check_options({**fixed, **params}, "space(trial)")
    if "model" not in {**fixed, **params}:
        raise ValueError(
            "the search space gave no model: return one from space(trial) (a name such as "
            "'mlp', or a factory), or pass model= to tune()."
        )
    return dict(trial.distributions)


def check_same_space(study, distributions: dict) -> None:
    """A resumed study's stored trials sampled the same ranges as the space now does."""
    for t in study.get_trials(deepcopy=False):
        for name, before in t.distributions.items():
            now = distributions.get(name)
            if now is not None and now != before:
                raise ValueError(
                    f"the search space changed since study {study.study_name!r} was stored: "
                    f"{name} was {before}, now {now}. Resume it with the space it had, or "
                    "start a new study (another study_name)."
                )


def check_out(out: Path | None, resume: bool) -> None:
    """A new study's ``out`` holds no other study's trial folders (their checkpoints would
    mix: trial N of each in ``trial-000N``)."""
    marker = None if out is None else Path(out) / MARKER
    if marker is not None and marker.exists() and not resume:
        theirs = json.loads(marker.read_text())
        raise ValueError(
            f"out={str(out)!r} holds the trials of another study ({theirs.get('name')!r}): "
            "their checkpoints would mix with this one's. Give another out= (or remove that "
            "folder), or pass resume=True with that study's storage= to go on with it."
        )


def claim_out(out: Path | None, study) -> None:
    """Mark ``out`` as this study's (a resumed study: check that it is)."""
    if out is None:
        return
    key = study.user_attrs.get("daskdl_id")
    marker = Path(out) / MARKER
    if key is not None and marker.exists():
        theirs = json.loads(marker.read_text())
        if theirs.get("id") != key:
            raise ValueError(
                f"out={str(out)!r} holds the trials of another study ({theirs.get('name')!r}), "
                f"not of {study.study_name!r}: give the out= this study was started with."
            )
        return
    if key is None:
        key = uuid.uuid4().hex
        study.set_user_attr("daskdl_id", key)
    Path(out).mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"name": study.study_name, "id": key}))


@dataclass
class Trial:
    """A running trial: its Optuna trial, its run and what has been reported of it."""

    trial: Any  # optuna.trial.Trial (optuna is an optional import)
    run: Run
    started: float
    reported: int = 0
    pruned: bool = False


def trial_event(study: str, t) -> dict:
    """The ``trial`` event of Optuna's frozen trial ``t`` in study ``study``: all a dashboard
    needs to show it, and to rebuild the study for parameter importances."""
    distributions = _optuna().distributions
    return {
        "study": study, "kind": "trial", "number": t.number, "state": t.state.name.lower(),
        "value": t.value, "params": dict(t.params), "run": t.user_attrs.get("run_id"),
        "distributions": {
            k: distributions.distribution_to_json(d) for k, d in t.distributions.items()
        },
        # Pairs, not a dict: event payloads travel as msgpack, whose maps want string keys.
        "curve": [[int(k), float(v)] for k, v in sorted(t.intermediate_values.items())],
    }  # fmt: skip


@dataclass
class Best:
    """The best trial: its parameters, metric, checkpoint folder and (when it ran in this
    process) its :class:`daskdl.Run`, to evaluate or predict with."""

    number: int
    params: dict
    value: float
    checkpoint: Path | None
    run: Run | None = None


@dataclass
class Trials:
    """The trials' part of a study that starts runs: the data (and its preprocessed variants),
    the options every trial gets, where their checkpoints go."""

    train: Dataset
    val: Dataset | None
    fixed: dict
    epochs: int
    out: Path | None
    parents: trackers.Trackers | None = None  # the study's trackers: a child per trial
    _variants: dict = field(default_factory=dict)

    def data(self, client: Client, standardize: bool) -> tuple[Dataset, Dataset | None]:
        """The data as trials with ``standardize`` see it: computed once for the study, kept
        on the workers until it ends (unless it streams), not once per trial."""
        if standardize not in self._variants:
            train, val = self.train, self.val
            # Data standardised already (datasets.train_test's) stay as they are: the runs
            # record their statistics either way, and nothing is standardised twice.
            if standardize and train.standardized is None:
                train = train.standardize()
                if val is not None and val.standardized is None:
                    val = val.standardize(like=train)
            both = [d for d in (train, val) if d is not None]
            if not streaming.should_stream(
                client, both, list(workers_info(client)), self.fixed.get("stream")
            ):
                train, val = _persist(client, train, val)
            self._variants[standardize] = (train, val)
        return self._variants[standardize]

    def release(self) -> None:
        """The study ended: its hold on the data goes (each run keeps its own)."""
        self._variants.clear()

    def start(self, client: Client, number: int, params: dict, workers: list[str]) -> Run:
        options = {**self.fixed, **params}
        if "model" not in options:
            raise ValueError(
                "the search space gave no model: return one from space(trial) (a name such as "
                "'mlp', or a factory), or pass model= to tune()."
            )
        train, val = self.data(client, bool(options.pop("standardize", False)))
        out = None if self.out is None else self.out / f"trial-{number:04d}"
        if self.parents is not None:
            options["loggers"] = self.parents.children(f"trial-{number:04d}")
        return _fit(client, options.pop("model"), train, val, workers, out, self.epochs, options)


def _persist(client, train: Dataset, val: Dataset | None):
    # One graph: val's standardisation reads train's statistics, computed once for both.
    if val is None:
        return train.persist(client), None
    X, y, vX, vy = client.persist([train.X, train.y, val.X, val.y], optimize_graph=False)
    with client.as_current():
        return train._persisted(X, y), val._persisted(vX, vy)


def _fit(client, model, train, val, workers, out, epochs, options) -> Run:
    from daskdl.training.launcher import (
        fit,  # the launcher imports more than tuning needs at import
    )

    return fit(
        client, model, train, val, workers=workers, out=out, overwrite=out is not None,
        epochs=epochs, block=False, progress=False, epoch_gate=True, **options,
    )  # fmt: skip
