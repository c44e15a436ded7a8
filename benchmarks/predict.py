"""Prediction throughput: ``run.predict`` over a data set of more than 1 GB on a 2-worker
LocalCluster, against the plain PyTorch loop a user would write over the same arrays in one
process.

    python benchmarks/predict.py [--kind tabular|images] [--n N] [--rounds 5]

``tabular`` (the default): 1,000,000 samples of 256 float32 features (1.02 GB) and the
registered ``mlp``; ``images``: synthetic 3x32x32 images (``synthetic_images``, 12 KiB each;
90,000 make 1.1 GB) and ``small_cnn``. The data are persisted on the workers where they are
generated for daskdl, and computed into this process for the plain loop; neither is timed.
The model is trained for one short epoch first, and each side predicts once untimed (a
worker builds its model on its first call). Both sides
run one torch thread per process (the plain loop as daskdl's workers do: one core each; a
row with the plain loop on every core is given too). Samples/s of each, in alternating rounds
(the machine is shared: the median of the rounds' ratios is reported). Ends with
``predict ratio=<daskdl / plain> target=1.7``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import dask
import dask.array as da
import numpy as np
import torch
import torch.multiprocessing as mp
from _report import report
from _workload import as_a_rank, synthetic

import daskdl

BATCH = 1024
TARGET = 1.7


def plain(model: torch.nn.Module, X: np.ndarray, threads: int) -> tuple[float, np.ndarray]:
    """Samples/s of the plain loop, and its labels."""
    torch.set_num_threads(threads)
    model.eval()
    labels = []
    t = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(X), BATCH):
            labels.append(model(torch.from_numpy(X[start : start + BATCH])).argmax(1).numpy())
    return len(X) / (time.perf_counter() - t), np.concatenate(labels)


def _plain_process(rank, nprocs, model, X, barrier, out):
    with as_a_rank():
        # A contiguous share in this process's own memory, copied before the clock starts
        # (a strided view of shared memory would time page faults and gathers as well).
        share = np.array_split(X.numpy(), nprocs)[rank].copy()
        barrier.wait()
        out[rank] = plain(model, share, 1)[0]


def plain_processes(model, X: torch.Tensor, nprocs: int = 2) -> float:
    """The machine's ceiling: ``nprocs`` plain processes, each on its share, started together;
    their samples/s summed."""
    with mp.Manager() as manager:
        out, barrier = manager.dict(), manager.Barrier(nprocs)
        mp.spawn(_plain_process, args=(nprocs, model, X, barrier, out), nprocs=nprocs)
        return sum(out.values())


def distributed(run, data) -> tuple[float, np.ndarray]:
    t = time.perf_counter()
    labels = run.predict(data, batch_size=BATCH).compute()
    return len(labels) / (time.perf_counter() - t), labels


FEATURES = 256


def workload(kind: str, n: int) -> tuple[str, daskdl.Dataset, daskdl.Dataset]:
    """The model, a small training set and the ``n`` samples to predict on (32 partitions)."""
    if kind == "images":
        big = daskdl.datasets.synthetic_images(n, seed=1, chunks=math.ceil(n / 32))
        return "small_cnn", synthetic(1024), big
    rng = da.random.default_rng(0)
    X = rng.standard_normal((n, FEATURES), chunks=(math.ceil(n / 32), FEATURES), dtype="f4")
    small = np.random.default_rng(1).standard_normal((2048, FEATURES), dtype=np.float32)
    train = daskdl.Dataset.from_numpy(small, (small[:, 0] > 0).astype(np.int64), chunks=512)
    return "mlp", train, daskdl.Dataset.from_dask(X, da.zeros(n, np.int64, chunks=X.chunks[0]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", choices=["tabular", "images"], default="tabular")
    parser.add_argument("--n", type=int)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    args.n = args.n or (1_000_000 if args.kind == "tabular" else 90_000)
    cores = torch.get_num_threads()
    with daskdl.local_cluster(n_workers=2, threads_per_worker=1) as client:
        name, train, big = workload(args.kind, args.n)
        run = daskdl.fit(
            client, name, train, epochs=1, batch_size=64, lr=0.05, torch_threads=1,
            progress=False,
        )  # fmt: skip
        gigabytes = big.X.nbytes / 1e9
        data = big.persist(client)  # generated on the workers
        (X,) = dask.compute(big.X, scheduler="threads")  # the same values, here
        model = run.model
        shared = torch.from_numpy(X).share_memory_()  # for the ceiling's processes
        rates = {"daskdl": [], "plain": [], "plain_all": [], "ceiling": []}
        # Untimed first calls: the workers build their model, the plain loop warms up.
        distributed(run, data)
        plain(model, X[: len(X) // 8], 1)
        for r in range(args.rounds):
            order = ["daskdl", "plain"] if r % 2 == 0 else ["plain", "daskdl"]
            for who in order:
                if who == "daskdl":
                    rate, labels = distributed(run, data)
                else:
                    with as_a_rank():
                        rate, reference = plain(model, X, 1)
                rates[who].append(rate)
            rates["plain_all"].append(plain(model, X, cores)[0])
            rates["ceiling"].append(plain_processes(model, shared))
        assert np.array_equal(labels, reference), "daskdl and the plain loop disagree"
    ratios = [d / p for d, p in zip(rates["daskdl"], rates["plain"])]
    ratio = statistics.median(ratios)
    med = {k: statistics.median(v) for k, v in rates.items()}
    rows = [
        ["plain PyTorch loop, 1 process, 1 thread", med["plain"], 1.0, ""],
        [f"plain PyTorch loop, 1 process, {cores} threads", med["plain_all"],
         med["plain_all"] / med["plain"], ""],
        ["2 plain processes x 1 thread, half each (the machine's ceiling)", med["ceiling"],
         med["ceiling"] / med["plain"], ""],
        ["daskdl run.predict, 2 workers x 1 thread", med["daskdl"], ratio, TARGET],
    ]  # fmt: skip
    report(
        "predict",
        f"{name} labels for {args.n} {args.kind} samples of shape {big.sample_shape} "
        f"({gigabytes:.2f} GB, 32 partitions), batch {BATCH}; median samples/s over "
        f"{args.rounds} alternating rounds; ratio: median of the rounds' daskdl / plain "
        "(1 thread) ratios. The predictions agree.",
        ["predictor", "samples/s", "ratio", "target"],
        rows,
        f"predict ratio={ratio:.3f} target={TARGET}",
    )


if __name__ == "__main__":
    main()
