"""Any target: regression, multi-label and multi-output data; losses and metrics of the user's
choosing; every metric combined exactly over uneven shards."""

from __future__ import annotations

import sys

import cloudpickle
import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from sklearn import metrics as skm
from sklearn.datasets import load_diabetes, load_digits, make_friedman1
from sklearn.linear_model import LinearRegression
from torchmetrics.classification import MulticlassAUROC, MulticlassF1Score

import daskdl
from daskdl import Dataset
from daskdl.checkpoint import files as checkpoint

# The losses below run on the workers, which cannot import this test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def three_workers():
    with daskdl.local_cluster(n_workers=3, threads_per_worker=1) as c:
        yield c


def _uneven(X, y, sizes, **kwargs) -> Dataset:
    """A data set whose partitions hold ``sizes`` samples: shards of different sizes."""
    X = da.from_array(np.asarray(X, dtype=np.float32), chunks=(tuple(sizes), -1))
    y = da.from_array(np.asarray(y), chunks=(tuple(sizes),) + tuple(-1 for _ in y.shape[1:]))
    return Dataset.from_dask(X, y, **kwargs)


def _outputs(run, X) -> torch.Tensor:
    with torch.no_grad():
        return run.model(torch.from_numpy(np.asarray(X, dtype=np.float32)))


def _assert_close(reported: dict, expected: dict, rtol=1e-5):
    for name, want in expected.items():
        assert reported[name] == pytest.approx(want, rel=rtol, abs=1e-6), name


def _history(run) -> dict:
    last = run.history.iloc[-1]
    return {k[len("val_") :]: last[k] for k in last.index if k.startswith("val_")}


def test_regression_on_a_dataframe_reaches_r2_090_in_the_targets_units(client):
    """make_friedman1 (20,000 samples, noise 1.0) from a Dask dataframe, on 2 workers."""
    X, y = make_friedman1(20_000, noise=1.0, random_state=0)
    frame = pd.DataFrame(X, columns=[f"x{i}" for i in range(10)]).assign(price=y)
    ddf = dd.from_pandas(frame, npartitions=8)
    data = Dataset.from_dataframe(ddf, features=[f"x{i}" for i in range(10)], label="price")
    assert data.task == "regression" and data.n_outputs == 1
    train, test = data.split(0.2, seed=0)
    train, test = train.standardize(), test.standardize(like=train)
    run = daskdl.fit(
        client, "mlp", train, val=test, epochs=10, optimizer="adamw", lr=3e-3,
        weight_decay=0.0, batch_size=64, progress=False,
    )  # fmt: skip
    assert {"val_loss", "val_mae", "val_rmse", "val_r2"} <= set(run.history.columns)
    assert "train_accuracy" not in run.history and "val_accuracy" not in run.history
    scores = run.evaluate(test)
    assert set(scores) == {"loss", "mae", "rmse", "r2"}
    assert scores["r2"] >= 0.90
    # In the targets' own units: the model's standardised outputs are scaled back.
    scale = daskdl.runs.run.target_scale(client, train)
    (X_test, y_std) = test.compute()
    y_test = y_std * scale.std[0] + scale.mean[0]
    predicted = _outputs(run, X_test).squeeze(1).numpy() * scale.std[0] + scale.mean[0]
    _assert_close(
        scores,
        {
            "r2": skm.r2_score(y_test, predicted),
            "mae": skm.mean_absolute_error(y_test, predicted),
            "rmse": skm.root_mean_squared_error(y_test, predicted),
        },
        rtol=1e-4,
    )
    assert scores["rmse"] > 0.5  # noise 1.0 in the target's units: not standardised units


def test_regression_matches_linear_regression_on_diabetes(client):
    X, y = load_diabetes(return_X_y=True)
    train, test = Dataset.from_numpy(X, y, chunks=111).split(0.2, seed=0)
    (X_train, y_train), (X_test, y_test) = train.compute(), test.compute()
    reference = skm.r2_score(y_test, LinearRegression().fit(X_train, y_train).predict(X_test))
    train, test = train.standardize(), test.standardize(like=train)
    run = daskdl.fit(
        client, "mlp", train, val=test, epochs=8, optimizer="adamw", lr=2e-3,
        weight_decay=0.1, progress=False,
    )  # fmt: skip
    assert run.evaluate(test)["r2"] >= reference - 0.05


