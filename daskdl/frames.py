"""Arrays from tables: the feature and target columns of a Dask dataframe (categorical
columns encoded), and the variables of an xarray dataset along its sample dimension, as the
Dask arrays a :class:`daskdl.Dataset` holds."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import dask.array as da
import numpy as np
import pandas as pd
from pandas.api.types import is_numeric_dtype

from daskdl import categorical as categorical_


def from_dataframe(
    ddf,
    features: Sequence[str],
    label: str | Sequence[str],
    categorical: Sequence[str] | None = None,
    categories: Mapping[str, Sequence] | None = None,
):
    """X (float32) and y of ``ddf``'s columns, the features' names, the categorical
    mapping (or None) and the index, in X's partitions; see
    :meth:`daskdl.Dataset.from_dataframe`."""
    features = list(features)
    labels = [label] if isinstance(label, str) else list(label)
    _check_columns(ddf, features, labels)
    cats = list(categorical or [])
    outside = [c for c in cats if c not in features]
    if outside:
        raise ValueError(f"categorical columns {outside} are not among the features.")
    mapped = categories if isinstance(categories, Mapping) else {}
    cats += [c for c in features if c not in cats and (c in mapped or _is_category(ddf[c].dtype))]
    bad = [c for c in features if c not in cats and not is_numeric_dtype(ddf[c].dtype)]
    if bad:
        raise TypeError(
            f"Feature columns {bad} are not numeric ({[str(ddf[c].dtype) for c in bad]}). "
            f"Name them in categorical=[...] to encode them as categories, or encode them "
            "as numbers first."
        )
    mapping = None
    if cats:
        mapping = (
            categorical_.check_mapping(categories, cats)
            if categories is not None
            else categorical_.categories_of(ddf, cats)
        )
        ddf = ddf.map_partitions(categorical_.encode, mapping)
    # X and y come from one frame whose columns are chosen once: projected apart, Dask's
    # optimizer may read them in different partitions (it joins small ones for few columns).
    frame = ddf[features + [c for c in labels if c not in features]]
    X = frame.map_partitions(_select, features, np.float32).to_dask_array()
    if isinstance(label, str):
        y = frame.map_partitions(_select, label, ddf[label].dtype).to_dask_array()
    else:
        dtype = np.result_type(*[ddf[c].dtype for c in labels])
        y = frame.map_partitions(_select, labels, dtype).to_dask_array()
    return X, y, features, mapping, index_of(frame)


def _select(df, columns, dtype):
    return df[columns].astype(dtype)


def from_xarray(ds, sample_dim: str, features: Sequence[str], label: str):
    """X and y of ``ds``'s variables; see :meth:`daskdl.Dataset.from_xarray`."""
    if label not in ds.variables:
        raise KeyError(
            f"Variables {[label]} are not in the xarray dataset; it has "
            f"{sorted(map(str, ds.data_vars))}."
        )
    X = xarray_features(ds, sample_dim, features)
    y_var = ds[label]
    if y_var.dims != (sample_dim,):
        raise ValueError(f"Label {label!r} must have dims ({sample_dim!r},), got {y_var.dims}.")
    y = y_var.data if isinstance(y_var.data, da.Array) else da.from_array(y_var.values)
    return X, y


def xarray_features(ds, sample_dim: str, features: Sequence[str]) -> da.Array:
    """X of ``ds``'s feature variables along ``sample_dim``: one variable as it is (an image
    ``(sample, channel, y, x)`` stays one), several flattened per sample and joined."""
    features = list(features)
    missing = [v for v in features if v not in ds.variables]
    if missing:
        raise KeyError(
            f"Variables {missing} are not in the xarray dataset; it has "
            f"{sorted(map(str, ds.data_vars))}."
        )
    if sample_dim not in ds.dims:
        raise ValueError(
            f"sample_dim={sample_dim!r} is not a dimension; dimensions are {list(ds.dims)}."
        )
    arrays = []
    for name in features:
        var = ds[name]
        if sample_dim not in var.dims:
            raise ValueError(
                f"Feature {name!r} has dims {var.dims}, without sample_dim {sample_dim!r}."
            )
        var = var.transpose(sample_dim, ...)
        data = var.data if isinstance(var.data, da.Array) else chunk_numpy(var.values)
        arrays.append(data)
    X = arrays[0] if len(arrays) == 1 else _flat_concat(arrays)
    if X.ndim == 1:
        X = X[:, None]
    return X.rechunk({i: -1 for i in range(1, X.ndim)})


def dataframe_features(ddf, features: Sequence[str], categories: Mapping | None):
    """X of ``ddf``'s ``features`` (float32), its categorical ones encoded with
    ``categories`` (a training set's), one block per partition, and the index that goes
    with it (one partition per block): what a model trained on a ``from_dataframe`` data set
    reads."""
    features = list(features)
    missing = [c for c in features if c not in ddf.columns]
    if missing:
        raise KeyError(f"Columns {missing} are not in the dataframe; it has {list(ddf.columns)}.")
    if categories:
        ddf = ddf.map_partitions(categorical_.encode, dict(categories))
    frame = ddf[features]
    return frame.map_partitions(_select, features, np.float32).to_dask_array(), index_of(frame)


def index_of(frame):
    """``frame``'s index, in the partitions of ``frame.map_partitions(...)``: a bare
    ``frame.index`` reads no column, and Dask's optimizer then joins small Parquet partitions
    (3 where the features come in 4), so the index would not line up with the samples."""
    return frame.map_partitions(_index_only, meta=frame._meta.iloc[:, :0]).index


def _index_only(df):
    return df.iloc[:, :0]


def _check_columns(ddf, features: list[str], labels: list[str]) -> None:
    missing = [c for c in [*features, *labels] if c not in ddf.columns]
    if missing:
        raise KeyError(f"Columns {missing} are not in the dataframe; it has {list(ddf.columns)}.")
    if not features:
        raise ValueError("features is empty: name at least one feature column.")
    if not labels:
        raise ValueError("label is empty: name the target column(s).")
    both = sorted(set(features) & set(labels))
    if both:
        raise ValueError(f"Columns {both} are both features and labels; name each once.")
    bad = [c for c in labels if not is_numeric_dtype(ddf[c].dtype)]
    if bad:
        raise TypeError(
            f"Label column(s) {bad} have dtype(s) {[str(ddf[c].dtype) for c in bad]}; a "
            "label must hold numbers (class ids, 0/1 labels or regression targets). For a "
            f"category column use ddf[{bad[0]!r}].cat.codes."
        )


def _is_category(dtype) -> bool:
    return isinstance(dtype, pd.CategoricalDtype)


def auto_rows(values: np.ndarray) -> int:
    """Samples per partition of in-memory data: about 64 MB, and at least 4 partitions where
    there are enough samples, so that two ranks each get work."""
    per_sample = max(1, values[:1].nbytes)
    return max(1, min(64 * 2**20 // per_sample, math.ceil(len(values) / 4)))


def chunk_numpy(values: np.ndarray) -> da.Array:
    """``values`` as a Dask array of :func:`auto_rows` samples per partition."""
    return da.from_array(values, chunks=(auto_rows(values),) + values.shape[1:])


def _flat_concat(arrays: list[da.Array]) -> da.Array:
    flat = [a.reshape(a.shape[0], -1) if a.ndim > 1 else a[:, None] for a in arrays]
    return da.concatenate([f.rechunk((flat[0].chunks[0], -1)) for f in flat], axis=1)
