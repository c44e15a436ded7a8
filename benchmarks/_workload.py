"""The CNN workload the throughput benchmarks share."""

from __future__ import annotations

import daskdl


def synthetic(n: int) -> daskdl.Dataset:
    """``n`` synthetic 3x32x32 images in 8 partitions."""
    return daskdl.datasets.synthetic_images(n, (3, 32, 32), 10, seed=0, chunks=max(1, n // 8))


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
