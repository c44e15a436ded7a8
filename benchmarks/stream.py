"""Streamed training against training from memory: the same model on synthetic images written
to disk as Zarr.

    python benchmarks/stream.py [--n 245000] [--model small_cnn] [--chunk 1000]

The data set (``synthetic_images``, 12 KiB per image: 245,000 make 3 GB) is written to a
Zarr store first (untimed). The streamed run trains one epoch over all of it on 2 workers
whose ``memory_limit`` is a third of the data set's size, so it cannot be held; the in-memory
run trains on the first sixth for two epochs, on a cluster of its own with the default
limits. Throughput of each: samples/s of
both ranks from the run's step events, the median after the first 10% of the steps (warm-up
and the first partitions' reads). The workers' peak RSS is printed against their limit.
Ends with ``stream ratio=<streamed / in-memory> target=0.9``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import dask
import dask.array as da
from _report import report

import daskdl
from daskdl import events

TARGET = 0.9
BATCH = 64
# A worker holds about 0.5 GB before it reads any data (torch, Dask): below that a limit of
# a third of a small data set would only kill it, so small trial runs get this instead.
SMALLEST_LIMIT = 1_000_000_000


def write_zarr(folder: Path, n: int, chunk: int) -> None:
    data = daskdl.datasets.synthetic_images(n, seed=0, chunks=chunk)
    X, y = data.X.rechunk((chunk, -1, -1, -1)), data.y.rechunk(chunk)
    dask.compute(
        da.to_zarr(X, str(folder / "X.zarr"), compute=False),
        da.to_zarr(y, str(folder / "y.zarr"), compute=False),
        scheduler="threads",
    )


def read_zarr(folder: Path, n: int | None = None) -> daskdl.Dataset:
    X, y = (da.from_zarr(str(folder / f"{v}.zarr")) for v in "Xy")
    if n is not None:
        X, y = X[:n], y[:n]
    return daskdl.Dataset.from_dask(X, y, n_classes=10)


def steady_rate(client, run) -> float:
    """Samples/s of all ranks: the median of rank 0's step events after the first 10% of
    steps, times the ranks."""
    steps = [e for e in events.replay(client, run.run_id) if e["kind"] == "step" and e["rank"] == 0]
    total = run.info["steps_per_epoch"] * run.info["config"]["epochs"]
    rates = [e["samples_per_s"] for e in steps if e["step"] > 0.1 * total]
    return statistics.median(rates) * run.info["world_size"]


def _peak_rss(dask_worker=None) -> int:
    """The worker's peak RSS (``VmHWM``: ``ru_maxrss`` would count the parent it was
    forked from before ``exec``)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def train(client, model, data, epochs, stream):
    return daskdl.fit(
        client, model, data, epochs=epochs, batch_size=BATCH, lr=0.05, schedule="constant",
        augment=False, torch_threads=1, progress=False, stream=stream,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=245_000)
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--chunk", type=int, default=1000)
    args = parser.parse_args()
    nbytes = args.n * 3 * 32 * 32 * 4
    limit = max(nbytes // 3, SMALLEST_LIMIT)
    with tempfile.TemporaryDirectory(prefix="daskdl-stream-") as tmp:
        folder = Path(tmp)
        write_zarr(folder, args.n, args.chunk)
        subset = args.n // 6
        # Its own cluster: the limits are the streamed run's, and its peak RSS only its own.
        with daskdl.local_cluster(n_workers=2, threads_per_worker=1) as client:
            held = train(client, args.model, read_zarr(folder, subset), 2, False)
            rate_held = steady_rate(client, held)
        with daskdl.local_cluster(n_workers=2, threads_per_worker=1, memory_limit=limit) as client:
            streamed = train(client, args.model, read_zarr(folder), 1, True)
            assert streamed.info["streamed"] == ["train"]
            peaks = client.run(_peak_rss)
            rate_streamed = steady_rate(client, streamed)
    ratio = rate_streamed / rate_held
    peak = max(peaks.values())
    under = "yes" if peak < limit else "NO"
    rows = [
        [f"in memory: {subset} images, 2 epochs", rate_held, 1.0, "", ""],
        [f"streamed from Zarr: {args.n} images, 1 epoch", rate_streamed, ratio, TARGET,
         f"{peak / 2**20:.0f} MiB of {limit / 2**20:.0f} MiB ({under})"],
    ]  # fmt: skip
    report(
        "stream",
        f"{args.model}, batch {BATCH} per rank, 2 workers x 1 thread; synthetic 3x32x32 images "
        f"({nbytes / 1e9:.2f} GB) in a Zarr store of {args.chunk}-image chunks; each worker's "
        f"memory_limit {limit / 1e9:.2f} GB; samples/s: median of the step events after the "
        "first 10% of steps; peak RSS: the higher worker's, after the streamed run.",
        ["run", "samples/s", "ratio", "target", "peak RSS of a worker"],
        rows,
        f"stream ratio={ratio:.3f} target={TARGET}",
    )
    if peak >= limit:
        raise SystemExit(f"a streamed worker's peak RSS {peak} passed its limit {limit}")


if __name__ == "__main__":
    main()
