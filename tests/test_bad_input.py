"""Bad input gets an error that says what was wrong and how to fix it, and leaves the cluster
usable."""

from __future__ import annotations

import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

import daskdl
from daskdl import Dataset

X = np.random.default_rng(0).normal(size=(200, 4)).astype(np.float32)
y = np.arange(200) % 2


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: Dataset.from_numpy(X, y[:150]), ValueError, "200 samples but y has 150"),
        (lambda: Dataset.from_numpy(X.astype(str), y), TypeError, "X must hold real numbers"),
        (lambda: Dataset.from_numpy(X[:0], y[:0]), ValueError, "empty"),
        (
            lambda: Dataset.from_dask(da.from_array(X, chunks=(50, 2)), da.from_array(y)),
            ValueError,
            r"chunked along axis 1.*X.rechunk\(\{1: -1\}\)",
        ),
        (lambda: Dataset.from_numpy(X, y.astype(str)), TypeError, "integer class labels"),
        (lambda: Dataset.from_numpy(X, y, chunks=0), ValueError, "chunks must be a positive"),
        (lambda: Dataset.from_numpy(X[:, 0], y), ValueError, "reshape"),
        (
            lambda: Dataset.from_dataframe(
                dd.from_pandas(pd.DataFrame({"a": X[:, 0], "label": y}), npartitions=2),
                ["a", "b"],
                "label",
            ),
            KeyError,
            r"Columns \['b'\] are not in the dataframe",
        ),
        (
            lambda: Dataset.from_dataframe(
                dd.from_pandas(
                    pd.DataFrame({"a": X[:, 0], "label": np.where(y, "cat", "dog")}),
                    npartitions=2,
                ),
                ["a"],
                "label",
            ),
            TypeError,
            r"\.cat\.codes",
        ),
        (lambda: Dataset.from_numpy(X, y).split(1.5), ValueError, "test_size must be"),
        (lambda: daskdl.datasets.cifar10("/no/such/dir"), FileNotFoundError, "binary version"),
        (lambda: daskdl.datasets.load("imagenet"), ValueError, "Unknown dataset 'imagenet'"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_data(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_truncated_cifar_file(tmp_path):
    (tmp_path / "data_batch_1.bin").write_bytes(b"\0" * 5000)
    with pytest.raises(ValueError, match="not a whole number of 3073-byte"):
        daskdl.datasets.cifar10(tmp_path)


good = Dataset.from_numpy(X, y, chunks=50)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"epochs": 0}, ValueError, "epochs must be a positive integer"),
        ({"lr": -1}, ValueError, "lr must be a positive number"),
        ({"optimizer": "adam"}, ValueError, r"optimizer must be one of \('sgd', 'adamw'\)"),
        ({"precision": "fp16"}, ValueError, "precision must be one of"),
        ({"batch_size": 120}, ValueError, "batch_size=120 is larger than rank"),
        ({"workers": 5}, ValueError, "workers=5, but the cluster has 2 workers"),
        ({"model": "resnet50"}, ValueError, "Unknown model 'resnet50'"),
        ({"model": "small_cnn"}, ValueError, "small_cnn needs images"),
        ({"augment": True}, ValueError, "augment=True needs images"),
        ({"train": X}, TypeError, "train must be a daskdl.Dataset"),
        ({"val": Dataset.from_numpy(X[:, :3], y)}, ValueError, r"val has samples of shape \(3,\)"),
        (
            {"train": Dataset.from_numpy(X, y, chunks=200)},
            ValueError,
            "1 partitions for 2 ranks",
        ),
        (
            {"train": Dataset.from_numpy(X, np.where(y, 5, 0), n_classes=3)},
            ValueError,
            r"Labels must be in \[0, 3\) but range over \[0, 5\]",
        ),
        (
            {"train": Dataset.from_numpy(X, y - 1, chunks=50)},
            ValueError,
            r"Labels must be in \[0, 2\) but range over \[-1, 0\]",
        ),
        (
            {"train": Dataset.from_numpy(X, y + 0.5, chunks=50)},
            ValueError,
            "200 non-integer values",
        ),
        (
            {"train": Dataset.from_numpy(np.where(X > 2, np.nan, X), y, chunks=50)},
            ValueError,
            r"NaN or infinite values.*dropna",
        ),
        ({"resume": "/no/such/run"}, Exception, "No checkpoint in '/no/such/run'"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_fit_arguments(client, kwargs, error, message):
    args = {"model": "mlp", "train": good, "epochs": 1, "batch_size": 16, "progress": False}
    args.update(kwargs)
    model, train = args.pop("model"), args.pop("train")
    with pytest.raises(error, match=message):
        daskdl.fit(client, model, train, **args)


def test_client_must_be_a_client():
    with pytest.raises(TypeError, match="needs a distributed.Client.*local_cluster"):
        daskdl.fit("tcp://127.0.0.1:8786", "mlp", good)


def test_the_cluster_still_trains_after_bad_input(client):
    run = daskdl.fit(client, "mlp", good, val=good, epochs=1, batch_size=16, progress=False)
    assert run.status == "finished"
    assert not client.processing() or not any(client.processing().values())
