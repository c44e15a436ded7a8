"""The dashboard's views: each watches a :class:`DashboardStore` and renders with ``__panel__``.

Curves stream: a view remembers how many of the selected run's events it has drawn and sends
Bokeh only the new points (``ColumnDataSource.stream``); the whole figure is redrawn only when
another run is selected. The same views render in a served page and in a notebook.
"""

from __future__ import annotations

import html

import numpy as np
import panel as pn
import param
from bokeh.models import ColumnDataSource, HoverTool
from bokeh.palettes import Category10_10
from bokeh.plotting import figure
from panel.viewable import Viewer

from daskdl.webapp.store import DashboardStore, RunState

EPOCH_COLUMNS = ("step", "epoch", "train_loss", "val_loss", "train_accuracy", "val_accuracy")
STEP_COLUMNS = ("step", "loss")
WORKER_COLUMNS = ("step", "rank", "samples_per_s", "step_time_ms", "rss_mb", "gpu_memory_mb")
STAGE_POINTS = ("step", "stage", "forward_ms", "backward_ms", "bubble", "activations_mb")


def _nan(value) -> float:
    return float("nan") if value is None else float(value)


def _figure(title: str, y_label: str, x_label: str = "step", **kwargs):
    fig = figure(
        title=title,
        height=260,
        sizing_mode="stretch_width",
        x_axis_label=x_label,
        y_axis_label=y_label,
        tools="pan,wheel_zoom,box_zoom,reset,save",
        **kwargs,
    )
    fig.toolbar.logo = None
    return fig


class _RunFollower(Viewer):
    """Shared plumbing: react to the store, tell a new selection from new events."""

    store = param.ClassSelector(class_=DashboardStore)

    def __init__(self, **params):
        super().__init__(**params)
        self._shown: str | None = None
        self.store.param.watch(self._update, ["revision", "selected", "compare"])

    def _update(self, *events) -> None:
        run = self.store.run()
        if run is None or run.run_id != self._shown:
            self._shown = run.run_id if run else None
            self.reset(run)
        if run is not None:
            self.advance(run)

    def reset(self, run: RunState | None) -> None: ...

    def advance(self, run: RunState) -> None: ...


class Curves(_RunFollower):
    """Loss per step (rank 0) and per epoch (train and validation); accuracy per epoch; and
    the epoch curves of a second run, dashed, to compare."""

    def __init__(self, **params):
        super().__init__(**params)
        self.steps = ColumnDataSource({c: [] for c in STEP_COLUMNS}, name="daskdl-loss-steps")
        self.epochs = ColumnDataSource({c: [] for c in EPOCH_COLUMNS}, name="daskdl-epochs")
        self.other = ColumnDataSource({c: [] for c in EPOCH_COLUMNS}, name="daskdl-compare")
        self.loss = _figure("loss", "cross-entropy")
        self.loss.line(
            "step", "loss", source=self.steps, color="#9ecae1", legend_label="train, rank 0"
        )
        for col, color, label in (
            ("train_loss", "#1f77b4", "train, per epoch"),
            ("val_loss", "#d62728", "val"),
        ):
            self.loss.scatter("step", col, source=self.epochs, color=color, size=7)
            self.loss.line(
                "step", col, source=self.epochs, color=color, line_width=2, legend_label=label
            )
            self.loss.line("step", col, source=self.other, color=color, line_dash="dashed")
        self.acc = _figure("accuracy", "accuracy", y_range=(0, 1.02))
        for col, color, label in (
            ("train_accuracy", "#1f77b4", "train"),
            ("val_accuracy", "#d62728", "val"),
        ):
            self.acc.line("step", col, source=self.epochs, color=color, legend_label=label)
            self.acc.scatter("step", col, source=self.epochs, color=color, size=7)
            self.acc.line("step", col, source=self.other, color=color, line_dash="dashed")
        for fig in (self.loss, self.acc):
            fig.legend.location = "top_right"
            fig.add_tools(HoverTool(tooltips=[("step", "@step"), ("epoch", "@epoch")]))
        self._n_steps = self._n_epochs = 0
        self._compared: tuple | None = None
        self._update()

    def reset(self, run):
        self.steps.data = {c: [] for c in STEP_COLUMNS}
        self.epochs.data = {c: [] for c in EPOCH_COLUMNS}
        self._n_steps = self._n_epochs = 0

    def advance(self, run):
        new_steps = [e for e in run.steps[self._n_steps :] if e.get("rank", 0) == 0]
        self._n_steps = len(run.steps)
        if new_steps:
            self.steps.stream(
                {"step": [e["step"] for e in new_steps], "loss": [e["loss"] for e in new_steps]}
            )
        new_epochs = run.epochs[self._n_epochs :]
        self._n_epochs = len(run.epochs)
        if new_epochs:
            self.epochs.stream({c: [_nan(e.get(c)) for e in new_epochs] for c in EPOCH_COLUMNS})
        other = self.store.run(self.store.compare) if self.store.compare else None
        key = (other.run_id, len(other.epochs)) if other else None
        if key != self._compared:
            self._compared = key
            epochs = other.epochs if other else []
            self.other.data = {c: [_nan(e.get(c)) for e in epochs] for c in EPOCH_COLUMNS}

    def __panel__(self):
        return pn.Row(
            pn.pane.Bokeh(self.loss, sizing_mode="stretch_width"),
            pn.pane.Bokeh(self.acc, sizing_mode="stretch_width"),
            sizing_mode="stretch_width",
        )


