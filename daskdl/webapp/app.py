"""The dashboard application: the views, the run list, and controls to start, stop and resume
runs, in one ``App(Viewer)``."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import panel as pn
import param
from panel.viewable import Viewer

from daskdl import comm, rundir
from daskdl.cluster import workers_info
from daskdl.config import PRECISIONS
from daskdl.webapp.store import DashboardStore, feed
from daskdl.webapp.views import Curves, RunList, Status, Workers

logger = logging.getLogger(__name__)

DATASETS = ["digits", "synthetic_images", "cifar10"]
MODELS = ["small_cnn", "mlp", "resnet18", "vgg11", "vgg16"]


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
        self.dataset = pn.widgets.Select(name="dataset", options=DATASETS, value="digits")
        self.data_path = pn.widgets.TextInput(name="data path (cifar10)", value="")
        self.model = pn.widgets.Select(name="model", options=MODELS, value="small_cnn")
        self.epochs = pn.widgets.IntInput(name="epochs", value=5, start=1)
        self.batch_size = pn.widgets.IntInput(name="batch size (per rank)", value=32, start=1)
        self.lr = pn.widgets.FloatInput(name="learning rate", value=0.05, start=1e-6, step=0.01)
        self.workers = pn.widgets.IntInput(name="workers", value=n_workers, start=1, end=n_workers)
        self.sync_every = pn.widgets.IntInput(name="sync every (steps)", value=1, start=1)
        self.precision = pn.widgets.Select(name="precision", options=list(PRECISIONS))
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

    def _fit(self, options: dict, dataset: str, data_path: str, **extra):
        import daskdl

        train, val = daskdl.datasets.train_test(dataset, data_path or None)
        run = daskdl.fit(
            self.client,
            train=train,
            val=val,
            block=False,
            progress=False,
            meta={"dataset": dataset, "data_path": data_path, "launched_by": "dashboard"},
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
                "epochs": self.epochs.value,
                "batch_size": self.batch_size.value,
                "lr": self.lr.value,
                "workers": self.workers.value,
                "sync_every": self.sync_every.value,
                "precision": self.precision.value,
                "out": str(out),
            },
            self.dataset.value,
            self.data_path.value,
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
        cfg = dict(run.config)
        self._fit(
            {
                "model": run.spec["model"],
                "epochs": cfg["epochs"],
                "batch_size": cfg["batch_size"],
                "lr": cfg["lr"],
                "workers": run.spec.get("world_size"),
                "sync_every": cfg["sync_every"],
                "precision": cfg["precision"],
                "seed": cfg["seed"],
                "out": out,
            },
            meta["dataset"],
            meta.get("data_path") or "",
            resume=out,
        )

    def show_message(self) -> None:
        """Called on the page's thread: bring news from a worker thread to the page."""
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
            self.epochs,
            self.batch_size,
            self.lr,
            self.workers,
            self.sync_every,
            self.precision,
            self.start,
            "### The selected run",
            pn.Row(self.stop, self.resume),
            self.alert,
        )


class App(Viewer):
    """daskdl's dashboard for the runs on one Dask cluster.

    In a notebook, ``daskdl.dashboard(client)`` displays it; served (``daskdl dashboard`` or
    ``panel serve app/dashboard.py``), :meth:`servable` puts it in a page template.
    """

    title = param.String(default="daskdl")
    refresh_ms = param.Integer(default=500, bounds=(100, None), doc="how often views update")

    def __init__(self, client, runs_dir: str | Path = "runs", **params):
        super().__init__(**params)
        self.client = client
        self.store = DashboardStore(feed(client))
        self.store.refresh()
        link = client.dashboard_link or ""
        self.status = Status(store=self.store, dask_dashboard=link)
        self.curves = Curves(store=self.store)
        self.workers = Workers(store=self.store)
        self.run_list = RunList(store=self.store)
        self.launcher = Launcher(client, runs_dir, store=self.store)
        self.compare = pn.widgets.Select.from_param(
            self.store.param.compare, name="compare with (dashed)"
        )
        self.select = pn.widgets.Select.from_param(self.store.param.selected, name="run")
        self._callback = None

    def tick(self) -> None:
        self.store.refresh()
        self.launcher.show_message()

    def start_updates(self) -> None:
        if self._callback is None:
            self._callback = pn.state.add_periodic_callback(self.tick, period=self.refresh_ms)

    def main(self):
        return pn.Column(
            self.status,
            self.curves,
            self.workers,
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

    def servable(self, title: str | None = None, **kwargs):
        return self.template().servable(title=title or self.title, **kwargs)
