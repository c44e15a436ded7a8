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
from distributed import get_worker

import daskdl
from daskdl import comm
from daskdl.cluster import workers_info
from daskdl.process import torch_friendly_malloc

SIZES = [65_536, 1_048_576, 6_250_000, 11_173_962]  # float32 values: 256 KB to 44.7 MB


def _rank(run_id, rank, peers, sizes, iters):
    with torch_friendly_malloc():
        group = comm.DaskGroup(get_worker(), run_id, rank, peers, timeout=60, direct_bytes=0)
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


def measure(ranks: int, iters: int) -> dict[int, float]:
    with daskdl.local_cluster(n_workers=ranks, threads_per_worker=1, dashboard_address=None) as c:
        comm.ensure_plugin(c)
        peers = sorted(workers_info(c))
        run_id = uuid.uuid4().hex
        futures = [
            c.submit(_rank, run_id, r, peers, SIZES, iters, workers=[w], pure=False)
            for r, w in enumerate(peers)
        ]
        per_rank = c.gather(futures)
    # A collective ends when its slowest rank ends.
    return {n: statistics.median(map(max, zip(*(t[n] for t in per_rank)))) for n in SIZES}


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


def two_level(p, n, alpha, beta, per_host=8, local=10.0):
    # A ring inside each host (``local`` times the bandwidth and a tenth of the step cost),
    # then one across the hosts' leaders on the whole buffer, then the inner ring's gather.
    g = min(per_host, p)
    hosts = max(1, p // g)
    inside = ring(g, n, alpha / 10, beta / local)
    return inside + ring(hosts, n, alpha, beta)


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
    ratio = _share(4) * ring(4, 4 * SIZES[-1], alpha, beta) / measured[4, 4 * SIZES[-1]]
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
