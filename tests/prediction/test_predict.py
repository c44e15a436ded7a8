"""Prediction over partitioned data: ``Run.predict`` and ``daskdl.predict`` give the plain
model's outputs, in order, one block per partition, with the weights sent once per worker."""

from __future__ import annotations

import json
import warnings

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
import torch

import daskdl
from daskdl import Dataset
from daskdl.worker.extension import manager
from tests.training.test_fit import QUICK, blobs

QUIET = {"progress": False}


def _outputs(model: torch.nn.Module, X: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(X, np.float32)))


@pytest.fixture(scope="module")
def classifier(client):
    X, y = blobs(n=800, d=6, classes=3)
    train = Dataset.from_numpy(X[:600], y[:600], chunks=150)
    run = daskdl.fit(client, "mlp", train, **QUICK)
    return run, X[600:]


def test_a_classifier_predicts_what_its_model_computes(client, classifier):
    run, X = classifier
    data = Dataset.from_numpy(X, np.zeros(len(X), np.int64), chunks=50)
    logits = _outputs(run.model, X)
    labels = run.predict(data)
    assert labels.numblocks == (4,) and labels.dtype == np.int64  # a block per partition
    np.testing.assert_array_equal(labels.compute(), logits.argmax(1).numpy())
    proba = run.predict(data, output="proba", batch_size=7).compute()
    np.testing.assert_allclose(proba, torch.softmax(logits, 1).numpy(), rtol=1e-5, atol=1e-6)
    raw = run.predict(data.X, output="logits").compute()  # a Dask array works as well
    np.testing.assert_allclose(raw, logits.numpy(), rtol=1e-5, atol=1e-5)
    assert (labels.compute() == data.y.compute()).mean() < 1  # not the targets' zeros


def test_bad_prediction_requests_say_what_to_do(classifier):
    run, X = classifier
    with pytest.raises(ValueError, match=r"output='values' does not suit a classification"):
        run.predict(Dataset.from_numpy(X, np.zeros(len(X), np.int64)), output="values")
    with pytest.raises(ValueError, match=r"samples of shape \(4,\), but the model takes \(6,\)"):
        run.predict(Dataset.from_numpy(X[:, :4], np.zeros(len(X), np.int64)))
    with pytest.raises(TypeError, match="a daskdl.Dataset, a Dask array of samples or a dataframe"):
        run.predict(X)


def test_regression_predictions_are_in_the_targets_units(client):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(600, 5)).astype(np.float32)
    y = (X @ rng.normal(size=(5, 2)) * 30 + 500).astype(np.float64)  # two targets
    train, test = Dataset.from_numpy(X, y, chunks=150).split(0.25, seed=0)
    train, test = train.standardize(), test.standardize(like=train)
    run = daskdl.fit(client, "mlp", train, epochs=8, batch_size=32, lr=0.01, progress=False)
    preds = run.predict(test).compute()
    Xt = test.X.compute()
    scale = run.spec["objective"].target_scale
    expected = scale.restore(_outputs(run.model, Xt).double()).numpy()
    np.testing.assert_allclose(preds, expected, rtol=1e-5)
    targets = test.y.compute() * np.array(scale.std) + np.array(scale.mean)
    assert preds.shape == (len(Xt), 2) and np.abs(preds - targets).mean() < 30  # units of y


def test_multilabel_probabilities_and_labels(client):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(400, 6)).astype(np.float32)
    y = np.stack([X[:, 0] > 0, X[:, 1] > 0, X[:, 0] + X[:, 1] > 0], axis=1).astype(np.int64)
    data = Dataset.from_numpy(X, y, chunks=100, task="multilabel")
    run = daskdl.fit(client, "mlp", data, **QUICK)
    logits = _outputs(run.model, X)
    proba = run.predict(data).compute()
    np.testing.assert_allclose(proba, torch.sigmoid(logits).numpy(), rtol=1e-5, atol=1e-6)
    labels = run.predict(data, output="labels").compute()
    np.testing.assert_array_equal(labels, (logits > 0).long().numpy())
    assert (labels == y).mean() > 0.8


def test_dataframe_predictions_keep_the_index(client):
    rng = np.random.default_rng(2)
    n = 480
    pdf = pd.DataFrame(
        {
            "a": rng.normal(size=n),
            "b": rng.normal(size=n),
            "city": rng.choice(["x", "y", "z"], n),
        },
        index=pd.Index(np.arange(n) * 10 + 7, name="house"),
    )
    pdf["price"] = 3 * pdf["a"] - pdf["b"] + pdf["city"].map({"x": 0, "y": 2, "z": 4}) + 100
    ddf = dd.from_pandas(pdf, npartitions=4)
    data = Dataset.from_dataframe(ddf, ["a", "b", "city"], "price", categorical=["city"])
    data = data.standardize()  # the same rows: the index stays
    run = daskdl.fit(client, "mlp", data, epochs=2, batch_size=32, progress=False)
    frame = run.predict(data)
    assert isinstance(frame, dd.DataFrame) and list(frame.columns) == ["prediction"]
    result = frame.compute()
    pd.testing.assert_index_equal(result.index, pdf.index)
    scale = run.spec["objective"].target_scale
    expected = scale.restore(_outputs(run.model, data.X.compute())[:, 0].double())
    np.testing.assert_allclose(result["prediction"], expected.numpy(), rtol=1e-5)
    later = Dataset.from_dataframe(
        ddf, ["a", "b", "city"], "price", categories={"city": ["x", "y"]}
    )  # other codes
    with pytest.raises(ValueError, match="categorical codes are not the training data's"):
        run.predict(later)
    train, _ = data.split(0.25, seed=0)  # another set of rows: no index any more
    assert isinstance(run.predict(train), type(data.X))


