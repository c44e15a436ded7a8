"""Lazy preprocessing on Dask arrays, and augmentation of image batches on the training device."""

from __future__ import annotations

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
    axes = _stat_axes(X)
    X64 = X.astype(np.float64)
    mean = X64.mean(axis=axes, keepdims=True)
    std = X64.std(axis=axes, keepdims=True)
    std = da.where(std > 1e-12, std, 1.0)
    return mean[0].astype(np.float32), std[0].astype(np.float32)


def target_moments(y: da.Array) -> tuple[da.Array, da.Array]:
    """Lazy mean and standard deviation of regression targets, per target (shape () for
    (n,) targets, (k,) for (n, k)); a constant target gets a standard deviation of 1."""
    y64 = y.astype(np.float64)
    std = y64.std(axis=0)
    return y64.mean(axis=0).astype(np.float32), da.where(std > 1e-12, std, 1.0).astype(np.float32)


def standardize(X: da.Array, mean: da.Array, std: da.Array) -> da.Array:
    """``(X - mean) / std``, lazily, broadcast over samples."""
    return ((X - mean) / std).astype(np.float32)


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
