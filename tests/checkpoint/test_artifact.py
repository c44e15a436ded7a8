"""A trained model is an artifact from raw data to predictions: its run records the features in
order and their standardisation, and every path that applies the model (``Run.predict``,
``Run.evaluate``, ``daskdl.predict``, ``daskdl predict``) applies them, once."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import dask
import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
import torch

import daskdl
from daskdl import Dataset, models
from daskdl.checkpoint import files as checkpoint
from daskdl.data import sources
from tests.training.test_fit import QUICK, blobs

DASKDL = [sys.executable, "-m", "daskdl"]
FEATURES = ["a", "b", "c", "d", "e", "f"]


def _frame(n=900, seed=0) -> pd.DataFrame:
    """Separable blobs far from zero, on scales far from one: a model fed raw features where
    it learned standardised ones gets them wrong."""
    X, y = blobs(n=n, d=6, classes=3, seed=seed)
    X = X * np.array([1, 10, 100, 0.1, 5, 2], np.float32) + np.float32(50)
    frame = pd.DataFrame(X, columns=FEATURES)
    frame["label"] = y
    return frame


def _outputs(model, X: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(X, np.float32))).numpy()


def _by_hand(stats: dict, X: np.ndarray) -> np.ndarray:
    """Raw samples standardised with a run's recorded statistics, in numpy."""
    return (X - np.asarray(stats["mean"], np.float32)) / np.asarray(stats["std"], np.float32)


@pytest.fixture(scope="module")
def parquet(tmp_path_factory):
    """A Parquet folder as Dask writes it: 7 files, one of them empty."""
    path = tmp_path_factory.mktemp("artifact") / "train.parquet"
    frame = _frame()
    parts = [frame.iloc[i * 129 : (i + 1) * 129] for i in range(7)]
    parts[3] = parts[3].iloc[:0]  # an empty partition, as a filter leaves them
    ddf = dd.from_delayed([dask.delayed(p) for p in parts], meta=frame.iloc[:0])
    ddf.to_parquet(path)
    return path, pd.concat(parts)


@pytest.fixture(scope="module")
def cli_run(client, parquet, tmp_path_factory):
    """``daskdl train --data`` (standardised by default) on the Parquet folder, on the test
    cluster."""
    path, _ = parquet
    out = tmp_path_factory.mktemp("artifact") / "run"
    args = ["--data", str(path), "--label", "label", "--model", "mlp", "--epochs", "4"]
    args += ["--batch-size", "32", "--lr", "0.05", "--out", str(out), "--no-progress"]
    done = _cli("train", *args, "--scheduler", client.scheduler.address)
    assert done.returncode == 0, done.stderr
    return out


def _cli(*args, timeout=300):
    return subprocess.run([*DASKDL, *args], capture_output=True, text=True, timeout=timeout)


def _checkpoint_model(out):
    _, weights, _, manifest = checkpoint.load_latest(out)
    model = models.trained(
        manifest["model_spec"], manifest["input_shape"], manifest["n_outputs"], weights
    )
    return model, manifest


