"""What the dashboard knows, built from nothing but the runs' events.

:class:`EventFeed` (one per client and process) subscribes to the scheduler's event topics and
keeps every event in arrival order; it is fed on the client's event loop thread. Each browser
session (or notebook view) has its own :class:`DashboardStore`, a ``param.Parameterized`` that
pulls the new events from the feed on its own thread, one batch per refresh, and folds them
into :class:`RunState` objects (a tuning study's into a
:class:`~daskdl.webapp.study_state.StudyState`). Views watch the store's ``revision`` and
stream what is new.
Nothing here imports Panel, and nothing here talks to the ranks: watching costs training
nothing beyond the events it already publishes.
"""

from __future__ import annotations

import threading
import time
import weakref

import pandas as pd
import param

from daskdl import events
from daskdl.webapp.study_state import StudyState

FINISHED = ("finished", "stopped", "failed", "cancelled")


def _round(value, digits: int = 0, scale: float = 1.0) -> float | None:
    if value is None or value != value:  # missing, or NaN
        return None
    return round(value * scale, digits)


WORKER_TABLE = (
    "rank", "worker", "samples_per_s", "step_time_ms", "rss_mb", "gpu_memory_mb",
    "gpu_utilization",
)  # fmt: skip
STAGE_COLUMNS = ["stage", "forward_ms", "backward_ms", "bubble", "activations_mb"]


