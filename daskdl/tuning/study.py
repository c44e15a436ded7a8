"""``daskdl.tune`` and its :class:`Study`: the client-side driver that keeps the cluster's
workers busy with trials, reports their metrics to Optuna and prunes them (see
:mod:`daskdl.tuning.parts` for the pieces)."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pandas as pd
from distributed import Client

from daskdl import events
from daskdl.cluster import workers_info
from daskdl.config import options as config_
from daskdl.data.dataset import Dataset
from daskdl.runs import trackers
from daskdl.runs.run import Run, deprecated_dashboard
from daskdl.tuning.parts import (
    Best,
    Trial,
    Trials,
    _optuna,
    check_out,
    check_same_space,
    check_storage,
    claim_out,
    direction_for,
    make_pruner,
    make_sampler,
    make_storage,
    probe_space,
    trial_event,
)

if TYPE_CHECKING:  # optuna and Panel are extras: for annotations only
    import optuna


logger = logging.getLogger(__name__)


class Study:
    """A tuning study running on a cluster: ``tune(...)`` returns one.

    ``wait()`` blocks until ``n_trials`` trials have ended; ``trials`` is a DataFrame of every
    trial (parameters, state, metric per epoch, run id, checkpoint folder); ``best`` the best
    trial; ``optuna`` the Optuna study itself (for its plots and parameter importances);
    ``utilization`` the share of the workers' time that trials held them. The study publishes
    its trials as events (``daskdl.events.STUDIES_TOPIC``): ``dashboard()`` shows them, as
    does any dashboard on the cluster.
    """

    def __init__(
        self,
        client: Client,
        study: optuna.Study,
        trials: Trials,
        space: Callable,
        metric: str,
        n_trials: int,
        ranks_per_trial: int,
        max_concurrent: int,
        poll: float = 0.05,
    ):
        self.client, self.optuna, self.metric = client, study, metric
        # This driver's name on the dashboard: a study resumed later is another driver.
        self.key = f"{study.study_name}-{uuid.uuid4().hex[:8]}"
        self._trials, self._space = trials, space
        self.n_trials, self.ranks_per_trial = n_trials, ranks_per_trial
        self.max_concurrent, self._poll = max_concurrent, poll
        self._running: dict[int, Trial] = {}
        self._runs: dict[int, Run] = {}  # every run this process started, by trial number
        self._error: BaseException | None = None
        self._stopping = threading.Event()
        self._held = 0.0  # worker-seconds that trials held
        self.peak_concurrent = 0  # the most trials that ran at once
        self._workers = len(workers_info(client))
        self._began = time.monotonic()
        self._ended_at: float | None = None
        self._thread = threading.Thread(target=self._drive, name="daskdl-tune", daemon=True)

    def __repr__(self) -> str:
        return f"<daskdl.Study {self.optuna.study_name!r}: {self._count()} of {self.n_trials}>"

    # ------------------------------------------------------------------ the user's handle

    def wait(self, timeout: float | None = None) -> Study:
        """Block until the study has run its trials; raise what stopped it, if anything."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"study {self.optuna.study_name!r} still running after {timeout}s")
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> Study:
        """Start no more trials, stop the running ones after their current step, and wait."""
        self._stopping.set()
        for t in list(self._running.values()):
            t.run.request_stop()
        self._thread.join()
        return self

    def dashboard(self, runs_dir: str = "runs") -> Any:
        """Deprecated: ``daskdl.dashboard(client, study=study)`` (removed in daskdl 0.3)."""
        return deprecated_dashboard(
            "study.dashboard()", "study=study", self.client, runs_dir, study=self.key
        )

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    @property
    def trials(self) -> pd.DataFrame:
        """One row per trial: number, state, value, the parameters, the metric per epoch,
        run id and checkpoint folder."""
        rows = []
        for t in self.optuna.get_trials(deepcopy=False):
            curve = [t.intermediate_values[k] for k in sorted(t.intermediate_values)]
            rows.append({
                "number": t.number, "state": t.state.name.lower(), "value": t.value,
                **t.params, self.metric: curve, "epochs": len(curve),
                "run_id": t.user_attrs.get("run_id"), "out": t.user_attrs.get("out"),
                "error": t.user_attrs.get("error"),
            })  # fmt: skip
        return pd.DataFrame(rows)

    @property
    def best(self) -> Best:
        """The best complete trial: parameters, metric, checkpoint folder and its Run."""
        t = self.optuna.best_trial
        out = t.user_attrs.get("out")
        value = cast(float, t.value)  # a complete trial's
        return Best(t.number, t.params, value, Path(out) if out else None,
                    self._runs.get(t.number))  # fmt: skip

    @property
    def utilization(self) -> float:
        """The workers' time that trials held them, over the study's wall time so far."""
        end = self._ended_at or time.monotonic()
        held = self._held + sum(
            (time.monotonic() - t.started) * len(t.run.workers) for t in self._running.values()
        )
        return held / max(1e-9, (end - self._began) * self._workers)

    # ------------------------------------------------------------------ the driver

    def _drive(self) -> None:
        status = "failed"
        try:
            self._announce()
            while True:
                for number in list(self._running):
                    self._follow(self._running[number])
                if self._stopping.is_set() or self._count() >= self.n_trials:
                    if not self._running:
                        break
                else:
                    self._start_free()
                time.sleep(self._poll)
            status = "stopped" if self._stopping.is_set() else "finished"
        except BaseException as e:  # handed to wait(): the study ends with the running trials
            self._error = e
            for t in self._running.values():
                t.run.cancel()
        finally:
            self._ended_at = time.monotonic()
            self._trials.release()
            self._publish({"kind": "end", "status": status})
            if self._trials.parents is not None:
                self._trials.parents.close(status)

    def _track(self, number: int, value: float) -> None:
        """A complete trial's value, and the best so far, in the study's trackers: against
        the count of complete trials (trials end out of order; steps must only increase)."""
        if self._trials.parents is None:
            return
        states = (_optuna().trial.TrialState.COMPLETE,)
        done = self.optuna.get_trials(deepcopy=False, states=states)
        self._trials.parents.log_metrics(
            {"study/value": value, "study/best": self.optuna.best_value, "study/trial": number},
            step=len(done),
        )

    def _publish(self, msg: dict) -> None:
        self.client.log_event(events.STUDIES_TOPIC, {"study": self.key, **msg})

    def _publish_trial(self, number: int) -> None:
        # Optuna numbers a study's trials 0, 1, ... in the order get_trials lists them.
        self._publish(trial_event(self.key, self.optuna.get_trials(deepcopy=False)[number]))

    def _announce(self) -> None:
        """The study's description, then the trials it already has (a resumed study)."""
        self._publish({
            "kind": "study", "name": self.optuna.study_name, "metric": self.metric,
            "direction": self.optuna.direction.name.lower(), "n_trials": self.n_trials,
            "pruner": type(self.optuna.pruner).__name__,
            "sampler": type(self.optuna.sampler).__name__,
        })  # fmt: skip
        for t in self.optuna.get_trials(deepcopy=False):
            self._publish(trial_event(self.key, t))

    def _count(self) -> int:
        """Trials that ended and count towards n_trials (not those queued again)."""
        states = _ended_states()
        trials = self.optuna.get_trials(deepcopy=False)
        requeued = {
            t.user_attrs["requeued_from"] for t in trials if "requeued_from" in t.user_attrs
        }
        ended = [t for t in trials if t.state in states and t.number not in requeued]
        return len(ended) + len(self._running)

    def _free_workers(self) -> list[str]:
        busy = {w for t in self._running.values() for w in t.run.workers}
        return [w for w in sorted(workers_info(self.client)) if w not in busy]

    def _start_free(self) -> None:
        while len(self._running) < self.max_concurrent and self._count() < self.n_trials:
            free = self._free_workers()
            if len(free) < self.ranks_per_trial:
                return
            trial = self.optuna.ask()
            try:
                params = self._space(trial)
                if not isinstance(params, dict):
                    raise TypeError(
                        f"space(trial) must return a dict of fit options, got "
                        f"{type(params).__name__}."
                    )
                run = self._trials.start(
                    self.client, trial.number, params, free[: self.ranks_per_trial]
                )
            except (ValueError, TypeError) as e:
                trial.set_user_attr("error", f"{type(e).__name__}: {e}")
                self.optuna.tell(trial, state=_optuna().trial.TrialState.FAIL)
                self._publish_trial(trial.number)
                if not self._runs:  # the first trial: the space or the options are wrong
                    raise
                logger.warning("trial %d could not start: %s", trial.number, e)
                continue
            trial.set_user_attr("run_id", run.run_id)
            trial.set_user_attr("out", None if run.out is None else str(run.out))
            self._running[trial.number] = Trial(trial, run, time.monotonic())
            self.peak_concurrent = max(self.peak_concurrent, len(self._running))
            self._runs[trial.number] = run
            self._publish_trial(trial.number)
            logger.info("trial %d started on %s: %s", trial.number, run.workers, params)

    def _follow(self, t: Trial) -> None:
        error = None
        try:
            t.run.wait(timeout=0.01)  # the run's coordinator follows it (and regroups) here
            ended = True
        except TimeoutError:
            ended = False
        except Exception as e:  # noqa: BLE001 - a failed trial is the study's data, not its end
            ended, error = True, e
        self._report(t, release=not ended)  # an ended run's workers may be gone
        if ended:
            self._finish(t, error)

    def _report(self, t: Trial, release: bool) -> None:
        history = t.run.history
        if len(history) <= t.reported:
            return
        if self.metric not in history.columns:
            t.run.cancel()
            raise ValueError(
                f"metric={self.metric!r} is not in the runs' history; its columns are "
                f"{sorted(history.columns)}."
            )
        for _, row in history.iloc[t.reported :].iterrows():
            t.trial.report(float(row[self.metric]), int(row["epoch"]))
        t.reported = len(history)
        self._publish_trial(t.trial.number)
        if not release:  # the run ended: nothing left to decide
            return
        if not t.pruned and t.trial.should_prune():
            t.pruned = True
            logger.info("trial %d pruned after epoch %d", t.trial.number, t.reported)
            t.run.request_stop()
        # The ranks wait for this after every epoch: with a stop request, they stop at the
        # next epoch's first step, all of them.
        t.run.release_epoch(int(history["epoch"].iloc[-1]))

    def _finish(self, t: Trial, error: BaseException | None) -> None:
        del self._running[t.trial.number]
        self._held += (time.monotonic() - t.started) * len(t.run.workers)
        states = _optuna().trial.TrialState
        values = t.run.history.get(self.metric)
        if error is not None or t.run.status in ("failed", "cancelled"):
            t.trial.set_user_attr("error", str(error or t.run.status))
            self.optuna.tell(t.trial, state=states.FAIL)
            logger.warning("trial %d failed: %s", t.trial.number, error)
        elif t.pruned or values is None or not len(values):
            self.optuna.tell(t.trial, state=states.PRUNED)
        else:
            self.optuna.tell(t.trial, float(values.iloc[-1]))
            logger.info("trial %d: %s = %.4g", t.trial.number, self.metric, values.iloc[-1])
            self._track(t.trial.number, float(values.iloc[-1]))
        self._publish_trial(t.trial.number)