def test_cli_train_then_predict_the_same_files_gives_the_models_outputs(
    client, parquet, cli_run, tmp_path
):
    path, frame = parquet
    model, manifest = _checkpoint_model(cli_run)
    assert manifest["features"] == FEATURES and manifest["standardize"] is not None
    # The statistics are the training split's, computed here in numpy.
    train, _ = sources.read(path, "label").split(0.2, 0)
    X_train = train.X.compute().astype(np.float64)
    np.testing.assert_allclose(manifest["standardize"]["mean"], X_train.mean(0), rtol=1e-5)
    np.testing.assert_allclose(manifest["standardize"]["std"], X_train.std(0), rtol=1e-4)
    out = tmp_path / "preds.parquet"
    done = _cli(
        "predict", "--checkpoint", str(cli_run), "--data", str(path), "--out", str(out),
        "--output", "logits", "--scheduler", client.scheduler.address, "--no-progress",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    preds = pd.read_parquet(out).sort_index()
    X = frame[FEATURES].to_numpy(np.float32)
    expected = _outputs(model, _by_hand(manifest["standardize"], X))
    assert len(preds) == len(frame)  # every sample, the empty partition too
    np.testing.assert_allclose(preds.to_numpy(), expected, rtol=1e-4, atol=1e-4)
    assert (expected.argmax(1) == frame["label"].to_numpy()).mean() > 0.9  # it learned
    labels = tmp_path / "labels.csv"  # CSV out, in another column order in
    shuffled = tmp_path / "shuffled.parquet"
    frame[["label", *FEATURES[::-1]]].to_parquet(shuffled)
    done = _cli(
        "predict", "--checkpoint", str(cli_run), "--data", str(shuffled), "--out", str(labels),
        "--scheduler", client.scheduler.address, "--no-progress",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    got = pd.read_csv(labels, index_col=0)["prediction"].to_numpy()
    np.testing.assert_array_equal(got, expected.argmax(1))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--out", "{data}"], "--out .* is --data"),
        (["--out", "{tmp}/p.zarr"], r"Tabular input \(Parquet, CSV\) is written as parquet or csv"),
        (["--data", "{tmp}/missing.parquet"], "has no column 'f'"),
        (["--data", "{tmp}/nan.parquet"], r"NaN or infinite features .*--on-nan propagate"),
    ],
)
def test_cli_predict_mistakes_are_one_line_naming_the_flag(
    client, parquet, cli_run, tmp_path, args, message
):
    path, frame = parquet
    frame.drop(columns=["f"]).to_parquet(tmp_path / "missing.parquet")
    bad = frame.copy()
    bad.iloc[5, 2] = np.nan
    bad.to_parquet(tmp_path / "nan.parquet")
    given = dict(zip(args[::2], args[1::2]))
    flags = {"--data": str(path), "--out": str(tmp_path / "p.parquet"), **given}
    flags = {k: v.format(data=path, tmp=tmp_path) for k, v in flags.items()}
    done = _cli(
        "predict", "--checkpoint", str(cli_run), *[x for kv in flags.items() for x in kv],
        "--scheduler", client.scheduler.address, "--no-progress",
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("daskdl: error:"), done.stderr
    assert re.search(message, last), last


@pytest.fixture(scope="module")
def python_run(client):
    """``fit`` on a standardised dataframe data set, as the README does."""
    frame = _frame(seed=1)
    ds = Dataset.from_dataframe(dd.from_pandas(frame, npartitions=4), FEATURES, "label")
    train, test = ds.split(0.25, seed=0)
    train_s, test_s = train.standardize(), test.standardize(like=train)
    run = daskdl.fit(client, "mlp", train_s, val=test_s, **QUICK)
    return run, train, test, frame


def _reference(run, train: Dataset, X: np.ndarray) -> np.ndarray:
    """The model applied by hand to samples standardised with the training statistics."""
    X_train = train.X.compute().astype(np.float64)
    mean, std = X_train.mean(0), X_train.std(0)
    return _outputs(run.model, ((X - mean) / std).astype(np.float32))


def test_python_predict_raw_or_standardised_data_alike(client, python_run, tmp_path):
    run, train, test, _ = python_run
    X = test.X.compute()
    expected = _reference(run, train, X)
    raw = run.predict(test, output="logits").compute()
    done = run.predict(test.standardize(like=train), output="logits").compute()
    np.testing.assert_allclose(np.asarray(raw), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(done), expected, rtol=1e-4, atol=1e-4)
    # like= a standardised training set: its statistics, not those of standardised data
    also = run.predict(test.standardize(like=train.standardize()), output="logits").compute()
    np.testing.assert_allclose(np.asarray(also), expected, rtol=1e-4, atol=1e-4)
    # A bare array of features standardised like=train (test.X) is not standardised again.
    bare = run.predict(test.standardize(like=train).X, output="logits").compute()
    np.testing.assert_allclose(bare, expected, rtol=1e-4, atol=1e-4)
    # evaluate scores raw data as standardised data
    a, b = run.evaluate(test), run.evaluate(test.standardize(like=train))
    assert a["accuracy"] == b["accuracy"] > 0.9 and a["loss"] == pytest.approx(b["loss"])
    # daskdl.predict from the run, and from its checkpoint folder
    from_run = daskdl.predict(run, test, output="logits").compute()
    np.testing.assert_allclose(np.asarray(from_run), expected, rtol=1e-4, atol=1e-4)


def test_python_predict_from_a_checkpoint_applies_its_statistics(client, python_run, tmp_path):
    _, train, test, frame = python_run
    run = daskdl.fit(client, "mlp", train.standardize(), out=tmp_path / "r", **QUICK)
    X = test.X.compute()
    expected = _reference(run, train, X)
    got = daskdl.predict(tmp_path / "r", test, output="logits", client=client).compute()
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-4)
    manifest = json.loads(
        next((tmp_path / "r" / "checkpoints").glob("*/manifest.json")).read_text()
    )
    assert manifest["features"] == FEATURES and len(manifest["standardize"]["mean"]) == 6