class RunState:
    """One run as its events describe it."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self.spec: dict = {}
        self.steps: list[dict] = []  # every rank's step events, in arrival order
        self.epochs: list[dict] = []
        self.checkpoints: list[dict] = []
        self.memberships: list[dict] = []
        self.latest: dict[int, dict] = {}  # rank -> its latest step event
        self.status = "running"
        self.error: str | None = None
        self.started: float | None = None
        self.ended: float | None = None
        self.last_seen: float | None = None

    # -- folding events in ---------------------------------------------------------------

    def ingest(self, timestamp: float, msg: dict) -> None:
        kind = msg.get("kind")
        self.last_seen = timestamp
        if kind == "start":
            self.spec = dict(msg)
            self.started = timestamp
            # A resumed run reuses nothing of an earlier one's state.
            self.status, self.error, self.ended = "running", None, None
        elif kind == "step":
            self.steps.append(msg)
            self.latest[msg.get("rank", 0)] = msg
        elif kind == "epoch":
            self.epochs.append(msg)
            if self.total_epochs and msg.get("epoch") == self.total_epochs:
                # Ranks are done once the last epoch is reported, whether or not the client
                # that started the run is still there to send "end".
                self.status = "finished" if self.status == "running" else self.status
                self.ended = self.ended or timestamp
        elif kind == "checkpoint":
            self.checkpoints.append(msg)
        elif kind == "membership":
            # The survivors of a lost worker regrouped: new ranks, shards and comm id.
            self.memberships.append(msg)
            self.latest = {}
            for key in ("workers", "world_size", "steps_per_epoch", "comm_id"):
                self.spec[key] = msg[key]
        elif kind == "end":
            self.status = msg.get("status", "finished")
            self.error = msg.get("error")
            self.ended = timestamp

    # -- what the views show -------------------------------------------------------------

    @property
    def config(self) -> dict:
        return self.spec.get("config", {})

    @property
    def total_epochs(self) -> int | None:
        return self.config.get("epochs")

    @property
    def steps_per_epoch(self) -> int | None:
        return self.spec.get("steps_per_epoch")

    @property
    def total_steps(self) -> int | None:
        if self.total_epochs and self.steps_per_epoch:
            return self.total_epochs * self.steps_per_epoch
        return None

    @property
    def step(self) -> int:
        """The furthest global step any event reported."""
        last = [e["step"] for e in (self.steps[-1:] + self.epochs[-1:]) if "step" in e]
        return max(last, default=0)

    @property
    def workers(self) -> list[str]:
        return list(self.spec.get("workers", []))

    @property
    def checkpoint_path(self) -> str | None:
        return self.checkpoints[-1]["path"] if self.checkpoints else None

    def elapsed(self, now: float | None = None) -> float | None:
        if self.started is None:
            return None
        return (self.ended or now or time.time()) - self.started

    def eta(self) -> float | None:
        """Seconds to the last step at rank 0's latest pace; None when unknown or done."""
        if self.status != "running" or not self.total_steps or 0 not in self.latest:
            return None
        remaining = self.total_steps - self.step
        return max(0.0, remaining * self.latest[0]["step_time"])

    def throughput(self) -> float:
        """Samples per second over all ranks, from each rank's latest report."""
        return float(sum(e.get("samples_per_s", 0.0) for e in self.latest.values()))

    def history(self) -> pd.DataFrame:
        return events.history_frame(self.epochs)

    def worker_table(self) -> pd.DataFrame:
        """One row per rank: its worker and latest throughput, step time and memory; for a
        pipeline, its stage's forward and backward time, bubble and activations sent."""
        rows = []
        for rank, e in sorted(self.latest.items()):
            worker = self.workers[rank] if rank < len(self.workers) else ""
            rows.append(
                {
                    "rank": rank,
                    "worker": worker,
                    "samples_per_s": _round(e.get("samples_per_s")),
                    "step_time_ms": _round(e.get("step_time"), 2, scale=1e3),
                    "rss_mb": _round(e.get("rss"), scale=2**-20),
                    "gpu_memory_mb": _round(e.get("gpu_memory"), scale=2**-20),
                    "gpu_utilization": e.get("gpu_utilization"),
                    "stage": e.get("stage"),
                    "forward_ms": _round(e.get("forward_time"), 2, scale=1e3),
                    "backward_ms": _round(e.get("backward_time"), 2, scale=1e3),
                    "bubble": _round(e.get("bubble"), 3),
                    "activations_mb": _round(e.get("activation_bytes"), 2, scale=2**-20),
                }
            )
        columns = list(WORKER_TABLE)
        if any(e.get("stage") is not None for e in self.latest.values()):
            columns += STAGE_COLUMNS
        return pd.DataFrame(rows, columns=[*WORKER_TABLE, *STAGE_COLUMNS])[columns]

    def summary(self) -> dict:
        last = self.epochs[-1] if self.epochs else {}
        return {
            "run": self.run_id,
            "model": self.spec.get("model"),
            "dataset": self.spec.get("meta", {}).get("dataset"),
            "status": self.status,
            "epochs": f"{last.get('epoch', 0)}/{self.total_epochs or '?'}",
            "ranks": self.spec.get("world_size"),
            "train_loss": last.get("train_loss"),
            "val_loss": last.get("val_loss"),
            "val_accuracy": last.get("val_accuracy"),
            "samples_per_s": last.get("samples_per_s"),
            "started": (
                time.strftime("%H:%M:%S", time.localtime(self.started)) if self.started else ""
            ),
        }


def _key(event: tuple[float, dict]) -> tuple:
    t, msg = event
    return (t, msg.get("kind"), msg.get("rank"), msg.get("step"), msg.get("epoch"))


