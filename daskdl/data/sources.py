"""Data sets from the user's own files, for ``daskdl train --data`` and :func:`read`, and data
sets shared on a cluster (:func:`publish`), for the dashboard.

Each format is read lazily by the library made for it: Parquet and CSV by
``dask.dataframe``, Zarr and netCDF by ``xarray`` (chunked with Dask), ``.npz``/``.npy`` by
numpy (memory-mapped), and a folder written by ``Dataset.save`` by :meth:`Dataset.load`.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from distributed import Client
from pandas.api.types import is_numeric_dtype

from daskdl.data.dataset import Dataset

FORMATS = ("parquet", "csv", "zarr", "netcdf", "npz", "npy", "daskdl")
_SUFFIXES = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".zarr": "zarr",
    ".nc": "netcdf",
    ".nc4": "netcdf",
    ".npz": "npz",
    ".npy": "npy",
}


def detect(path: str | os.PathLike) -> str:
    """The format of ``path``: from a data set folder's ``dataset.json``, a Zarr store's
    metadata, a folder of Parquet or CSV files, or the file's suffix."""
    path = Path(path)
    if path.is_dir():
        if (path / "dataset.json").exists():
            return "daskdl"
        if any((path / name).exists() for name in (".zgroup", "zarr.json", ".zattrs")):
            return "zarr"
        for suffix in (".parquet", ".pq", ".csv"):
            if any(path.glob(f"*{suffix}")):
                return _SUFFIXES[suffix]
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"Cannot tell the format of {path}: give a Parquet (.parquet, or a folder of them), "
            "CSV (.csv, globs too), Zarr (.zarr), netCDF (.nc), numpy (.npz, .npy) file, or a "
            "folder written by Dataset.save."
        )
    return fmt


def detect_or_glob(path) -> str:
    return "csv" if any(c in str(path) for c in "*?[") else detect(path)


def read(
    path: str | os.PathLike,
    label: str | Sequence[str] | None = None,
    features: Sequence[str] | None = None,
    task: str | None = None,
    sample_dim: str | None = None,
    n_classes: int | None = None,
    categorical: Sequence[str] | None = None,
) -> Dataset:
    """A lazy :class:`Dataset` from the file (or folder, or CSV glob) ``path``.

    ``label`` names the target column(s) (Parquet, CSV), variable (Zarr, netCDF) or array
    (``.npz``; default ``"y"``; for ``.npy`` features, the ``.npy`` file of the targets).
    ``features`` defaults to every other numeric column or variable (``"X"`` in an ``.npz``).
    ``sample_dim`` is the samples' dimension of a Zarr or netCDF data set (default: the first
    dimension of the label). ``categorical`` columns (Parquet, CSV) are encoded as categories
    (:meth:`Dataset.from_dataframe`); text columns not named there are left out of the default
    features.
    """
    if categorical and detect_or_glob(path) not in ("parquet", "csv"):
        raise ValueError("categorical= is for tabular files (Parquet, CSV).")
    fmt = detect_or_glob(path)
    if fmt != "csv" and not Path(path).exists():
        raise FileNotFoundError(f"{path} does not exist.")
    if fmt == "daskdl":
        return Dataset.load(path)
    if fmt in ("parquet", "csv"):
        return _from_frame(path, fmt, label, features, task, n_classes, categorical)
    if fmt in ("zarr", "netcdf"):
        return _from_xarray(path, fmt, label, features, task, sample_dim, n_classes)
    return _from_numpy(path, fmt, label, features, task, n_classes)


def read_samples(
    path: str | os.PathLike,
    features: Sequence[str] | None = None,
    categories: dict | None = None,
    sample_dim: str | None = None,
):
    """The samples of ``path`` alone (no targets needed), to predict on: ``(X, index)``, the
    index being a dataframe's (Parquet, CSV) and None otherwise. ``features`` and
    ``categories`` are the training data's (a checkpoint has them); ``features`` defaults as
    for :func:`read`."""
    from daskdl.data import frames

    fmt = detect_or_glob(path)
    if fmt != "csv" and not Path(path).exists():
        raise FileNotFoundError(f"{path} does not exist.")
    if fmt == "daskdl":
        return Dataset.load(path).X, None
    if fmt in ("parquet", "csv"):
        ddf = _read_frame(path, fmt)
        if features is None:
            features = [c for c in ddf.columns if is_numeric_dtype(ddf[c].dtype)]
        missing = [c for c in features if c not in ddf.columns]
        if missing:
            raise ValueError(
                f"{path} has no column {missing[0]!r}{' (and more)' if len(missing) > 1 else ''}"
                f", a feature of the model (it was trained on {list(features)}); the file has "
                f"{list(ddf.columns)}. Predict on files with those columns, or name the "
                "file's feature columns with --features (features=)."
            )
        return frames.dataframe_features(ddf, features, categories)
    if fmt in ("zarr", "netcdf"):
        import xarray as xr

        ds = xr.open_zarr(path) if fmt == "zarr" else xr.open_dataset(path, chunks={})
        features = list(features or [str(v) for v in ds.data_vars])
        missing = [f for f in features if f not in ds.variables]
        if missing:
            raise ValueError(
                f"{path} has no variable {missing[0]!r}, a feature of the model (it was trained "
                f"on {features}); it has {sorted(map(str, ds.data_vars))}. Name its feature "
                "variables with --features (features=)."
            )
        dim = sample_dim or str(ds[features[0]].dims[0])
        return frames.xarray_features(ds, dim, features), None
    if fmt == "npz":
        arrays = np.load(path)
        name = (features or ["X"])[0]
        if name not in arrays:
            raise KeyError(f"{path} has no array {name!r}; it has {sorted(arrays.files)}.")
        X = arrays[name]
    else:
        X = np.load(path, mmap_mode="r")
    return frames.chunk_numpy(X), None


