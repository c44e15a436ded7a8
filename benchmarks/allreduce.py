"""Averaging one ResNet-18 gradient (11,173,962 float32) between 2 ranks on this machine:
daskdl's all-reduce over Dask worker comms against torch.distributed gloo ``all_reduce``.

    python benchmarks/allreduce.py [--size N] [--iters K]

Both run in this one process run, one after the other, 2 processes each, with one thread per
process; the figure is the mean time per all-reduce after warm-up.
Ends with ``allreduce ratio=<daskdl time / gloo time> target=1.5``.
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
from daskdl import comm
from daskdl.engine import torch_friendly_malloc

RESNET18 = 11_173_962


def _daskdl_rank(run_id, rank, peers, size, iters, warmup, piece_bytes):
    # The allocator settings every training rank runs with (see daskdl.engine).
    with torch_friendly_malloc():
        return _daskdl_loop(run_id, rank, peers, size, iters, warmup, piece_bytes)


def _daskdl_loop(run_id, rank, peers, size, iters, warmup, piece_bytes):
    group = comm.DaskGroup(get_worker(), run_id, rank, peers, timeout=60, piece_bytes=piece_bytes)
    buf = np.full(size, rank + 1, dtype=np.float32)
    try:
        for _ in range(warmup):
            group.allreduce_mean_(buf)
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            group.allreduce_mean_(buf)
            times.append(time.perf_counter() - t)
        return times
    finally:
        group.close()


def bench_daskdl(size, iters, warmup, piece_bytes=4 * 2**20):
    with daskdl.local_cluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as c:
        comm.ensure_plugin(c)
        peers = sorted(c.scheduler_info()["workers"])
        run_id = uuid.uuid4().hex
        futures = [
            c.submit(
                _daskdl_rank,
                run_id,
                r,
                peers,
                size,
                iters,
                warmup,
                piece_bytes,
                workers=[w],
                pure=False,
            )
            for r, w in enumerate(peers)
        ]
        times = c.gather(futures)
    # A collective ends when its slowest rank ends.
    return [max(pair) for pair in zip(*times)]


def _gloo_rank(rank, port, size, iters, warmup, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        buf = torch.full((size,), float(rank + 1))
        for _ in range(warmup):
            dist.all_reduce(buf)
            buf /= 2
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            dist.all_reduce(buf)
            buf /= 2
            times.append(time.perf_counter() - t)
        out[rank] = times
    finally:
        dist.destroy_process_group()


def bench_gloo(size, iters, warmup):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_gloo_rank, args=(port, size, iters, warmup, out), nprocs=2)
    return [max(pair) for pair in zip(out[0], out[1])]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=RESNET18)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = {}
    # Interleave so that a noisy neighbour hurts both about equally.
    for name, fn in [
        ("gloo", bench_gloo),
        ("daskdl", bench_daskdl),
        ("gloo", bench_gloo),
        ("daskdl", bench_daskdl),
    ]:
        results.setdefault(name, []).extend(fn(args.size, args.iters, args.warmup))
    mb = args.size * 4 / 1e6
    rows = []
    for name in ["gloo", "daskdl"]:
        t = results[name]
        rows.append(
            [
                name,
                mb,
                statistics.median(t) * 1e3,
                statistics.mean(t) * 1e3,
                min(t) * 1e3,
                mb / (statistics.median(t) * 1e3),
            ]
        )
    ratio = statistics.median(results["daskdl"]) / statistics.median(results["gloo"])
    report(
        "allreduce",
        f"2 ranks average a {args.size:,}-float32 buffer (a ResNet-18 gradient), "
        f"{2 * args.iters} timed rounds each after {args.warmup} warm-up, two interleaved "
        "sessions per backend.",
        ["backend", "MB", "median ms", "mean ms", "min ms", "GB/s"],
        rows,
        f"allreduce ratio={ratio:.3f} target=1.5",
    )


if __name__ == "__main__":
    main()