class Workers(_RunFollower):
    """Per worker: throughput and step time over the run (a straggler stands out), memory,
    and a table of the latest figures."""

    def __init__(self, **params):
        super().__init__(**params)
        self.points = ColumnDataSource({**{c: [] for c in WORKER_COLUMNS}, "color": []})
        self.points.name = "daskdl-workers"
        self.throughput = _figure("samples/s per rank", "samples/s")
        self.step_time = _figure("step time per rank", "ms")
        self.memory = _figure("memory per rank (RSS; GPU where there is one)", "MiB")
        self.throughput.scatter("step", "samples_per_s", source=self.points, color="color")
        self.step_time.scatter("step", "step_time_ms", source=self.points, color="color")
        self.memory.scatter("step", "rss_mb", source=self.points, color="color")
        self.memory.scatter(
            "step", "gpu_memory_mb", source=self.points, color="color", marker="triangle"
        )
        for fig in (self.throughput, self.step_time, self.memory):
            fig.add_tools(HoverTool(tooltips=[("rank", "@rank"), ("step", "@step")]))
        self.table = pn.widgets.Tabulator(
            disabled=True, show_index=False, sizing_mode="stretch_width", height=140
        )
        self._n = 0
        self._update()

    def reset(self, run):
        self.points.data = {**{c: [] for c in WORKER_COLUMNS}, "color": []}
        self._n = 0

    def advance(self, run):
        new = run.steps[self._n :]
        self._n = len(run.steps)
        if new:
            rows = {
                "step": [e["step"] for e in new],
                "rank": [e.get("rank", 0) for e in new],
                "samples_per_s": [e.get("samples_per_s") for e in new],
                "step_time_ms": [1e3 * e.get("step_time", np.nan) for e in new],
                "rss_mb": [e.get("rss", 0) / 2**20 for e in new],
                "gpu_memory_mb": [_nan(e.get("gpu_memory")) / 2**20 for e in new],
            }
            rows["color"] = [Category10_10[r % 10] for r in rows["rank"]]
            self.points.stream(rows)
            self.table.value = run.worker_table()

    def __panel__(self):
        return pn.Column(
            pn.Row(
                pn.pane.Bokeh(self.throughput, sizing_mode="stretch_width"),
                pn.pane.Bokeh(self.step_time, sizing_mode="stretch_width"),
                sizing_mode="stretch_width",
            ),
            pn.Row(
                pn.pane.Bokeh(self.memory, sizing_mode="stretch_width"),
                self.table,
                sizing_mode="stretch_width",
            ),
            sizing_mode="stretch_width",
        )


