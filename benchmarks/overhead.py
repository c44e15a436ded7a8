"""What daskdl costs over a plain PyTorch loop: the same model, data, optimizer and thread
count, trained (a) by a hand-written loop in this process and (b) by ``daskdl.fit`` with one
rank on a one-worker LocalCluster.

    python benchmarks/overhead.py [--model small_cnn] [--threads 1] [--epochs 4]

Throughput is samples per second over the training steps of every epoch after the first
(warm-up); the trainers alternate twice. (a) also runs with the allocator settings daskdl's
ranks use (``torch_friendly_malloc``), to show how much of the comparison is the allocator.
Ends with ``overhead ratio=<b / a> target=0.97``.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _report import report
from _workload import plain_epochs

import daskdl
from daskdl import models
from daskdl.worker.process import torch_friendly_malloc


def plain_loop(X, y, model_name, epochs, batch, lr, seed):
    torch.manual_seed(seed)
    model = models.build(model_name, X.shape[1:], int(y.max()) + 1)
    return plain_epochs(model, X, y, epochs, batch, lr, seed=[seed])


def daskdl_fit(client, ds, model_name, epochs, batch, lr, seed, threads):
    run = daskdl.fit(
        client,
        model_name,
        ds,
        epochs=epochs,
        batch_size=batch,
        lr=lr,
        schedule="constant",
        augment=False,
        seed=seed,
        torch_threads=threads,
        progress=False,
    )
    return list(run.history["samples_per_s"].iloc[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--n", type=int, default=2048)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # As daskdl's ranks do (see daskdl.worker.process.flush_denormals): both sides run alike.
    torch.set_flush_denormal(True)
    data = daskdl.datasets.synthetic_images(args.n, (3, 32, 32), 10, seed=0)
    X, y = data.compute()
    common = (args.model, args.epochs, args.batch_size, 0.05, 0)
    plain, tuned, dl = [], [], []
    with daskdl.local_cluster(n_workers=1, threads_per_worker=args.threads) as client:
        for _ in range(2):
            plain += plain_loop(X, y, *common)
            # The same loop with the allocator settings a daskdl rank uses: the fair baseline.
            with torch_friendly_malloc(force=True):
                tuned += plain_loop(X, y, *common)
            dl += daskdl_fit(client, data, *common, args.threads)
    a, b = statistics.median(plain), statistics.median(dl)
    report(
        "overhead",
        f"{args.model} on {args.n} synthetic 3x32x32 images, batch {args.batch_size}, "
        f"{args.threads} torch thread(s); samples/s per epoch after the first, two alternating "
        "sessions each.",
        ["trainer", "median samples/s", "min", "max", "epochs timed", "daskdl / this"],
        [
            ["plain PyTorch loop", a, min(plain), max(plain), len(plain), b / a],
            [
                "plain loop, rank allocator settings",
                statistics.median(tuned),
                min(tuned),
                max(tuned),
                len(tuned),
                b / statistics.median(tuned),
            ],
            ["daskdl.fit, 1 rank", b, min(dl), max(dl), len(dl), 1.0],
        ],
        f"overhead ratio={b / a:.3f} target=0.97",
    )


if __name__ == "__main__":
    main()
