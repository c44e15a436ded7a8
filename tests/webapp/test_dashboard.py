"""The dashboard: store logic with plain pytest, the event feed against a real cluster, and
the served page in headless Chromium."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import poll_for

import daskdl
from daskdl.webapp.store import DashboardStore, RunState, feed

pytest.importorskip("panel")


def _start(run="r1", epochs=2, steps=10, workers=("tcp://a:1", "tcp://b:2")):
    return {
        "run": run,
        "kind": "start",
        "model": "mlp",
        "config": {"epochs": epochs, "lr": 0.1},
        "world_size": len(workers),
        "workers": list(workers),
        "steps_per_epoch": steps,
        "meta": {"dataset": "digits"},
    }


def _step(run="r1", rank=0, step=1, loss=1.0, step_time=0.01, sps=100.0):
    return {
        "run": run,
        "kind": "step",
        "rank": rank,
        "epoch": 1,
        "step": step,
        "loss": loss,
        "samples_per_s": sps,
        "step_time": step_time,
        "rss": 300 * 2**20,
        "lr": 0.1,
    }


def _epoch(run="r1", epoch=1, steps=10, val=0.9):
    return {
        "run": run,
        "kind": "epoch",
        "epoch": epoch,
        "step": epoch * steps,
        "train_loss": 0.5 / epoch,
        "train_accuracy": 0.8,
        "val_loss": 0.4,
        "val_accuracy": val,
        "samples_per_s": 200.0,
        "epoch_time": 1.0,
        "lr": 0.1,
    }


def test_run_state_follows_its_events():
    run = RunState("r1")
    run.ingest(100.0, _start())
    assert (run.status, run.total_steps, run.step) == ("running", 20, 0)
    run.ingest(101.0, _step(rank=0, step=4, step_time=0.02, sps=150.0))
    run.ingest(101.1, _step(rank=1, step=4, step_time=0.05, sps=60.0))  # a straggler
    assert run.step == 4
    assert run.eta() == pytest.approx(16 * 0.02)  # rank 0's pace for the 16 steps left
    assert run.throughput() == pytest.approx(210.0)
    table = run.worker_table()
    assert list(table["worker"]) == ["tcp://a:1", "tcp://b:2"]
    assert list(table["step_time_ms"]) == [20.0, 50.0]
    assert list(table["rss_mb"]) == [300, 300]
    run.ingest(102.0, _epoch(epoch=1))
    run.ingest(102.5, {"run": "r1", "kind": "checkpoint", "epoch": 1, "path": "/x/epoch-0001"})
    assert run.checkpoint_path == "/x/epoch-0001"
    assert run.elapsed(now=103.0) == pytest.approx(3.0)
    # The last epoch ends the run even if no "end" event ever comes.
    run.ingest(104.0, _epoch(epoch=2, val=0.95))
    assert run.status == "finished" and run.eta() is None
    assert list(run.history()["val_accuracy"]) == [0.9, 0.95]
    summary = run.summary()
    assert summary["epochs"] == "2/2" and summary["dataset"] == "digits"
    assert summary["val_accuracy"] == 0.95


def test_end_event_reports_failures_and_a_restart_clears_them():
    run = RunState("r1")
    run.ingest(1.0, _start())
    run.ingest(2.0, {"run": "r1", "kind": "end", "status": "failed", "error": "rank 1 died"})
    assert (run.status, run.error) == ("failed", "rank 1 died")
    run.ingest(3.0, _start())  # resumed under the same id
    assert (run.status, run.error) == ("running", None)


def test_a_regrouped_run_shows_its_survivors():
    run = RunState("r1")
    run.ingest(1.0, _start(workers=("tcp://a:1", "tcp://b:2", "tcp://c:3")))
    run.ingest(2.0, _step(rank=2, step=3))
    change = {
        "run": "r1",
        "kind": "membership",
        "lost": ["tcp://c:3"],
        "workers": ["tcp://a:1", "tcp://b:2"],
        "world_size": 2,
        "steps_per_epoch": 15,
        "epoch": 1,
        "step_in_epoch": 4,
        "comm_id": "r1.1",
    }
    run.ingest(3.0, change)
    assert run.workers == ["tcp://a:1", "tcp://b:2"] and run.total_steps == 30
    assert run.spec["comm_id"] == "r1.1" and run.memberships == [change]
    assert run.worker_table().empty  # the old ranks' figures are gone with their membership


def test_store_follows_the_newest_run_until_one_is_picked():
    store = DashboardStore()
    seen = []
    store.param.watch(lambda e: seen.append(e.new), "selected")
    assert store.ingest([(1.0, _start("a")), (1.5, _step("a"))])
    assert store.selected == "a"
    store.ingest([(2.0, _start("b"))])
    assert store.selected == "a"  # the user's view does not jump
    assert store.param.compare.objects == [None, "a", "b"]
    store.compare = "b"
    assert list(store.runs_table()["run"]) == ["b", "a"]  # newest first
    assert not store.ingest([])
    assert seen == ["a"]


def test_feed_sees_past_and_live_runs(client, digits_split):
    train, test = digits_split
    before = daskdl.fit(client, "mlp", train, val=test, epochs=2, progress=False)
    store = DashboardStore(feed(client))
    store.refresh()
    past = store.runs[before.run_id]
    assert past.status == "finished"
    assert list(past.history()["val_accuracy"]) == list(before.history["val_accuracy"])
    assert {e["rank"] for e in past.steps} == {0, 1}

    # A run started after the feed: announced live, replayed on the client's loop.
    after = daskdl.fit(client, "mlp", train, val=test, epochs=3, progress=False, block=False)
    revision = store.revision

    def three_epochs_seen():
        store.refresh()
        return after.run_id in store.runs and len(store.runs[after.run_id].epochs) == 3

    poll_for(three_epochs_seen, timeout=60)
    after.wait()
    assert store.revision > revision
    assert list(store.runs[after.run_id].history()["epoch"]) == [1, 2, 3]
    # The run's own history is unaffected by the dashboard listening on the same client.
    assert list(after.history["epoch"]) == [1, 2, 3]
    assert store.runs[after.run_id].spec["meta"] == {}


def test_notebook_views_render(client, digits_split):
    import panel as pn

    train, test = digits_split
    run = daskdl.fit(client, "small_cnn", train, val=test, epochs=2, progress=False)
    app = daskdl.dashboard(client, run=run)
    assert app.store.selected == run.run_id
    # The deprecated method opens the same, with a warning that names the call to use.
    with pytest.warns(DeprecationWarning, match=r"daskdl.dashboard\(client, run=run\)"):
        assert run.dashboard().store.selected == run.run_id
    app.store.refresh()
    app.curves._update()
    assert len(app.curves.epochs.data["epoch"]) == 2
    assert len(app.curves.steps.data["step"]) >= 1
    assert "finished" in app.status.text.object
    # Overlay an earlier run's epoch curves (dashed) for comparison.
    other = daskdl.fit(client, "mlp", train, val=test, epochs=3, progress=False)
    app.store.refresh()
    assert app.store.selected == run.run_id  # a new run does not steal the view
    app.store.compare = other.run_id
    assert list(app.curves.other.data["epoch"]) == [1.0, 2.0, 3.0]
    assert list(app.curves.other.data["val_accuracy"]) == list(other.history["val_accuracy"])
    app.store.compare = None
    assert list(app.curves.other.data["epoch"]) == []
    layout = pn.panel(app)
    assert isinstance(layout, pn.layout.Row)
    html = pn.panel(app).get_root()  # builds the Bokeh models, as a notebook display does
    assert html is not None


# --- the served page, in a real browser -------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _stop_server(proc: subprocess.Popen, log) -> None:
    # SIGINT lets the server close its cluster; kill only if it does not.
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@contextlib.contextmanager
def _serve(tmp_path, *cluster: str):
    """``daskdl dashboard`` on a free localhost port (its own 2-worker cluster, or the one
    ``cluster`` names); yields its address."""
    from daskdl.webapp.serve import free_port

    port = free_port("127.0.0.1")
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "daskdl", "dashboard", *(cluster or ("--workers", "2"))]
        + ["--port", str(port), "--runs-dir", str(tmp_path / "runs")],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        poll_for(lambda: "daskdl dashboard: " + url in (tmp_path / "server.log").read_text(), 60)
        yield url
    finally:
        _stop_server(proc, log)


@pytest.fixture
def served(tmp_path):
    with _serve(tmp_path) as url:
        yield url


def _steps_drawn(page) -> int:
    return page.evaluate(
        """() => {
            const doc = window.Bokeh && Bokeh.documents[0];
            const source = doc && doc.get_model_by_name('daskdl-loss-steps');
            return source ? source.data.step.length : -1;
        }"""
    )


def _status(page) -> str | None:
    status = page.locator(".daskdl-run-status")
    return status.first.text_content() if status.count() else None


# In CI (.ci/run installs Chromium) a missing browser is a failure, not a skip.
@pytest.mark.skipif(
    not os.path.exists(CHROMIUM) and not os.environ.get("CI"),
    reason="needs Chromium at /usr/bin/chromium (apt-get install chromium)",
)
@pytest.mark.integration
def test_start_watch_stop_and_resume_from_the_page(served, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(served)
        # A short digits run with the form's defaults (small_cnn, 10 epochs, 2 workers).
        page.get_by_role("button", name="Start run").click(timeout=60_000)
        counts = []

        def finished():
            counts.append(_steps_drawn(page))
            return _status(page) == "finished"

        poll_for(finished, timeout=120, interval=0.25)
        assert counts[-1] > 0
        assert len({c for c in counts if c > 0}) >= 2, f"the curve never grew: {counts}"
        # The checkpoint is written (and reported) just after the last epoch's event.
        poll_for(
            lambda: page.locator(".daskdl-checkpoint").first.text_content().endswith("epoch-0010"),
            timeout=30,
        )
        page.screenshot(path=str(tmp_path / "dashboard-finished.png"), full_page=True)
        if os.environ.get("DASKDL_SCREENSHOTS"):
            shutil.copy(tmp_path / "dashboard-finished.png", os.environ["DASKDL_SCREENSHOTS"])

        # A long run, stopped from the page, then resumed from its checkpoint.
        epochs = page.locator("input").nth(1)  # after the data path (selects are not inputs)
        epochs.fill("400")
        epochs.press("Enter")
        page.get_by_role("button", name="Start run").click()
        poll_for(lambda: _status(page) == "running" and _steps_drawn(page) > 2, timeout=60)
        first = page.locator(".daskdl-run-id").first.text_content()
        poll_for(lambda: list((tmp_path / "runs").glob("*-2/checkpoints/epoch-*")), timeout=60)
        page.get_by_role("button", name="Stop").click()
        poll_for(lambda: _status(page) == "stopped", timeout=60)
        page.get_by_role("button", name="Resume").click()
        poll_for(
            lambda: (
                _status(page) == "running"
                and page.locator(".daskdl-run-id").first.text_content() != first
            ),
            timeout=60,
        )
        page.get_by_role("button", name="Stop").click()
        poll_for(lambda: _status(page) == "stopped", timeout=60)
        page.screenshot(path=str(tmp_path / "dashboard-resumed.png"), full_page=True)
        browser.close()
    resumed = Path(tmp_path / "runs").glob("*-2/config.json")
    assert any('"start_epoch": 0' not in f.read_text() for f in resumed)


@pytest.mark.skipif(
    not os.path.exists(CHROMIUM) and not os.environ.get("CI"),
    reason="needs Chromium at /usr/bin/chromium (apt-get install chromium)",
)
@pytest.mark.integration
def test_panel_serve_runs_the_app_script(tmp_path):
    from playwright.sync_api import sync_playwright

    from daskdl.webapp.serve import free_port

    root = Path(__file__).resolve().parents[2]
    port = free_port("127.0.0.1")
    log = open(tmp_path / "panel.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "panel", "serve", str(root / "app" / "dashboard.py")]
        + ["--address", "127.0.0.1", "--port", str(port), "--allow-websocket-origin"]
        + [f"127.0.0.1:{port}", "--args", "--workers", "1", "--runs-dir", str(tmp_path)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page()

            def page_served():
                try:
                    page.goto(f"http://127.0.0.1:{port}/dashboard", timeout=5000)
                    return True
                except Exception:
                    return False

            poll_for(page_served, timeout=60, interval=1)
            page.get_by_role("button", name="Start run").wait_for(timeout=60_000)
            assert page.title() == "daskdl"
            assert _steps_drawn(page) == 0  # the views are there, with no run yet
            browser.close()
    finally:
        _stop_server(proc, log)


@pytest.mark.integration
def test_beyond_loopback_the_dashboard_needs_a_password(tmp_path):
    import http.cookiejar
    import urllib.parse
    import urllib.request

    from daskdl.webapp.serve import free_port

    refused = subprocess.run(
        [sys.executable, "-m", "daskdl", "dashboard", "--address", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2
    assert "--basic-auth" in refused.stderr and "--insecure" in refused.stderr

    port = free_port("0.0.0.0")
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "daskdl",
            "dashboard",
            "--workers",
            "1",
            "--port",
            str(port),
        ]
        + ["--address", "0.0.0.0", "--basic-auth", "correct horse battery"]
        + ["--runs-dir", str(tmp_path / "runs")],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    try:
        poll_for(lambda: "daskdl dashboard: " in (tmp_path / "server.log").read_text(), 60)
        url = f"http://127.0.0.1:{port}/"
        opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())
        )

        def get(path: str, data: dict | None = None) -> str:
            body = urllib.parse.urlencode(data).encode() if data else None
            with opener.open(url + path, data=body, timeout=30) as response:
                return response.geturl() + "\n" + response.read().decode()

        def served():
            try:
                return get("")
            except OSError:
                return None

        poll_for(lambda: served() is not None, 60, 0.5)
        page = get("")
        assert "/login" in page.splitlines()[0] and 'type="password"' in page
        assert "Start run" not in page
        wrong = get("login", {"username": "me", "password": "wrong"})
        assert "/login" in wrong.splitlines()[0]
        page = get("login", {"username": "me", "password": "correct horse battery"})
        assert "/login" not in page.splitlines()[0] and "<title>daskdl</title>" in page
    finally:
        _stop_server(proc, log)


@pytest.mark.integration
def test_insecure_serves_beyond_loopback_without_a_password_and_says_so(tmp_path):
    import urllib.request

    from daskdl.webapp.serve import free_port

    port = free_port("0.0.0.0")
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "daskdl",
            "dashboard",
            "--workers",
            "1",
            "--port",
            str(port),
        ]
        + ["--address", "0.0.0.0", "--insecure", "--runs-dir", str(tmp_path / "runs")],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    try:
        poll_for(lambda: "daskdl dashboard: " in (tmp_path / "server.log").read_text(), 60)
        assert "without a password" in (tmp_path / "server.log").read_text()

        def page():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as r:
                    return r.geturl(), r.read().decode()
            except OSError:
                return None

        poll_for(lambda: page() is not None, 60, 0.5)
        url, body = page()
        assert "/login" not in url and "<title>daskdl</title>" in body
    finally:
        _stop_server(proc, log)


@pytest.mark.skipif(
    not os.path.exists(CHROMIUM) and not os.environ.get("CI"),
    reason="needs Chromium at /usr/bin/chromium (apt-get install chromium)",
)
def test_a_published_data_set_trains_from_the_page(fresh_client, tmp_path):
    """A data set prepared in a notebook (here: this process), published on the cluster, is
    listed by the page beside the built-in ones and trains from it."""
    from playwright.sync_api import sync_playwright

    train, val = daskdl.datasets.digits().split(0.2, seed=0)
    daskdl.publish(fresh_client, "my-digits", train.standardize(), val.standardize(like=train))
    with _serve(tmp_path, "--scheduler", fresh_client.scheduler.address) as url:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            dataset = page.locator("select").first
            poll_for(lambda: "my-digits" in dataset.inner_text(), timeout=30)
            dataset.select_option("my-digits")
            epochs = page.locator("input").nth(1)
            epochs.fill("2")
            epochs.press("Enter")
            page.get_by_role("button", name="Start run").click(timeout=60_000)
            poll_for(lambda: _status(page) == "finished", timeout=120, interval=0.25)
            browser.close()
    config = json.loads((tmp_path / "runs" / "my-digits-small_cnn-1" / "config.json").read_text())
    assert config["meta"]["dataset"] == "my-digits" and config["meta"]["published"]
    assert config["config"]["epochs"] == 2
