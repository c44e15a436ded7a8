"""The dashboard's Studies view: a tuning study's trials, its optimisation history, the
learning curves of kept and pruned trials, and the parameters' importances (from
:class:`~daskdl.webapp.study_state.StudyState`). A trial's row opens its run.
"""

from __future__ import annotations

import html

import pandas as pd
import panel as pn
import param
from bokeh.models import ColumnDataSource, HoverTool
from panel.viewable import Viewer

from daskdl.webapp.store import DashboardStore
from daskdl.webapp.study_state import StudyState
from daskdl.webapp.views import _figure

HISTORY_COLUMNS = ("number", "value", "best", "color", "state")
CURVE_COLUMNS = ("xs", "ys", "color", "number", "state")


def _source(name: str, columns) -> ColumnDataSource:
    # Named, so that a browser test finds the data in Bokeh's document.
    return ColumnDataSource({c: [] for c in columns}, name=name)


class Studies(Viewer):
    """The dashboard's Studies view: pick a study, see its trials; click one to open its run
    (``opened`` says which)."""

    store = param.ClassSelector(class_=DashboardStore)
    opened = param.String(default=None, allow_None=True, doc="the run of the trial clicked")

    def __init__(self, **params):
        super().__init__(**params)
        self.choose = pn.widgets.Select(name="study", options={}, width=420)
        self.choose.param.watch(self._chosen, "value")
        self.summary = pn.pane.HTML("", css_classes=["daskdl-study"], sizing_mode="stretch_width")
        self.table = pn.widgets.Tabulator(
            pd.DataFrame(), disabled=True, show_index=False, selectable=1, height=260,
            sizing_mode="stretch_width", name="trials", css_classes=["daskdl-trials"],
        )  # fmt: skip
        self.table.on_click(self._clicked)
        self.points = _source("daskdl-study-history", HISTORY_COLUMNS)
        self.lines = _source("daskdl-study-curves", CURVE_COLUMNS)
        self.marks = _source("daskdl-study-marks", ("number", "color", "epoch", "value"))
        self.bars = _source("daskdl-study-importance", ("param", "importance"))
        self.history = _figure("optimisation history", "value", x_label="trial")
        self.history.scatter("number", "value", source=self.points, color="color", size=8)
        self.history.step("number", "best", source=self.points, color="#d62728", mode="after")
        self.curves = _figure("intermediate values (grey: pruned)", "metric", x_label="epoch")
        self.curves.multi_line("xs", "ys", source=self.lines, color="color", line_width=2)
        self.curves.scatter("epoch", "value", source=self.marks, color="color", size=6)
        self.curves.add_tools(HoverTool(tooltips=[("trial", "@number"), ("state", "@state")]))
        self.importance = _figure("parameter importances (fANOVA)", "", x_label="importance",
                                  y_range=[])  # fmt: skip
        self.importance.hbar(y="param", right="importance", source=self.bars, height=0.6)
        self._shown: tuple | None = None
        self.store.param.watch(self._update, ["revision", "study"])
        self._update()

    def _chosen(self, event) -> None:
        if event.new is not None:
            self.store.study = event.new

    def _clicked(self, event) -> None:
        run_id = self.table.value.iloc[event.row].get("run")
        if run_id and run_id in self.store.runs:
            self.store.selected = run_id
            self.opened = run_id

    def _update(self, *_) -> None:
        options = {s.label(): key for key, s in self.store.studies.items()}
        if options != self.choose.options:
            self.choose.options = options
        self.choose.value = self.store.study
        study = self.store.studies.get(self.store.study)
        shown = (study.key, study.version) if study else None
        if shown == self._shown:
            return
        self._shown = shown
        self._draw(study)

    def _draw(self, study: StudyState | None) -> None:
        if study is None:
            self.summary.object = "<b>No studies yet.</b> Start one with <code>daskdl.tune</code>."
            return
        best = study.best()
        found = "no complete trial yet"
        if best:
            found = (
                f"<b>best</b> trial {best['number']}: {best['value']:.4g} "
                f"{html.escape(str(best['params']))}"
            )
        self.summary.object = (
            f"<b>study</b> <span class='daskdl-study-name'>{html.escape(study.name)}</span> "
            f"&middot; {html.escape(study.spec.get('direction', ''))} "
            f"{html.escape(study.spec.get('metric', ''))} &middot; "
            f"<b>status</b>: <span class='daskdl-study-status'>{study.status}</span> &middot; "
            f"{len(study.trials)} of {study.spec.get('n_trials', '?')} trials "
            f"{html.escape(str(study.counts()))}<br>{found}"
        )
        self.table.value = study.table()
        self.points.data = study.history()
        self.lines.data = study.curves()
        self.marks.data = study.points()
        weights = study.importances()
        names = sorted(weights, key=lambda name: weights[name])
        self.importance.y_range.factors = names
        self.bars.data = {"param": names, "importance": [weights[n] for n in names]}

    def __panel__(self):
        return pn.Column(
            self.choose, self.summary, self.table,
            pn.Row(pn.pane.Bokeh(self.history, sizing_mode="stretch_width"),
                   pn.pane.Bokeh(self.curves, sizing_mode="stretch_width"),
                   sizing_mode="stretch_width"),
            pn.pane.Bokeh(self.importance, sizing_mode="stretch_width"),
            sizing_mode="stretch_width",
        )  # fmt: skip
