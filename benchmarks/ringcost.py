"""The ring all-reduce's cost model, fitted on this machine, and projected to many ranks.

    python benchmarks/ringcost.py [--iters K]

Times daskdl's ring (the direct exchange turned off) at 2, 3 and 4 ranks on buffers from
256 KB to 44.7 MB, one process per rank with one thread each, and fits

    T(P, n) = s * (2 (P - 1) alpha + 2 (P - 1) / P * n * beta),   s = max(1, P / cores)

by least squares: ``alpha`` the cost of one ring step (a message's latency and handling),
``beta`` seconds per byte each rank moves, and ``s`` the share of a core each rank gets when
there are more ranks than cores (the ring is CPU-bound here: copies into and out of sockets).
Projections take ``s = 1``: a rank per core or GPU. Prints the fit beside every measurement, then a
25 MB bucket's projected all-reduce at 8 to 1024 ranks for the ring, a binary tree and a
two-level ring (see docs/collectives.md). Ends with ``ringcost ratio=<model / measured, 4 ranks,
44.7 MB> target=1``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
import uuid

import numpy as np
from _report import report
from distributed import Client, Nanny, Scheduler, SpecCluster, get_worker

import daskdl
from daskdl.cluster import workers_info
from daskdl.collectives import comm, hierarchy
from daskdl.worker.process import torch_friendly_malloc

SIZES = [65_536, 1_048_576, 6_250_000, 11_173_962]  # float32 values: 256 KB to 44.7 MB


def _rank(run_id, rank, peers, sizes, iters, allreduce="ring"):
    with torch_friendly_malloc():
        group = comm.DaskGroup(
            get_worker(), run_id, rank, peers, timeout=60, direct_bytes=0, allreduce=allreduce
        )
        try:
            times = {}
            for n in sizes:
                buf = np.full(n, rank + 1, dtype=np.float32)
                for _ in range(3):
                    group.allreduce_mean_(buf)
                times[n] = []
                for _ in range(iters):
                    t = time.perf_counter()
                    group.allreduce_mean_(buf)
                    times[n].append(time.perf_counter() - t)
            return times
        finally:
            group.close()


def _time(c, iters: int, sizes=SIZES, allreduce="ring") -> dict[int, float]:
    comm.ensure_plugin(c)
    addresses = sorted(workers_info(c))
    # Ranks alternate between hosts where there are several: the layout must find them.
    peers = [addresses[i] for ranks in zip(*hierarchy.hosts(addresses)) for i in ranks]
    run_id = uuid.uuid4().hex
    futures = [
        c.submit(_rank, run_id, r, peers, sizes, iters, allreduce, workers=[w], pure=False)
        for r, w in enumerate(peers)
    ]
    per_rank = c.gather(futures)
    # A collective ends when its slowest rank ends.
    return {n: statistics.median(map(max, zip(*(t[n] for t in per_rank)))) for n in sizes}


def measure(ranks: int, iters: int) -> dict[int, float]:
    with daskdl.local_cluster(n_workers=ranks, threads_per_worker=1, dashboard_address=None) as c:
        return _time(c, iters)


def measure_two_hosts(iters: int) -> dict[str, float]:
    """The largest buffer on 4 ranks, 2 on each of two loopback addresses (which daskdl takes
    for two hosts): the one ring, and the two-level all-reduce."""
    spec = {"cls": Nanny, "options": {"nthreads": 1, "dashboard_address": None}}
    workers = {
        f"{host}-{i}": {**spec, "options": {**spec["options"], "host": host}}
        for host in ("127.0.0.1", "127.0.0.2")
        for i in range(2)
    }
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": None}}
    with SpecCluster(scheduler=scheduler, workers=workers) as cluster, Client(cluster) as c:
        c.wait_for_workers(4)
        times: dict[str, list[float]] = {"ring": [], "auto": []}
        for algorithm in ("ring", "auto") * 2:  # interleaved: noise hurts both alike
            times[algorithm].append(_time(c, iters, SIZES[-1:], algorithm)[SIZES[-1]])
        return {algorithm: min(t) for algorithm, t in times.items()}


def fit(measured: dict[tuple[int, int], float]) -> tuple[float, float]:
    """alpha, beta of the ring model, fitted to times ``{(ranks, bytes): seconds}`` with
    relative errors weighted alike (small buffers count as much as large ones)."""
    rows, times = [], []
    for (p, nbytes), t in measured.items():
        s = _share(p)
        rows.append([s * 2 * (p - 1) / t, s * 2 * (p - 1) / p * nbytes / t])
        times.append(1.0)
    (alpha, beta), *_ = np.linalg.lstsq(np.array(rows), np.array(times), rcond=None)
    return float(alpha), float(beta)


def _share(p: int) -> float:
    return max(1.0, p / os.cpu_count())


def ring(p, n, alpha, beta):
    return 2 * (p - 1) * alpha + 2 * (p - 1) / p * n * beta


def tree(p, n, alpha, beta):
    # Reduce up and broadcast down a binary tree, pipelined in as many pieces as is best: each
    # level costs a step per piece, and an inner node takes in two pieces for each it sends.
    depth = math.ceil(math.log2(p))
    return min(
        2 * (depth + pieces - 1) * (alpha + 2 * n / pieces * beta)
        for pieces in (2**k for k in range(12))
    )


def two_level(p, n, alpha, beta, per_host=8, local=10.0, link_shared=True):
    """daskdl.collectives.hierarchy's all-reduce: a reduce-scatter and an all-gather inside each
    host (a ring's cost, at ``local`` times the bandwidth and a tenth of the step cost), and between
    them ``per_host`` rings across the hosts side by side, each on ``1/per_host`` of the
    buffer, sharing the host's network link (``link_shared``) or each with a link of its own
    (a NIC per GPU)."""
    g = min(per_host, p)
    hosts = max(1, p // g)
    inside = ring(g, n, alpha / local, beta / local)
    return inside + ring(hosts, n / g, alpha, beta * (g if link_shared else 1))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    measured = {}
    for p in (2, 3, 4):
        for n, t in measure(p, args.iters).items():
            measured[p, 4 * n] = t
    alpha, beta = fit(measured)
    rows = []
    for (p, nbytes), t in measured.items():
        model = _share(p) * ring(p, nbytes, alpha, beta)
        rows.append(["measured", p, f"{nbytes / 1e6:.3g} MB", t * 1e3, model * 1e3, model / t])
    bucket = 25e6
    for p in (8, 16, 32, 64, 128, 256, 1024):
        rows.append(
            [
                "projected",
                p,
                "25 MB",
                "",
                ring(p, bucket, alpha, beta) * 1e3,
                f"tree {tree(p, bucket, alpha, beta) * 1e3:.4g} ms, "
                f"two-level {two_level(p, bucket, alpha, beta) * 1e3:.4g} ms",
            ]
        )
    # Two loopback "hosts": inside and across cost alike here, so the model's local factor is 1.
    nbytes = 4 * SIZES[-1]
    two = measure_two_hosts(args.iters)
    model = _share(4) * two_level(4, nbytes, alpha, beta, per_host=2, local=1, link_shared=False)
    rows.append(["two hosts x 2, ring", 4, f"{nbytes / 1e6:.3g} MB", two["ring"] * 1e3, "", ""])
    rows.append(
        ["two hosts x 2, two-level", 4, f"{nbytes / 1e6:.3g} MB", two["auto"] * 1e3,
         model * 1e3, model / two["auto"]]
    )  # fmt: skip
    ratio = _share(4) * ring(4, nbytes, alpha, beta) / measured[4, nbytes]
    report(
        "ringcost",
        f"daskdl's ring (no direct exchange) at 2-4 ranks, {args.iters} timed rounds per case, "
        "fitted T = s (2(P-1) alpha + 2(P-1)/P n beta), s = max(1, P / cores): "
        f"alpha = {alpha * 1e3:.3f} ms per step, "
        f"beta = {beta * 1e9:.3f} ns per byte ({1 / beta / 1e9:.2f} GB/s). Projected rows: "
        "the ring model, a pipelined binary tree and a two-level ring (8 ranks per host) with "
        "the same alpha and beta across hosts; see docs/collectives.md.",
        ["rows", "ranks", "buffer", "measured ms", "ring model ms", "model / measured"],
        rows,
        f"ringcost ratio={ratio:.3f} target=1",
    )


if __name__ == "__main__":
    main()
