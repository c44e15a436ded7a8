"""Bad input gets an error that says what was wrong and how to fix it, and leaves the cluster
usable."""

from __future__ import annotations

import dask
import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
import torch
from distributed import Client

import daskdl
from daskdl import Dataset
from daskdl.cluster import workers_info
from daskdl.collectives import comm

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
        (lambda: Dataset.from_numpy(X, y.astype(str)), TypeError, "y must hold numbers"),
        (lambda: Dataset.from_numpy(X, y, chunks=0), ValueError, "chunks must be a positive"),
        (lambda: Dataset.from_numpy(X[:, 0], y), ValueError, "reshape"),
        (
            lambda: Dataset.from_numpy(X, y[:, None]),
            ValueError,
            r"got shape \(200, 1\): use y.ravel",
        ),
        (
            lambda: Dataset.from_dataframe(
                dd.from_pandas(pd.DataFrame({"a": X[:, 0], "label": y}), npartitions=2),
                ["a", "b"],
                "label",
            ),
            ValueError,
            r"features: \['b'\] is not a column of the data \(--features on the command line\)",
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
        (lambda: Dataset.from_numpy(X, y).split("0.2"), ValueError, "test_size must be a fraction"),
        (lambda: Dataset.from_numpy(X, y).split(0.2, seed=-1), ValueError, "seed must be an int"),
        (
            lambda: Dataset.from_numpy(X, y, chunks=5).split(0.05),
            ValueError,
            r"split\(test_size=0.05\) leaves the test set empty.*partitions hold \[5\] samples",
        ),
        (
            lambda: Dataset.from_numpy(X, y).standardize(like=X),
            TypeError,
            "like must be a daskdl.Dataset",
        ),
        (
            lambda: Dataset.from_numpy(X, y, n_classes=1),
            ValueError,
            "n_classes must be an integer >= 2",
        ),
        (
            lambda: Dataset.from_numpy(X, y, n_classes=3.0),
            ValueError,
            r"n_classes must be an integer, got 3.0. Pass n_classes=3.",
        ),
        (lambda: daskdl.datasets.cifar10("/no/such/dir"), FileNotFoundError, "binary version"),
        (lambda: daskdl.datasets.load("imagenet"), ValueError, "Unknown dataset 'imagenet'"),
        (
            lambda: Dataset.from_numpy(X, y + 0.5, n_classes=2, task="regression"),
            ValueError,
            r"n_classes is for classification; this data set's task is 'regression'",
        ),
        (
            lambda: Dataset.from_numpy(X, y, task="multilabel"),
            ValueError,
            r"task='multilabel' needs y of shape \(n, k\)",
        ),
        (
            lambda: Dataset.from_numpy(X, y, task="clustering"),
            ValueError,
            r"task must be one of \('classification', 'regression', 'multilabel'\)",
        ),
        (
            lambda: Dataset.from_dataframe(
                dd.from_pandas(pd.DataFrame({"a": X[:, 0], "b": y}), npartitions=2),
                ["a", "b"],
                ["b"],
            ),
            ValueError,
            r"Columns \['b'\] are both features and labels",
        ),
        (
            lambda: Dataset.from_numpy(X, y + 0.5).standardize().standardize(),
            ValueError,
            r"This data set is standardised already",
        ),
        (
            lambda: Dataset.from_numpy(X, y).standardize().split(0.5)[1].standardize(),
            ValueError,
            r"This data set is standardised already",
        ),
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


def _not_a_scalar_loss(outputs, targets):
    return torch.nn.functional.cross_entropy(outputs, targets, reduction="none")


def _detached_loss(outputs, targets):
    return torch.nn.functional.cross_entropy(outputs, targets).detach()


def _one_output(input_shape, n_outputs):
    return torch.nn.Linear(input_shape[0], 3)


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
            {"train": Dataset.from_numpy(X, y, chunks=200), "stream": True},
            ValueError,
            r"has 1 non-empty partitions \(1 in all\) for 2 ranks.*--workers 1",
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
            {"train": Dataset.from_numpy(X, y + 0.5, chunks=50, task="classification")},
            ValueError,
            "200 non-integer",
        ),
        (
            {"train": Dataset.from_numpy(np.where(X > 2, np.nan, X), y, chunks=50)},
            ValueError,
            r"NaN or infinite values.*dropna",
        ),
        ({"resume": "/no/such/run"}, Exception, "No checkpoint in '/no/such/run'"),
        # Numbers: type, range and finiteness, checked once (TrainConfig).
        ({"comm_timeout": float("nan")}, ValueError, "comm_timeout must be a positive number"),
        ({"comm_timeout": float("inf")}, ValueError, "comm_timeout must be a positive number"),
        ({"comm_timeout": "60s"}, ValueError, "comm_timeout must be a number, got '60s'"),
        ({"lr": float("nan")}, ValueError, "lr must be a positive number, got nan"),
        ({"lr": float("inf")}, ValueError, "lr must be a positive number, got inf"),
        ({"momentum": 1.0}, ValueError, r"momentum must be in \[0, 1\), got 1.0"),
        ({"weight_decay": float("nan")}, ValueError, "weight_decay must be >= 0, got nan"),
        ({"warmup_epochs": 2}, ValueError, r"warmup_epochs must be in \[0, 1\]"),
        ({"bucket_mb": 0}, ValueError, "bucket_mb must be a positive number"),
        ({"outer_lr": float("nan")}, ValueError, "outer_lr must be a positive number"),
        ({"batch_size": 1.5}, ValueError, "batch_size must be an integer, got 1.5"),
        ({"batch_size": 16.0}, ValueError, "batch_size must be an integer, got 16.0. Pass"),
        ({"epochs": True}, ValueError, "epochs must be an integer, got True"),
        ({"seed": -1}, ValueError, "seed must be an integer >= 0, got -1"),
        ({"seed": 2**70}, ValueError, "seed must be below 2\\*\\*63"),
        ({"out": ""}, ValueError, "out='' names no folder"),
        ({"torch_threads": 0}, ValueError, "torch_threads must be a positive integer"),
        ({"checkpoint_every": 0}, ValueError, "checkpoint_every must be a positive integer"),
        ({"sync_every": 0}, ValueError, "sync_every must be a positive integer"),
        ({"shuffle": "no"}, ValueError, "shuffle must be True or False, got 'no'"),
        ({"augment": 1}, ValueError, r"augment must be True, False or None \(automatic\)"),
        ({"max_failures": -1}, ValueError, "max_failures must be an integer >= 0"),
        ({"max_failures": 1.0}, ValueError, "max_failures must be an integer, got 1.0"),
        ({"on_nonfinite": "ignore"}, ValueError, "on_nonfinite must be one of"),
        ({"wire_dtype": "fp16"}, ValueError, "wire_dtype must be one of"),
        ({"backend": "nccl"}, ValueError, "backend must be one of"),
        ({"schedule": "linear"}, ValueError, "schedule must be one of"),
        # Workers, in the forms Python users pass them.
        ({"workers": 0}, ValueError, "workers must be a positive integer, got 0"),
        ({"workers": 2.0}, ValueError, r"workers must be an integer, got 2.0. Pass workers=2"),
        ({"workers": []}, ValueError, r"workers=\[\] names no worker"),
        ({"workers": "tcp://127.0.0.1:1"}, ValueError, r"Workers \['tcp://127.0.0.1:1'\] are"),
        ({"workers": [1, 2]}, TypeError, "workers must be a count or a list of worker addr"),
        # Run folders and resume, in the forms Python users pass them.
        ({"resume": True}, ValueError, "resume=True continues the run in out=, but out is not"),
        ({"resume": 3}, TypeError, "resume must be a folder path, got int"),
        ({"overwrite": True}, ValueError, "overwrite=True replaces the run in out=, but out is"),
        ({"out": "/dev/null"}, NotADirectoryError, "out='/dev/null' is a file, not a folder"),
        ({"out": "/dev/null/run"}, OSError, "cannot write the run folder '/dev/null/run'"),
        ({"meta": {"when": object()}}, TypeError, "meta must be JSON-able"),
        ({"meta": ["cifar"]}, TypeError, "meta must be a dict of JSON-able facts, got list"),
        ({"progress": "no"}, ValueError, "progress must be True or False, got 'no'"),
        ({"block": None}, ValueError, "block must be True or False, got None"),
        # Targets.
        (
            {"train": Dataset.from_numpy(X, 1000 + 997 * np.arange(200), chunks=50)},
            ValueError,
            r"look like regression targets.*\[1000, 199403\].*199,404 classes for 200 samples",
        ),
        (
            {"train": Dataset.from_numpy(X, np.full(200, 10**9), chunks=50)},
            ValueError,
            r"look like regression targets.*1,000,000,001 classes",
        ),
        (
            {"train": Dataset.from_numpy(X, np.where(y, np.nan, 0), chunks=50, n_classes=2)},
            ValueError,
            r"The train labels contain 100 non-integer \(or NaN\) values",
        ),
        (
            {"train": Dataset.from_numpy(X, np.where(y, np.nan, 0.5), chunks=50)},
            ValueError,
            r"The train regression targets contain 100 NaN or infinite values.*dropna",
        ),
        (
            {"train": Dataset.from_numpy(X, np.stack([y, 2 * y], 1), chunks=50)},
            ValueError,
            r"labels are multi-hot.*every value must be 0 or 1; they range over \[0, 2\]",
        ),
        (
            {"train": Dataset.from_numpy(X, y, chunks=50), "loss": "mse"},
            ValueError,
            r"loss='mse' does not suit task='classification'",
        ),
        (
            {"train": Dataset.from_numpy(X, y, chunks=50), "loss": "hinge"},
            ValueError,
            r"loss must be one of \['bce', 'cross_entropy', 'huber', 'l1', 'mse'\]",
        ),
        (
            {"train": Dataset.from_numpy(X, y, chunks=50), "metrics": ["r2"]},
            ValueError,
            r"Unknown metric 'r2' for task='classification'; built-in ones are \['accuracy'",
        ),
        (
            {"train": Dataset.from_numpy(X, y, chunks=50), "metrics": ["top5"]},
            ValueError,
            r"top5 needs at least 5 classes; the data have 2",
        ),
        (
            {"train": Dataset.from_numpy(X, y, chunks=50), "metrics": [len]},
            TypeError,
            r"Metric 'builtin_function_or_method' is a builtin_function_or_method; give a",
        ),
        (
            {"train": Dataset.from_numpy(X, y, chunks=50), "loss": _not_a_scalar_loss},
            ValueError,
            r"The loss _not_a_scalar_loss returned shape \(8,\); it must return one",
        ),
        (
            {"train": Dataset.from_numpy(X, y, chunks=50), "loss": _detached_loss},
            ValueError,
            r"The loss _detached_loss returned a tensor without a gradient",
        ),
        (
            {"train": Dataset.from_numpy(X, y.astype(float)), "model": _one_output},
            ValueError,
            r"gives 3 outputs per sample, but the data have 1 regression targets",
        ),
        (
            {"val": Dataset.from_numpy(np.where(X > 2, np.inf, X), y, chunks=50)},
            ValueError,
            "The val features contain",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_fit_arguments(client, no_rank_may_start, kwargs, error, message):
    args = {"model": "mlp", "train": good, "epochs": 1, "batch_size": 16, "progress": False}
    args.update(kwargs)
    model, train = args.pop("model"), args.pop("train")
    with pytest.raises(error, match=message):
        daskdl.fit(client, model, train, **args)


def test_numbers_of_any_numeric_type_are_accepted(client):
    """numpy scalars (from a grid or an array) are options like any other number, and are
    kept as plain Python numbers (the config is JSON in events and checkpoints)."""
    run = daskdl.fit(
        client,
        "mlp",
        Dataset.from_numpy(X, y, chunks=np.int64(50), n_classes=np.int64(2)),
        epochs=np.int64(1),
        batch_size=np.int32(16),
        lr=np.float32(0.05),
        momentum=np.float64(0.9),
        shuffle=np.bool_(True),
        workers=np.int64(2),
        max_failures=np.int64(1),
        progress=False,
    )
    config = run.info["config"]
    assert config["batch_size"] == 16 and type(config["batch_size"]) is int
    assert type(config["lr"]) is float and type(config["shuffle"]) is bool
    assert run.status == "finished" and len(run.workers) == 2
    assert type(run.info["n_classes"]) is int


def test_one_worker_address_as_a_string_is_that_worker(client):
    address = sorted(workers_info(client))[1]
    run = daskdl.fit(client, "mlp", good, workers=address, epochs=1, batch_size=16, progress=False)
    assert run.workers == [address]


def test_a_worker_listed_twice_is_refused_at_once(client, no_rank_may_start):
    address = sorted(workers_info(client))[0]
    with pytest.raises(ValueError, match=r"workers lists \['tcp://.*'\] more than once"):
        daskdl.fit(client, "mlp", good, workers=[address, address], progress=False)


def test_a_nan_timeout_never_hangs_the_cluster(client):
    """The NaN timeout used to make a rank wait for ever one try in five, and every later fit
    on the cluster with it: now it is refused at once, every time, and the cluster trains."""
    for _ in range(10):
        with pytest.raises(ValueError, match="comm_timeout must be a positive number"):
            daskdl.fit(client, "mlp", good, comm_timeout=float("nan"), progress=False)
    with dask.config.set({"daskdl.comm-timeout": float("nan")}):  # the configured default too
        with pytest.raises(ValueError, match="daskdl.comm-timeout is nan in the Dask config"):
            daskdl.fit(client, "mlp", good, progress=False)
    with dask.config.set({"daskdl.comm-timeout": "soon"}):
        with pytest.raises(ValueError, match="daskdl.comm-timeout is 'soon' in the Dask config"):
            daskdl.fit(client, "mlp", good, progress=False)
    run = daskdl.fit(client, "mlp", good, epochs=1, batch_size=16, progress=False)
    assert run.status == "finished"


def test_a_wait_with_a_nan_or_infinite_deadline_is_refused():
    box = comm.Mailbox()
    for timeout in (float("nan"), float("inf"), 0, -1):
        with pytest.raises(ValueError, match="timeout must be finite seconds > 0"):
            box.take("tag", timeout, lambda: "peer")


@pytest.mark.parametrize(
    "data, kwargs, message",
    [
        (
            Dataset.from_numpy(X, y + 0.5, chunks=50, task="classification"),
            {},
            "The data labels contain 200 non-integer",
        ),
        (
            Dataset.from_numpy(X, y + 0.5, chunks=50),
            {},
            "data is a regression data set, but the model learns classification",
        ),
        (
            Dataset.from_numpy(np.where(X > 2, np.nan, X), y, chunks=50),
            {},
            r"The data features contain \d+ NaN or infinite values.*dropna",
        ),
        (
            Dataset.from_numpy(X, np.where(y, 11, 0), chunks=50),
            {},
            r"Labels must be in \[0, 2\) but range over \[0, 11\]",
        ),
        (good, {"batch_size": 0}, "batch_size must be a positive integer, got 0"),
        (good, {"batch_size": 2.5}, "batch_size must be an integer, got 2.5"),
        (X, {}, "data must be a daskdl.Dataset"),
        (Dataset.from_numpy(X[:, :3], y), {}, r"data has samples of shape \(3,\)"),
    ],
    ids=["fractional", "task", "nan", "beyond-classes", "batch-0", "batch-float", "array", "shape"],
)
def test_evaluate_checks_its_data_as_fit_does(client, trained, data, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        trained.evaluate(data, **kwargs)


@pytest.fixture(scope="module")
def trained(client):
    """A finished run on two classes, to evaluate."""
    data = Dataset.from_numpy(X, y, chunks=50)
    return daskdl.fit(client, "mlp", data, epochs=1, batch_size=16, progress=False)


def test_evaluate_scores_good_data_after_bad(trained):
    assert 0 <= trained.evaluate(good)["accuracy"] <= 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_workers": 0}, "n_workers must be a positive integer, got 0"),
        ({"n_workers": -2}, "n_workers must be a positive integer, got -2"),
        ({"n_workers": 1.5}, "n_workers must be an integer, got 1.5"),
        ({"n_workers": 1, "threads_per_worker": 0}, "threads_per_worker must be a positive"),
        ({"gpus": True, "n_workers": 2}, "a GPU cluster has one worker per GPU"),
        ({"n_workers": 1, "dashboard_address": "nope"}, "dashboard_address must be 'host:port'"),
        ({"n_workers": 1, "memory_limit": "lots"}, "Could not interpret 'lots' as a byte unit"),
    ],
)
def test_impossible_clusters_are_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        daskdl.local_cluster(**kwargs)


def test_client_must_be_a_client():
    with pytest.raises(TypeError, match="needs a distributed.Client.*local_cluster"):
        daskdl.fit("tcp://127.0.0.1:8786", "mlp", good)


def test_the_cluster_still_trains_after_bad_input(client):
    run = daskdl.fit(client, "mlp", good, val=good, epochs=1, batch_size=16, progress=False)
    assert run.status == "finished"
    assert not client.processing() or not any(client.processing().values())


def test_a_closed_client_is_refused_with_the_fix(client):
    closed = Client(client.scheduler.address)
    closed.close()
    with pytest.raises(RuntimeError, match="fit was given a closed client. Start a new one"):
        daskdl.fit(closed, "mlp", good, progress=False)


def test_boolean_labels_are_classes_0_and_1(client):
    data = Dataset.from_numpy(X, y.astype(bool), chunks=50)
    assert data.y.dtype == np.int64
    run = daskdl.fit(client, "mlp", data, epochs=1, batch_size=16, progress=False)
    assert run.spec["objective"].n_outputs == 2
