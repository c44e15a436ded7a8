"""The user's own data: files read lazily (Parquet, CSV, Zarr, netCDF, numpy, Dataset.save),
``daskdl train --data`` on each, and data sets published on the cluster."""

from __future__ import annotations

import re
import subprocess
import sys

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from sklearn.datasets import load_digits, make_friedman1

import daskdl
from daskdl import Dataset
from daskdl.data import sources

DASKDL = [sys.executable, "-m", "daskdl"]


def _digits_frame() -> pd.DataFrame:
    X, y = load_digits(return_X_y=True)
    frame = pd.DataFrame(X, columns=[f"p{i}" for i in range(64)])
    return frame.assign(digit=y, note="text columns are left out")


def _friedman(n=2000):
    X, y = make_friedman1(n, noise=0.5, random_state=0)
    return X.astype(np.float32), y


def _write(fmt: str, folder) -> tuple[str, list[str]]:
    """A data set in ``fmt`` under ``folder``; its path and the CLI's label flags."""
    if fmt == "parquet":
        dd.from_pandas(_digits_frame(), npartitions=4).to_parquet(folder / "digits")
        return str(folder / "digits"), ["--label", "digit"]
    if fmt == "csv":
        frame = _digits_frame()
        (folder / "csv").mkdir()
        for i, start in enumerate(range(0, len(frame), 600)):
            frame.iloc[start : start + 600].to_csv(folder / "csv" / f"p{i}.csv", index=False)
        return str(folder / "csv" / "*.csv"), ["--label", "digit"]
    X, y = _friedman()
    if fmt == "zarr":
        ds = xr.Dataset({"x": (("sample", "feature"), X), "price": (("sample",), y)}).chunk(
            {"sample": 500}
        )
        ds.to_zarr(folder / "houses.zarr")
        return str(folder / "houses.zarr"), ["--label", "price"]
    np.savez(folder / "houses.npz", X=X, y=y)
    return str(folder / "houses.npz"), []


@pytest.mark.integration
@pytest.mark.parametrize("fmt", ["parquet", "csv", "zarr", "npz"])
def test_train_on_your_own_files(tmp_path, fmt):
    path, label = _write(fmt, tmp_path)
    proc = subprocess.run(
        [*DASKDL, "train", "--data", path, *label, "--model", "mlp", "--workers", "2",
         "--epochs", "4", "--optimizer", "adamw", "--lr", "0.003", "--no-progress",
         "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    if fmt in ("parquet", "csv"):  # digits: a classifier
        assert float(re.search(r"val_accuracy=([0-9.]+)", last).group(1)) > 0.9, last
    else:  # house prices: a regression
        assert float(re.search(r"val_r2=([0-9.]+)", last).group(1)) > 0.7, last
    # The CLI says what happens to the run as it happens.
    assert "checkpoint epoch-0004 written" in proc.stderr


def test_read_finds_the_format_and_the_features(tmp_path):
    path, _ = _write("parquet", tmp_path)
    data = sources.read(path, "digit")
    assert data.task == "classification" and data.sample_shape == (64,)  # "note" left out
    X, y = _friedman(400)
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "y.npy", y)
    data = sources.read(tmp_path / "X.npy", str(tmp_path / "y.npy"))
    assert data.task == "regression" and len(data) == 400
    saved = Dataset.from_numpy(X, y, chunks=100).save(tmp_path / "saved")
    assert sources.read(saved).npartitions == 4
    xr.Dataset({"x": (("s", "f"), X), "t": (("s",), y)}).to_netcdf(tmp_path / "h.nc")
    data = sources.read(tmp_path / "h.nc", "t")
    np.testing.assert_allclose(data.X.compute(), X)


@pytest.mark.parametrize(
    "args, message",
    [
        (("nowhere.parquet", "y"), "nowhere.parquet does not exist"),
        (("data.txt", "y"), "Cannot tell the format of .*data.txt"),
    ],
)
def test_bad_paths_say_what_is_wrong(tmp_path, args, message):
    (tmp_path / "data.txt").write_text("1,2\n")
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        sources.read(tmp_path / args[0], args[1])


@pytest.mark.integration
def test_the_cli_refuses_mixed_sources(tmp_path):
    proc = subprocess.run(
        [*DASKDL, "train", "--data", "x.npz", "--dataset", "digits"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "Give --data (your own files) or --dataset (a built-in one), not both" in proc.stderr


def test_a_published_data_set_trains_from_another_client(client):
    train, val = daskdl.datasets.digits().split(0.2, seed=0)
    train, val = train.standardize(), val.standardize(like=train)
    daskdl.publish(client, "digits-prepared", train, val)
    try:
        with daskdl.cluster.connect(client.scheduler.address) as other:
            assert "digits-prepared" in sources.published(other)
            got_train, got_val = sources.get(other, "digits-prepared")
            assert got_train.task == "classification" and len(got_val) == len(val)
            run = daskdl.fit(other, "mlp", got_train, val=got_val, epochs=2, progress=False)
            assert run.history["val_accuracy"].iloc[-1] > 0.85
        with pytest.raises(KeyError, match="No data set 'nope' is published"):
            sources.get(client, "nope")
    finally:
        sources.unpublish(client, "digits-prepared")
