"""Ready data sets. Nothing here downloads anything: data ships with a package, is read from
local files, or is generated."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import dask
import dask.array as da
import numpy as np

from daskdl.data.dataset import Dataset

CIFAR10_RECORD = 1 + 3 * 32 * 32
CIFAR10_TRAIN_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)]
CIFAR10_TEST_FILES = ["test_batch.bin"]


def digits(chunks: int = 225) -> Dataset:
    """scikit-learn's 1,797 handwritten digits as 1x8x8 images in [0, 1], 10 classes.

    Examples
    --------
    >>> ds = digits()
    >>> ds.sample_shape, ds.n_classes, ds.npartitions
    ((1, 8, 8), 10, 8)
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    X = (bunch.images[:, None, :, :] / 16.0).astype(np.float32)
    return Dataset.from_numpy(X, bunch.target.astype(np.int64), chunks=chunks, n_classes=10)


def cifar10(path: str | os.PathLike, split: str = "train") -> Dataset:
    """CIFAR-10 from the binary version's files in ``path``, lazily, one partition per file.

    ``split="train"`` reads ``data_batch_1.bin`` ... ``data_batch_5.bin`` (those present, at
    least one); ``split="test"`` reads ``test_batch.bin``. Each record is 1 label byte and
    3,072 pixel bytes (channels first); pixels are scaled to [0, 1]. The files are parsed with
    numpy: nothing is unpickled and nothing is downloaded.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(
            f"CIFAR-10 directory {str(root)!r} does not exist. Point cifar10() at the folder "
            "holding data_batch_1.bin ... test_batch.bin (the 'binary version' of CIFAR-10)."
        )
    names = CIFAR10_TRAIN_FILES if split == "train" else CIFAR10_TEST_FILES
    files = [root / n for n in names if (root / n).is_file()]
    if not files:
        raise FileNotFoundError(f"None of {names} is in {str(root)!r}.")
    parts_x, parts_y = [], []
    for f in files:
        size = f.stat().st_size
        if size == 0 or size % CIFAR10_RECORD:
            raise ValueError(
                f"{f} has {size} bytes, not a whole number of {CIFAR10_RECORD}-byte CIFAR-10 "
                "records; the file is truncated or not in the binary format."
            )
        n = size // CIFAR10_RECORD
        records = dask.delayed(_read_records, pure=True)(str(f))
        parts_x.append(da.from_delayed(records[0], shape=(n, 3, 32, 32), dtype=np.float32))
        parts_y.append(da.from_delayed(records[1], shape=(n,), dtype=np.int64))
    return Dataset(da.concatenate(parts_x), da.concatenate(parts_y), n_classes=10)


def _read_records(filename: str) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(filename, dtype=np.uint8).reshape(-1, CIFAR10_RECORD)
    labels = raw[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise ValueError(f"{filename} has label {labels.max()}; CIFAR-10 labels are 0..9.")
    images = raw[:, 1:].reshape(-1, 3, 32, 32).astype(np.float32) / 255.0
    return images, labels


def write_cifar10_binary(filename: str | os.PathLike, images: np.ndarray, labels: np.ndarray):
    """Write uint8 images (n, 3, 32, 32) and labels in CIFAR-10's binary record format."""
    images = np.asarray(images, dtype=np.uint8).reshape(len(images), -1)
    records = np.concatenate([np.asarray(labels, dtype=np.uint8)[:, None], images], axis=1)
    records.tofile(filename)


def synthetic_images(
    n: int,
    shape: tuple[int, int, int] = (3, 32, 32),
    n_classes: int = 10,
    seed: int = 0,
    chunks: int | None = None,
    noise: float = 1.0,
) -> Dataset:
    """``n`` random images, generated lazily per partition, that a model can learn.

    Each class has a fixed random template, smooth at the scale of 8 pixels so that crops and
    flips keep it recognisable; a sample is its class template plus Gaussian noise of scale
    ``noise``. The result depends only on the arguments (not on the cluster).
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}.")
    chunks = chunks or max(1, math.ceil(n / 4))
    starts = range(0, n, chunks)
    c, h, w = shape
    coarse = np.random.default_rng([seed, 2**31]).normal(
        size=(n_classes, c, math.ceil(h / 8), math.ceil(w / 8))
    )
    templates = coarse.repeat(8, axis=2).repeat(8, axis=3)[:, :, :h, :w]
    xs, ys = [], []
    for b, start in enumerate(starts):
        m = min(chunks, n - start)
        block = dask.delayed(_synthetic_block, pure=True)(templates, m, seed, b, noise)
        xs.append(da.from_delayed(block[0], shape=(m, *shape), dtype=np.float32))
        ys.append(da.from_delayed(block[1], shape=(m,), dtype=np.int64))
    return Dataset(da.concatenate(xs), da.concatenate(ys), n_classes=n_classes)


def _synthetic_block(templates: np.ndarray, m: int, seed: int, block: int, noise: float):
    rng = np.random.default_rng([seed, block])
    labels = rng.integers(0, len(templates), size=m)
    images = templates[labels] + noise * rng.normal(size=(m, *templates.shape[1:]))
    return images.astype(np.float32), labels.astype(np.int64)


def python_docs(npartitions: int = 8):
    """The English documentation that ships inside Python (``pydoc_data.topics``: the
    language reference's topics, about 465 KB) as a ``dask.bag`` of paragraphs.

    Real text with nothing to download, for word counts and language models.

    Examples
    --------
    >>> paragraphs = python_docs()
    >>> paragraphs.count().compute() > 1000
    True
    """
    import re
    from pydoc_data.topics import topics

    import dask.bag as db

    paragraphs = [
        " ".join(p.split())
        for name in sorted(topics)
        for p in re.split(r"\n\s*\n", topics[name])
        if p.strip()
    ]
    return db.from_sequence(paragraphs, npartitions=npartitions)


REGISTRY: dict[str, Callable[..., Dataset]] = {
    "digits": digits,
    "synthetic_images": synthetic_images,
}


def load(name: str, **kwargs) -> Dataset:
    """A data set by name, as the command line names them."""
    if name == "cifar10":
        return cifar10(**kwargs)
    if name not in REGISTRY:
        raise ValueError(
            f"Unknown dataset {name!r}; choose one of {sorted([*REGISTRY, 'cifar10'])}."
        )
    return REGISTRY[name](**kwargs)


def train_test(
    name: str,
    path: str | os.PathLike | None = None,
    test_size: float = 0.2,
    seed: int = 0,
    standardize: bool = True,
) -> tuple[Dataset, Dataset]:
    """Training and validation sets of a named data set, standardised with the training
    statistics: what ``daskdl train`` and the dashboard train on.

    ``cifar10`` needs ``path`` (its own train and test files); the others are split with
    ``test_size`` and ``seed``; ``synthetic_images`` makes 4,096 images.

    Examples
    --------
    >>> train, val = train_test("digits")
    >>> len(train) + len(val)
    1797
    """
    if name == "cifar10":
        if not path:
            raise ValueError("cifar10 needs the folder of its binary files (--data-path FOLDER).")
        train, test = cifar10(path, "train"), cifar10(path, "test")
    else:
        if path:
            raise ValueError(f"A data path is only for cifar10, not {name!r}.")
        kwargs = {"n": 4096} if name == "synthetic_images" else {}
        train, test = load(name, **kwargs).split(test_size, seed)
    if standardize:
        train, test = train.standardize(), test.standardize(like=train)
    return train, test