def test_another_column_order_is_reordered_a_missing_column_refused(client, python_run, caplog):
    run, train, test, frame = python_run
    X = test.X.compute()
    expected = _reference(run, train, X).argmax(1)
    ddf = dd.from_pandas(frame, npartitions=4)  # as python_run split it
    reordered = Dataset.from_dataframe(ddf, FEATURES[::-1], "label").split(0.25, seed=0)[1]
    np.testing.assert_array_equal(np.asarray(run.predict(reordered).compute()).ravel(), expected)
    extra = Dataset.from_dataframe(ddf.assign(g=1.0), [*FEATURES, "g"], "label")
    extra = extra.split(0.25, seed=0)[1]
    with caplog.at_level("WARNING", logger="daskdl.data.inputs"):
        got = np.asarray(run.predict(extra).compute()).ravel()
    np.testing.assert_array_equal(got, expected)
    assert "left out: ['g']" in caplog.text
    fewer = Dataset.from_dataframe(ddf, FEATURES[:5], "label")
    with pytest.raises(ValueError, match="data has no column 'f', which the model was trained"):
        run.predict(fewer)


def test_other_statistics_are_refused_naming_both(client, python_run):
    run, train, test, _ = python_run
    with pytest.raises(ValueError, match=r"standardised with other statistics.*mean \[.*against"):
        run.predict(test.standardize())  # the test set's own statistics
    raw_run = daskdl.fit(client, "mlp", train, **{**QUICK, "epochs": 1, "lr": 1e-5})
    with pytest.raises(ValueError, match="trained on features as they were read"):
        raw_run.predict(test.standardize(like=train))


def test_nan_features_are_refused_or_propagated(client, python_run):
    run, train, test, frame = python_run
    X = np.asarray(test.X.compute())
    X[3, 1], X[7, 4] = np.nan, np.inf
    data = Dataset.from_numpy(X, np.zeros(len(X), np.int64), chunks=50)
    with pytest.raises(ValueError, match=r"Partition 0 of the data has 2 samples with NaN"):
        run.predict(data).compute()
    labels = run.predict(data, on_nan="propagate").compute()
    proba = run.predict(data, output="proba", on_nan="propagate").compute()
    assert labels[3] == labels[7] == -1 and (labels[np.r_[0:3, 8:20]] >= 0).all()
    assert np.isnan(proba[[3, 7]]).all() and np.isfinite(proba[:3]).all()
    with pytest.raises(ValueError, match=r"on_nan must be one of \['raise', 'propagate'\]"):
        run.predict(data, on_nan="skip")


