"""Experiment trackers: a run's metrics in TensorBoard, MLflow, or any Lightning-style logger.

``fit(..., loggers=["tensorboard", "mlflow"])`` (and ``launch`` and ``tune``). Trackers are fed
from the run's events on the client, on a thread of their own (a slow tracking server never
holds up the client's event loop): one tracker run per daskdl run, never one per rank. A
tracker is any object with the methods of Lightning's loggers, so Lightning's own work too:

- ``log_hyperparams(params)``: the run's description (config, model, world size), once;
- ``log_metrics(metrics, step)``: rank 0's loss and learning rate per logged step, every
  epoch's metrics (``epoch/...``), and each rank's samples/s, step time and memory
  (``system/rank<r>/...``), all against the global step;
- ``finalize(status)``: the run ended (``finished``, ``stopped``, ``failed``, ``cancelled``).

A step is logged once, the first time: after an elastic regroup or a resume, steps trained
again are not logged again, so a tracker's steps only increase. The built-in trackers keep
their identity (TensorBoard's folder, MLflow's run id) in the run's checkpoints: ``resume=``
goes on in the same tracker run. A tracker that fails warns once and is dropped; training goes
on.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

NAMES = ("csv", "tensorboard", "mlflow")
STEP_METRICS = {"loss": "train/loss", "lr": "train/lr"}
# A step event's field: the name it is logged under (per rank), and the scale to its unit.
SYSTEM_METRICS = {
    "samples_per_s": ("samples_per_s", 1.0),
    "step_time": ("step_time_ms", 1e3),
    "rss": ("rss_mb", 2.0**-20),
    "gpu_memory": ("gpu_memory_mb", 2.0**-20),
}
NOT_LOGGED = {"kind", "run", "rank", "step", "time"}
CLOSE_TIMEOUT = 30.0  # seconds to wait for a tracker to write what is queued at the end
# Opening a tracker runs on the client before the ranks start: an MLflow server that does not
# answer is given this long (MLflow's own retries take minutes), then warned about and dropped.
OPEN_TIMEOUT = 10.0
PROBE_TIMEOUT = 3.0  # an HTTP tracking server's first answer


class TensorBoardTracker:
    """A run's metrics as TensorBoard event files in ``log_dir`` (``torch.utils.tensorboard``;
    needs ``pip install "daskdl[tensorboard]"``). ``purge_step``: a resumed run's first step;
    TensorBoard hides what an earlier attempt logged from there on."""

    name = "tensorboard"

    def __init__(self, log_dir: str | Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = str(log_dir)
        self.writer = SummaryWriter(self.log_dir, purge_step=purge_step)

    def identity(self) -> dict:
        return {"log_dir": self.log_dir}

    def child(self, name: str) -> TensorBoardTracker:
        """A tracker for one trial of a study: a folder inside this one."""
        return TensorBoardTracker(Path(self.log_dir) / name)

    def log_hyperparams(self, params: dict) -> None:
        text = json.dumps(params, indent=1, sort_keys=True, default=str)
        self.writer.add_text("config", f"```json\n{text}\n```")

    def log_metrics(self, metrics: dict, step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def finalize(self, status: str) -> None:
        self.writer.add_text("status", status)
        self.writer.close()


def _probe(uri: str) -> None:
    """An HTTP tracking server answers at all, within :data:`PROBE_TIMEOUT` (MLflow itself
    retries a refused connection for minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri, timeout=PROBE_TIMEOUT).close()
    except urllib.error.HTTPError:
        return  # it answered (a 404 at the root is still a server)
    except (OSError, ValueError) as e:
        raise ConnectionError(
            f"the MLflow tracking server {uri} does not answer ({e}): start it, or set "
            "MLFLOW_TRACKING_URI (or the tracker's tracking_uri) to one that runs."
        ) from None


