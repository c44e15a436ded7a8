"""``Dataset``: features ``X`` (n, ...) and targets ``y`` (class ids (n,), multi-hot labels (n, k)
or numbers (n,) / (n, k)) as Dask arrays chunked along samples (the shard plan that gives their
partitions to ranks is :mod:`daskdl.runs.shards`)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import dask
import dask.array as da
import numpy as np

from daskdl.config.options import integer
from daskdl.data import frames, preprocess, storage
from daskdl.objective.task import check_task, infer_task

if TYPE_CHECKING:  # for annotations only
    import os
    from pathlib import Path

    import dask.bag as db
    import dask.dataframe as dd
    import pandas as pd
    import xarray as xr
    from distributed import Client

    from daskdl.data.text import Vocab


class Dataset:
    """A data set held as two lazy Dask arrays with the same partitions: features ``X`` and
    targets ``y``.

    Partition ``i`` is ``X.blocks[i]`` together with ``y.blocks[i]``: whole samples, never a
    slice of a sample. Nothing is computed until training (or ``persist``).

    ``task`` says what ``y`` holds: ``"classification"`` (integer class ids, shape (n,)),
    ``"multilabel"`` (multi-hot 0/1, shape (n, k)) or ``"regression"`` (numbers, shape (n,) or
    (n, k)). When not given it follows the labels: floats are regression targets, integers
    (or booleans) class ids, or multi-hot labels when there are several per sample; giving
    ``n_classes`` means classification.

    Build one with :meth:`from_numpy`, :meth:`from_dask`, :meth:`from_dataframe`,
    :meth:`from_xarray`, or :meth:`load` one written by :meth:`save`.

    Examples
    --------
    >>> import numpy as np, daskdl
    >>> ds = daskdl.Dataset.from_numpy(np.zeros((100, 4)), np.arange(100) % 2, chunks=25)
    >>> ds.npartitions, ds.n_classes, ds.task
    (4, 2, 'classification')
    >>> daskdl.Dataset.from_numpy(np.zeros((100, 4)), np.linspace(0, 1, 100)).task
    'regression'
    """

    classes: list | None = None  # label names, where labels were names (from_text)
    features: Sequence[str] | None = None  # feature names, where they have names (dataframes)
    # Categorical features' categories, {column: [category, ...]}: code 0 is "unknown", the
    # categories are 1..K (daskdl.data.categorical).
    categories: dict[str, list] | None = None
    # The dataframe's index, one partition per partition of X (from_dataframe): predictions
    # keep it. Transforms that drop or move samples (split, dropna) drop it.
    index = None
    # Lazy (mean, std) of the targets, where standardize() scaled them (regression).
    target_scale: tuple[da.Array, da.Array] | None = None
    # The statistics standardize() applied to the features (None: the features as read).
    standardized: preprocess.Standardization | None = None

    def __init__(
        self, X: da.Array, y: da.Array, n_classes: int | None = None, task: str | None = None
    ):
        if not isinstance(X, da.Array) or not isinstance(y, da.Array):
            raise TypeError(
                f"Dataset needs Dask arrays, got X={type(X).__name__}, y={type(y).__name__}. "
                "Use Dataset.from_numpy(...) for numpy arrays."
            )
        if X.ndim < 2:
            raise ValueError(
                f"X must have a sample axis and at least one feature axis, got shape {X.shape}. "
                "For one feature per sample, use X.reshape(-1, 1)."
            )
        if not np.issubdtype(X.dtype, np.number) or np.issubdtype(X.dtype, np.complexfloating):
            raise TypeError(
                f"X must hold real numbers, got dtype {X.dtype}. Encode categorical or text "
                "features as numbers first."
            )
        if y.dtype == bool:
            y = y.astype(np.int64)  # False/True are classes 0 and 1 (or labels off and on)
        if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
            raise TypeError(
                f"y must hold numbers (class ids, 0/1 labels or regression targets), got dtype "
                f"{y.dtype}. Encode labels as integers 0..n_classes-1 (for a pandas category: "
                ".cat.codes)."
            )
        task = check_task(task)
        if task is None:
            task = "classification" if n_classes is not None else infer_task(y.dtype, y.shape)
        self.task: str = task
        y = _check_target_shape(y, task)
        for axis, chunks in enumerate(X.chunks[1:], start=1):
            if len(chunks) > 1:
                raise ValueError(
                    f"X is chunked along axis {axis} (chunks {chunks}); every partition must "
                    f"hold whole samples. Fix: X = X.rechunk({{{axis}: -1}})."
                )
        n_x, n_y = X.shape[0], y.shape[0]
        if not (math.isnan(n_x) or math.isnan(n_y)) and n_x != n_y:
            raise ValueError(f"X has {n_x} samples but y has {n_y}; they must be equal.")
        if n_x == 0:
            raise ValueError("The dataset is empty (0 samples).")
        if any(math.isnan(c) for c in X.chunks[0] + y.chunks[0]):
            if X.numblocks[0] != y.numblocks[0]:
                raise ValueError(
                    f"X has {X.numblocks[0]} partitions and y {y.numblocks[0]}, with unknown "
                    "lengths, so they cannot be aligned. Call X.compute_chunk_sizes() and "
                    "y.compute_chunk_sizes() first."
                )
        elif X.chunks[0] != y.chunks[0]:
            y = y.rechunk((X.chunks[0],) + y.chunks[1:])
        if n_classes is not None:
            if task != "classification":
                raise ValueError(
                    f"n_classes is for classification; this data set's task is {task!r}. "
                    "Leave n_classes out (the outputs follow y's shape), or pass "
                    "task='classification'."
                )
            n_classes = integer("n_classes", n_classes, minimum=2)
        if X.dtype.kind == "f" and X.dtype.itemsize > 4:  # values beyond float32's: named
            X = X.map_blocks(frames.to_float, np.float32, "X", dtype=np.float32)  # type: ignore[arg-type]  # dask's stubs
        self.X = X.astype(np.float32) if X.dtype != np.float32 else X
        self.y = y
        self._n_classes = n_classes

    # ---------------------------------------------------------------- constructors

    @classmethod
    def from_numpy(
        cls,
        X: np.ndarray,
        y: np.ndarray,
        chunks: int | str = "auto",
        n_classes: int | None = None,
        task: str | None = None,
    ) -> Dataset:
        """From in-memory arrays, split into partitions of ``chunks`` samples.

        ``chunks="auto"`` picks partitions of about 64 MB (and at least 4 of them where there
        are enough samples, so that two ranks each get work). Where a ``distributed.Client``
        is current and the arrays are large, their partitions are scattered to the workers
        now, as Dask recommends, instead of travelling inside every graph that uses them.
        """
        X, y = np.asarray(X), np.asarray(y)
        if len(X) != len(y):
            raise ValueError(f"X has {len(X)} samples but y has {len(y)}; they must be equal.")
        if chunks == "auto":
            chunks = frames.auto_rows(X)
        if isinstance(chunks, bool) or not isinstance(chunks, numbers.Integral) or chunks < 1:
            raise ValueError(f"chunks must be a positive number of samples, got {chunks!r}.")
        chunks = int(chunks)
        return cls(frames.in_cluster(X, chunks), frames.in_cluster(y, chunks), n_classes, task)

    @classmethod
    def from_dask(
        cls, X: da.Array, y: da.Array, n_classes: int | None = None, task: str | None = None
    ) -> Dataset:
        """From Dask arrays chunked along the first (sample) axis only."""
        return cls(X, y, n_classes, task)

    @classmethod
    def from_dataframe(
        cls,
        ddf: dd.DataFrame | pd.DataFrame,
        features: Sequence[str],
        label: str | Sequence[str],
        n_classes: int | None = None,
        task: str | None = None,
        categorical: Sequence[str] | None = None,
        categories: Mapping[str, Sequence] | None = None,
    ) -> Dataset:
        """From a Dask (or pandas) dataframe: ``features`` columns become X (n, len(features));
        ``label`` (one column, or a list of them: several regression targets or multi-hot
        labels) y. pandas' nullable dtypes (``Int64``, ``Float64``, ``boolean``, ``string``
        as a categorical column) work; a missing feature value is NaN (``dropna()`` drops its
        row), a missing class id is refused naming the column.

        ``categorical`` features (and any feature of ``category`` dtype) are encoded as integer
        codes, lazily: 0 for a value not in the mapping, 1..K for the categories. The mapping
        is found in one pass over those columns (a ``category`` dtype's own where known),
        or given: build validation or test data with ``categories=train.categories`` so that
        they share the training codes (the columns it maps are categorical then). One
        partition per dataframe partition; their lengths are found at training time.
        """
        X, y, features, mapping, index = frames.from_dataframe(
            ddf, features, label, categorical, categories
        )
        ds = cls(X, y, n_classes, task)
        ds.features, ds.categories, ds.index = features, mapping, index
        return ds

    @classmethod
    def from_text(
        cls, ddf: dd.DataFrame, text: str, label: str, vocab: Vocab, seq_len: int = 64
    ) -> Dataset:
        """Labelled text: the ``text`` column of a Dask dataframe as ``seq_len`` token ids per
        row (:func:`daskdl.data.text.encode`: padded with 0, cut at ``seq_len``), lazily.

        Labels that are not integers (topic names, say) get ids in sorted order; the names
        are in ``dataset.classes``.

        Examples
        --------
        >>> freqs = daskdl.data.text.word_frequencies(ddf["text"])              # doctest: +SKIP
        >>> vocab = daskdl.data.text.build_vocab(freqs, max_size=20_000)         # doctest: +SKIP
        >>> ds = Dataset.from_text(ddf, "text", "topic", vocab, seq_len=64)  # doctest: +SKIP
        """
        from daskdl.data import text as text_

        frame, classes = text_.labelled_frame(ddf, text, label, vocab, seq_len)
        n_classes = len(classes) if classes else None
        ds = cls.from_dataframe(frame, text_.token_columns(seq_len), label, n_classes=n_classes)
        ds.classes = classes
        return ds

    @classmethod
    def from_corpus(cls, bag: db.Bag, vocab: Vocab, seq_len: int = 32, stride: int = 1) -> Dataset:
        """Next-word prediction: windows of ``seq_len`` token ids from a ``dask.bag`` of texts,
        each labelled with the id of the word that follows (``n_classes = len(vocab)``).

        Split the texts first (:func:`daskdl.data.text.split_corpus`), not the windows: windows
        overlap.
        """
        from daskdl.data import text as text_

        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}.")
        frame = text_.corpus_frame(bag, vocab, seq_len, stride)
        return cls.from_dataframe(frame, text_.token_columns(seq_len), "next", len(vocab))

    @classmethod
    def from_xarray(
        cls,
        ds: xr.Dataset,
        sample_dim: str,
        features: Sequence[str],
        label: str,
        n_classes: int | None = None,
        task: str | None = None,
    ) -> Dataset:
        """From an xarray Dataset whose variables share the dimension ``sample_dim``.

        One feature variable may have more dimensions (an image ``(sample, channel, y, x)``
        becomes X of that shape); several feature variables are flattened per sample and
        concatenated. The partitions follow the chunks of ``sample_dim`` (or one partition per
        about 64 MB when the dataset is not chunked).
        """
        X, y = frames.from_xarray(ds, sample_dim, features, label)
        out = cls(X, y.rechunk((X.chunks[0],)), n_classes, task)
        if all(ds[f].dims == (sample_dim,) for f in features):  # a column per variable
            out.features = [str(f) for f in features]
        return out

    # ---------------------------------------------------------------- properties

    @property
    def n_classes(self) -> int:
        """The number of classes; when not given, ``max(y) + 1`` (computed once)."""
        if self.task != "classification":
            raise ValueError(
                f"A {self.task} data set has no classes; its model has n_outputs="
                f"{self.n_outputs} outputs."
            )
        if self._n_classes is None:
            self._n_classes = max(2, int(self.y.max().compute()) + 1)
        return self._n_classes

    @property
    def known_n_classes(self) -> int | None:
        """The number of classes given, or counted so far; ``None`` where neither (nothing is
        computed to answer)."""
        return self._n_classes

    @property
    def n_outputs(self) -> int:
        """Outputs a model needs: one per class, per label, or per regression target."""
        if self.task == "classification":
            return self.n_classes
        return int(self.y.shape[1]) if self.y.ndim == 2 else 1

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.X.shape[1:])

    @property
    def npartitions(self) -> int:
        return self.X.numblocks[0]

    @property
    def is_image(self) -> bool:
        """Images are (n, channels, height, width)."""
        return self.X.ndim == 4

    def __len__(self) -> int:
        n = self.X.shape[0]
        if math.isnan(n):
            raise TypeError("The number of samples is not known yet; call .persist() first.")
        return int(n)

    def __repr__(self) -> str:
        n = self.X.shape[0]
        n = "?" if math.isnan(n) else int(n)
        if self.task == "classification":
            what = f"n_classes={self._n_classes or '?'}"
        else:
            what = f"{self.task}, n_outputs={self.n_outputs}"
        return (
            f"<daskdl.Dataset: {n} samples of shape {self.sample_shape}, "
            f"{self.npartitions} partitions, {what}>"
        )

    def _like(self, X: da.Array, y: da.Array, target_scale=None, same_rows=False) -> Dataset:
        """A data set of the same kind (task, classes, target scale) over new arrays: the
        same samples in the same order where ``same_rows``."""
        ds = Dataset(X, y, self._n_classes, task=self.task)
        ds.classes, ds.features, ds.categories = self.classes, self.features, self.categories
        ds.index = self.index if same_rows else None
        ds.target_scale = target_scale if target_scale is not None else self.target_scale
        ds.standardized = self.standardized
        return ds

    # ---------------------------------------------------------------- transforms

    def split(self, test_size: float = 0.2, seed: int = 0) -> tuple[Dataset, Dataset]:
        """Split lazily into (train, test) at random, reproducibly for a given ``seed``.

        Each partition gives ``round(test_size * len(partition))`` of its samples, chosen with
        a generator seeded by ``(seed, partition index)``, to the test set: no data moves and
        the result does not depend on the cluster.
        """
        real = isinstance(test_size, numbers.Real) and not isinstance(test_size, bool)
        if not (real and 0 < test_size < 1):
            raise ValueError(f"test_size must be a fraction between 0 and 1, got {test_size!r}.")
        test_size = float(test_size)
        seed = integer("seed", seed, minimum=0)
        masks = _split_masks(self.y, test_size, seed)
        n_test = tuple(round(test_size * m) if not math.isnan(m) else m for m in self.y.chunks[0])
        n_train = tuple(m - t for m, t in zip(self.y.chunks[0], n_test))
        for side, counts in (("test", n_test), ("train", n_train)):
            if not any(math.isnan(c) for c in counts) and sum(counts) == 0:
                raise ValueError(
                    f"split(test_size={test_size:g}) leaves the {side} set empty: each "
                    "partition gives round(test_size * its length) samples to the test set, and "
                    f"these partitions hold {sorted(set(self.y.chunks[0]))} samples. Choose "
                    "another test_size, or fewer, larger partitions (chunks=...)."
                )
        test = self._like(_take_rows(self.X, masks, n_test), _take_rows(self.y, masks, n_test))
        train_masks = masks.map_blocks(np.logical_not, dtype=bool)  # type: ignore[call-arg,arg-type]  # dask's stubs
        train = self._like(
            _take_rows(self.X, train_masks, n_train), _take_rows(self.y, train_masks, n_train)
        )
        return train, test

    def standardize(self, like: Dataset | None = None) -> Dataset:
        """Scale features to zero mean and unit variance (lazily); regression targets too.

        The mean and standard deviation are Dask reductions over all samples: per feature for
        tabular data, per channel for images, per target for regression. Pass ``like=train``
        to apply the training set's statistics to a test set (``train`` as it was, or after
        its own ``standardize()``: either way its statistics). The data set remembers the
        statistics (``standardized``): a run records them in its checkpoints, and
        ``predict``/``evaluate`` apply them to raw data and refuse data standardised with
        others. A model trained on standardised targets reports its metrics (and
        ``Run.evaluate`` its scores) in the targets' own units.
        """
        if like is not None and not isinstance(like, Dataset):
            raise TypeError(
                f"like must be a daskdl.Dataset (the one whose statistics to use, such as the "
                f"training set), got {type(like).__name__}."
            )
        if self.standardized is not None:
            raise ValueError(
                "This data set is standardised already (standardize() was called on it or on "
                "the data it came from): call it once, on the data as they are."
            )
        source = like if like is not None else self
        if source.standardized is not None:  # like= standardised: the statistics it used
            mean, std = source.standardized.mean, source.standardized.std
        else:
            mean, std = source.stats()
            if self.categories:  # codes stay codes
                keep = np.isin(list(self.features or ()), list(self.categories))
                mean, std = da.where(keep, 0.0, mean), da.where(keep, 1.0, std)
        X = preprocess.standardize(self.X, mean, std)
        stats = preprocess.Standardization(mean, std)
        if self.task != "regression":
            out = self._like(X, self.y, same_rows=True)
            out.standardized = stats
            return out
        if like is not None and like.task != "regression":
            raise ValueError(
                f"like= is a {like.task} data set; a regression data set needs the statistics "
                "of a regression training set."
            )
        if self.target_scale is not None:  # already standardised: keep the first scale
            raise ValueError(
                "These targets are standardised already (standardize() was called before); "
                "call it once, on the data as they are."
            )
        if source.target_scale is not None:  # like= standardised: its targets' scale
            scale = source.target_scale
        else:
            scale = preprocess.target_moments(source.y)
        y = preprocess.standardize(self.y, *scale)
        out = self._like(X, y, target_scale=scale, same_rows=True)
        out.standardized = stats
        return out

    def stats(self) -> tuple[da.Array, da.Array]:
        """Lazy (mean, std) used by :meth:`standardize`."""
        return preprocess.moments(self.X)

    def dropna(self) -> Dataset:
        """Drop (lazily) every sample with a NaN or infinite feature or a NaN label."""
        keep = preprocess.finite_rows(self.X, self.y)
        return self._like(_take_rows(self.X, keep), _take_rows(self.y, keep))

    def persist(self, client: Client | None = None) -> Dataset:
        """Compute the partitions and keep them in the cluster's memory (on the workers).

        Unoptimised, as ``fit`` persists: keys shared with other data sets (the statistics
        that ``test.standardize(like=train)`` uses) keep the same tasks everywhere, so a later
        computation does not resubmit them fused differently (Dask warns of deadlocks then).
        """
        if client is None:
            X, y = dask.persist(self.X, self.y, optimize_graph=False)
        else:
            X, y = client.persist([self.X, self.y], optimize_graph=False)
        return self._persisted(X, y)

    def _persisted(self, X: da.Array, y: da.Array, target_scale=None) -> Dataset:
        if math.isnan(X.shape[0]):
            # Lengths of partitions made by dropna or a dataframe are now cheap to find.
            X, y = X.compute_chunk_sizes(), y.compute_chunk_sizes()
        return self._like(X, y, target_scale, same_rows=True)

    def _with_lengths(self, sizes: Sequence[int]) -> Dataset:
        """The same data set with its partitions' lengths known (counted by a pass)."""
        chunks = (tuple(int(n) for n in sizes),)
        X = da.Array(self.X.dask, self.X.name, chunks + self.X.chunks[1:], meta=self.X._meta)
        y = da.Array(self.y.dask, self.y.name, chunks + self.y.chunks[1:], meta=self.y._meta)
        return self._like(X, y, same_rows=True)

    def compute(self) -> tuple[np.ndarray, np.ndarray]:
        """(X, y) as numpy arrays in this process; only for data that fits in memory."""
        return dask.compute(self.X, self.y)

    # ---------------------------------------------------------------- on disk

    def save(
        self, path: str | os.PathLike, key: bytes | str | None = None, overwrite: bool = False
    ) -> Path:
        """Write the data set to the folder ``path``, one file per partition, each written by
        a Dask task (so ``path`` must be visible to every worker); return the path.

        ``key`` encrypts every partition with AES-GCM: 16, 24 or 32 random bytes
        (``os.urandom(32)``), or a passphrase (stretched with scrypt). The key travels to
        the workers with the tasks: use a TLS cluster (``local_cluster(secure=True)``)
        beyond one machine. An existing non-empty folder is replaced only with ``overwrite``.

        >>> ds.save("cache/train", key=key)                          # doctest: +SKIP
        >>> train = daskdl.Dataset.load("cache/train", key=key)      # doctest: +SKIP
        """
        return storage.save(self, path, key, overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike, key: bytes | str | None = None) -> Dataset:
        """A lazy data set over a folder written by :meth:`save` (pass the same ``key`` if it
        was encrypted). A wrong key is an error before any partition is read."""
        X, y, meta = storage.load(path, key)
        ds = cls(X, y, meta["n_classes"], meta["task"])
        ds.classes, ds.features, ds.categories = (
            meta["classes"],
            meta["features"],
            meta["categories"],
        )
        ds.target_scale, ds.standardized = meta["target_scale"], meta["standardized"]
        return ds