def test_a_launch_checkpoint_predicts_with_model_and_wrong_weights_are_named(
    client, tmp_path, no_signing_keys
):
    X, y = blobs(n=400, d=6, classes=3)
    data = Dataset.from_numpy(X, y, chunks=100)

    def net():
        return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))

    def loop(ctx):
        torch.manual_seed(0)
        model = ctx.prepare(net())
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for epoch in range(2):
            for xb, yb in ctx.batches("train", batch_size=32, epoch=epoch):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(xb), yb).backward()
                opt.step()
            ctx.checkpoint(epoch, model, opt)
        return {k: v.numpy() for k, v in model.state_dict().items()}

    run = daskdl.launch(client, loop, {"train": data}, out=tmp_path / "loop", progress=False)
    weights = run.result
    model = net()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    got = daskdl.predict(tmp_path / "loop", data.X, model=net, client=client).compute()
    np.testing.assert_allclose(got, _outputs(model, X), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="a launch\\(\\) loop, whose model is the loop's own"):
        daskdl.predict(tmp_path / "loop", data.X, client=client)

    def wider():
        return torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))

    with pytest.raises(
        ValueError, match=r"does not fit the model.*0.weight \(16, 6\) vs \(32, 6\)"
    ):
        daskdl.predict(tmp_path / "loop", data.X, model=wider, client=client)


def test_a_single_file_trains_on_two_workers(client, tmp_path):
    """One Parquet file is one partition: it is cut into one per rank, not refused."""
    frame = _frame(n=600, seed=2)
    frame.to_parquet(tmp_path / "one.parquet")  # a single file, a single row group
    out = tmp_path / "run"
    done = _cli(
        "train", "--data", str(tmp_path / "one.parquet"), "--label", "label", "--model", "mlp",
        "--epochs", "3", "--out", str(out), "--no-progress", "--scheduler",
        client.scheduler.address,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2 and config["n_train"] == 480  # 600 less 20% held out
    # A dataframe of one partition from Python, and one with empty partitions besides.
    ds = Dataset.from_dataframe(dd.from_pandas(frame, npartitions=1), FEATURES, "label")
    run = daskdl.fit(client, "mlp", ds.standardize(), **QUICK)
    assert run.info["world_size"] == 2 and run.history["train_loss"].iloc[-1] < 1.0


def test_a_dataframe_predicts_by_its_column_names_and_a_wrong_width_is_named(client, python_run):
    run, train, test, frame = python_run
    expected = _reference(run, train, frame[FEATURES].to_numpy(np.float32)).argmax(1)
    shuffled = frame[["label", *FEATURES[::-1]]]  # the label and another order: by name
    for given in (shuffled, dd.from_pandas(shuffled, npartitions=3)):
        got = run.predict(given).compute()
        assert list(got.columns) == ["prediction"] and got.index.equals(frame.index)
        np.testing.assert_array_equal(got["prediction"].to_numpy(), expected)
    with pytest.raises(ValueError, match=r"data has samples of shape \(3,\), but the model"):
        run.predict(da.from_array(frame[FEATURES[:3]].to_numpy(np.float32)))
    with pytest.raises(ValueError, match=r"features: \['f'\] is not a column"):
        run.predict(frame.drop(columns=["f"]))


def test_python_predicts_a_dask_written_parquet_folder_with_its_index(client, parquet, cli_run):
    """The Dataset's index comes in the partitions of its rows (Dask joins small Parquet
    files when it reads only some columns), empty partitions and unknown divisions too."""
    path, frame = parquet
    model, manifest = _checkpoint_model(cli_run)
    data = sources.read(path, "label")
    got = daskdl.predict(cli_run, data, output="logits", client=client).compute()
    expected = _outputs(model, _by_hand(manifest["standardize"], frame[FEATURES].to_numpy()))
    assert got.index.equals(frame.index) and len(got) == len(frame)
    np.testing.assert_allclose(got.to_numpy(), expected, rtol=1e-4, atol=1e-4)
