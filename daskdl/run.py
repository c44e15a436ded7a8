"""A running run, seen from the client: :class:`Run` watches its rank tasks, regroups them when
a worker is lost or joins, stops or cancels them, and scores the trained model
(:mod:`daskdl.launcher` starts them)."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import dask
import numpy as np
import pandas as pd
import torch
from distributed import Client, wait

from daskdl import comm, config, events, models, preflight, rundir
from daskdl import metrics as metrics_
from daskdl.cluster import workers_info
from daskdl.data import Dataset
from daskdl.objective import Scale

if TYPE_CHECKING:
    from daskdl.launcher import Launch

logger = logging.getLogger(__name__)


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
        staging: Path | None = None,
    ):
        self.client = client
        self.run_id = run_id
        self.spec = spec
        self.workers = workers
        self.out = out
        self._staging = staging  # where it writes until its first checkpoint replaces out
        self._futures = futures
        self._data = data
        self._recorder = recorder
        self._result: dict | None = None
        self._error: BaseException | None = None
        self._model: torch.nn.Module | None = None
        self._state = None  # the trained weights, scattered to the workers by evaluate()
        self._launch: Launch | None = None
        self._max_failures = 0
        self.lost: list[str] = []  # workers lost during the run, in order
        self._grow = False  # whether workers that join the cluster get ranks
        self._join_asked = False
        self._cancelled = False
        self._following = threading.Lock()  # held by the one thread in wait()

    def __repr__(self) -> str:
        return f"<daskdl.Run {self.run_id} {self.status}, {len(self.workers)} ranks>"

    @property
    def done(self) -> bool:
        self._check_client()
        if self._result is not None or self._error is not None:
            return True
        return all(f.done() for f in self._futures)

    @property
    def status(self) -> str:
        """``"running"``, ``"finished"``, ``"stopped"`` (by :meth:`stop`), ``"failed"`` or
        ``"cancelled"`` (by :meth:`cancel`, or its client went away); ``wait()`` raises the
        reason of the last two."""
        self._check_client()
        if self._error is not None:
            return "cancelled" if self._cancelled else "failed"
        if self._result is not None:
            return "stopped" if self._result["stopped"] else "finished"
        return "running"

    def _check_client(self) -> None:
        """A run whose client closed cannot be followed any more: the scheduler released its
        rank tasks (they stop after the same step), so it ends as cancelled, saying why."""
        if self._result is not None or self._error is not None:
            return
        if self.client.status in ("closing", "closed"):
            self._cancelled = True
            self._error = RunError(
                f"run {self.run_id} was cancelled: the client that started it closed before it "
                "ended, and the scheduler released its ranks. Keep the client open until "
                "run.wait() returns; resume= continues the run from its last checkpoint."
            )
            self._recorder.close()

    @property
    def history(self) -> pd.DataFrame:
        """One row per finished epoch: epoch, step, train_loss, train_accuracy, val_loss,
        val_accuracy, val_perplexity, samples_per_s, epoch_time, lr."""
        if self._result is not None:
            return events.history_frame(self._result["history"])
        return self._recorder.history()

    @property
    def result(self):
        """What rank 0's ``train_fn`` returned (``daskdl.launch``; waits for the run)."""
        self.wait()
        return self._result.get("result")

    @property
    def model(self) -> torch.nn.Module:
        """The trained model on the CPU (waits for the run to end)."""
        if self.spec.get("loop"):
            raise AttributeError(
                "A launch() run's model is the loop's own: return it (or its state_dict) from "
                "train_fn (run.result), or load it from the run's checkpoint."
            )
        if self._model is None:
            self.wait()
            model = models.build(
                self.spec["model"], self.spec["input_shape"], self.spec["objective"].n_outputs
            )
            state = {k: torch.from_numpy(v) for k, v in self._result["model"].items()}
            model.load_state_dict(state)
            self._model = model.eval()
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
            if self._error is not None:
                raise self._error
            if self._result is None:
                self._follow(deadline, timeout)
        finally:
            self._following.release()
        return self

    def _follow(self, deadline: float | None, timeout: float | None) -> None:
        """Watch the rank tasks until the run ends: regroup on lost or joined workers, fail
        on a rank's error, and record the result."""
        try:
            while True:
                try:
                    wait(self._futures, timeout=1.0)
                except TimeoutError:
                    pass
                self._check_client()
                if self._error is not None:
                    raise self._error
                if any(f.status == "cancelled" for f in self._futures):
                    self._cancelled = True
                    self._fail(
                        RunError(
                            f"run {self.run_id} was cancelled: its rank tasks were cancelled "
                            "(client.cancel, or the scheduler released them)."
                        )
                    )
                failed = [i for i, f in enumerate(self._futures) if f.status == "error"]
                live = self._live_workers()
                gone = [i for i, w in enumerate(self.workers) if w not in live]
                if failed and not gone:
                    self._fail(self._rank_error(failed))
                if gone:
                    self._regroup(gone)
                    continue
                self._ask_to_grow(live)
                if self.done and self._returned("join"):
                    self._regroup([], sorted(self._live_workers() - set(self.workers)))
                    continue
                if self.done and self._peer_lost():
                    continue  # a rank saw a peer vanish before the scheduler did: look again
                if self.done:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"run {self.run_id} still running after {timeout}s")
            self._result = self._futures[0].result()
            self._finish("stopped" if self._result["stopped"] else "finished")
        except KeyboardInterrupt:
            self._fail(RunError(f"run {self.run_id} interrupted"))

    def dashboard(self):
        """A live dashboard of this run (and the others on the cluster), for a notebook.

        Needs ``pip install "daskdl[app]"``; see :func:`daskdl.dashboard`.
        """
        from daskdl.webapp import dashboard

        app = dashboard(self.client)
        if self.run_id in app.store.runs:
            app.store.selected = self.run_id
        return app

    @property
    def _comm_id(self) -> str:
        return self._launch.comm_id if self._launch is not None else self.run_id

    def stop(self, timeout: float | None = None) -> Run:
        """Ask every rank to stop after the current step, and wait for them: at most
        ``timeout`` seconds, then :meth:`cancel` (a rank stuck in its step never gets there).

        The default, twice the run's ``comm_timeout`` and 30 s, is longer than any step can
        take without its peers giving up on it.
        """
        if timeout is None:
            comm_timeout = self._launch.config["comm_timeout"] if self._launch else 60.0
            timeout = 2 * comm_timeout + 30
        self.client.run(comm.request_stop, self._comm_id, workers=self.workers, on_error="ignore")
        try:
            return self.wait(timeout)
        except TimeoutError:
            logger.warning("run %s did not stop within %ss: cancelling it", self.run_id, timeout)
            return self.cancel()

    def cancel(self, grace: float = 10.0) -> Run:
        """End the run now, wherever its ranks are, and leave the cluster able to train.

        Collectives are aborted and the rank tasks cancelled; a rank still busy after
        ``grace`` seconds (stuck in a model's forward, say) holds its worker's thread, which
        Dask cannot take back, so that worker is restarted (its data is recomputed when
        needed). The run ends as ``"cancelled"``; checkpoints already written stay.
        """
        if self._result is not None or self._error is not None:
            return self
        reason = f"run {self.run_id} was cancelled (Run.cancel)"
        self.client.run(comm.abort, self._comm_id, reason, workers=self.workers, on_error="ignore")
        self.client.cancel(self._futures, force=True)
        keys = [f.key for f in self._futures]
        busy: list[str] = []
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            running = self.client.run(_running_keys, keys, workers=self.workers, on_error="ignore")
            busy = sorted(w for w, found in running.items() if isinstance(found, list) and found)
            if not busy:
                break
            time.sleep(0.2)
        if busy:
            logger.warning(
                "run %s: ranks on %s still ran %.0fs after cancel; restarting those workers",
                self.run_id,
                busy,
                grace,
            )
            self.client.restart_workers(busy, raise_for_error=False)
        self._cancelled = True
        self._error = RunError(reason)
        self._finish("cancelled", error=reason)
        return self

    def _returned(self, reason: str | None = None) -> list[dict]:
        """The states ranks handed back to regroup (for ``reason``, or any but a join)."""
        results = [f.result() for f in self._futures if f.status == "finished"]
        states = [r for r in results if isinstance(r, dict) and "elastic" in r]
        if reason is None:
            return [r for r in states if r["elastic"] != "join"]
        return [r for r in states if r["elastic"] == reason]

    def _ask_to_grow(self, live: set[str]) -> None:
        """Workers that joined the cluster get ranks from the next epoch on (runs that were
        given all workers, and may regroup)."""
        if not self._grow or self._join_asked or self._launch is None:
            return
        if not self._launch.elastic or not live - set(self.workers):
            return
        self.client.run(
            comm.request_regroup, self._comm_id, workers=self.workers, on_error="ignore"
        )
        self._join_asked = True

    def _peer_lost(self) -> bool:
        """Ranks that returned a regroup request while every worker is still there: wait a
        little for the scheduler to notice the loss; a collective that failed with every
        worker alive is an error."""
        results = self._returned()
        if not results:
            return False
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if set(self.workers) - self._live_workers():
                return True
            time.sleep(0.2)
        self._fail(RunError(f"run {self.run_id}: a collective failed ({results[0]['elastic']})."))

    def _regroup(self, gone: list[int], joined: list[str] = ()) -> None:
        """Go on without the workers of ranks ``gone`` (or fail past max_failures), and with
        the workers that ``joined``."""
        lost = [self.workers[i] for i in gone]
        names = ", ".join(f"rank {i} ({self.workers[i]})" for i in gone)
        survivors = [w for i, w in enumerate(self.workers) if i not in gone]
        if gone and (self._launch is None or len(self.lost) + len(lost) > self._max_failures):
            so_far = f"; lost before: {self.lost}" if self.lost else ""
            self._fail(
                RunError(
                    f"run {self.run_id}: worker of {names} left the cluster{so_far} "
                    f"(max_failures={self._max_failures})."
                )
            )
        if not survivors:
            self._fail(RunError(f"run {self.run_id}: every worker is gone ({names})."))
        if gone:
            # Wake the survivors at once (they may be waiting on the lost peer); each returns
            # its replica as of the last step it finished.
            self.client.run(
                comm.abort,
                self._comm_id,
                f"membership change: lost {names}",
                workers=survivors,
                on_error="ignore",
            )
        states = []
        for i, f in enumerate(self._futures):
            if i in gone:
                continue
            try:
                result = f.result(timeout=self._launch.config["comm_timeout"] + 30)
            except Exception as e:  # noqa: BLE001 - any survivor failure ends the run
                self._fail(self._rank_error([i]) if f.status == "error" else RunError(str(e)))
            if isinstance(result, dict) and "elastic" in result:
                states.append(result)
        if not states:
            # The survivors had finished the run already: nothing to regroup.
            self.workers = survivors
            self._futures = [f for i, f in enumerate(self._futures) if i not in gone]
            return
        # All replicas agree up to the last step every survivor finished: start there.
        state = min(states, key=lambda st: (st["epoch"], st["step"], st["rank"]))
        for f in self._futures:
            f.release()
        self.lost += lost
        self._launch.generation += 1
        self._join_asked = False
        # Partitions lost with a worker are recomputed first, while every worker thread is
        # free: a new rank that started early would hold its thread waiting for a peer whose
        # data needs that very thread.
        wait(self._launch.all_futures)
        try:
            ranks, rank_plans, steps = self._launch.plan(survivors + list(joined))
        except ValueError:  # more ranks than partitions, or shards below a batch: do without
            joined = []
            ranks, rank_plans, steps = self._launch.plan(survivors)
        # The epoch goes on from the same fraction of it, in the new shards' batches.
        start_step = min(steps, round(state["step"] * steps / state["steps_per_epoch"]))
        resume = self._launch.resume_from(state)
        self.client.log_event(
            events.topic(self.run_id),
            {
                "run": self.run_id,
                "kind": "membership",
                "lost": lost,
                "joined": list(joined),
                "workers": ranks,
                "world_size": len(ranks),
                "steps_per_epoch": steps,
                "epoch": state["epoch"] + 1,
                "step_in_epoch": start_step,
                "comm_id": self._launch.comm_id,
            },
        )
        self._futures = self._launch.submit(
            ranks, rank_plans, steps, resume, state["epoch"], start_step, state["history"]
        )
        self.workers = ranks

    def evaluate(self, data: Dataset, batch_size: int = 512) -> dict[str, float]:
        """The trained model's loss and metrics on ``data`` (the run's metrics: accuracy for a
        classifier by default; mae, rmse, r2 for regression, in the targets' own units),
        computed on the cluster.

        Each partition is scored where it lives; only its metrics' states come back, merged
        here. The data are checked as ``fit`` checks them (targets that suit the task,
        features finite), in the same pass, with the same messages.
        """
        if self.spec.get("loop"):
            raise TypeError(
                "evaluate() scores fit() runs; a launch() loop scores its own data (with "
                "ctx.batches(name, ..., full=False) and ctx.all_reduce)."
            )
        batch_size = config.integer("batch_size", batch_size, minimum=1)
        objective = self.spec["objective"]
        check_compatible(data, self.spec["input_shape"], name="data", task=objective.task)
        check_categories(data, self.spec.get("categories"), name="data")
        if self._state is None:
            # One future for the whole state dict, under a fresh key: scattering the dict itself
            # would key each tensor by its bare name, and a content hash would reuse a key that
            # an earlier call may be releasing at this very moment.
            [self._state] = self.client.scatter([self._result_model()], broadcast=True, hash=False)
        X_parts = data.X.to_delayed(optimize_graph=False).ravel()
        y_parts = data.y.to_delayed(optimize_graph=False).ravel()
        score = dask.delayed(_score_partition, pure=True)
        spec = {k: self.spec[k] for k in ("model", "input_shape", "objective", "metrics")}
        spec["data_scale"] = target_scale(self.client, data)
        parts = [score(spec, self._state, x, y, batch_size) for x, y in zip(X_parts, y_parts)]
        parts = self.client.compute(parts, sync=True)
        counts = preflight.total_counts([p[0] for p in parts])
        preflight.check_values("data", counts, objective.task)
        if objective.is_classifier:
            preflight.class_count("data", counts[0], counts[1], counts[4], objective.n_outputs)
        loss, n = np.sum([p[1] for p in parts], axis=0)
        scores = metrics_.values(metrics_.merge([p[2] for p in parts]))
        return {"loss": float(loss / n), **scores}

    def _result_model(self) -> dict:
        self.wait()
        return self._result["model"]

    def _live_workers(self) -> set[str]:
        """Workers that can host a rank: not leaving. A retiring worker counts as gone at
        once, so its peers regroup without waiting for it to close."""
        workers = workers_info(self.client)
        leaving = ("closing", "closing_gracefully", "closed")
        return {addr for addr, info in workers.items() if info.get("status") not in leaving}

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
        status = "cancelled" if self._cancelled else "failed"
        self.client.run(
            comm.abort,
            self._comm_id,
            str(error),
            workers=list(self._live_workers() & set(self.workers)),
            on_error="ignore",
        )
        self.client.cancel(self._futures, force=True)
        self._finish(status, error=str(error))
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
        if self.out is None:
            return
        if status != "finished":
            rundir.abandon(self.out, self._staging, status)  # a replaced run stays as it was
        if status not in ("failed", "cancelled"):
            folder = rundir.writing_to(self.out, self._staging)
            folder.mkdir(parents=True, exist_ok=True)
            self.history.to_csv(folder / rundir.METRICS, index=False)


