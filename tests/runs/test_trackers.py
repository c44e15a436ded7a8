"""Experiment trackers: TensorBoard's event files and MLflow's store read back after real runs,
across a resume, with a failing tracker, and a study as a parent run with a child per trial."""

from __future__ import annotations

import json
import logging

import dask
import pytest
from conftest import Recording, poll_for

import daskdl
from daskdl import events

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """MLflow's store for the test: a SQLite file of its own (MLflow's default kind)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _history(store, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in store.get_metric_history(run_id, key))


def _runs(store) -> list:
    experiment = store.get_experiment_by_name("daskdl")
    return store.search_runs([experiment.experiment_id]) if experiment else []


def test_tensorboard_and_mlflow_hold_one_run_with_every_step_and_epoch(
    client, digits_split, tmp_path, mlflow_store
):
    train, test = digits_split
    run = daskdl.fit(client, "mlp", train, val=test, epochs=2, batch_size=64, out=tmp_path / "r",
                     loggers=["tensorboard", "mlflow", "csv"], progress=False)  # fmt: skip
    history = run.history
    expected = list(zip(history["step"], history["val_accuracy"]))
    # TensorBoard: the epochs at their global steps, rank 0's loss per step, every rank's figures.
    tb = _scalars(tmp_path / "r" / "tensorboard")
    assert [(s, round(v, 5)) for s, v in tb["epoch/val_accuracy"]] == [
        (s, round(v, 5)) for s, v in expected
    ]
    steps = [s for s, _ in tb["train/loss"]]
    assert steps == sorted(set(steps)) and steps[-1] <= history["step"].iloc[-1]
    assert {"system/rank0/samples_per_s", "system/rank1/rss_mb"} <= set(tb)
    # MLflow: one run for the two ranks, its config, the same values, and its end.
    [found] = _runs(mlflow_store)
    logged = _history(mlflow_store, found.info.run_id, "epoch/val_accuracy")
    assert [s for s, _ in logged] == [s for s, _ in expected]
    assert [v for _, v in logged] == pytest.approx([v for _, v in expected])
    assert json.loads(found.data.params["config"])["epochs"] == 2
    assert found.info.status == "FINISHED"
    # The checkpoints keep the trackers' identities (what resume= goes on with).
    manifest = json.loads(
        (tmp_path / "r" / "checkpoints" / "epoch-0002" / "manifest.json").read_text()
    )
    assert manifest["trackers"]["mlflow"]["run_id"] == found.info.run_id
    assert manifest["trackers"]["tensorboard"]["log_dir"] == str(tmp_path / "r" / "tensorboard")
    assert (tmp_path / "r" / "metrics.csv").exists()


def test_a_resumed_run_goes_on_in_the_same_tracker_runs_logging_each_step_once(
    client, tmp_path, mlflow_store
):
    train, test = daskdl.datasets.synthetic_images(1280, chunks=320).split(0.2, seed=0)
    opts = dict(val=test, batch_size=32, out=tmp_path / "r", loggers=["tensorboard", "mlflow"],
                progress=False)  # fmt: skip
    with dask.config.set({"daskdl.log-interval": "50ms"}):
        first = daskdl.fit(client, "small_cnn", train, epochs=4, block=False, **opts)

        # Cut off in epoch 3, after its checkpoint of epoch 2: epoch 3's first steps are
        # logged, then trained again by the resumed run.
        def in_epoch_3():
            return any(
                e["kind"] == "step" and e["epoch"] == 3 for e in events.replay(client, first.run_id)
            )

        poll_for(in_epoch_3, timeout=120)
        first.cancel()
        [tracked] = _runs(mlflow_store)
        cut = max(s for s, _ in _history(mlflow_store, tracked.info.run_id, "train/loss"))
        second = daskdl.fit(client, "small_cnn", train, epochs=4, resume=True, **opts)
    assert second.status == "finished"
    start = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cut > start["start_epoch"] * start["steps_per_epoch"]  # some steps were trained twice
    [again] = _runs(mlflow_store)  # the same MLflow run, not a second one
    assert again.info.run_id == tracked.info.run_id and again.info.status == "FINISHED"
    run_id = again.info.run_id
    loss_steps = [s for s, _ in _history(mlflow_store, run_id, "train/loss")]
    assert len(loss_steps) == len(set(loss_steps)) and max(loss_steps) > cut
    epochs = [s for s, _ in _history(mlflow_store, run_id, "epoch/val_accuracy")]
    assert epochs == list(second.history["step"])  # epochs 1-4, once each
    # TensorBoard hides the first attempt's steps past the checkpoint: each step shows once.
    tb = _scalars(tmp_path / "r" / "tensorboard")
    tb_steps = [s for s, _ in tb["train/loss"]]
    assert len(tb_steps) == len(set(tb_steps)) and max(tb_steps) > cut
    assert [s for s, _ in tb["epoch/val_accuracy"]] == list(second.history["step"])


def test_any_lightning_style_logger_works_and_a_failing_one_does_not_stop_training(
    client, digits_split, caplog
):
    train, test = digits_split
    good, bad = Recording(), Recording(fail_on="log_metrics")
    with caplog.at_level(logging.WARNING, logger="daskdl.runs.trackers"):
        run = daskdl.fit(client, "mlp", train, val=test, epochs=2, loggers=[good, bad],
                         progress=False)  # fmt: skip
    assert run.status == "finished"
    assert len(good.params) == 1 and good.params[0]["config"]["epochs"] == 2
    steps = [s for s, _ in good.metrics]
    assert steps == sorted(steps) and good.status == "finished"
    assert [m["epoch/val_accuracy"] for _, m in good.metrics if "epoch/val_accuracy" in m] == list(
        run.history["val_accuracy"]
    )
    assert "failed in log_metrics and is dropped: ConnectionError" in caplog.text
    assert bad.status is None  # dropped: not called again


def test_bad_loggers_are_refused_with_the_fix(client, digits_split):
    train, _ = digits_split
    with pytest.raises(ValueError, match="'wandb' is not one of"):
        daskdl.fit(client, "mlp", train, loggers=["wandb"], progress=False)
    with pytest.raises(TypeError, match="has no log_hyperparams, log_metrics, finalize"):
        daskdl.fit(client, "mlp", train, loggers=[object()], progress=False)
    with pytest.raises(ValueError, match="pass out= a folder"):
        daskdl.fit(client, "mlp", train, loggers="csv", progress=False)


def _space(trial):
    return {"model": "mlp", "lr": trial.suggest_float("lr", 0.01, 0.3, log=True)}


def test_a_study_is_one_parent_run_with_a_child_run_per_trial(
    client, digits_split, tmp_path, mlflow_store
):
    train, test = digits_split
    study = daskdl.tune(
        client, _space, train, val=test, n_trials=3, epochs=2, pruner="none", sampler="random",
        out=tmp_path / "s", loggers=["mlflow", "tensorboard"],
    )  # fmt: skip
    runs = {r.info.run_name: r for r in _runs(mlflow_store)}
    parent = runs.pop("daskdl")
    assert sorted(runs) == ["trial-0000", "trial-0001", "trial-0002"]
    assert {r.data.tags["mlflow.parentRunId"] for r in runs.values()} == {parent.info.run_id}
    for t in study.trials.itertuples(index=False):
        child = runs[f"trial-{t.number:04d}"]
        logged = [v for _, v in _history(mlflow_store, child.info.run_id, "epoch/val_accuracy")]
        assert logged == pytest.approx(t.val_accuracy)
    values = _history(mlflow_store, parent.info.run_id, "study/best")
    assert [s for s, _ in values] == [1, 2, 3] and values[-1][1] == pytest.approx(study.best.value)
    assert parent.info.status == "FINISHED"
    tb = _scalars(tmp_path / "s" / "tensorboard")
    assert [s for s, _ in tb["study/value"]] == [1, 2, 3]
    assert len(_scalars(tmp_path / "s" / "tensorboard" / "trial-0001")["epoch/val_accuracy"]) == 2
    # A study whose objects cannot make a child run per trial is refused with the fix.
    with pytest.raises(TypeError, match="has no child"):
        daskdl.tune(client, _space, train, val=test, n_trials=1, loggers=[Recording()])


def _loop(ctx):
    for epoch in range(ctx.config["epochs"]):
        for _ in ctx.batches("train", 64, epoch=epoch):
            pass  # a step: what ctx.log reports is against the steps done
        ctx.log(epoch=epoch, train_loss=1.0 / (epoch + 1))


def test_a_launch_loop_logs_what_it_reports_against_the_epoch(client, digits_split):
    train, _ = digits_split
    seen = Recording()
    run = daskdl.launch(client, _loop, {"train": train}, config={"epochs": 3}, loggers=[seen],
                        progress=False)  # fmt: skip
    assert run.status == "finished" and seen.status == "finished"
    logged = [(s, m["epoch/train_loss"]) for s, m in seen.metrics]
    assert logged == list(zip(run.history["step"], [1.0, 0.5, 1 / 3]))
    assert seen.params[0]["config"]["epochs"] == 3


@pytest.fixture
def silent_server():
    """A server on 127.0.0.1 that accepts connections and never answers."""
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


@pytest.fixture
def refusing_uri():
    """An address where nothing listens: connections are refused."""
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("server", ["silent_server", "refusing_uri"])
def test_an_mlflow_server_that_does_not_answer_is_dropped_within_seconds(
    client, digits_split, caplog, monkeypatch, request, server
):
    """MLflow retries for minutes (247 s measured); the run warns and trains without it."""
    import time

    monkeypatch.setenv("MLFLOW_TRACKING_URI", request.getfixturevalue(server))
    train, test = digits_split
    began = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="daskdl.runs.trackers"):
        run = daskdl.fit(client, "mlp", train, val=test, epochs=1, loggers=["mlflow"],
                         progress=False)  # fmt: skip
    assert run.status == "finished" and len(run.history) == 1
    assert "tracker 'mlflow' could not be opened and is dropped" in caplog.text
    assert "does not answer" in caplog.text
    assert time.monotonic() - began < 60  # the probe's 3 s, then training