class EventFeed:
    """Every daskdl event a client can see, in arrival order: earlier ones replayed from the
    scheduler (``Client.get_events``), later ones as they come (``Client.subscribe_topic``).

    Use :func:`feed` to share one per client.
    """

    def __init__(self, client):
        self.client = client
        self._lock = threading.Lock()
        self._events: list[tuple[float, dict]] = []
        self._watched: set[str] = set()
        events.subscribe(client, events.RUNS_TOPIC, self._on_announcement)
        for event in client.get_events(events.RUNS_TOPIC):
            self._watch(event[1].get("run"), replay=client.get_events)
        self._follow(events.STUDIES_TOPIC, replay=client.get_events)

    def _on_announcement(self, event: tuple[float, dict]) -> None:
        # On the client's event loop: the replay must not block it.
        self._watch(event[1].get("run"), replay=None)

    def _watch(self, run_id: str | None, replay) -> None:
        if not run_id:
            return
        with self._lock:
            if run_id in self._watched:
                return
            self._watched.add(run_id)
        self._follow(events.topic(run_id), replay)

    def _follow(self, topic: str, replay) -> None:
        # Subscribe first, then replay, holding live events back until the replay is in: an
        # event could otherwise be missed between the two, or appear twice.
        held: list[tuple[float, dict]] | None = []

        def on_event(event):
            with self._lock:
                if held is not None:
                    held.append(event)
                else:
                    self._events.append(event)

        def merge(past):
            nonlocal held
            past = [tuple(e) for e in past]
            with self._lock:
                seen = {_key(e) for e in past}
                self._events.extend(past + [e for e in held if _key(e) not in seen])
                held = None

        events.subscribe(self.client, topic, on_event)
        if replay is not None:
            merge(replay(topic))
        else:

            async def replay_on_loop():
                merge(await self.client.scheduler.events(topic=topic))

            self.client.loop.add_callback(replay_on_loop)

    def since(self, cursor: int) -> tuple[list[tuple[float, dict]], int]:
        """The events after ``cursor`` and the next cursor."""
        with self._lock:
            return self._events[cursor:], len(self._events)


_feeds: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_feeds_lock = threading.Lock()


def feed(client) -> EventFeed:
    """The one :class:`EventFeed` of ``client`` in this process."""
    with _feeds_lock:
        f = _feeds.get(client)
        if f is None:
            f = _feeds[client] = EventFeed(client)
        return f


class DashboardStore(param.Parameterized):
    """The runs one view (a browser session, a notebook cell) shows, and what is selected.

    Call :meth:`refresh` from the view's own thread (a periodic callback): it folds in the
    feed's new events and bumps ``revision`` if anything changed.
    """

    runs = param.Dict(default={}, doc="run id -> RunState, in order of appearance")
    studies = param.Dict(default={}, doc="study key -> StudyState, in order of appearance")
    study = param.String(default=None, allow_None=True, doc="the study the Studies view shows")
    selected: param.Selector = param.Selector(
        default=None, objects=[None], doc="the run the views show"
    )
    compare: param.Selector = param.Selector(
        default=None, objects=[None], doc="a run overlaid for comparison"
    )
    revision = param.Integer(default=0, doc="bumped after every refresh that changed anything")

    def __init__(self, source: EventFeed | None = None, **params):
        super().__init__(**params)
        self.source = source
        self._cursor = 0

    def ingest(self, batch: list[tuple[float, dict]]) -> bool:
        """Fold events into the runs; True if there were any. Plain logic, no I/O."""
        new_runs = []
        for timestamp, msg in batch:
            if "study" in msg:  # a study's event names the trial's run too: not a run's event
                self._ingest_study(timestamp, msg)
                continue
            run_id = msg.get("run")
            if not run_id:
                continue
            state = self.runs.get(run_id)
            if state is None:
                state = self.runs[run_id] = RunState(run_id)
                new_runs.append(run_id)
            state.ingest(timestamp, msg)
        if new_runs:
            options = [None, *self.runs]
            self.param.selected.objects = options
            self.param.compare.objects = options
            if self.selected is None:
                self.selected = new_runs[-1]  # follow the newest run until the user picks one
        return bool(batch)

    def _ingest_study(self, timestamp: float, msg: dict) -> None:
        key = msg["study"]
        state = self.studies.get(key)
        if state is None:
            state = self.studies[key] = StudyState(key)
            if self.study is None:
                self.study = key  # show the first study until the user picks one
        state.ingest(timestamp, msg)

    def refresh(self) -> bool:
        if self.source is None:
            return False
        batch, self._cursor = self.source.since(self._cursor)
        changed = self.ingest(batch)
        if changed:
            self.revision += 1
        return changed

    def run(self, run_id: str | None = None) -> RunState | None:
        run_id = run_id if run_id is not None else self.selected
        return self.runs.get(run_id) if run_id else None

    def runs_table(self) -> pd.DataFrame:
        """Past and current runs with their latest metrics, newest first."""
        rows = [state.summary() for state in self.runs.values()][::-1]
        return pd.DataFrame(rows, columns=list(RunState("").summary()))
