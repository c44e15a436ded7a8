"""Averaging one ResNet-18 gradient (11,173,962 float32) between 2 (and 4) ranks on this machine:
daskdl's all-reduce over Dask worker comms against torch.distributed gloo ``all_reduce``.

    python benchmarks/allreduce.py [--size N] [--iters K]

Cases, each run twice, interleaved, in this one process run, one process per rank with one
thread each: gloo and daskdl with 2 ranks, daskdl with bfloat16 on the wire, gloo and daskdl
with 4 ranks, and both with 2 ranks on a small (latency-bound) buffer. The figure is the median
time per all-reduce after warm-up.
Ends with ``allreduce ratio=<daskdl fp32 time / gloo time, 2 ranks> target=1.2`` (the table
also has bf16 on the wire against gloo fp32, target 0.7).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
import uuid

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _report import report
from distributed import get_worker

import daskdl
from daskdl.cluster import workers_info
from daskdl.collectives import comm
from daskdl.worker.extension import manager

RESNET18 = 11_173_962


def _daskdl_rank(run_id, rank, peers, size, iters, warmup, wire):
    # The allocator settings every training rank runs with, and Dask's profiler paused as
    # for a rank: it samples stacks on the event loop that runs the ring (see
    # daskdl.worker.process).
    tuning = manager(get_worker()).tuning
    with tuning.malloc(), tuning.profiler_paused(get_worker()):
        return _daskdl_loop(run_id, rank, peers, size, iters, warmup, wire)


def _daskdl_loop(run_id, rank, peers, size, iters, warmup, wire):
    group = comm.DaskGroup(get_worker(), run_id, rank, peers, timeout=60)
    buf = np.full(size, rank + 1, dtype=np.float32)
    try:
        for _ in range(warmup):
            group.allreduce_mean_(buf, wire)
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            group.allreduce_mean_(buf, wire)
            times.append(time.perf_counter() - t)
        return times
    finally:
        group.close()


def bench_daskdl(size, iters, warmup, ranks=2, wire="fp32"):
    with daskdl.local_cluster(n_workers=ranks, threads_per_worker=1, dashboard_address=None) as c:
        comm.ensure_plugin(c)
        peers = sorted(workers_info(c))
        run_id = uuid.uuid4().hex
        futures = [
            c.submit(
                _daskdl_rank, run_id, r, peers, size, iters, warmup, wire, workers=[w], pure=False
            )
            for r, w in enumerate(peers)
        ]
        times = c.gather(futures)
    # A collective ends when its slowest rank ends.
    return [max(per_rank) for per_rank in zip(*times)]


def _gloo_rank(rank, ranks, port, size, iters, warmup, out):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=ranks
    )
    try:
        buf = torch.full((size,), float(rank + 1))
        for _ in range(warmup):
            dist.all_reduce(buf)
            buf /= ranks
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            dist.all_reduce(buf)
            buf /= ranks
            times.append(time.perf_counter() - t)
        out[rank] = times
    finally:
        dist.destroy_process_group()


def bench_gloo(size, iters, warmup, ranks=2, wire="fp32"):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_gloo_rank, args=(ranks, port, size, iters, warmup, out), nprocs=ranks)
    return [max(per_rank) for per_rank in zip(*(out[r] for r in range(ranks)))]


SMALL_CNN = 66_571  # small_cnn's gradient on 3x32x32 images, plus the stop slot

CASES = [  # (backend, ranks, wire, buffer); each is compared with gloo fp32 on as many ranks
    ("gloo", 2, "fp32", "large"),
    ("daskdl", 2, "fp32", "large"),
    ("daskdl", 2, "bf16", "large"),
    ("gloo", 4, "fp32", "large"),
    ("daskdl", 4, "fp32", "large"),
    ("gloo", 2, "fp32", "small"),
    ("daskdl", 2, "fp32", "small"),
]
TARGETS = {
    ("daskdl", 2, "fp32", "large"): 1.2,
    ("daskdl", 2, "bf16", "large"): 0.7,
    ("daskdl", 4, "fp32", "large"): 1.2,
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=RESNET18)
    parser.add_argument("--small-size", type=int, default=SMALL_CNN)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    bench = {"gloo": bench_gloo, "daskdl": bench_daskdl}
    sizes = {"large": args.size, "small": args.small_size}
    # Latency-bound small buffers get more rounds for the same measuring time.
    iters = {"large": args.iters, "small": 10 * args.iters}
    results: dict[tuple, list[float]] = {}
    # Two sessions of every case, interleaved, so that a noisy neighbour hurts all alike.
    for _ in range(2):
        for case in CASES:
            backend, ranks, wire, buffer = case
            results.setdefault(case, []).extend(
                bench[backend](sizes[buffer], iters[buffer], args.warmup, ranks=ranks, wire=wire)
            )
    rows = []
    for case in CASES:
        backend, ranks, wire, buffer = case
        t = statistics.median(results[case])
        gloo = statistics.median(results[("gloo", ranks, "fp32", buffer)])
        mb = sizes[buffer] * 4 / 1e6
        rows.append(
            [
                backend,
                ranks,
                wire,
                f"{mb:.3g} MB",
                t * 1e3,
                min(results[case]) * 1e3,
                mb / (t * 1e3),
                t / gloo,
                TARGETS.get(case, ""),
            ]
        )
    ratio = rows[1][-2]
    report(
        "allreduce",
        f"Ranks average a {args.size:,}-float32 buffer ({args.size * 4 / 1e6:.1f} MB, a "
        f"ResNet-18 gradient) and a {args.small_size:,}-float32 one (a small_cnn gradient, "
        f"latency-bound); {2 * args.iters} (small: {20 * args.iters}) timed rounds per case "
        f"after {args.warmup} warm-up, in two interleaved sessions. Ratio: time against gloo "
        "fp32 with as many ranks and the same buffer.",
        [
            "backend",
            "ranks",
            "wire",
            "buffer",
            "median ms",
            "min ms",
            "GB/s",
            "ratio to gloo",
            "target",
        ],
        rows,
        f"allreduce ratio={ratio:.3f} target=1.2",
    )


if __name__ == "__main__":
    main()