def _running_keys(keys: list[str], dask_worker=None) -> list[str]:
    """Which of ``keys`` still hold a thread of this worker (cancelled or not)."""
    state = dask_worker.state
    return [ts.key for ts in state.executing | state.long_running if ts.key in keys]


def _score_partition(spec: dict, state: dict, X: np.ndarray, y: np.ndarray, batch_size: int):
    """A partition's checks (:func:`daskdl.preflight.value_counts`), then its summed loss and
    count and its metrics (updated); only scored when the checks pass."""
    objective = spec["objective"]
    counts = preflight.value_counts(X, y)
    scores = metrics_.build(spec["metrics"], objective, "cpu")
    try:  # the client raises the error, from every partition's counts
        preflight.check_values("data", counts, objective.task)
        if objective.is_classifier:
            preflight.class_count("data", counts[0], counts[1], counts[4], objective.n_outputs)
    except ValueError:
        return counts, np.zeros(2), scores
    model = models.build(spec["model"], spec["input_shape"], objective.n_outputs)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    X = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
    y = torch.from_numpy(np.asarray(y, dtype=objective.target_dtype))
    no_autocast = torch.autocast("cpu", enabled=False)
    sums = metrics_.score(
        model, X, y, batch_size, no_autocast, objective, scores, spec["data_scale"]
    )
    return counts, sums, scores