def _check_target_shape(y: da.Array, task: str) -> da.Array:
    """``y`` as the task needs it (one class id per sample; k labels or targets per sample),
    whole samples per partition."""
    if task == "classification":
        if y.ndim == 2 and y.shape[1] == 1:
            raise ValueError(
                f"y must be one label per sample (1-D), got shape {y.shape}: use y.ravel()."
            )
        if y.ndim != 1:
            hint = (
                " For several 0/1 labels per sample, pass task='multilabel'." if y.ndim == 2 else ""
            )
            raise ValueError(
                f"y must be one class label per sample (1-D), got shape {y.shape}.{hint}"
            )
    elif task == "multilabel" and y.ndim != 2:
        raise ValueError(
            f"task='multilabel' needs y of shape (n, k): one 0/1 column per label, got shape "
            f"{y.shape}. For one class per sample use task='classification'."
        )
    elif y.ndim not in (1, 2):
        raise ValueError(
            f"Regression targets must be (n,) or (n, k), got shape {y.shape}. Flatten the "
            "targets of a sample: y.reshape(len(y), -1)."
        )
    if y.ndim == 2 and len(y.chunks[1]) > 1:
        y = y.rechunk({1: -1})
    return y


def _split_masks(y: da.Array, test_size: float, seed: int) -> da.Array:
    def block_mask(block: np.ndarray, block_id=None) -> np.ndarray:
        n = len(block)
        rng = np.random.default_rng([seed, block_id[0]])
        mask = np.zeros(n, dtype=bool)
        mask[rng.permutation(n)[: round(test_size * n)]] = True
        return mask

    # One mask value per sample, also for (n, k) targets.
    return y.map_blocks(block_mask, dtype=bool, drop_axis=list(range(1, y.ndim)))  # type: ignore[call-arg,arg-type]


def _take_rows(arr: da.Array, masks: da.Array, counts: tuple | None = None) -> da.Array:
    """Rows of ``arr`` where the per-partition boolean ``masks`` is true, partition by partition.

    ``counts`` are the resulting partition lengths where they are known in advance.
    """
    counts = counts or tuple(np.nan for _ in arr.chunks[0])
    axes = "abcdefgh"[: arr.ndim]
    return da.blockwise(
        _select_rows,
        axes,
        arr,
        axes,
        masks,
        axes[0],
        dtype=arr.dtype,
        adjust_chunks={axes[0]: counts},
    )


def _select_rows(block: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return block[mask]