class Stages(_RunFollower):
    """For a pipelined run, per stage over the steps: forward and backward time (a stage
    that holds up the others stands out), and the bubble, the share of its step it waited.
    Hidden for runs without stages."""

    def __init__(self, **params):
        super().__init__(**params)
        self.points = ColumnDataSource({**{c: [] for c in STAGE_POINTS}, "color": []})
        self.points.name = "daskdl-stages"
        self.time = _figure("time per stage (forward ●, backward ▲)", "ms")
        self.time.scatter("step", "forward_ms", source=self.points, color="color")
        self.time.scatter(
            "step", "backward_ms", source=self.points, color="color", marker="triangle"
        )
        self.bubble = _figure("bubble per stage (share of the step waiting)", "bubble",
                              y_range=(0, 1.02))  # fmt: skip
        self.bubble.scatter("step", "bubble", source=self.points, color="color")
        tips = [("stage", "@stage"), ("step", "@step"), ("activations sent", "@activations_mb MB")]
        for fig in (self.time, self.bubble):
            fig.add_tools(HoverTool(tooltips=tips))
        self.row = pn.Row(
            pn.pane.Bokeh(self.time, sizing_mode="stretch_width"),
            pn.pane.Bokeh(self.bubble, sizing_mode="stretch_width"),
            sizing_mode="stretch_width",
            visible=False,
        )
        self._n = 0
        self._update()

    def reset(self, run):
        self.points.data = {**{c: [] for c in STAGE_POINTS}, "color": []}
        self.row.visible = False
        self._n = 0

    def advance(self, run):
        new = [e for e in run.steps[self._n :] if e.get("stage") is not None]
        self._n = len(run.steps)
        if new:
            rows = {
                "step": [e["step"] for e in new],
                "stage": [e["stage"] for e in new],
                "forward_ms": [1e3 * _nan(e.get("forward_time")) for e in new],
                "backward_ms": [1e3 * _nan(e.get("backward_time")) for e in new],
                "bubble": [_nan(e.get("bubble")) for e in new],
                "activations_mb": [_nan(e.get("activation_bytes")) / 2**20 for e in new],
            }
            rows["color"] = [Category10_10[s % 10] for s in rows["stage"]]
            self.points.stream(rows)
            self.row.visible = True

    def __panel__(self):
        return self.row


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Status(_RunFollower):
    """Status, progress, elapsed time and ETA, throughput, checkpoint, links, and the config."""

    dask_dashboard = param.String(default="")

    def __init__(self, **params):
        super().__init__(**params)
        self.text = pn.pane.HTML("", css_classes=["daskdl-status"], sizing_mode="stretch_width")
        self.progress = pn.indicators.Progress(value=0, max=100, sizing_mode="stretch_width")
        self.config = pn.pane.JSON({}, depth=1, name="config", sizing_mode="stretch_width")
        self._update()

    def reset(self, run):
        self.config.object = run.config if run else {}
        if run is None:
            self.text.object = "<b>No runs yet.</b> Start one here, from a notebook or the CLI."
            self.progress.value = 0

    def advance(self, run):
        total = run.total_steps or 0
        self.progress.value = int(100 * min(run.step, total) / total) if total else 0
        self.config.object = run.config
        link = self.dask_dashboard
        error = f"<br><b>error</b>: {html.escape(run.error)}" if run.error else ""
        self.text.object = (
            f"<b>run</b> <span class='daskdl-run-id'>{run.run_id}</span> &middot; "
            f"<b>{html.escape(str(run.spec.get('model')))}</b> "
            f"on {run.spec.get('world_size', '?')} rank(s) &middot; "
            f"<b>status</b>: <span class='daskdl-run-status'>{run.status}</span> &middot; "
            f"step {run.step}/{total or '?'} &middot; <b>elapsed</b> "
            f"{_duration(run.elapsed())} &middot; <b>ETA</b> {_duration(run.eta())} &middot; "
            f"<b>throughput</b> {run.throughput():,.0f} samples/s<br>"
            "<b>checkpoint</b>: <span class='daskdl-checkpoint'>"
            f"{html.escape(run.checkpoint_path or '–')}</span>"
            + (f" &middot; <a href='{link}' target='_blank'>Dask dashboard</a>" if link else "")
            + error
        )

    def __panel__(self):
        return pn.Column(self.text, self.progress, sizing_mode="stretch_width")


class RunList(Viewer):
    """Every run the scheduler knows, with its latest metrics; click one to show it."""

    store = param.ClassSelector(class_=DashboardStore)

    def __init__(self, **params):
        super().__init__(**params)
        self.table = pn.widgets.Tabulator(
            self.store.runs_table(),
            disabled=True,
            show_index=False,
            selectable=1,
            sizing_mode="stretch_width",
            height=220,
            name="runs",
        )
        self.table.on_click(self._clicked)
        self.store.param.watch(self._refresh, "revision")

    def _refresh(self, *_):
        self.table.value = self.store.runs_table()

    def _clicked(self, event):
        run_id = self.table.value.iloc[event.row]["run"]
        self.store.selected = run_id

    def __panel__(self):
        return self.table
