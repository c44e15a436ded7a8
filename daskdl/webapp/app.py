"""The dashboard application: the views, the run list, and controls to start, stop and resume
runs, in one ``App(Viewer)``."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import panel as pn
import param
from panel.io.location import Location
from panel.viewable import Viewer

from daskdl import datasets, models
from daskdl.checkpoint import rundir
from daskdl.cluster import workers_info
from daskdl.collectives import comm
from daskdl.config import options as config
from daskdl.data import sources
from daskdl.webapp.store import DashboardStore, feed
from daskdl.webapp.studies import Studies
from daskdl.webapp.views import Curves, RunList, Stages, Status, Workers

logger = logging.getLogger(__name__)

LIST_EVERY = 2.0  # seconds between looks for newly published data sets
# Shown in the form; the other TrainConfig options are under "more options".
MAIN_OPTIONS = ("epochs", "batch_size", "lr", "optimizer", "sync_every", "precision")


def option_widget(f) -> pn.widgets.Widget:
    """A widget for one :class:`daskdl.TrainConfig` field, with its default and help."""
    kind = config.base_type(f)
    choices = f.metadata["choices"]
    common = {"name": f.name.replace("_", " "), "description": f.metadata["help"]}
    if choices is not None:
        options = {"none" if c is None else c: c for c in choices}
        return pn.widgets.Select(options=options, value=f.default, **common)
    if kind == "bool" and f.default is None:
        options = {"automatic": None, "on": True, "off": False}
        return pn.widgets.Select(options=options, value=None, **common)
    if kind == "bool":  # a checkbox takes no description: its help is not shown
        return pn.widgets.Checkbox(value=f.default, name=common["name"])
    if kind == "int":
        return pn.widgets.IntInput(value=f.default, **common)
    if kind == "str":  # empty: the default, None
        return pn.widgets.TextInput(value=f.default or "", placeholder="none", **common)
    return pn.widgets.FloatInput(value=f.default, **common)


class Launcher(Viewer):
    """Start a run from the page, stop the selected one, or resume it from its checkpoint.

    Runs go through :func:`daskdl.fit` on the dashboard's client, from a thread of their own,
    so the page stays live; each waits for its run so that the run's ``end`` event goes out.
    """

    store = param.ClassSelector(class_=DashboardStore)
    message = param.String(default="")
    follow = param.String(default=None, allow_None=True, doc="a run to select once it is known")

    def __init__(self, client, runs_dir: str | Path = "runs", **params):
        super().__init__(**params)
        self.client = client
        self.runs_dir = Path(runs_dir)
        self.runs: dict = {}  # run id -> daskdl.Run started here
        n_workers = max(1, len(workers_info(client)))
        self.dataset = pn.widgets.Select(name="dataset", options=self._datasets(), value="digits")
        self._listed = time.monotonic()
        self.data_path = pn.widgets.TextInput(name="data path (cifar10)", value="")
        self.model = pn.widgets.Select(
            name="model", options=list(models.REGISTRY), value="small_cnn"
        )
        self.options = {f.name: option_widget(f) for f in config.fields()}
        self.workers = pn.widgets.IntInput(name="workers", value=n_workers, start=1, end=n_workers)
        self.start = pn.widgets.Button(name="Start run", button_type="primary")
        self.stop = pn.widgets.Button(name="Stop", button_type="warning")
        self.resume = pn.widgets.Button(name="Resume", button_type="success")
        self.start.on_click(lambda _: self._in_thread(self._start))
        self.stop.on_click(lambda _: self._in_thread(self._stop))
        self.resume.on_click(lambda _: self._in_thread(self._resume))
        self.alert = pn.pane.Alert("", alert_type="info", visible=False)

    def _in_thread(self, work) -> None:
        # fit() persists and checks the data before it returns: keep that off the page's loop.
        threading.Thread(target=self._guarded, args=(work,), daemon=True).start()

    def _guarded(self, work) -> None:
        try:
            work()
        except Exception as e:
            self.message = f"{type(e).__name__}: {e}"
            logger.exception("dashboard: %s failed", getattr(work, "__name__", work))

    def _datasets(self) -> list[str]:
        """The built-in data sets, then those published on the cluster (daskdl.publish)."""
        return [*datasets.REGISTRY, "cifar10", *sources.published(self.client)]

    def _data(self, dataset: str, data_path: str, seed: int):
        """(train, val, meta) of a built-in or a published data set."""
        meta = {"dataset": dataset, "data_path": data_path, "launched_by": "dashboard"}
        if dataset in datasets.REGISTRY or dataset == "cifar10":
            return (*datasets.train_test(dataset, data_path or None), meta)
        train, val = sources.get(self.client, dataset)  # as prepared, in a notebook say
        if val is None:
            train, val = train.split(0.2, seed)
        return train, val, {**meta, "published": True}

    def _fit(self, options: dict, dataset: str, data_path: str, **extra):
        from daskdl.training.launcher import fit

        seed = options.get("seed", options.get("config", {}).get("seed", 0))
        train, val, meta = self._data(dataset, data_path, seed)
        run = fit(
            self.client,
            train=train,
            val=val,
            block=False,
            progress=False,
            meta=meta,
            **options,
            **extra,
        )
        self.runs[run.run_id] = run
        self.follow = run.run_id  # the page switches to a run started from it
        self.message = f"run {run.run_id} started"
        run.wait()  # sends the run's end event; an error surfaces below
        self.message = f"run {run.run_id} {run.status}"

    def _start(self) -> None:
        name = "-".join([self.dataset.value, self.model.value])
        n = 1
        while rundir.holds_run(self.runs_dir / f"{name}-{n}"):  # a folder holds one run
            n += 1
        out = self.runs_dir / f"{name}-{n}"
        self._fit(
            {
                "model": self.model.value,
                "workers": self.workers.value,
                "out": str(out),
                **{name: w.value if w.value != "" else None for name, w in self.options.items()},
            },
            self.dataset.value,
            self.data_path.value or "",
        )

    def _stop(self) -> None:
        run = self.store.run()
        if run is None or run.status != "running":
            raise ValueError("Select a running run to stop.")
        if run.run_id in self.runs:
            self.runs[run.run_id].stop()  # cancels it if a rank is stuck in its step
        else:  # started elsewhere (a notebook, the CLI): ask its ranks directly
            comm_id = run.spec.get("comm_id", run.run_id)  # changes when a run regroups
            self.client.run(comm.request_stop, comm_id, workers=run.workers, on_error="ignore")
        self.message = f"stop requested for run {run.run_id}"

    def _resume(self) -> None:
        run = self.store.run()
        if run is None:
            raise ValueError("Select a run to resume.")
        out, meta = run.spec.get("out"), run.spec.get("meta", {})
        if not out or not run.checkpoint_path and not Path(out, "checkpoints").is_dir():
            raise ValueError(f"Run {run.run_id} has no checkpoints to resume from.")
        if "dataset" not in meta:
            raise ValueError(
                f"Run {run.run_id} does not record its data set; resume it where it was started."
            )
        self._fit(
            {
                "model": run.spec["model"],
                "config": dict(run.config),  # every option as the run had it
                "workers": run.spec.get("world_size"),
                "out": out,
            },
            meta["dataset"],
            meta.get("data_path") or "",
            resume=out,
        )

    def show_message(self) -> None:
        """Called on the page's thread: bring news from a worker thread to the page, and
        list data sets published since (every few seconds)."""
        if time.monotonic() - self._listed > LIST_EVERY:
            self._listed = time.monotonic()
            names = self._datasets()
            if names != self.dataset.options:
                self.dataset.options = names
        if self.follow and self.follow in self.store.runs:
            self.store.selected, self.follow = self.follow, None
        if self.message:
            failed = ":" in self.message
            self.alert.alert_type = "danger" if failed else "info"
            self.alert.object = self.message
            self.alert.visible = True
            self.message = ""

    def __panel__(self):
        return pn.Column(
            "### Start a run",
            self.dataset,
            self.data_path,
            self.model,
            *(self.options[name] for name in MAIN_OPTIONS),
            self.workers,
            pn.Card(
                *(w for name, w in self.options.items() if name not in MAIN_OPTIONS),
                title="more options",
                collapsed=True,
            ),
            self.start,
            "### The selected run",
            pn.Row(self.stop, self.resume),
            self.alert,
        )


class App(Viewer):
    """daskdl's dashboard for the runs on one Dask cluster.

    In a notebook, ``daskdl.dashboard(client)`` displays it; served (``daskdl dashboard`` or
    ``panel serve app/dashboard.py``), :meth:`servable` puts it in a page template. Two tabs:
    the selected run, and the tuning studies (``study``: open this one's tab first).
    """

    title = param.String(default="daskdl")
    refresh_ms = param.Integer(default=500, bounds=(100, None), doc="how often views update")

    def __init__(self, client, runs_dir: str | Path = "runs", study: str | None = None, **params):
        super().__init__(**params)
        self.client = client
        self.store = DashboardStore(feed(client))
        self.store.refresh()
        if study is not None:
            self.store.study = study
        link = client.dashboard_link or ""
        self.status = Status(store=self.store, dask_dashboard=link)
        self.curves = Curves(store=self.store)
        self.workers = Workers(store=self.store)
        self.stages = Stages(store=self.store)
        self.run_list = RunList(store=self.store)
        self.launcher = Launcher(client, runs_dir, store=self.store)
        self.compare = pn.widgets.Select.from_param(
            self.store.param.compare, name="compare with (dashed)"
        )
        self.select = pn.widgets.Select.from_param(self.store.param.selected, name="run")
        self.studies = Studies(store=self.store)
        self.tabs = pn.Tabs(
            ("Runs", self._runs_tab()), ("Studies", self.studies),
            active=int(study is not None), dynamic=False, sizing_mode="stretch_width",
        )  # fmt: skip
        # A trial clicked in the Studies tab opens its run in the Runs tab.
        self.studies.param.watch(lambda _: setattr(self.tabs, "active", 0), "opened")
        self._callback: object | None = None  # the page's periodic refresh, once started

    def tick(self) -> None:
        self.store.refresh()
        self.launcher.show_message()

    def start_updates(self) -> None:
        if self._callback is None:
            self._callback = pn.state.add_periodic_callback(self.tick, period=self.refresh_ms)

    def main(self):
        return self.tabs

    def _runs_tab(self):
        return pn.Column(
            self.status,
            self.curves,
            self.workers,
            self.stages,
            pn.Row(self.select, self.compare),
            "### Runs",
            self.run_list,
            pn.Card(self.status.config, title="config", collapsed=True),
            sizing_mode="stretch_width",
        )

    def __panel__(self):
        self.start_updates()
        return pn.Row(pn.Column(self.launcher, width=300), self.main(), sizing_mode="stretch_width")

    def template(self):
        """The page: run controls in the sidebar, the selected run's views in the main area."""
        self.start_updates()
        return pn.template.FastListTemplate(
            title=self.title, sidebar=[self.launcher], main=[self.main()], accent="#1f77b4"
        )

    def servable(
        self,
        title: str | None = None,
        location: bool | Location = True,
        area: str = "main",
        target: str | None = None,
    ):
        return self.template().servable(title or self.title, location, area, target)
