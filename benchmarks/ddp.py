"""Two ranks on this CPU machine: daskdl with its Dask backend, daskdl with its torch backend,
and plain PyTorch DistributedDataParallel started with ``torch.multiprocessing`` (the ceiling).

    python benchmarks/ddp.py [--n 2048] [--epochs 3]

Same model (small_cnn), data (synthetic 3x32x32), batch (64 per rank), optimizer, one torch
thread per rank; denormals flushed and glibc's allocator tuned as in daskdl's ranks, for all
three. Samples/s over the epochs after the first, two alternating sessions.
Ends with ``ddp ratio=<daskdl dask backend / DDP> target=0.9``.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _report import report
from _workload import as_a_rank, fit_throughput, plain_epochs, synthetic

import daskdl
from daskdl import models

BATCH = 64


def _ddp_rank(rank, port, X, y, epochs, out):
    # The ceiling gets the settings daskdl's ranks get (see daskdl.worker.process).
    with as_a_rank():
        _ddp_loop(rank, port, X, y, epochs, out)


def _ddp_loop(rank, port, X, y, epochs, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(models.small_cnn(X.shape[1:], 10))
        # Each rank's rate is its own samples/s; the run delivers twice that.
        rates = plain_epochs(
            model,
            X[rank::2],
            y[rank::2],
            epochs,
            BATCH,
            0.05,
            seed=[rank],
            before_epoch=dist.barrier,
        )
        out[rank] = [2 * r for r in rates]
    finally:
        dist.destroy_process_group()


def ddp(X, y, epochs) -> list[float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_ddp_rank, args=(port, X, y, epochs, out), nprocs=2)
    return [min(a, b) for a, b in zip(out[0], out[1])]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    data = synthetic(args.n)
    X, y = data.compute()
    rates: dict[str, list[float]] = {"DDP": [], "daskdl dask": [], "daskdl torch": []}
    with daskdl.local_cluster(n_workers=2, threads_per_worker=1) as client:
        data = data.persist(client)
        for _ in range(2):
            rates["DDP"] += ddp(X, y, args.epochs)
            rates["daskdl dask"] += fit_throughput(client, data, args.epochs, BATCH, backend="dask")
            rates["daskdl torch"] += fit_throughput(
                client, data, args.epochs, BATCH, backend="torch"
            )
    ceiling = statistics.median(rates["DDP"])
    rows = [
        [name, statistics.median(r), min(r), max(r), statistics.median(r) / ceiling]
        for name, r in rates.items()
    ]
    report(
        "ddp",
        f"small_cnn on {args.n} synthetic 3x32x32 images, 2 ranks, batch {BATCH} per rank, one "
        "torch thread per rank; global samples/s over the epochs after the first, two "
        "alternating sessions.",
        ["trainer", "median samples/s", "min", "max", "ratio to DDP"],
        rows,
        f"ddp ratio={rows[1][-1]:.3f} target=0.9",
    )


if __name__ == "__main__":
    main()