class MLflowTracker:
    """A run's metrics in an MLflow run (needs ``pip install "daskdl[mlflow]"``).

    ``tracking_uri``: default MLflow's own (``MLFLOW_TRACKING_URI``, else ``./mlflow.db``);
    ``run_id``: an existing run to go on with; ``parent``: the run this one is nested in (a
    study's). Steps an earlier attempt logged are not logged again.
    """

    name = "mlflow"

    def __init__(self, tracking_uri: str | None = None, experiment: str = "daskdl",
                 run_id: str | None = None, run_name: str | None = None,
                 parent: str | None = None):  # fmt: skip
        import mlflow
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri or mlflow.get_tracking_uri()
        _probe(self.tracking_uri)
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        self.experiment = experiment
        self.resumed = run_id is not None
        if run_id is None:
            found = self.client.get_experiment_by_name(experiment)
            exp_id = found.experiment_id if found else self.client.create_experiment(experiment)
            tags = {"mlflow.parentRunId": parent} if parent else {}
            run_id = self.client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
        self.run_id = run_id

    def identity(self) -> dict:
        return {"tracking_uri": self.tracking_uri, "experiment": self.experiment,
                "run_id": self.run_id}  # fmt: skip

    def child(self, name: str) -> MLflowTracker:
        return MLflowTracker(self.tracking_uri, self.experiment, run_name=name, parent=self.run_id)

    def logged_until(self) -> int:
        """The highest step this run already holds (-1: none)."""
        run = self.client.get_run(self.run_id)
        steps = [
            m.step
            for key in run.data.metrics
            for m in self.client.get_metric_history(self.run_id, key)
        ]
        return max(steps, default=-1)

    def log_hyperparams(self, params: dict) -> None:
        if self.resumed:  # MLflow's parameters cannot change; the first attempt's stay
            self.client.set_tag(self.run_id, "daskdl.resumed", "true")
            return
        flat = {k: json.dumps(v, default=str)[:6000] for k, v in params.items()}
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in flat.items()])

    def log_metrics(self, metrics: dict, step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def finalize(self, status: str) -> None:
        state = {"finished": "FINISHED", "stopped": "KILLED"}.get(status, "FAILED")
        self.client.set_terminated(self.run_id, state)


BUILT_IN = {"tensorboard": TensorBoardTracker, "mlflow": MLflowTracker}


def check(loggers, out) -> list:
    """``loggers`` as a list, refused with the fix if a name is unknown, an object lacks a
    tracker's methods, or ``"csv"`` has no ``out=`` to write ``metrics.csv`` into."""
    if loggers is None:
        return []
    if isinstance(loggers, str) or not isinstance(loggers, list | tuple):
        loggers = [loggers]
    for item in loggers:
        if isinstance(item, str):
            if item not in NAMES:
                raise ValueError(f"loggers: {item!r} is not one of {NAMES} (or a logger object).")
            if item == "csv" and out is None:
                raise ValueError("loggers=['csv'] writes out/metrics.csv: pass out= a folder.")
        else:
            missing = [m for m in ("log_hyperparams", "log_metrics", "finalize")
                       if not callable(getattr(item, m, None))]  # fmt: skip
            if missing:
                raise TypeError(
                    f"loggers: {item!r} has no {', '.join(missing)}: give a name from {NAMES} "
                    "or an object with Lightning's logger methods."
                )
    return list(loggers)


def open_trackers(
    loggers: list, out, run_id: str, resumed: dict | None, logged_until: int, epochs_logged: int
) -> Trackers:
    """The run's :class:`Trackers`: built-in names made into trackers (going on with the
    ones ``resumed`` names, from a checkpoint), objects as given. ``logged_until`` and
    ``epochs_logged``: the last step and epoch an earlier attempt logged for sure (a resumed
    run's checkpoint), else -1 and 0."""
    resumed = resumed or {}
    made, first = [], logged_until
    for item in loggers:
        if item == "csv":
            continue  # the run folder's metrics.csv, written as it always is
        if isinstance(item, str):
            item = _bounded(item, run_id, _open_built_in, item, out, run_id,
                            resumed.get(item), logged_until + 1)  # fmt: skip
            if item is None:
                continue
            if isinstance(item, MLflowTracker) and item.resumed:
                until = _bounded("mlflow", run_id, item.logged_until)
                if until is not None:
                    first = max(first, until)
        made.append(item)
    return Trackers(made, run_id, first, epochs_logged)


def _bounded(name: str, label: str, function, *args):
    """``function(*args)`` for at most :data:`OPEN_TIMEOUT` seconds; its error or its
    lateness is warned about and gives None (the tracker is dropped, training goes on)."""
    done: queue.SimpleQueue = queue.SimpleQueue()

    def call():
        try:
            done.put((True, function(*args)))
        except Exception as e:  # noqa: BLE001 - any tracker's failure only drops it
            done.put((False, e))

    threading.Thread(target=call, name=f"daskdl-open-{name}", daemon=True).start()
    try:
        ok, value = done.get(timeout=OPEN_TIMEOUT)
    except queue.Empty:
        logger.warning("run %s: tracker %r did not answer within %.0fs and is dropped",
                       label, name, OPEN_TIMEOUT)  # fmt: skip
        return None
    if not ok:
        logger.warning("run %s: tracker %r could not be opened and is dropped: %s: %s",
                       label, name, type(value).__name__, value)  # fmt: skip
        return None
    return value


def open_study(loggers: list, out, name: str, resumed: dict | None) -> Trackers:
    """A study's parent trackers (each trial's run gets a child of each), going on with the
    ones ``resumed`` names (kept in the Optuna study)."""
    made = []
    for item in loggers:
        if item == "csv":
            continue  # each trial's out/trial-NNNN/metrics.csv
        if isinstance(item, str):
            item = _bounded(item, name, _open_built_in, item, out, name,
                            (resumed or {}).get(item), None)  # fmt: skip
            if item is None:
                continue
        elif not callable(getattr(item, "child", None)):
            raise TypeError(
                f"loggers: {item!r} has no child(name) for the study's trials: give a name "
                f"from {NAMES}, or a tracker with child()."
            )
        made.append(item)
    return Trackers(made, name)


def _open_built_in(name, out, label: str, identity, purge_step: int | None):
    """A built-in tracker: the one ``identity`` names (a resumed run's), else a new one,
    TensorBoard's in ``out/tensorboard`` (without ``out``: ``runs/tensorboard/<label>``)."""
    if name == "tensorboard":
        if identity:
            return TensorBoardTracker(identity["log_dir"], purge_step=purge_step)
        base = Path(out) if out is not None else Path("runs")
        return TensorBoardTracker(base / "tensorboard" / ("" if out is not None else label))
    if identity:
        return MLflowTracker(identity["tracking_uri"], identity["experiment"], identity["run_id"])
    return MLflowTracker(run_name=label)


class Trackers:
    """The trackers of one daskdl run, fed its events through a queue by a thread of their
    own. ``logged_until``: steps up to here are logged already (a resumed run's)."""

    def __init__(self, trackers: list, run_id: str, logged_until: int = -1, epochs_logged: int = 0):
        self.trackers, self.run_id = list(trackers), run_id
        # Each series (the epochs, each rank's steps) logs a step once; calls never go back.
        self._start = self._last = logged_until
        self._epochs = epochs_logged
        self._high: dict[str, int] = {}
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._drain, name=f"daskdl-trackers-{run_id}",
                                        daemon=True)  # fmt: skip
        if self.trackers:
            self._thread.start()

    def identities(self) -> dict:
        """What the checkpoints keep, so that a resumed run goes on in the same tracker runs."""
        built_in = [t for t in self.trackers if isinstance(t, TensorBoardTracker | MLflowTracker)]
        return {t.name: t.identity() for t in built_in}

    def hyperparams(self, params: dict) -> None:
        self._put(("log_hyperparams", (params,)))

    def log_metrics(self, metrics: dict, step: int) -> None:
        """Log ``metrics`` at ``step`` directly (a study's own figures, say)."""
        self._put(("log_metrics", (metrics, step)))

    def children(self, name: str) -> list:
        """A child of each tracker, for a trial's run."""
        made = [self._guarded(t, "child", name) for t in list(self.trackers)]
        return [t for t in made if t is not None]

    def handle(self, event: tuple[float, dict]) -> None:
        """Called for each of the run's events (on the client's event loop: no I/O here)."""
        self._put(("event", event[1]))

    def close(self, status: str) -> None:
        """Write what is queued, then finalize every tracker with the run's end status."""
        if not self.trackers:
            return
        self._put(("finalize", (status,)))
        self._put(None)
        self._thread.join(CLOSE_TIMEOUT)
        if self._thread.is_alive():
            logger.warning("run %s: trackers still writing after %.0fs; left behind",
                           self.run_id, CLOSE_TIMEOUT)  # fmt: skip

    def _put(self, item) -> None:
        if self.trackers:
            self._queue.put(item)

    def _drain(self) -> None:
        while (item := self._queue.get()) is not None:
            what, payload = item
            if what == "event":
                for metrics, step in self._metrics(payload):
                    self._call("log_metrics", metrics, step)
            else:
                self._call(what, *payload)

    def _metrics(self, msg: dict) -> list[tuple[dict, int]]:
        """The metrics an event holds, with their step; nothing for a step logged already."""
        kind = msg.get("kind")
        step = msg.get("step") if msg.get("step") is not None else msg.get("epoch")
        if kind not in ("step", "epoch", "log") or step is None:
            return []
        step = int(step)
        if kind == "epoch":
            return self._epoch(msg, step)
        if kind == "log":  # a loop's own values, under its own names
            return [(_numbers({k: v for k, v in msg.items() if k not in NOT_LOGGED}), step)]
        rank = msg.get("rank", 0)
        series = f"rank{rank}"
        if step <= self._high.get(series, self._start) or step < self._last:
            return []  # trained again after a regroup or resume, or a rank's late report
        self._high[series] = self._last = step
        values = {
            f"system/rank{rank}/{name}": msg[k] * scale
            for k, (name, scale) in SYSTEM_METRICS.items()
            if msg.get(k) is not None
        }
        if rank == 0:
            values.update({name: msg[k] for k, name in STEP_METRICS.items() if k in msg})
        return [(_numbers(values), step)]

    def _epoch(self, msg: dict, step: int) -> list[tuple[dict, int]]:
        """An epoch's metrics, once per epoch. The global step is ``epoch x steps per epoch``
        of the membership at the time, which goes back when a worker joins (fewer steps per
        epoch): the epoch is logged then at the last step logged, never dropped."""
        epoch = int(msg.get("epoch", 0))
        if epoch <= self._epochs or step <= self._start:
            return []  # logged by an earlier attempt (a resumed run's)
        self._epochs, self._last = epoch, max(step, self._last)
        values = {f"epoch/{k}": v for k, v in msg.items() if k not in NOT_LOGGED}
        return [(_numbers(values), self._last)]

    def _call(self, method: str, *args) -> None:
        for tracker in list(self.trackers):
            self._guarded(tracker, method, *args)

    def _guarded(self, tracker, method: str, *args):
        try:
            return getattr(tracker, method)(*args)
        except Exception as e:  # noqa: BLE001 - a tracker's failure must not stop training
            if tracker in self.trackers:
                self.trackers.remove(tracker)
            logger.warning("run %s: tracker %r failed in %s and is dropped: %s: %s",
                           self.run_id, tracker, method, type(e).__name__, e)  # fmt: skip
            return None


def _numbers(values: dict) -> dict:
    return {k: float(v) for k, v in values.items() if isinstance(v, int | float) and v == v}