def _multilabel_data(n=1200, k=4, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 8)).astype(np.float32)
    W = rng.normal(size=(8, k))
    y = (X @ W + 0.3 * rng.normal(size=(n, k)) > 0).astype(np.int64)
    return X, y


def _reference_multilabel(logits, y) -> dict:
    predicted = (torch.sigmoid(logits) > 0.5).numpy().astype(int)
    macro = {"average": "macro", "zero_division": 0}
    return {
        "accuracy": (predicted == y).mean(),
        "exact_match": (predicted == y).all(1).mean(),
        "f1": skm.f1_score(y, predicted, **macro),
        "precision": skm.precision_score(y, predicted, **macro),
        "recall": skm.recall_score(y, predicted, **macro),
        "loss": F.binary_cross_entropy_with_logits(logits, torch.from_numpy(y).float()).item(),
    }


def _reference_classification(logits, y) -> dict:
    predicted = logits.argmax(1).numpy()
    macro = {"average": "macro", "zero_division": 0}
    return {
        "accuracy": skm.accuracy_score(y, predicted),
        "top5": skm.top_k_accuracy_score(y, logits.numpy(), k=5, labels=np.arange(10)),
        "f1": skm.f1_score(y, predicted, **macro),
        "precision": skm.precision_score(y, predicted, **macro),
        "recall": skm.recall_score(y, predicted, **macro),
        "loss": F.cross_entropy(logits, torch.from_numpy(y)).item(),
    }


def _regression_data():
    X, y1 = make_friedman1(1500, noise=0.5, random_state=1)
    y = np.stack([y1, X[:, 0] * 3 - X[:, 1] ** 2], axis=1)  # two targets of other scales
    return X, y


