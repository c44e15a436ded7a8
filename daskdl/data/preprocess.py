"""Lazy preprocessing on Dask arrays, and augmentation of image batches on the training device."""

from __future__ import annotations

from dataclasses import dataclass

import dask.array as da
import numpy as np
import torch


def _stat_axes(X: da.Array) -> tuple[int, ...]:
    # Images (n, C, H, W) are standardised per channel, everything else per feature.
    return (0, 2, 3) if X.ndim == 4 else (0,)


def moments(X: da.Array) -> tuple[da.Array, da.Array]:
    """Lazy mean and standard deviation of ``X`` per feature (per channel for images).

    Computed in float64 so that large data sets do not lose precision; a constant feature gets a
    standard deviation of 1 so that standardising leaves it at 0 instead of dividing by zero.
    """
    mean, std = _mean_std(X, _stat_axes(X), keepdims=True)
    return mean[0].astype(np.float32), std[0].astype(np.float32)


def target_moments(y: da.Array) -> tuple[da.Array, da.Array]:
    """Lazy mean and standard deviation of regression targets, per target (shape () for
    (n,) targets, (k,) for (n, k)); a constant target gets a standard deviation of 1."""
    mean, std = _mean_std(y, (0,), keepdims=False)
    return mean.astype(np.float32), std.astype(np.float32)


def _mean_std(A: da.Array, axes: tuple[int, ...], keepdims: bool) -> tuple[da.Array, da.Array]:
    """Mean and standard deviation (1 where constant) over ``axes``, in float64, from sums:
    Dask's own mean/std give NaN where a partition is empty (a filter's, or an empty Parquet
    file), and a NaN would silently leave the data unscaled."""
    A64 = A.astype(np.float64)
    count = (A64 * 0 + 1).sum(axis=axes, keepdims=True)
    mean = A64.sum(axis=axes, keepdims=True) / count
    std = da.sqrt(((A64 - mean) ** 2).sum(axis=axes, keepdims=True) / count)
    std = da.where(std > 1e-12, std, 1.0)
    if not keepdims:
        mean, std = mean.squeeze(axis=axes), std.squeeze(axis=axes)
    return mean, std


def standardize(X: da.Array, mean: da.Array | np.ndarray, std: da.Array | np.ndarray) -> da.Array:
    """``(X - mean) / std``, lazily, broadcast over samples."""
    return ((X - mean) / std).astype(np.float32)


@dataclass(frozen=True)
class Standardization:
    """The statistics a data set's features were standardised with: lazy (or computed)
    ``mean`` and ``std``, per feature (F,) or per channel (C, 1, 1). A :class:`Dataset`
    carries the one :meth:`~daskdl.Dataset.standardize` applied, so that a run records it
    and prediction never applies it twice."""

    mean: da.Array | np.ndarray
    std: da.Array | np.ndarray
    token: tuple[str, str] | None = None  # the lazy arrays' names, once computed

    @property
    def key(self) -> tuple[str, str] | None:
        """The Dask names of the lazy statistics these are (or were computed from)."""
        if self.token is not None:
            return self.token
        names = (getattr(self.mean, "name", None), getattr(self.std, "name", None))
        return names if None not in names else None  # type: ignore[return-value]

    def same_as(self, other: Standardization) -> bool:
        """Whether both are known to be the same statistics without computing them: the
        same lazy Dask arrays (``standardize(like=train)`` shares train's)."""
        return self.key is not None and self.key == other.key


def to_record(mean: np.ndarray, std: np.ndarray) -> dict:
    """Computed statistics as a run records them (JSON, in its signed manifest)."""
    return {
        "mean": np.asarray(mean, np.float64).tolist(),
        "std": np.asarray(std, np.float64).tolist(),
    }


def from_record(record: dict) -> tuple[np.ndarray, np.ndarray]:
    """A run's recorded statistics as float32 arrays, in the shape they broadcast with."""
    return (
        np.asarray(record["mean"], dtype=np.float32),
        np.asarray(record["std"], dtype=np.float32),
    )


def close(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> bool:
    """Two (mean, std) pairs equal to float32's precision (computed on other workers, in
    other orders, they differ in the last bits)."""
    return all(
        np.shape(x) == np.shape(y) and np.allclose(x, y, rtol=1e-4, atol=1e-6) for x, y in zip(a, b)
    )


def finite_rows(X: da.Array, y: da.Array) -> da.Array:
    """Per-sample boolean: all features finite and no target NaN."""
    axes = tuple(range(1, X.ndim))
    ok = da.isfinite(X).all(axis=axes)
    if np.issubdtype(y.dtype, np.floating):
        ok = ok & ~da.isnan(y).any(axis=tuple(range(1, y.ndim)))
    return ok


def augment_images(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, on ``x``'s device.

    One crop offset per batch position is drawn from ``generator``; the whole batch is cropped
    with a single gather, so this costs one pass over the batch instead of a Python loop. Give
    a generator on ``x``'s device: drawing on the CPU and copying to a GPU would make the host
    wait for the GPU at every batch.
    """
    n, _, h, w = x.shape
    device, where = x.device, generator.device
    flip = torch.rand(n, generator=generator, device=where).to(device) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=where).to(device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=where).to(device)
    rows = (dy[:, None] + torch.arange(h, device=device)[None, :])[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=device)[None, :])[:, None, None, :]
    batch = torch.arange(n, device=device)[:, None, None, None]
    chan = torch.arange(x.shape[1], device=device)[None, :, None, None]
    return padded[batch, chan, rows, cols]