def test_the_weights_go_once_to_each_worker(client, tmp_path, monkeypatch):
    """A 17 MB model: in every task it would be a large graph; scattered, it is not."""
    monkeypatch.setenv("DASKDL_SIGNING_KEY", "a test secret of enough length, 32+ bytes")
    X, y = blobs(n=400, d=64, classes=10)
    data = Dataset.from_numpy(X, y, chunks=50)
    wide = ("mlp", {"hidden": 2048})
    run = daskdl.fit(client, wide, data, epochs=1, batch_size=32, out=tmp_path / "r", **QUIET)
    before = client.run(lambda dask_worker: manager(dask_worker).models_built)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Sending large graph of size ..." would fail here
        labels = run.predict(data).compute()
        again = daskdl.predict(tmp_path / "r", data, client=client).compute()
    after = client.run(lambda dask_worker: manager(dask_worker).models_built)
    # Two sets of weights (the run's, the checkpoint's: equal digests), each built at most
    # once per worker, for 8 partitions.
    assert all(after[w] - before[w] <= 1 for w in after), (before, after)
    np.testing.assert_array_equal(labels, _outputs(run.model, X).argmax(1).numpy())
    np.testing.assert_array_equal(again, labels)


def test_predict_from_a_checkpoint_verifies_it_first(client, tmp_path, monkeypatch):
    monkeypatch.setenv("DASKDL_SIGNING_KEY", "a test secret of enough length, 32+ bytes")
    X, y = blobs(n=400)
    data = Dataset.from_numpy(X, y, chunks=100)

    def factory(input_shape, n_outputs):
        return torch.nn.Sequential(torch.nn.Linear(input_shape[0], 16), torch.nn.ReLU(),
                                   torch.nn.Linear(16, n_outputs))  # fmt: skip

    run = daskdl.fit(client, factory, data, out=tmp_path / "r", **QUICK)
    with pytest.raises(ValueError, match="built by a factory of the user's: pass it as model="):
        daskdl.predict(tmp_path / "r", data, client=client)
    preds = daskdl.predict(tmp_path / "r", data, factory, client=client).compute()
    np.testing.assert_array_equal(preds, run.predict(data).compute())
    [ckpt] = sorted((tmp_path / "r" / "checkpoints").glob("epoch-*"))[-1:]
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["n_outputs"] = 4
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(daskdl.CheckpointError):
        daskdl.predict(ckpt, data, factory, client=client)


def test_daskdl_predict_writes_parquet_with_the_index_and_zarr_for_arrays(
    client, tmp_path, monkeypatch
):
    monkeypatch.setenv("DASKDL_SIGNING_KEY", "a test secret of enough length, 32+ bytes")
    from daskdl.cli import main as cli

    rng = np.random.default_rng(3)
    n = 400
    pdf = pd.DataFrame(
        {"a": rng.normal(size=n), "b": rng.normal(size=n), "kind": rng.choice(["p", "q"], n)},
        index=pd.Index(np.arange(n) + 1000, name="id"),
    )
    pdf["label"] = ((pdf["a"] > 0) ^ (pdf["kind"] == "q")).astype(np.int64)
    pdf.to_parquet(tmp_path / "houses.parquet")
    ddf = dd.read_parquet(tmp_path / "houses.parquet").repartition(npartitions=4)
    data = Dataset.from_dataframe(ddf, ["a", "b", "kind"], "label", categorical=["kind"])
    run = daskdl.fit(client, "mlp", data, out=tmp_path / "run", **QUICK)
    address = ["--scheduler", client.scheduler.address]
    out = tmp_path / "preds.parquet"
    houses = str(tmp_path / "houses.parquet")
    code = cli.main(
        ["predict", "--checkpoint", str(tmp_path / "run"), "--data", houses,
         "--out", str(out), "--output", "proba", "--no-progress", *address]
    )  # fmt: skip
    assert code == 0
    written = pd.read_parquet(out)
    pd.testing.assert_index_equal(written.index, pdf.index)
    expected = run.predict(data, output="proba").compute()
    np.testing.assert_allclose(written.to_numpy(), expected.to_numpy(), rtol=1e-5)
    assert list(written.columns) == ["proba_0", "proba_1"]

    # Arrays: a .npz of the same features (codes for "kind"), out as Zarr.
    X = data.X.compute()
    np.savez(tmp_path / "samples.npz", X=X)
    code = cli.main(
        ["predict", "--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path / "samples.npz"),
         "--out", str(tmp_path / "preds.zarr"), "--no-progress", *address]
    )  # fmt: skip
    assert code == 0
    import zarr

    labels = np.asarray(zarr.open(str(tmp_path / "preds.zarr"), mode="r"))
    np.testing.assert_array_equal(labels, _outputs(run.model, X).argmax(1).numpy())
    # Refusals: an existing --out, the wrong format for the input.
    assert cli.main(["predict", "--checkpoint", str(tmp_path / "run"), "--data",
                     str(tmp_path / "samples.npz"), "--out", str(tmp_path / "preds.zarr"),
                     *address]) == 2  # fmt: skip
    assert cli.main(["predict", "--checkpoint", str(tmp_path / "run"), "--data",
                     str(tmp_path / "samples.npz"), "--out", str(tmp_path / "x.parquet"),
                     *address]) == 2  # fmt: skip