@pytest.mark.parametrize("n_ranks", [1, 3])
@pytest.mark.parametrize("task", ["classification", "multilabel", "regression"])
def test_every_builtin_metric_equals_its_one_process_value(three_workers, n_ranks, task):
    """Uneven shards (validation partitions of 50, 110 and 200 samples on 3 ranks): each
    metric's state is combined over the ranks, never its value averaged."""
    val_sizes = [50, 110, 200]
    if task == "classification":
        X, y = load_digits(return_X_y=True)
        X = (X / 16.0).astype(np.float32)
        names = ["accuracy", "top5", "f1", "precision", "recall"]
    elif task == "multilabel":
        X, y = _multilabel_data()
        names = ["accuracy", "exact_match", "f1", "precision", "recall"]
    else:
        X, y = _regression_data()
        names = ["mae", "mse", "rmse", "r2"]
    n_val = sum(val_sizes)
    rest = len(X) - n_val
    train_sizes = [rest // 4, rest // 4, rest - 2 * (rest // 4)]
    train = _uneven(X[n_val:], y[n_val:], train_sizes)
    val = _uneven(X[:n_val], y[:n_val], val_sizes)
    assert train.task == task
    if task == "regression":
        train, val = train.standardize(), val.standardize(like=train)
    run = daskdl.fit(
        three_workers, "mlp", train, val=val, metrics=names, epochs=1, batch_size=32,
        lr=0.02, workers=n_ranks, progress=False,
    )  # fmt: skip
    assert len(run.workers) == n_ranks
    X_val, y_val = val.X.compute(), y[:n_val]  # features standardised, targets as they were
    logits = _outputs(run, X_val)
    if task == "classification":
        expected = _reference_classification(logits, y_val)
    elif task == "multilabel":
        expected = _reference_multilabel(logits, y_val)
    else:
        scale = daskdl.runs.run.target_scale(three_workers, train)
        mean, std = np.asarray(scale.mean), np.asarray(scale.std)
        predicted = logits.numpy() * std + mean
        expected = {
            "mae": skm.mean_absolute_error(y_val, predicted),
            "mse": skm.mean_squared_error(y_val, predicted),
            "rmse": np.sqrt(skm.mean_squared_error(y_val, predicted)),
            "r2": skm.r2_score(y_val, predicted),  # the mean over the two targets
            "loss": F.mse_loss(logits, torch.from_numpy((y_val - mean) / std).float()).item(),
        }
    _assert_close(_history(run), expected)
    _assert_close(run.evaluate(val), expected)


def test_a_torchmetrics_metric_and_one_with_list_states(client):
    """torchmetrics objects as metrics: macro F1, and AUROC, whose state is every prediction
    (a list, concatenated over the ranks, not summed)."""
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    train = _uneven(X[400:], y[400:], [500, 400, 497])
    val = _uneven(X[:400], y[:400], [120, 280])
    run = daskdl.fit(
        client, "mlp", train, val=val, epochs=2, lr=0.05, progress=False,
        metrics={"f1": MulticlassF1Score(10, average="macro"), "auroc": MulticlassAUROC(10)},
    )  # fmt: skip
    logits = _outputs(run, X[:400])
    expected = {
        "f1": skm.f1_score(y[:400], logits.argmax(1).numpy(), average="macro"),
        "auroc": skm.roc_auc_score(y[:400], logits.softmax(1).numpy(), multi_class="ovr"),
    }
    _assert_close(_history(run), expected, rtol=1e-4)
    _assert_close(run.evaluate(val), expected, rtol=1e-4)


def _smooth_l1(outputs, targets):
    return F.smooth_l1_loss(outputs, targets, beta=0.5)


def test_a_user_loss_trains_multi_output_regression(client):
    X, y = _regression_data()
    frame = pd.DataFrame(X, columns=[f"x{i}" for i in range(10)]).assign(a=y[:, 0], b=y[:, 1])
    data = Dataset.from_dataframe(
        dd.from_pandas(frame, npartitions=4), [f"x{i}" for i in range(10)], label=["a", "b"]
    )
    assert data.task == "regression" and data.n_outputs == 2
    train, val = data.split(0.2, seed=0)
    train, val = train.standardize(), val.standardize(like=train)
    run = daskdl.fit(
        client, "mlp", train, val=val, loss=_smooth_l1, epochs=6, optimizer="adamw", lr=3e-3,
        progress=False,
    )  # fmt: skip
    assert run.info["loss"] == "_smooth_l1"
    history = run.history
    assert history["train_loss"].iloc[-1] < 0.5 * history["train_loss"].iloc[0]
    scores = run.evaluate(val)
    assert scores["r2"] > 0.8
    X_val, y_std = val.compute()
    outputs = _outputs(run, X_val)
    assert scores["loss"] == pytest.approx(
        _smooth_l1(outputs, torch.from_numpy(y_std)).item(), rel=1e-5
    )


def test_multilabel_training_and_its_checkpoint_record_the_task(client, tmp_path):
    X, y = _multilabel_data(2000, k=5)
    train, val = Dataset.from_numpy(X, y, chunks=400).split(0.2, seed=0)
    assert train.task == "multilabel" and train.n_outputs == 5
    run = daskdl.fit(
        client, "mlp", train, val=val, epochs=4, optimizer="adamw", lr=3e-3,
        out=tmp_path / "run", progress=False,
    )  # fmt: skip
    scores = run.evaluate(val)
    assert set(scores) == {"loss", "accuracy", "f1"}
    assert scores["accuracy"] > 0.85 and scores["f1"] > 0.8
    manifest = checkpoint.read_manifest(
        checkpoint.list_checkpoints(tmp_path / "run/checkpoints")[-1]
    )
    assert manifest["task"] == "multilabel" and manifest["n_outputs"] == 5
    assert manifest["loss"] == "bce" and manifest["metrics"] == ["accuracy", "f1"]
    # A checkpoint of one task does not resume another.
    regression = Dataset.from_numpy(X, y.astype(np.float32), chunks=400)
    with pytest.raises(ValueError, match="it learned multilabel, this run regression"):
        daskdl.fit(
            client, "mlp", regression, epochs=5, out=tmp_path / "run", resume=True,
            progress=False,
        )  # fmt: skip


def test_standardised_regression_targets_survive_save_and_load(client, tmp_path):
    X, y = _regression_data()
    train = Dataset.from_numpy(X, y, chunks=500).standardize()
    loaded = Dataset.load(train.save(tmp_path / "data"))
    assert loaded.task == "regression" and loaded.n_outputs == 2
    scale, again = (daskdl.runs.run.target_scale(client, d) for d in (train, loaded))
    np.testing.assert_allclose(again.mean, scale.mean, rtol=1e-6)
    np.testing.assert_allclose(again.std, scale.std, rtol=1e-6)
    np.testing.assert_allclose(loaded.y.compute(), train.y.compute(), rtol=1e-6)
