"""A run seen from the client: :class:`Run`, the handle ``fit`` and ``launch`` return. It waits
for, stops and cancels the run (its :class:`~daskdl.runs.coordinator.Coordinator` follows the rank
tasks), and rebuilds and scores a ``fit`` run's trained model."""

from __future__ import annotations

import importlib
import logging
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dask
import dask.array as da
import numpy as np
import pandas as pd
import torch
from distributed import Client

from daskdl import events, models
from daskdl.collectives import comm
from daskdl.config import options as config
from daskdl.data import inputs, validate
from daskdl.data.dataset import Dataset
from daskdl.objective import metrics as metrics_
from daskdl.objective.task import Scale
from daskdl.runs.coordinator import Coordinator, RunError, State

if TYPE_CHECKING:
    import dask.dataframe as dd

    from daskdl.runs.launching import Launch, Started

logger = logging.getLogger(__name__)

__all__ = ["Run", "RunError"]


class Run:
    """A training run on a Dask cluster.

    ``fit(..., block=False)`` returns one at once; ``wait()`` blocks until it ends.
    ``history`` has one row per finished epoch, ``model`` is the trained module (on the CPU).
    """

    def __init__(self, launch: Launch, spec: dict, started: Started):
        plan = launch.plan
        self.client = client = launch.client
        self.run_id = plan.run_id
        self.spec = spec  # what rebuilds the model: the factory and its objective
        self.out = out = Path(plan.out_arg) if plan.out_arg else None
        staging = Path(plan.staging) if plan.staging else None
        recorder = started.recorder
        self._launch = launch
        self._coordinator = Coordinator(
            client, launch, started.futures, started.ranks, recorder, out, staging
        )
        self._recorder = recorder
        self._model: torch.nn.Module | None = None
        self._state = None  # the trained weights on the workers (evaluate, predict)
        self._digest: str | None = None
        self._following = threading.Lock()  # held by the one thread in wait()

    def __repr__(self) -> str:
        return f"<daskdl.Run {self.run_id} {self.status}, {len(self.workers)} ranks>"

    @property
    def workers(self) -> list[str]:
        """The workers of the run's ranks, in rank order (after any regroup)."""
        return self._coordinator.workers

    @property
    def lost(self) -> list[str]:
        """Workers lost during the run, in order."""
        return self._coordinator.lost

    @property
    def info(self) -> dict:
        """The run's description, as its ``config.json`` and ``start`` event have it: its
        options (``info["config"]``), model, task, loss, metrics, data, workers, ..."""
        return self._launch.public

    @property
    def done(self) -> bool:
        coordinator = self._coordinator
        coordinator.check_client()
        return coordinator.ended or all(f.done() for f in coordinator.futures)

    @property
    def status(self) -> str:
        """``"running"``, ``"finished"``, ``"stopped"`` (by :meth:`stop`), ``"failed"`` or
        ``"cancelled"`` (by :meth:`cancel`, or its client went away); ``wait()`` raises the
        reason of the last two. A run that is regrouping onto other workers is running."""
        self._coordinator.check_client()
        state = self._coordinator.state
        return "running" if state is State.REGROUPING else state.value

    @property
    def history(self) -> pd.DataFrame:
        """One row per finished epoch: epoch, step, train_loss, train_accuracy, val_loss,
        val_accuracy, val_perplexity, samples_per_s, epoch_time, lr."""
        return self._coordinator.history()

    @property
    def logs(self) -> pd.DataFrame:
        """What a ``launch`` loop logged without an epoch (``ctx.log(**metrics)``): one row
        per call, its step and values; replayed from the scheduler once the run has ended."""
        if self._coordinator.ended:
            rows = [e for e in events.replay(self.client, self.run_id) if e.get("kind") == "log"]
            return pd.DataFrame(
                [{k: v for k, v in e.items() if k not in ("kind", "run", "rank")} for e in rows]
            )
        return self._coordinator.recorder.logged()

    @property
    def result(self) -> Any:
        """What rank 0's ``train_fn`` returned (waits for the run): a ``launch`` loop's own
        value; for ``fit``, ``{"model": state dict of numpy arrays}``."""
        self.wait()
        return (self._coordinator.result or {}).get("result")

    @property
    def model(self) -> torch.nn.Module:
        """The trained model on the CPU (waits for the run to end)."""
        if self.spec.get("loop"):
            raise AttributeError(
                "A launch() run's model is the loop's own: return it (or its state_dict) from "
                "train_fn (run.result), or load it from the run's checkpoint."
            )
        if self._model is None:
            spec = self.spec
            self._model = models.trained(
                spec["model"], spec["input_shape"], spec["objective"].n_outputs,
                self._result_model(),
            )  # fmt: skip
        return self._model

    def wait(self, timeout: float | None = None) -> Run:
        """Block until every rank has finished; raise the first rank's error if one failed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        # One follower at a time: the dashboard's stop() waits beside the thread that started
        # the run, and a second follower would find the futures the first one released (and
        # take them for cancelled).
        if not self._following.acquire(timeout=-1 if timeout is None else timeout):
            raise TimeoutError(f"run {self.run_id} still running after {timeout}s")
        try:
            self._coordinator.follow(deadline, timeout)
        finally:
            self._following.release()
        return self

    def dashboard(self) -> Any:
        """Deprecated: ``daskdl.dashboard(client, run=run)`` (removed in daskdl 0.3)."""
        return deprecated_dashboard("run.dashboard()", "run=run", self.client, run=self.run_id)

    def stop(self, timeout: float | None = None) -> Run:
        """Ask every rank to stop after the current step, and wait for them: at most
        ``timeout`` seconds, then :meth:`cancel` (a rank stuck in its step never gets there).

        The default, twice the run's ``comm_timeout`` and 30 s, is longer than any step can
        take without its peers giving up on it.
        """
        if timeout is None:
            timeout = 2 * self._launch.plan.comm_timeout + 30
        self.request_stop()
        try:
            return self.wait(timeout)
        except TimeoutError:
            logger.warning("run %s did not stop within %ss: cancelling it", self.run_id, timeout)
            return self.cancel()

    def request_stop(self) -> None:
        """Ask every rank to stop after the current step, and return at once (the flag
        travels with the next all-reduce, so all ranks stop after the same step)."""
        self._on_ranks(comm.request_stop)

    def release_epoch(self, epochs: int) -> None:
        """Let the ranks of a run started with ``epoch_gate=True`` go on after ``epochs``
        epochs (after :meth:`request_stop`, to stop them at the next epoch's first step)."""
        self._on_ranks(comm.release_epoch, epochs)

    def _on_ranks(self, function, *args) -> None:
        """``function(comm_id, *args)`` on the workers of the run's current ranks."""
        comm_id = self._launch.comm_id
        self.client.run(function, comm_id, *args, workers=self.workers, on_error="ignore")

    def cancel(self, grace: float = 10.0) -> Run:
        """End the run now, wherever its ranks are, and leave the cluster able to train.

        Collectives are aborted and the rank tasks cancelled; a rank still busy after
        ``grace`` seconds (stuck in a model's forward, say) holds its worker's thread, which
        Dask cannot take back, so that worker is restarted (its data is recomputed when
        needed). The run ends as ``"cancelled"``; checkpoints already written stay.
        """
        if not self._coordinator.ended:
            self._coordinator.cancel(grace)
        return self

    def evaluate(self, data: Dataset, batch_size: int = 512) -> dict[str, float | list]:
        """The trained model's loss and metrics on ``data`` (the run's metrics: accuracy for a
        classifier by default; mae, rmse, r2 for regression, in the targets' own units),
        computed on the cluster.

        Each partition is scored where it lives; only its metrics' states come back, merged
        here. The data are checked as ``fit`` checks them (targets that suit the task,
        features finite), in the same pass, with the same messages. Raw data get the
        training statistics, named features the training order, as in :meth:`predict`.
        """
        if self.spec.get("loop"):
            raise TypeError(
                "evaluate() scores fit() runs; a launch() loop scores its own data (with "
                "ctx.batches(name, ..., full=False) and ctx.all_reduce)."
            )
        batch_size = config.integer("batch_size", batch_size, minimum=1)
        objective = self.spec["objective"]
        validate.check_compatible(data, None, name="data", task=objective.task)
        validate.check_categories(data, self.spec.get("categories"), name="data")
        data = inputs.conform(self.client, data, self._trained())
        self._scatter_weights()
        X_parts = data.X.to_delayed(optimize_graph=False).ravel()
        y_parts = data.y.to_delayed(optimize_graph=False).ravel()
        score = dask.delayed(_score_partition, pure=True)
        spec = {k: self.spec[k] for k in ("model", "input_shape", "objective", "metrics")}
        spec["data_scale"] = target_scale(self.client, data)
        parts = [score(spec, self._state, x, y, batch_size) for x, y in zip(X_parts, y_parts)]
        parts = self.client.compute(parts, sync=True)
        counts = validate.total_counts([p[0] for p in parts])
        validate.check_values("data", counts, objective.task)
        if objective.is_classifier:
            validate.class_count("data", counts[0], counts[1], counts[4], objective.n_outputs)
        loss, n = np.sum([p[1] for p in parts], axis=0)
        scores = metrics_.values(metrics_.merge([p[2] for p in parts]))
        return {"loss": float(loss / n), **scores}

    def predict(
        self,
        data: Dataset | da.Array | pd.DataFrame | dd.DataFrame,
        *,
        output: str | None = None,
        batch_size: int = 1024,
        device: str = "auto",
        precision: str = "fp32",
        on_nan: str = "raise",
    ) -> da.Array | dd.DataFrame | str:
        """The trained model's predictions over ``data`` (a Dataset, a Dask array of
        samples, or a pandas or Dask dataframe with the training features by name), lazily:
        a Dask array with one block per partition, or, for a dataframe or a Dataset made by
        ``from_dataframe``, a Dask dataframe with its index. Waits for the run.

        ``data`` may be raw (as read) or standardised with the training statistics
        (``standardize(like=train)``): the run applies its own statistics to raw data, and
        refuses data standardised with other ones. Named features (dataframes, files) are
        matched by name: another column order is reordered, extra columns left out. A
        Dask array counts as raw samples, in the training features' order.
        ``on_nan="raise"`` refuses samples with NaN or infinite features (naming the
        partition); ``"propagate"`` gives them NaN outputs (label -1).

        ``output``: ``"labels"`` (a classifier's default: class ids), ``"proba"``
        (probabilities; a multi-label model's default) or ``"logits"``; a regression's
        ``"values"`` are in the targets' own units. ``device="auto"`` predicts on a worker's
        GPU where it has one, ``precision="bf16"`` in bfloat16 there. The weights go to each
        worker once, not with every task. Categorical columns need the training codes
        (``categories=train.categories``).
        """
        from daskdl.prediction.partitions import digest, make_predictor, predictions

        if self.spec.get("loop"):
            raise TypeError(
                "predict() uses a fit() run's model; a launch() loop's model is its own "
                "(daskdl.predict(checkpoint, data, model=...) rebuilds one from a checkpoint)."
            )
        X, index = inputs.samples(self.client, data, self._trained())
        self._scatter_weights()
        self._digest = self._digest or digest(self._result_model())
        predictor = make_predictor(
            self.spec["model"], self.spec["input_shape"], self.spec["objective"], self._digest,
            output, batch_size, device, precision, on_nan,
        )  # fmt: skip
        return predictions(self.client, X, predictor, self._state, index)

    def _trained(self) -> inputs.Trained:
        spec = self.spec
        return inputs.Trained(
            spec.get("features"), spec.get("categories"), spec.get("standardized"),
            tuple(spec["input_shape"]),
        )  # fmt: skip

    def _scatter_weights(self) -> None:
        """The trained weights on every worker, once per run: one future for the whole state
        dict, under a fresh key (a content hash could reuse a key that an earlier call may be
        releasing at this very moment)."""
        if self._state is None:
            [self._state] = self.client.scatter([self._result_model()], broadcast=True, hash=False)

    def _result_model(self) -> dict:
        return self.result["model"]


def _score_partition(spec: dict, state: dict, X: np.ndarray, y: np.ndarray, batch_size: int):
    """A partition's checks (:func:`daskdl.data.validate.value_counts`), then its summed loss and
    count and its metrics (updated); only scored when the checks pass."""
    objective = spec["objective"]
    counts = validate.value_counts(X, y)
    scores = metrics_.build(spec["metrics"], objective, "cpu")
    try:  # the client raises the error, from every partition's counts
        validate.check_values("data", counts, objective.task)
        if objective.is_classifier:
            validate.class_count("data", counts[0], counts[1], counts[4], objective.n_outputs)
    except ValueError:
        return counts, np.zeros(2), scores
    model = models.trained(spec["model"], spec["input_shape"], objective.n_outputs, state)
    xt = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
    yt = torch.from_numpy(np.asarray(y, dtype=objective.target_dtype))
    no_autocast = torch.autocast("cpu", enabled=False)
    sums = metrics_.score(
        model, xt, yt, batch_size, no_autocast, objective, scores, spec["data_scale"]
    )
    return counts, sums, scores


def target_scale(client: Client, data: Dataset) -> Scale | None:
    """How ``data``'s targets were standardised (computed on the cluster), or None."""
    if data.target_scale is None:
        return None
    stats = client.compute(list(data.target_scale), sync=True, optimize_graph=False)
    return Scale.from_arrays(*stats)


def deprecated_dashboard(call: str, keyword: str, client: Client, *args, **kwargs) -> Any:
    """The dashboard that ``run.dashboard()`` and ``study.dashboard()`` opened, with a warning."""
    warnings.warn(
        f"{call} is deprecated and goes in daskdl 0.3: use daskdl.dashboard(client, {keyword}).",
        DeprecationWarning,
        stacklevel=3,
    )
    # The dashboard sits above the runs (it starts them), so they do not import it: the
    # deprecated methods reach it by name for one more release.
    return importlib.import_module("daskdl.webapp").dashboard(client, *args, **kwargs)