def _read_frame(path, fmt):
    import dask.dataframe as dd

    if fmt == "csv":
        files = str(Path(path) / "*.csv") if Path(path).is_dir() else str(path)
        if not glob.glob(files):
            raise FileNotFoundError(f"No CSV file matches {files}.")
        return dd.read_csv(files)
    return dd.read_parquet(path)


def _needs_label(label, path) -> None:
    if not label:
        raise ValueError(f"Name the target column of {path}: --label COLUMN (label=...).")


def _from_frame(path, fmt, label, features, task, n_classes, categorical) -> Dataset:
    _needs_label(label, path)
    ddf = _read_frame(path, fmt)
    labels = [label] if isinstance(label, str) else list(label)
    categorical = list(categorical or [])
    if features is None:
        features = [
            c
            for c in ddf.columns
            if c not in labels and (c in categorical or is_numeric_dtype(ddf[c].dtype))
        ]
    return Dataset.from_dataframe(
        ddf, features, label, n_classes=n_classes, task=task, categorical=categorical
    )


def _from_xarray(path, fmt, label, features, task, sample_dim, n_classes) -> Dataset:
    import xarray as xr

    _needs_label(label, path)
    if not isinstance(label, str):
        raise ValueError("A Zarr or netCDF data set takes one label variable.")
    ds = xr.open_zarr(path) if fmt == "zarr" else xr.open_dataset(path, chunks={})
    if label not in ds.variables:
        raise KeyError(
            f"{path} has no variable {label!r}; it has {sorted(map(str, ds.data_vars))}."
        )
    sample_dim = sample_dim or ds[label].dims[0]
    if features is None:
        features = [str(v) for v in ds.data_vars if v != label and sample_dim in ds[v].dims]
    return Dataset.from_xarray(ds, sample_dim, features, label, n_classes=n_classes, task=task)


def _from_numpy(path, fmt, label, features, task, n_classes) -> Dataset:
    if fmt == "npz":
        arrays = np.load(path)
        x_name, y_name = (features or ["X"])[0], label or "y"
        for name in (x_name, y_name):
            if name not in arrays:
                raise KeyError(f"{path} has no array {name!r}; it has {sorted(arrays.files)}.")
        X, y = arrays[x_name], arrays[y_name]
    else:
        if not label or not str(label).endswith(".npy"):
            raise ValueError(
                f"{path} holds the features; give the targets' .npy file with --label "
                "(label='y.npy'), or both arrays in one .npz."
            )
        X, y = np.load(path, mmap_mode="r"), np.load(label, mmap_mode="r")
    return Dataset.from_numpy(X, y, n_classes=n_classes, task=task)  # partitions of ~64 MB


# ------------------------------------------------------------------ published data sets

_MARK = "daskdl-dataset"


def publish(client: Client, name: str, train: Dataset, val: Dataset | None = None) -> None:
    """Persist ``train`` (and ``val``) on the cluster and publish them under ``name``, as
    Dask publishes data sets (``Client.publish_dataset``): they stay in the workers' memory
    until :func:`unpublish`, and the dashboard lists them beside the built-in data sets."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}.")
    for which, ds in (("train", train), ("val", val)):
        if ds is not None and not isinstance(ds, Dataset):
            raise TypeError(f"{which} must be a daskdl.Dataset, got {type(ds).__name__}.")
    entry = {_MARK: 1, "train": _parts(train.persist(client))}
    if val is not None:
        entry["val"] = _parts(val.persist(client))
    client.publish_dataset(**{name: entry}, override=True)


def _parts(ds: Dataset) -> dict:
    # A dict of collections, which Dask looks into for the futures it keeps published.
    return {
        "X": ds.X,
        "y": ds.y,
        "target_scale": list(ds.target_scale) if ds.target_scale is not None else None,
        "task": ds.task,
        "n_classes": ds.known_n_classes,
        "classes": ds.classes,
        "features": ds.features,
        "categories": ds.categories,
        "standardized": ds.standardized,
    }


def _dataset(parts: dict) -> Dataset:
    ds = Dataset(parts["X"], parts["y"], parts["n_classes"], parts["task"])
    ds.classes, ds.features = parts["classes"], parts["features"]
    ds.categories, ds.standardized = parts["categories"], parts.get("standardized")
    if parts["target_scale"] is not None:
        ds.target_scale = tuple(parts["target_scale"])
    return ds


def published(client) -> list[str]:
    """The names of the daskdl data sets published on ``client``'s cluster."""
    names = []
    for name in client.list_datasets():
        entry = client.get_dataset(name)
        if isinstance(entry, dict) and entry.get(_MARK):
            names.append(name)
    return sorted(names)


def get(client, name: str) -> tuple[Dataset, Dataset | None]:
    """The (train, val) data sets published as ``name`` (val may be None)."""
    if name not in client.list_datasets():
        raise KeyError(
            f"No data set {name!r} is published on this cluster; published: {published(client)}."
        )
    entry = client.get_dataset(name)
    if not (isinstance(entry, dict) and entry.get(_MARK)):
        raise TypeError(f"The data set {name!r} was not published by daskdl.publish.")
    val = entry.get("val")
    return _dataset(entry["train"]), (_dataset(val) if val is not None else None)


def unpublish(client, name: str) -> None:
    client.unpublish_dataset(name)
