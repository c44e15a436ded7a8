"""Every check of the data a run meets, in one place, used alike by ``fit``, ``launch``,
``Run.evaluate`` and prediction: what a data set is (its type, sample shape and task against
the model's), its categorical codes against training's, and its values (non-finite features,
targets that do not suit the task, class ids), counted per partition where the partitions live
(:func:`value_counts`) and checked once on the client from the totals."""

from __future__ import annotations

import numpy as np

from daskdl.data.dataset import Dataset

# More classes than this, or more than training samples, is not what class ids look like.
MAX_INFERRED_CLASSES = 100_000


N_COUNTS = 6  # what value_counts gives per partition


def value_counts(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """One partition's (lowest target, highest target, non-integer targets, non-finite
    features, samples, non-finite targets): what :func:`check_values` needs."""
    y = np.asarray(y)
    if len(y) == 0:
        return np.array([np.inf, -np.inf, 0, 0, 0, 0], dtype=np.float64)
    floating = np.issubdtype(y.dtype, np.floating)
    fractional = int((y != np.round(y)).sum()) if floating else 0
    bad_y = int((~np.isfinite(y)).sum()) if floating else 0
    bad = int((~np.isfinite(X)).sum())
    lo, hi = (np.nanmin(y), np.nanmax(y)) if bad_y < y.size else (np.nan, np.nan)
    return np.array([lo, hi, fractional, bad, len(y), bad_y], dtype=np.float64)


def total_counts(parts) -> np.ndarray:
    """A whole data set's numbers from its partitions' :func:`value_counts`."""
    parts = np.asarray(parts, dtype=np.float64).reshape(-1, N_COUNTS)
    return np.array([np.nanmin(parts[:, 0]), np.nanmax(parts[:, 1]), *parts[:, 2:].sum(axis=0)])


def check_values(which: str, counts, task: str = "classification") -> None:
    """Raise on non-finite features, or targets that do not suit the task (class ids that are
    not integers, multi-hot labels that are not 0/1, NaN regression targets), from the
    counts of :func:`total_counts`. ``which`` names the data ("train", "val", "data")."""
    lo, hi, fractional, bad, _, bad_y = counts
    if bad:
        raise ValueError(
            f"The {which} features contain {int(bad)} NaN or infinite values. Clean them, "
            "or drop those samples with dataset.dropna()."
        )
    if task == "regression" and bad_y:
        raise ValueError(
            f"The {which} regression targets contain {int(bad_y)} NaN or infinite values. "
            "Drop those samples (dataset.dropna()) or fill them in."
        )
    if task == "multilabel" and (fractional or lo < 0 or hi > 1):
        raise ValueError(
            f"The {which} labels are multi-hot (task='multilabel'), so every value must be 0 "
            f"or 1; they range over [{lo:g}, {hi:g}]"
            + (f" with {int(fractional)} non-integer (or NaN) values" if fractional else "")
            + ". Make one 0/1 column per label, or use task='regression' for numbers."
        )
    if task == "classification" and fractional:
        raise ValueError(
            f"The {which} labels contain {int(fractional)} non-integer (or NaN) values, and "
            "the task is classification: labels are integer class ids 0..n_classes-1. Map "
            "the labels to class ids (for example np.unique(y, return_inverse=True)), or "
            "pass task='regression' to the Dataset for numeric targets."
        )


def class_count(which: str, lo: float, hi: float, n: int, n_classes: int | None) -> int:
    """The number of classes: ``n_classes``, or inferred from the highest label; an error
    when the labels ``[lo, hi]`` do not fit it, or look like a regression target instead."""
    if n_classes is None:
        inferred = max(2, int(hi) + 1)
        if inferred > MAX_INFERRED_CLASSES or (inferred > 100 and inferred > n):
            raise ValueError(
                f"The {which} labels look like regression targets, not class ids: they range "
                f"over [{lo:g}, {hi:g}], which would make {inferred:,} classes for "
                f"{int(n):,} samples. For a numeric target pass task='regression' to the "
                "Dataset (Dataset.from_numpy(X, y, task='regression'), or y as floats). To "
                "train on that many classes anyway, pass n_classes to the Dataset."
            )
        n_classes = inferred
    if lo < 0 or hi >= n_classes:
        raise ValueError(
            f"Labels must be in [0, {n_classes}) but range over [{lo:g}, {hi:g}]. "
            "Map class labels to 0..n_classes-1, or pass n_classes to the Dataset."
        )
    return n_classes


def check_parts(parts: dict[str, tuple[np.ndarray | None, str]]) -> dict:
    """Check each named data set's targets (for its task) and features from a few numbers
    of each of its partitions, counted where they are (:func:`value_counts`,
    ``parts[name] = (counts, task)``). Returns each data set's totals."""
    uncounted = [name for name, (c, _) in parts.items() if c is None]
    if uncounted:
        raise RuntimeError(f"the partitions of {uncounted} were not counted on the cluster")
    counts = {name: total_counts(c) for name, (c, _) in parts.items() if c is not None}
    for name, (_, task) in parts.items():
        check_values(name, counts[name], task)
    return counts


def check_compatible(data, input_shape, name: str, task: str | None = None) -> None:
    """``data`` is a Dataset whose samples (and task, when given) are the model's."""
    if not isinstance(data, Dataset):
        raise TypeError(
            f"{name} must be a daskdl.Dataset, got {type(data).__name__}. "
            "Wrap arrays with daskdl.Dataset.from_numpy(X, y) or Dataset.from_dask(X, y)."
        )
    if task is not None and data.task != task:
        raise ValueError(
            f"{name} is a {data.task} data set, but the model learns {task}. Give it the "
            f"same kind of targets (Dataset(..., task={task!r}))."
        )
    if input_shape is not None and tuple(data.sample_shape) != tuple(input_shape):
        raise ValueError(
            f"{name} has samples of shape {data.sample_shape}, but the model takes "
            f"{tuple(input_shape)}."
        )


def check_categories(data: Dataset, categories: dict | None, name: str) -> None:
    """``data`` encodes its categorical features with the codes the model learned."""
    if data.categories != categories:
        raise ValueError(
            f"{name}'s categorical codes are not the training data's (categories "
            f"{sorted(data.categories or {})} vs {sorted(categories or {})}, or other values): "
            "build it with Dataset.from_dataframe(..., categories=train.categories), or split "
            "it from the same data set."
        )
