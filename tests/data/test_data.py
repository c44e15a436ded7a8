"""Dataset constructors, lazy transforms and validation."""

from __future__ import annotations

import dask
import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
import xarray as xr

import daskdl
from daskdl import Dataset


@pytest.fixture(params=["numpy", "dask"])
def tabular(request):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 5)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    if request.param == "numpy":
        return Dataset.from_numpy(X, y, chunks=50), X, y
    return Dataset.from_dask(da.from_array(X, chunks=(50, 5)), da.from_array(y, chunks=50)), X, y


def test_constructors_keep_samples_and_partitions(tabular):
    ds, X, y = tabular
    assert ds.npartitions == 4 and len(ds) == 200 and ds.sample_shape == (5,)
    Xc, yc = ds.compute()
    np.testing.assert_array_equal(Xc, X)
    np.testing.assert_array_equal(yc, y)
    assert ds.n_classes == 2


def test_labels_follow_the_feature_partitions():
    X = da.from_array(np.arange(100, dtype=np.float32).reshape(-1, 1), chunks=(50, 1))
    y = da.from_array(np.arange(100) % 2, chunks=((30, 70),))  # as many blocks, other sizes
    ds = Dataset.from_dask(X, y)
    assert ds.y.chunks == ds.X.chunks[:1]
    Xc, yc = ds.compute()
    np.testing.assert_array_equal(yc, Xc[:, 0].astype(int) % 2)


def test_from_dataframe():
    pdf = pd.DataFrame({"a": np.arange(100.0), "b": np.ones(100), "label": np.arange(100) % 3})
    ds = Dataset.from_dataframe(dd.from_pandas(pdf, npartitions=4), ["a", "b"], "label")
    assert ds.npartitions == 4 and ds.sample_shape == (2,)
    X, y = ds.compute()
    np.testing.assert_array_equal(X[:, 0], np.arange(100.0))
    np.testing.assert_array_equal(y, np.arange(100) % 3)


def test_standardize_like_a_set_of_unknown_length():
    # A dataframe's partition lengths are unknown until computed; using the training set's
    # statistics must not ask for its length.
    pdf = pd.DataFrame({"a": np.arange(100.0), "b": np.arange(100.0) ** 2, "label": 0})
    ds = Dataset.from_dataframe(dd.from_pandas(pdf, npartitions=4), ["a", "b"], "label")
    train, test = ds.split(0.2, seed=0)
    Xs, _ = test.standardize(like=train).compute()
    Xt, _ = train.compute()
    Xv, _ = test.compute()
    np.testing.assert_allclose(Xs, (Xv - Xt.mean(0)) / Xt.std(0), rtol=1e-5)


def test_from_xarray_images_and_columns():
    imgs = np.random.default_rng(0).normal(size=(60, 1, 4, 4)).astype(np.float32)
    ds = xr.Dataset(
        {
            "pixels": (("sample", "channel", "y", "x"), imgs),
            "t": (("sample",), np.arange(60.0)),
            "label": (("sample",), np.arange(60) % 2),
        }
    ).chunk({"sample": 20})
    images = Dataset.from_xarray(ds, sample_dim="sample", features=["pixels"], label="label")
    assert images.sample_shape == (1, 4, 4) and images.npartitions == 3 and images.is_image
    np.testing.assert_array_equal(images.compute()[0], imgs)
    flat = Dataset.from_xarray(ds, sample_dim="sample", features=["pixels", "t"], label="label")
    assert flat.sample_shape == (17,)
    np.testing.assert_array_equal(flat.compute()[0][:, -1], np.arange(60.0))


