"""Metric events: ranks publish with ``Worker.log_event`` on a per-run topic; the client (and the
dashboard, and anyone else) receives them with ``Client.subscribe_topic`` or replays them with
``Client.get_events``.

Every event is a flat dict with at least ``run`` and ``kind``:

- ``start``   (client) the config, world size, steps per epoch, model name.
- ``step``    (every rank, at most every ``daskdl.log-interval``) rank, epoch, step, loss,
  samples_per_s, step_time, comm_time, rss.
- ``epoch``   (rank 0) epoch, step, train_loss, train_accuracy (classifiers), val_loss, a
  ``val_<name>`` per metric (val_accuracy, val_r2, ...), val_perplexity (cross-entropy),
  samples_per_s, epoch_time, lr.
- ``log``     (rank 0) step and a user's loop's own metrics, logged without an epoch
  (``ctx.log(**metrics)``): ``run.logs``.
- ``checkpoint`` (rank 0) epoch, path.
- ``nonfinite`` (a rank that saw it) epoch, step, batch, ranks: a step skipped for a NaN or
  infinite loss or gradient (``on_nonfinite="skip"``).
- ``membership`` (client) lost workers, the survivors' workers, world_size, steps_per_epoch,
  epoch and step_in_epoch where they go on, comm_id: the ranks regrouped after a worker loss.
- ``end``     (client) status (``finished``, ``stopped`` or ``failed``), and the error if any.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pandas as pd

logger = logging.getLogger(__name__)

TOPIC_PREFIX = "daskdl-run-"
RUNS_TOPIC = "daskdl-runs"
# Tuning studies' events (see daskdl.tuning.parts.trial_event): ``study`` when a driver starts,
# ``trial`` whenever a trial starts, reports an epoch or ends, ``end`` when the driver stops.
STUDIES_TOPIC = "daskdl-studies"


def topic(run_id: str) -> str:
    return TOPIC_PREFIX + run_id


_handlers_lock = threading.Lock()


def subscribe(client, topic_name: str, handler) -> None:
    """Call ``handler((timestamp, msg))`` for every event on ``topic_name``.

    ``Client.subscribe_topic`` keeps one handler per topic and client; this keeps a list, so
    that a run's recorder and a dashboard on the same client (in one notebook) both listen.
    """
    with _handlers_lock:
        table = client.__dict__.setdefault("_daskdl_handlers", {})
        handlers = table.get(topic_name)
        if handlers is None:
            handlers = table[topic_name] = []

            def fan_out(event, handlers=handlers):
                for h in list(handlers):
                    h(event)

            client.subscribe_topic(topic_name, fan_out)
        handlers.append(handler)


def unsubscribe(client, topic_name: str, handler) -> None:
    with _handlers_lock:
        table = client.__dict__.get("_daskdl_handlers", {})
        handlers = table.get(topic_name, [])
        if handler in handlers:
            handlers.remove(handler)
        if not handlers and topic_name in table:
            del table[topic_name]
            client.unsubscribe_topic(topic_name)


def emit(worker, run_id: str, kind: str, **fields) -> None:
    """Publish one event from a worker (thread-safe)."""
    worker.log_event(topic(run_id), {"run": run_id, "kind": kind, **fields})


class Recorder:
    """Collects a run's events on the client and drives its progress bar.

    ``handle`` is called on the client's event loop for every event on the run's topic.
    """

    def __init__(
        self, run_id: str, total: int | None, initial: int, progress: bool, unit: str = "step",
        trackers=None,
    ):  # fmt: skip
        self.run_id = run_id
        self.trackers = trackers  # daskdl.runs.trackers.Trackers: fed every event, closed with us
        self.unit = unit  # what the bar counts: steps (fit), or epochs (a user's loop)
        self._lock = threading.Lock()
        self.epochs: list[dict] = []
        self.steps: list[dict] = []
        self.logs: list[dict] = []
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit=unit, desc=f"daskdl {run_id}")

    def handle(self, event: tuple[float, dict]) -> None:
        _, msg = event
        kind = msg.get("kind")
        with self._lock:
            if kind == "epoch":
                self.epochs.append(msg)
            elif kind == "step":
                self.steps.append(msg)
            elif kind == "log":
                self.logs.append(msg)
        _report(self.run_id, kind, msg)
        if self.trackers is not None:
            self.trackers.handle(event)
        if self.bar is None:
            return
        if kind == "step" and msg.get("rank") == 0:
            self.bar.n = msg["step"]
            self.bar.set_postfix(epoch=msg["epoch"], loss=f"{msg['loss']:.4f}", refresh=False)
            self.bar.refresh()
        elif kind == "epoch":
            self.bar.n = msg[self.unit]
            postfix = {"epoch": msg["epoch"]}
            if msg.get("train_loss") is not None:
                postfix["loss"] = f"{msg['train_loss']:.4f}"
            if msg.get("val_accuracy") is not None:
                postfix["val_accuracy"] = f"{msg['val_accuracy']:.4f}"
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.refresh()

    def history(self) -> pd.DataFrame:
        with self._lock:
            return history_frame(self.epochs)

    def logged(self) -> pd.DataFrame:
        """The metrics logged without an epoch, one row per call: step and the values."""
        with self._lock:
            rows = [{k: v for k, v in e.items() if k not in _NOT_METRICS} for e in self.logs]
        return pd.DataFrame(rows)

    def close(self, status: str = "cancelled") -> None:
        if self.bar is not None:
            self.bar.close()
        if self.trackers is not None:
            self.trackers.close(status)
            self.trackers = None


def _report(run_id: str, kind: str | None, msg: dict) -> None:
    """Log what happens to a run as it happens (the CLI prints these lines)."""
    if kind == "checkpoint":
        logger.info("run %s: checkpoint %s written", run_id, Path(msg["path"]).name)
    elif kind == "nonfinite":
        logger.warning(
            "run %s: step %s skipped (non-finite loss or gradient on ranks %s)",
            run_id,
            msg.get("step"),
            msg.get("ranks"),
        )
    elif kind == "membership":
        lost, joined = msg.get("lost") or [], msg.get("joined") or []
        change = "; ".join(
            [
                *([f"lost {', '.join(lost)}"] if lost else []),
                *([f"joined {', '.join(joined)}"] if joined else []),
            ]
        )
        logger.warning(
            "run %s: %s; regrouped onto %d ranks, going on from epoch %s",
            run_id,
            change or "membership changed",
            msg.get("world_size"),
            msg.get("epoch"),
        )


HISTORY_COLUMNS = [
    "epoch",
    "step",
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "val_perplexity",
    "skipped_steps",
    "samples_per_s",
    "epoch_time",
    "lr",
]
_NOT_METRICS = {"kind", "run", "rank", "time"}
_CLASSIFIER_ONLY = ("train_accuracy", "val_accuracy", "val_perplexity")


def history_frame(epoch_events: list[dict]) -> pd.DataFrame:
    """One row per epoch (the latest event wins if an epoch was reported twice, after resume).

    The columns are :data:`HISTORY_COLUMNS` (what a classifier reports) with any other
    validation metric the run reported (``val_f1``, ``val_r2``, ...) after ``val_loss``; a run
    that is not a classifier has no accuracy or perplexity columns.
    """
    rows = [e for _, e in sorted({e["epoch"]: e for e in epoch_events}.items())]
    known = set(HISTORY_COLUMNS) | _NOT_METRICS
    extra = list(dict.fromkeys(k for e in rows for k in e if k not in known))  # as reported
    columns = HISTORY_COLUMNS[:7] + extra + HISTORY_COLUMNS[7:]
    if rows:  # what the run reports (a user's loop: what it logs)
        reported = {k for e in rows for k in e}
        columns = [c for c in columns if c in reported or c in ("epoch", "step")]
    if rows and all(e.get("train_accuracy") is None for e in rows):
        # Not a classifier: what only classifiers report goes (a multi-label accuracy stays).
        filled = {c for e in rows for c, v in e.items() if v is not None}
        columns = [c for c in columns if c not in _CLASSIFIER_ONLY or c in filled]
    frame = pd.DataFrame([{c: e.get(c) for c in columns} for e in rows], columns=columns)
    return frame.astype({"epoch": "int64", "step": "int64"})


def replay(client, run_id: str) -> list[dict]:
    """All events the scheduler still holds for a run, oldest first."""
    return [msg for _, msg in client.get_events(topic(run_id))]
