"""Tuning studies on the dashboard: the study's events folded into its trials (plain pytest),
``study.dashboard()`` in a notebook, and the Studies view of the served page in Chromium."""

from __future__ import annotations

import os
from types import SimpleNamespace

import optuna
import pytest
from conftest import poll_for
from test_dashboard import CHROMIUM, CHROMIUM_ARGS, _serve, _status

import daskdl
from daskdl.webapp.store import DashboardStore
from daskdl.webapp.study_state import STATE_COLORS, StudyState

pytest.importorskip("panel")

LR = optuna.distributions.distribution_to_json(
    optuna.distributions.FloatDistribution(1e-3, 1, log=True)
)
HIDDEN = optuna.distributions.distribution_to_json(
    optuna.distributions.CategoricalDistribution([32, 128])
)


def _trial(number, state, curve, value=None, lr=0.1, hidden=32):
    return {
        "study": "s-1", "kind": "trial", "number": number, "state": state, "value": value,
        "params": {"lr": lr, "hidden": hidden}, "run": f"run-{number}",
        "distributions": {"lr": LR, "hidden": HIDDEN}, "curve": curve,
    }  # fmt: skip


def _study(direction="maximize"):
    return {"study": "s-1", "kind": "study", "name": "s", "metric": "val_accuracy",
            "direction": direction, "n_trials": 3}  # fmt: skip


def test_a_study_state_follows_its_trials():
    study = StudyState("s-1")
    study.ingest(1.0, _study())
    study.ingest(2.0, _trial(0, "running", [[1, 0.5]]))
    assert study.best() is None and study.history()["number"] == []
    study.ingest(3.0, _trial(0, "complete", [[1, 0.5], [2, 0.9]], 0.9, lr=0.2, hidden=128))
    study.ingest(3.5, _trial(1, "pruned", [[1, 0.3]], lr=0.001))
    study.ingest(4.0, _trial(2, "complete", [[1, 0.6], [2, 0.8]], 0.8, lr=0.01))
    study.ingest(5.0, {"study": "s-1", "kind": "end", "status": "finished"})
    assert study.status == "finished" and study.counts() == {"complete": 2, "pruned": 1}
    table = study.table()
    assert list(table["state"]) == ["complete", "pruned", "complete"]
    assert list(table["run"]) == ["run-0", "run-1", "run-2"]
    assert list(table["epochs"]) == [2, 1, 2]
    assert study.best()["number"] == 0
    history = study.history()  # complete trials only, and the best so far
    assert (history["number"], history["value"], history["best"]) == (
        [0, 2],
        [0.9, 0.8],
        [0.9, 0.9],
    )
    curves = study.curves()
    assert curves["ys"] == [[0.5, 0.9], [0.3], [0.6, 0.8]]
    assert curves["color"][1] == STATE_COLORS["pruned"]
    assert study.points()["value"] == [0.5, 0.9, 0.3, 0.6, 0.8]  # one epoch is a point
    importances = study.importances()
    assert set(importances) == {"lr", "hidden"}
    assert sum(importances.values()) == pytest.approx(1.0)
    # Minimised, the best is the least.
    low = StudyState("s-1")
    for t, msg in ((1.0, _study("minimize")), (2.0, _trial(0, "complete", [[1, 0.9]], 0.9)),
                   (3.0, _trial(1, "complete", [[1, 0.4]], 0.4))):  # fmt: skip
        low.ingest(t, msg)
    assert low.best()["number"] == 1 and low.history()["best"] == [0.9, 0.4]


def test_the_store_keeps_studies_apart_from_runs():
    store = DashboardStore()
    store.ingest([(1.0, _study()), (2.0, _trial(0, "running", []))])
    assert store.study == "s-1" and list(store.studies) == ["s-1"]
    assert store.runs == {}  # a trial event names its run, but is not the run's event


def _space(trial):
    return {
        "model": ("mlp", {"hidden": trial.suggest_categorical("hidden", [32, 128])}),
        "lr": trial.suggest_float("lr", 0.01, 0.3, log=True),
    }


def test_study_dashboard_opens_on_its_trials_and_a_trial_opens_its_run(client, digits_split):
    train, test = digits_split
    study = daskdl.tune(client, _space, train, val=test, n_trials=4, epochs=2, pruner="none",
                        sampler="random")  # fmt: skip
    app = daskdl.dashboard(client, study=study)
    with pytest.warns(DeprecationWarning, match="study=study"):
        assert study.dashboard().store.study == study.key
    app.store.refresh()
    assert app.store.study == study.key and app.tabs.active == 1
    view = app.studies
    assert list(view.table.value["number"]) == [0, 1, 2, 3]
    assert set(view.table.value["state"]) == {"complete"}
    assert sorted(view.points.data["value"]) == sorted(study.trials["value"])
    assert [len(x) for x in view.lines.data["xs"]] == [2, 2, 2, 2]
    assert "finished" in view.summary.object
    view._clicked(SimpleNamespace(row=2))  # as a click on the third trial's row
    assert app.store.selected == study.trials["run_id"][2] and app.tabs.active == 0


@pytest.mark.skipif(
    not os.path.exists(CHROMIUM) and not os.environ.get("CI"),
    reason="needs Chromium at /usr/bin/chromium (apt-get install chromium)",
)
def test_the_studies_view_follows_a_study_live_in_the_browser(fresh_client, tmp_path):
    from playwright.sync_api import sync_playwright

    train, test = daskdl.datasets.digits().split(0.2, seed=0)
    with _serve(tmp_path, "--scheduler", fresh_client.scheduler.address) as url:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.get_by_text("Studies", exact=True).click(timeout=60_000)
            study = daskdl.tune(fresh_client, _space, train, val=test, n_trials=4, epochs=3,
                                sampler="random", block=False)  # fmt: skip
            rows = page.locator(".daskdl-trials .tabulator-row")
            seen = []

            def finished():
                seen.append(rows.count())
                status = page.locator(".daskdl-study-status")
                return status.count() and status.first.text_content() == "finished"

            poll_for(finished, timeout=180, interval=0.25)
            study.wait()
            assert rows.count() == 4 and len({n for n in seen if n}) >= 2, seen  # it grew live
            drawn = page.evaluate(
                """() => {
                    const doc = Bokeh.documents[0];
                    const n = (name, col) => doc.get_model_by_name(name).data[col].length;
                    return [n('daskdl-study-curves', 'xs'), n('daskdl-study-history', 'number'),
                            n('daskdl-study-importance', 'param')];
                }"""
            )
            complete = (study.trials["state"] == "complete").sum()
            assert drawn[:2] == [4, complete]  # every trial's curve, pruned ones too
            assert drawn[2] == (2 if complete >= 2 else 0)  # lr and hidden
            page.screenshot(path=str(tmp_path / "studies.png"), full_page=True)
            # A trial's row opens its run on the Runs tab.
            rows.nth(1).locator(".tabulator-cell[tabulator-field='number']").click()
            poll_for(lambda: page.locator(".daskdl-run-id").first.text_content()
                     == study.trials["run_id"][1], timeout=30)  # fmt: skip
            assert _status(page) in ("finished", "stopped")
            browser.close()