def _ended_states():
    states = _optuna().trial.TrialState
    return (states.COMPLETE, states.PRUNED, states.FAIL)


def tune(
    client: Client,
    space: Callable,
    train: Dataset,
    val: Dataset | None = None,
    *,
    n_trials: int = 20,
    epochs: int = 10,
    metric: str = "val_accuracy",
    direction: str | None = None,
    pruner: str | optuna.pruners.BasePruner = "asha",
    sampler: str | optuna.samplers.BaseSampler = "tpe",
    ranks_per_trial: int = 1,
    max_concurrent: int | None = None,
    storage: str | Path | None = None,
    study_name: str = "daskdl",
    resume: bool = False,
    out: str | Path | None = None,
    seed: int = 0,
    block: bool = True,
    loggers: Sequence | None = None,
    **fixed: Any,
) -> Study:
    """Tune hyperparameters and choose a model: ``n_trials`` daskdl runs on one cluster.

    Parameters
    ----------
    space
        ``space(trial) -> dict`` (or the dict a YAML search space holds: ``{"lr": {"low":
        1e-3, "high": 0.3, "log": True}, ...}``): the options of one trial, sampled with Optuna's
        ``trial.suggest_*``: ``model`` (a registered name or a factory), any :func:`daskdl.fit`
        option (``lr``, ``batch_size``, ``augment``, ``precision``, ``schedule``, ``shard``,
        ``pipeline``, ``loss``, ...) and ``standardize`` (the data standardised or not).
    train, val
        The data every trial trains on and is scored on.
    n_trials, epochs
        Trials to run (complete, pruned or failed), and each one's epoch budget.
    metric, direction
        A column of the runs' history (``val_accuracy``, ``val_loss``, ...), reported after
        every epoch, and ``"maximize"`` or ``"minimize"``: by default from the metric's name
        (losses and errors are minimised, accuracies and scores maximised; a name that says
        neither needs ``direction=``).
    pruner, sampler
        ``"asha"`` (default), ``"hyperband"``, ``"median"``, ``"none"``, or any Optuna pruner;
        ``"tpe"`` (default), ``"random"``, or any Optuna sampler.
    ranks_per_trial, max_concurrent
        Workers per trial, and trials at once (default: as many as the workers hold).
    storage, study_name, resume
        A journal file path or an RDB URL that keeps the study; ``resume=True`` goes on with
        the stored study ``study_name`` (trials running when its driver died run again).
    out
        A folder: trial ``N``'s checkpoints go to ``out/trial-000N``.
    loggers
        Experiment trackers (as for :func:`daskdl.fit`): the study is one parent run (its
        settings, each complete trial's value and the best so far), each trial a child run
        (``trial-000N``: what its run logs).
    **fixed
        ``fit`` options every trial gets (the space's values win).

    Examples
    --------
    >>> def space(trial):                                              # doctest: +SKIP
    ...     return {"model": "mlp", "lr": trial.suggest_float("lr", 1e-3, 0.3, log=True)}
    >>> study = daskdl.tune(client, space, train, val=test, n_trials=8)  # doctest: +SKIP
    >>> study.best.params                                               # doctest: +SKIP
    {'lr': 0.061}
    """
    optuna = _optuna()
    workers = len(workers_info(client))
    n_trials = config_.integer("n_trials", n_trials, minimum=1)
    epochs = config_.integer("epochs", epochs, minimum=1)
    ranks_per_trial = config_.integer("ranks_per_trial", ranks_per_trial, minimum=1)
    if ranks_per_trial > workers:
        raise ValueError(
            f"ranks_per_trial={ranks_per_trial} on a cluster of {workers} workers: give 1 to "
            f"{workers}, or add workers."
        )
    if max_concurrent is not None:
        max_concurrent = config_.integer("max_concurrent", max_concurrent, minimum=1)
    if not isinstance(metric, str) or not metric:
        raise TypeError(f"metric must be a column name of the runs' history, got {metric!r}.")
    if metric.startswith("val_") and val is None:
        raise ValueError(f"metric={metric!r} scores the validation set: pass val=.")
    direction = direction_for(metric, direction)
    if isinstance(space, Mapping):  # the YAML file's form, as data
        from daskdl.tuning import space as space_

        space = space_.from_dict(space)
    if not callable(space):
        raise TypeError(
            f"space must be a function space(trial) -> dict, or a dict as daskdl tune's YAML "
            f"file holds it, got {space!r}."
        )
    resume = config_.flag("resume", resume)
    check_storage(storage)
    if resume and storage is None:
        raise ValueError("resume=True needs the storage= the study was kept in.")
    check_out(None if out is None else Path(out), resume)
    distributions = probe_space(space, fixed)
    loggers = trackers.check(loggers, out)
    sampler_, pruner_ = make_sampler(sampler, seed), make_pruner(pruner, epochs)
    # Everything is checked: only now is the study created (or loaded) in storage=.
    study = _open(optuna, storage, study_name, resume, direction, sampler_, pruner_)
    if resume:
        check_same_space(study, distributions)
    claim_out(None if out is None else Path(out), study)
    concurrent = max_concurrent or workers // ranks_per_trial
    parents = _study_trackers(study, loggers, out, resume, fixed, n_trials, epochs)
    trials = Trials(train, val, fixed, epochs, None if out is None else Path(out), parents)
    handle = Study(client, study, trials, space, metric, n_trials, ranks_per_trial, concurrent)
    handle._thread.start()
    return handle.wait() if block else handle


