"""What a trained model takes as input, recorded by its run and applied wherever the model
meets data again (``Run.predict``, ``Run.evaluate``, :func:`daskdl.predict`, ``daskdl
predict``, a run's validation set): the features by name and in order, and the statistics
the features were standardised with. (The categorical codes, the task and the targets' scale
travel beside them in the same signed manifest.)

As a scikit-learn ``Pipeline`` carries its scaler, a run carries its standardisation: raw
data get the training statistics; data standardised with the same statistics pass as they
are; data standardised with other statistics, or standardised for a model trained on raw
features, are refused with both named. Nothing is applied twice.

>>> import numpy as np
>>> match_order(["b", "a"], ["a", "b"], "data")
array([1, 0])
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd
from distributed import Client

from daskdl.data import frames, preprocess, validate
from daskdl.data.dataset import Dataset
from daskdl.data.preprocess import Standardization

logger = logging.getLogger(__name__)


def statistics(client: Client, stats: Standardization) -> tuple[np.ndarray, np.ndarray]:
    """The values of (possibly lazy) statistics, computed on the cluster where lazy."""
    lazy = [a for a in (stats.mean, stats.std) if isinstance(a, da.Array)]
    values = iter(client.compute(lazy, sync=True, optimize_graph=False) if lazy else [])
    mean, std = (next(values) if isinstance(a, da.Array) else a for a in (stats.mean, stats.std))
    return np.asarray(mean, np.float32), np.asarray(std, np.float32)


def record(client: Client, train: Dataset) -> tuple[dict, Standardization | None]:
    """What a run records about its inputs (JSON: the features' statistics, where the
    training data were standardised, and the samples' dtype), and those statistics computed,
    still known by the lazy arrays' keys (data standardised ``like=train`` match at once)."""
    doc: dict = {"standardize": None, "input_dtype": str(train.X.dtype)}
    stats = train.standardized
    if stats is None:
        return doc, None
    values = statistics(client, stats)
    doc["standardize"] = preprocess.to_record(*values)
    return doc, Standardization(*values, token=stats.key)


def recorded(doc: dict) -> Standardization | None:
    """The statistics a run (or checkpoint manifest) recorded, or None."""
    std = doc.get("standardize")
    return None if std is None else Standardization(*preprocess.from_record(std))


def match_order(names: Sequence[str], trained: Sequence[str], what: str) -> np.ndarray | None:
    """Where each of the model's features is among ``names``: None when they already come in
    the model's order; the columns to take otherwise (other order, extra columns)."""
    names, trained = list(names), list(trained)
    if names == trained:
        return None
    missing = [n for n in trained if n not in names]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(
            f"{what} has no column {missing[0]!r}{more}, which the model was trained on: it "
            f"needs the features {trained}. Give {what} "
            "every training feature (from_dataframe(..., features=...)), or --features."
        )
    _note_left_out(names, trained, what)
    return np.array([names.index(n) for n in trained])


def _note_left_out(names: Sequence, trained: Sequence[str], what: str) -> None:
    extra = [n for n in names if n not in trained]
    if extra:
        logger.warning("%s has columns the model was not trained on, left out: %s", what, extra)


@dataclass(frozen=True)
class Trained:
    """What a trained model takes: its features by name (None: it learned from arrays),
    their categorical codes, the statistics they were standardised with, and one sample's
    shape."""

    features: Sequence[str] | None
    categories: dict | None
    reference: Standardization | None
    input_shape: tuple[int, ...]

    @classmethod
    def from_manifest(cls, manifest: dict, input_shape: tuple[int, ...]) -> Trained:
        return cls(
            manifest.get("features"), manifest.get("categories"), recorded(manifest),
            tuple(input_shape),
        )  # fmt: skip


def samples(client: Client, data, trained: Trained, what: str = "data"):
    """``data``'s samples as the model takes them, and the index to give predictions (a
    dataframe's, or None): ``data`` is a :class:`Dataset`, a Dask array of raw samples, or a
    pandas or Dask dataframe holding the training features by name."""
    if isinstance(data, Dataset):
        validate.check_categories(data, trained.categories, name=what)
        return conform(client, data, trained, what).X, data.index
    if isinstance(data, da.Array):
        return conform_array(client, data, None, None, trained, what), None
    if isinstance(data, (pd.DataFrame, dd.DataFrame)):
        if trained.features is None:
            raise TypeError(
                f"{what} is a dataframe, but the model learned from arrays, without feature "
                "names: pass a daskdl.Dataset or a Dask array of samples."
            )
        ddf = frames.as_dask_frame(data)
        X, index = frames.dataframe_features(ddf, trained.features, trained.categories)
        _note_left_out(list(ddf.columns), trained.features, what)
        return conform_array(client, X, None, None, trained, what), index
    raise TypeError(
        f"{what} must be a daskdl.Dataset, a Dask array of samples or a dataframe, got "
        f"{type(data).__name__}."
    )


def conform(client: Client, data: Dataset, trained: Trained, what: str = "data") -> Dataset:
    """A data set as the model takes it (:func:`conform_array` on its features), marked with
    the statistics it now carries."""
    X = conform_array(client, data.X, data.features, data.standardized, trained, what)
    if X is data.X:
        return data
    out = data._like(X, data.y, same_rows=True)
    out.features = list(trained.features) if trained.features is not None else data.features
    out.standardized = trained.reference
    return out


def conform_array(
    client: Client,
    X: da.Array,
    names: Sequence[str] | None,
    stats: Standardization | None,
    trained: Trained,
    what: str = "data",
) -> da.Array:
    """``X`` as the model takes it: the model's features in its order (by name, where both
    sides have names), standardised with the training statistics unless it already was."""
    order = None
    if names is not None and trained.features is not None:
        order = match_order(names, trained.features, what)
        if order is not None:
            if X.ndim != 2 or X.shape[1] != len(names):
                raise ValueError(
                    f"{what}'s features {list(names)} are not the model's "
                    f"{list(trained.features)}, and its samples are not one column per name to "
                    "reorder: build it with the training features, in their order."
                )
            X = X[:, order]
    if tuple(X.shape[1:]) != tuple(trained.input_shape):
        raise ValueError(
            f"{what} has samples of shape {tuple(X.shape[1:])}, but the model takes "
            f"{tuple(trained.input_shape)}."
        )
    reference = trained.reference
    if stats is None:
        if reference is None or _reads(X, reference):
            return X
        return preprocess.standardize(X, reference.mean, reference.std)
    if reference is None:
        raise ValueError(
            f"{what} is standardised (standardize() was called on it), but the model was "
            "trained on features as they were read, not standardised: pass the data as they "
            "were before standardize()."
        )
    if stats.same_as(reference):
        return X
    theirs, ours = statistics(client, stats), statistics(client, reference)
    if order is not None:
        theirs = (theirs[0][order], theirs[1][order])
    if not preprocess.close(theirs, ours):
        raise ValueError(
            f"{what} was standardised with other statistics than the model's training data: "
            f"mean {_short(theirs[0])}, std {_short(theirs[1])}, against the training data's "
            f"mean {_short(ours[0])}, std {_short(ours[1])}. Pass the data as they were before "
            "standardize() (the model applies its own statistics), or standardize(like=train)."
        )
    return X


def _reads(X: da.Array, reference: Standardization) -> bool:
    """Whether ``X`` was computed from the training statistics themselves: the features of a
    data set standardised ``like=train``, handed over as a bare array (``test.X``)."""
    if reference.key is None:
        return False
    names = {k[0] if isinstance(k, tuple) else k for k in X.__dask_graph__()}
    if reference.key[0] in names:
        logger.info("the samples are standardised with the training statistics: taken as they are")
        return True
    return False


def _short(values: np.ndarray, n: int = 4) -> str:
    flat = np.asarray(values).ravel()
    shown = ", ".join(f"{v:.4g}" for v in flat[:n])
    return f"[{shown}{', ...' if len(flat) > n else ''}]"
