"""How fast a rank's loader delivers batches: ``daskdl.rank.loader.ShardLoader`` over the partitions
of a persisted Dask array, on the worker that trains, against random-batch indexing of the same
array held in numpy in this process.

    python benchmarks/dataload.py [--n 16384] [--batch-size 256] [--epochs 4]

Both deliver torch tensors of (batch, 3, 32, 32) float32 images and their labels; both run in
this one process run, twice, alternating. The loader's one-time join of its partitions is
reported separately. Ends with ``dataload ratio=<loader / numpy samples per second>
target=0.9``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from _report import report

import daskdl
from daskdl.rank.loader import ShardLoader
from daskdl.worker.process import torch_friendly_malloc


def loader_rate(batch_size: int, epochs: int, n_parts: int, *parts):
    # The allocator settings every training rank runs with (see daskdl.worker.process).
    with torch_friendly_malloc():
        return _loader_rate(batch_size, epochs, n_parts, *parts)


def _loader_rate(batch_size: int, epochs: int, n_parts: int, *parts):
    t = time.perf_counter()
    steps = sum(len(p) for p in parts[:n_parts]) // batch_size
    loader = ShardLoader(parts[:n_parts], parts[n_parts:], batch_size, steps, seed=0)
    join = time.perf_counter() - t
    rates = []
    for epoch in range(epochs):
        t = time.perf_counter()
        for xb, yb in loader.epoch(epoch):
            pass
        rates.append(steps * batch_size / (time.perf_counter() - t))
    return join, rates


def numpy_rate(X: np.ndarray, y: np.ndarray, batch_size: int, epochs: int) -> list[float]:
    rng = np.random.default_rng(0)
    steps = len(X) // batch_size
    rates = []
    for _ in range(epochs):
        t = time.perf_counter()
        for _ in range(steps):
            idx = rng.integers(0, len(X), batch_size)
            batch = torch.from_numpy(X[idx]), torch.from_numpy(y[idx])  # noqa: F841
        rates.append(steps * batch_size / (time.perf_counter() - t))
    return rates


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = daskdl.datasets.synthetic_images(args.n, (3, 32, 32), 10, seed=0, chunks=args.n // 8)
    X, y = data.compute()
    loader, plain, joins = [], [], []
    with daskdl.local_cluster(n_workers=1, threads_per_worker=1) as client:
        data = data.persist(client)
        parts = [*data.X.to_delayed().ravel(), *data.y.to_delayed().ravel()]
        for _ in range(2):
            plain += numpy_rate(X, y, args.batch_size, args.epochs)
            future = client.compute(
                daskdl.datasets.dask.delayed(loader_rate)(
                    args.batch_size, args.epochs, data.npartitions, *parts
                )
            )
            join, rates = future.result()
            joins.append(join)
            loader += rates
    a, b = statistics.median(plain), statistics.median(loader)
    mb = X.nbytes / 1e6
    report(
        "dataload",
        f"{args.n} synthetic 3x32x32 float32 images ({mb:.0f} MB) in {data.npartitions} "
        f"partitions, batches of {args.batch_size}; samples/s per epoch, two alternating "
        "sessions. The loader runs on the worker, in a task that received the partitions.",
        ["source", "median samples/s", "min", "max", "one-time join s"],
        [
            ["numpy X[random batch] in this process", a, min(plain), max(plain), ""],
            [
                "ShardLoader on a persisted Dask array",
                b,
                min(loader),
                max(loader),
                statistics.median(joins),
            ],
        ],
        f"dataload ratio={b / a:.3f} target=0.9",
    )


if __name__ == "__main__":
    main()
