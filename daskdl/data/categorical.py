"""Categorical features: category values to integer codes, lazily, partition by partition.

Code 0 is "unknown": a value the mapping does not hold (seen first in validation or prediction
data, or missing) gets it instead of an error; the known categories are 1..K in their sorted
order. The mapping, ``{column: [category, ...]}``, stays with the data set, the run and its
checkpoints, so that every later use of the model encodes alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

UNKNOWN = 0


def categories_of(ddf, columns: Sequence[str]) -> dict[str, list]:
    """The categories of ``columns``: a ``category`` dtype's own (when known), else the
    distinct values, found in one pass over those columns. JSON-able, sorted."""
    import dask

    known, todo = {}, []
    for c in columns:
        dtype = ddf[c].dtype
        if isinstance(dtype, pd.CategoricalDtype) and ddf[c].cat.known:
            known[c] = list(dtype.categories)
        else:
            todo.append(c)
    found = dask.compute(*[ddf[c].dropna().drop_duplicates() for c in todo])
    known.update({c: list(values) for c, values in zip(todo, found)})
    return {c: _plain(sorted(known[c], key=_order)) for c in columns}


def _order(value):
    # Mixed types (1 and "1") sort by type first, then value: a stable order all the same.
    return (type(value).__name__, value)


def _plain(values: list) -> list:
    """numpy scalars as Python ones, so the mapping is JSON."""
    return [v.item() if isinstance(v, np.generic) else v for v in values]


def check_mapping(categories, columns: Sequence[str]) -> dict[str, list]:
    """A mapping given by the user (``categories=train.categories``) covers ``columns``."""
    if not isinstance(categories, Mapping):
        raise TypeError(
            f"categories must map column names to their categories (such as "
            f"train.categories), got {type(categories).__name__}."
        )
    missing = [c for c in columns if c not in categories]
    if missing:
        raise ValueError(
            f"categories has no mapping for the categorical column(s) {missing}; it maps "
            f"{sorted(categories)}."
        )
    return {c: list(categories[c]) for c in columns}


def encode(frame: pd.DataFrame, mapping: Mapping[str, list]) -> pd.DataFrame:
    """One partition with its categorical columns as codes (float32: the feature array's
    type, exact up to 2**24 categories); unknown and missing values get code 0."""
    frame = frame.copy()
    for column, values in mapping.items():
        index = pd.Index(values)
        codes = index.get_indexer(frame[column].astype(object)) + 1  # -1 (unseen) -> 0
        frame[column] = codes.astype(np.float32)
    return frame


def layout(features: Sequence[str], mapping: Mapping[str, list]) -> list[list[int]]:
    """``[[feature index, number of codes], ...]`` for the categorical features: what the
    registered ``mlp`` sizes its embeddings from (the codes include "unknown")."""
    return [[features.index(c), len(values) + 1] for c, values in mapping.items()]
