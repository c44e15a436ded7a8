"""Arrays from tables: the feature and target columns of a Dask dataframe (categorical
columns encoded), and the variables of an xarray dataset along its sample dimension, as the
Dask arrays a :class:`daskdl.Dataset` holds."""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence

import dask.array as da
import numpy as np
import pandas as pd
from pandas.api.types import is_numeric_dtype

from daskdl.data import categorical as categorical_


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
    ddf = as_dask_frame(ddf)
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
    X = _selected(frame, features, np.float32)
    if isinstance(label, str):
        y = _selected(frame, label, _numpy_dtype(ddf[label].dtype))
    else:
        y = _selected(frame, labels, np.result_type(*[_numpy_dtype(ddf[c].dtype) for c in labels]))
    return X, y, features, mapping, index_of(frame)


def _selected(frame, columns, dtype) -> da.Array:
    """``frame``'s ``columns`` as a Dask array of ``dtype`` (see :func:`_select`)."""
    if isinstance(columns, str):
        meta = pd.Series(np.empty(0, dtype), name=columns)
    else:
        meta = pd.DataFrame({c: np.empty(0, dtype) for c in columns})
    # meta= given: Dask's guess runs _select on made-up rows, <NA> among them.
    return frame.map_partitions(_select, columns, dtype, meta=meta).to_dask_array()


def as_dask_frame(data):
    """A Dask dataframe of ``data``: a pandas DataFrame is cut into partitions of about
    64 MB (at least 4 where there are enough rows)."""
    import dask.dataframe as dd

    if isinstance(data, pd.DataFrame):
        per_row = max(1, int(data.memory_usage(index=False).sum()) // max(1, len(data)))
        return dd.from_pandas(data, chunksize=rows_for(len(data), per_row), sort=False)
    if not isinstance(data, dd.DataFrame):
        raise TypeError(
            f"from_dataframe takes a pandas or Dask DataFrame, got {type(data).__name__}."
        )
    return data


def _numpy_dtype(dtype) -> np.dtype:
    """The numpy dtype of a column: pandas' nullable ones (``Int64``, ``Float64``,
    ``boolean``) as their numpy counterparts."""
    return np.dtype(getattr(dtype, "numpy_dtype", dtype))


def _select(df, columns, dtype):
    """Columns as numpy ``dtype``; pandas' missing values (``<NA>``) as NaN where that is a
    float, refused naming the column where it is not (class ids)."""
    part = df[columns]
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        missing = part.isna().to_numpy().any(axis=0)
        if np.any(missing):
            names = [columns] if isinstance(columns, str) else list(np.asarray(columns)[missing])
            raise ValueError(
                f"Column(s) {names} have missing values (<NA>), which are no class ids: drop "
                f"those rows first (ddf.dropna(subset={names}))."
            )
        return part.astype(dtype)
    values = part.to_numpy(dtype=np.float64, na_value=np.nan)
    names = [columns] if isinstance(columns, str) else list(columns)
    values = to_float(values, dtype, f"columns {names}")
    if isinstance(columns, str):
        return pd.Series(values, index=part.index, name=columns)
    return pd.DataFrame(values, index=part.index, columns=columns)


def to_float(values: np.ndarray, dtype: np.dtype, what: str) -> np.ndarray:
    """``values`` in the float ``dtype``; finite values beyond its range are named (they would
    become infinite, and then be reported as such, which the user's data are not)."""
    dtype = np.dtype(dtype)
    if dtype == values.dtype or dtype.itemsize >= values.dtype.itemsize:
        return values.astype(dtype, copy=False)
    big = np.isfinite(values) & (np.abs(values) > np.finfo(dtype).max)
    if big.any():
        raise ValueError(
            f"{int(big.sum())} values of {what} are beyond {dtype}'s range (largest magnitude "
            f"{np.abs(values[big]).max():.3g}, over {np.finfo(dtype).max:.3g}): models compute "
            f"in {dtype}. Rescale them first (divide by a power of ten, or take a log)."
        )
    return values.astype(dtype)


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
    _check_present(ddf, features, [])
    if categories:
        ddf = ddf.map_partitions(categorical_.encode, dict(categories))
    frame = ddf[features]
    return _selected(frame, features, np.float32), index_of(frame)


def index_of(frame):
    """``frame``'s index, in the partitions of ``frame.map_partitions(...)``: a bare
    ``frame.index`` reads no column, and Dask's optimizer then joins small Parquet partitions
    (3 where the features come in 4), so the index would not line up with the samples."""
    return frame.map_partitions(_index_only, meta=frame._meta.iloc[:, :0]).index


def _index_only(df):
    return df.iloc[:, :0]


def _check_present(ddf, features: list[str], labels: list[str]) -> None:
    """Every named column is there; the first missing is named, with the closest match."""
    for what, names, flag in (("label", labels, "--label"), ("features", features, "--features")):
        missing = [c for c in names if c not in ddf.columns]
        if missing:
            close = difflib.get_close_matches(str(missing[0]), list(map(str, ddf.columns)), 1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"{what}: {missing} {'is not a column' if len(missing) == 1 else 'are not columns'}"
                f" of the data ({flag} on the command line); it has {list(ddf.columns)}.{hint}"
            )


def _check_columns(ddf, features: list[str], labels: list[str]) -> None:
    _check_present(ddf, features, labels)
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
    return rows_for(len(values), max(1, values[:1].nbytes))


def rows_for(n: int, per_sample: int) -> int:
    """Rows per partition for ``n`` rows of ``per_sample`` bytes (see :func:`auto_rows`)."""
    return max(1, min(64 * 2**20 // per_sample, math.ceil(n / 4)))


SCATTER_BYTES = 8 * 2**20  # larger arrays go to the workers ahead of the graph


def in_cluster(values: np.ndarray, rows: int) -> da.Array:
    """``values`` as a Dask array of ``rows`` samples per partition. Large arrays, where a
    client is current, are scattered to the workers block by block (Dask warns of "large
    graphs" otherwise, and sends them with every computation); small ones live in the graph."""
    chunks = (rows,) + tuple(-1 for _ in values.shape[1:])
    client = _current_client()
    if client is None or values.nbytes < SCATTER_BYTES:
        return da.from_array(values, chunks=chunks)
    import dask

    parts = [np.ascontiguousarray(values[i : i + rows]) for i in range(0, len(values), rows)]
    futures = client.scatter(parts)
    blocks = [
        da.from_delayed(dask.delayed(f), shape=part.shape, dtype=values.dtype)
        for part, f in zip(parts, futures)
    ]
    return da.concatenate(blocks)


def _current_client():
    from distributed import get_client

    try:
        return get_client()
    except ValueError:  # no client: the arrays stay in the graph
        return None


def chunk_numpy(values: np.ndarray) -> da.Array:
    """``values`` as a Dask array of :func:`auto_rows` samples per partition."""
    return in_cluster(values, auto_rows(values))


def _flat_concat(arrays: list[da.Array]) -> da.Array:
    flat = [a.reshape(a.shape[0], -1) if a.ndim > 1 else a[:, None] for a in arrays]
    return da.concatenate([f.rechunk((flat[0].chunks[0], -1)) for f in flat], axis=1)