def test_split_is_lazy_reproducible_and_disjoint():
    X = np.arange(1000, dtype=np.float32).reshape(-1, 1)
    ds = Dataset.from_numpy(X, np.arange(1000) % 2, chunks=250)
    train, test = ds.split(test_size=0.2, seed=3)
    assert isinstance(train.X, da.Array)
    assert len(test) == 200 and len(train) == 800
    (a,) = dask.compute(test.X)
    (b,) = dask.compute(ds.split(test_size=0.2, seed=3)[1].X)
    np.testing.assert_array_equal(a, b)
    (c,) = dask.compute(ds.split(test_size=0.2, seed=4)[1].X)
    assert not np.array_equal(a, c)
    together = np.sort(np.concatenate([train.compute()[0], a]).ravel())
    np.testing.assert_array_equal(together, np.arange(1000))
    # Every partition gives its share: a test set that covers the whole range.
    assert a.min() < 250 and a.max() >= 750


def test_standardize_per_feature_and_per_channel():
    rng = np.random.default_rng(0)
    X = rng.normal(loc=5, scale=3, size=(400, 3)).astype(np.float32)
    X[:, 2] = 7.0  # constant: stays finite
    out = Dataset.from_numpy(X, np.zeros(400, dtype=int) % 2, chunks=100, n_classes=2)
    Xs = out.standardize().compute()[0]
    np.testing.assert_allclose(Xs[:, :2].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(Xs[:, :2].std(0), 1, atol=1e-4)
    np.testing.assert_array_equal(Xs[:, 2], 0)

    imgs = rng.normal(size=(64, 3, 4, 4)).astype(np.float32) * np.array([1, 10, 100])[:, None, None]
    ds = Dataset.from_numpy(imgs, np.arange(64) % 2, chunks=16).standardize()
    Xi = ds.compute()[0]
    np.testing.assert_allclose(Xi.std(axis=(0, 2, 3)), 1, atol=1e-4)


def test_standardize_like_uses_the_reference_statistics():
    X = np.arange(20, dtype=np.float32).reshape(-1, 1)
    train = Dataset.from_numpy(X[:10], np.arange(10) % 2, chunks=5)
    test = Dataset.from_numpy(X[10:], np.arange(10) % 2, chunks=5)
    out = test.standardize(like=train).compute()[0]
    expected = (X[10:] - X[:10].mean()) / X[:10].std()
    np.testing.assert_allclose(out, expected, rtol=1e-5)


def test_dropna_removes_bad_rows_lazily():
    X = np.ones((10, 2), dtype=np.float32)
    X[2, 0] = np.nan
    X[7, 1] = np.inf
    y = np.arange(10, dtype=float) % 2
    y[4] = np.nan
    ds = Dataset.from_numpy(X, y, chunks=5).dropna()
    assert np.isnan(ds.X.shape[0])  # still lazy: lengths unknown
    Xc, yc = ds.compute()
    assert len(Xc) == 7 and np.isfinite(Xc).all() and not np.isnan(yc).any()


def test_digits_and_synthetic_images():
    digits = daskdl.datasets.digits()
    assert (len(digits), digits.sample_shape, digits.n_classes) == (1797, (1, 8, 8), 10)
    a = daskdl.datasets.synthetic_images(40, (3, 8, 8), n_classes=4, seed=1, chunks=10)
    b = daskdl.datasets.synthetic_images(40, (3, 8, 8), n_classes=4, seed=1, chunks=10)
    assert a.npartitions == 4
    np.testing.assert_array_equal(a.compute()[0], b.compute()[0])


def test_cifar10_binary_files_are_read_lazily(tmp_path):
    rng = np.random.default_rng(0)
    for name, n in [("data_batch_1.bin", 30), ("data_batch_2.bin", 20), ("test_batch.bin", 10)]:
        imgs = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
        daskdl.datasets.write_cifar10_binary(tmp_path / name, imgs, rng.integers(0, 10, n))
    train = daskdl.datasets.cifar10(tmp_path)
    assert train.npartitions == 2 and len(train) == 50 and train.sample_shape == (3, 32, 32)
    X, y = train.compute()
    raw = np.fromfile(tmp_path / "data_batch_1.bin", dtype=np.uint8).reshape(30, -1)
    np.testing.assert_array_equal(y[:30], raw[:, 0])
    np.testing.assert_allclose(X[:30].reshape(30, -1), raw[:, 1:] / 255.0, rtol=1e-6)
    assert len(daskdl.datasets.cifar10(tmp_path, "test")) == 10


def _nullable() -> pd.DataFrame:
    n = 40
    return pd.DataFrame({
        "a": pd.array([1, 2, None, 4] * (n // 4), dtype="Int64"),
        "b": pd.array([0.5, None, 1.5, 2.0] * (n // 4), dtype="Float64"),
        "c": pd.array([True, False, None, True] * (n // 4), dtype="boolean"),
        "s": pd.array(["x", "y", "x", None] * (n // 4), dtype="string"),
        "y": pd.array([0, 1, 2, 0] * (n // 4), dtype="Int64"),
        "yb": pd.array([True, False] * (n // 2), dtype="boolean"),
    })  # fmt: skip


@pytest.mark.parametrize("kind", ["pandas", "dask"])
def test_from_dataframe_takes_pandas_frames_and_nullable_dtypes(kind):
    frame = _nullable()
    given = frame if kind == "pandas" else dd.from_pandas(frame, npartitions=3)
    ds = Dataset.from_dataframe(given, ["a", "b", "c", "s"], "y", categorical=["s"])
    X, y = ds.compute()
    expected = frame[["a", "b", "c"]].astype("float64").to_numpy(na_value=np.nan)
    np.testing.assert_array_equal(X[:, :3], expected.astype(np.float32))  # <NA> is NaN
    assert sorted(ds.categories["s"]) == ["x", "y"] and set(X[:, 3]) == {0.0, 1.0, 2.0}
    assert y.dtype == np.int64 and list(y[:4]) == [0, 1, 2, 0] and ds.task == "classification"
    assert ds.npartitions >= 1 and len(X) == len(frame)
    _, yb = Dataset.from_dataframe(given, ["a"], "yb").compute()
    assert yb.dtype == np.int64 and list(yb[:2]) == [1, 0]  # booleans are classes 0 and 1
    assert len(ds.dropna().compute()[0]) == 20  # rows with a missing feature go


def test_missing_class_ids_and_float32_overflow_are_named():
    frame = _nullable()
    frame.loc[5, "y"] = pd.NA
    with pytest.raises(ValueError, match=r"Column\(s\) \['y'\] have missing values \(<NA>\)"):
        Dataset.from_dataframe(frame, ["a"], "y").compute()
    big = np.ones((8, 2))
    big[3, 1] = 1e39
    with pytest.raises(ValueError, match=r"1 values of X are beyond float32's range.*1e\+39"):
        Dataset.from_numpy(big, np.arange(8) % 2).compute()
    wide = pd.DataFrame({"a": big[:, 1], "y": np.arange(8) % 2})
    with pytest.raises(ValueError, match=r"values of columns \['a'\] are beyond float32"):
        Dataset.from_dataframe(wide, ["a"], "y").compute()


def test_channels_last_images_get_a_hint():
    from daskdl.models import preflight

    assert "X.transpose(0, 3, 1, 2)" in preflight.layout_hint((32, 32, 3))
    assert preflight.layout_hint((3, 32, 32)) == "" and preflight.layout_hint((6,)) == ""


def test_a_large_array_is_scattered_not_sent_in_every_graph(client):
    import warnings

    X = np.random.default_rng(0).random((40_000, 100)).astype(np.float32)  # 16 MB
    y = np.arange(len(X)) % 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = Dataset.from_numpy(X, y)
        total = float(ds.X.sum().compute())
        persisted = ds.persist(client)
    assert not [w for w in caught if "large graph" in str(w.message)], caught
    assert total == pytest.approx(float(X.astype(np.float64).sum()), rel=1e-4)
    np.testing.assert_array_equal(persisted.compute()[1], y)
    assert ds.npartitions == 4