def check_categories(data: Dataset, categories: dict | None, name: str) -> None:
    """``data`` encodes its categorical features with the codes the model learned."""
    if data.categories != categories:
        raise ValueError(
            f"{name}'s categorical codes are not the training data's (categories "
            f"{sorted(data.categories or {})} vs {sorted(categories or {})}, or other values): "
            "build it with Dataset.from_dataframe(..., categories=train.categories), or split "
            "it from the same data set."
        )


def target_scale(client: Client, data: Dataset) -> Scale | None:
    """How ``data``'s targets were standardised (computed on the cluster), or None."""
    if data.target_scale is None:
        return None
    stats = client.compute(list(data.target_scale), sync=True, optimize_graph=False)
    return Scale.from_arrays(*stats)


def check_compatible(data, input_shape, name: str, task: str | None = None) -> None:
    """``data`` is a Dataset whose samples (and task, when given) are the model's."""
    if not isinstance(data, Dataset):
        raise TypeError(
            f"{name} must be a daskdl.Dataset, got {type(data).__name__}. "
            "Wrap arrays with daskdl.Dataset.from_numpy(X, y) or Dataset.from_dask(X, y)."
        )
    if task is not None and data.task != task:
        raise ValueError(
            f"{name} is a {data.task} data set, but the model learns {task}. Give it the "
            f"same kind of targets (Dataset(..., task={task!r}))."
        )
    if tuple(data.sample_shape) != tuple(input_shape):
        raise ValueError(
            f"{name} has samples of shape {data.sample_shape}, but the model takes "
            f"{tuple(input_shape)}."
        )
