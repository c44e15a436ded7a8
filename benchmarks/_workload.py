"""The CNN workload the throughput benchmarks share."""

from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

import daskdl
from daskdl.worker.process import flush_denormals, torch_friendly_malloc


def synthetic(n: int) -> daskdl.Dataset:
    """``n`` synthetic 3x32x32 images in 8 partitions."""
    return daskdl.datasets.synthetic_images(n, (3, 32, 32), 10, seed=0, chunks=max(1, n // 8))


@contextmanager
def as_a_rank():
    """One torch thread, denormals flushed and glibc's allocator tuned, as daskdl's ranks
    train: for the plain PyTorch processes a benchmark measures beside them."""
    torch.set_num_threads(1)
    with torch_friendly_malloc(force=True), flush_denormals():
        yield


def fit_throughput(client, data, epochs: int, batch_size: int = 64, **options) -> list[float]:
    """Samples/s of ``small_cnn`` trained by ``daskdl.fit``, per epoch after the first.

    Constant learning rate, no augmentation, one torch thread per rank, no progress bar.
    """
    run = daskdl.fit(
        client,
        "small_cnn",
        data,
        epochs=epochs,
        batch_size=batch_size,
        lr=0.05,
        schedule="constant",
        augment=False,
        torch_threads=1,
        progress=False,
        **options,
    )
    return list(run.history["samples_per_s"].iloc[1:])


def plain_epochs(model, X, y, epochs: int, batch: int, lr: float, seed, before_epoch=None):
    """The loop a PyTorch user would write: shuffle, index a batch, step. Samples/s of this
    process per epoch after the first; ``before_epoch()`` runs untimed (a DDP barrier, say)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    X, y = torch.as_tensor(X), torch.as_tensor(y)
    steps = len(X) // batch
    rates = []
    for epoch in range(epochs):
        perm = torch.from_numpy(np.random.default_rng([*seed, epoch]).permutation(len(X)))
        if before_epoch is not None:
            before_epoch()
        t = time.perf_counter()
        for s in range(steps):
            idx = perm[s * batch : (s + 1) * batch]
            opt.zero_grad()
            loss = F.cross_entropy(model(X[idx]), y[idx])
            loss.backward()
            opt.step()
            loss.item()
        rates.append(steps * batch / (time.perf_counter() - t))
    return rates[1:]