def _study_trackers(study, loggers, out, resume, fixed, n_trials, epochs):
    """The study's parent trackers; their identities are kept in the Optuna study, so that a
    resumed study goes on in the same parent run."""
    if not loggers:
        return None
    identities = study.user_attrs.get("trackers") if resume else None
    parents = trackers.open_study(loggers, out, study.study_name, identities)
    if identities is None:
        study.set_user_attr("trackers", parents.identities())
    parents.hyperparams({
        "study": study.study_name, "direction": study.direction.name.lower(),
        "n_trials": n_trials, "epochs": epochs, "pruner": type(study.pruner).__name__,
        "sampler": type(study.sampler).__name__, "fixed": fixed,
    })  # fmt: skip
    return parents


def _open(optuna, storage, name, resume, direction, sampler, pruner):
    """Create the study, or with ``resume`` load it and queue again the trials whose driver
    died while they ran."""
    kwargs = dict(study_name=name, storage=make_storage(storage), sampler=sampler, pruner=pruner)
    if not resume:
        try:
            return optuna.create_study(direction=direction, **kwargs)
        except optuna.exceptions.DuplicatedStudyError:
            raise ValueError(
                f"a study named {name!r} is already in {storage}: pass resume=True to go on "
                "with it, or another study_name."
            ) from None
    if storage is None:
        raise ValueError("resume=True needs the storage= the study was kept in.")
    try:
        study = optuna.load_study(**kwargs)
    except KeyError:  # Optuna's word for a study the storage does not hold
        raise ValueError(
            f"resume=True, but {storage} holds no study named {name!r}: pass resume=False to "
            "create it, or the study_name it was stored under."
        ) from None
    running = optuna.trial.TrialState.RUNNING
    for t in study.get_trials(deepcopy=False, states=(running,)):
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"requeued_from": t.number})
        logger.info("trial %d was running when the study's driver stopped: queued again", t.number)
    return study
