"""Data-parallel scaling on this machine: a small CNN on 3x32x32 synthetic images, batch 64 per
rank, one torch thread per rank, trained by 1 rank and by 2 ranks of the same 2-worker
LocalCluster, with per-step gradient averaging and with local SGD (``sync_every=8``).

    python benchmarks/scaling.py [--n 2048] [--epochs 3]

Throughput is samples per second over every epoch after the first; 1 and 2 ranks alternate.
Ends with ``scaling ratio=<2 ranks / 1 rank, per-step averaging> target=1.8`` (the table also
has the ``sync_every=8`` ratio, target 1.9).
"""

from __future__ import annotations

import argparse
import statistics

from _report import report
from _workload import fit_throughput, synthetic

import daskdl


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    data = synthetic(args.n)
    rates: dict[tuple[int, int], list[float]] = {}
    with daskdl.local_cluster(n_workers=2, threads_per_worker=1) as client:
        data = data.persist(client)
        for _ in range(2):
            for sync_every in (1, 8):
                for ranks in (1, 2):
                    key = (sync_every, ranks)
                    rates.setdefault(key, []).extend(
                        fit_throughput(
                            client, data, args.epochs, sync_every=sync_every, workers=ranks
                        )
                    )
    rows, ratios = [], {}
    for sync_every in (1, 8):
        one = statistics.median(rates[(sync_every, 1)])
        two = statistics.median(rates[(sync_every, 2)])
        ratios[sync_every] = two / one
        target = 1.8 if sync_every == 1 else 1.9
        rows.append([f"sync_every={sync_every}", one, two, two / one, target])
    report(
        "scaling",
        f"small_cnn on {args.n} synthetic 3x32x32 images, batch 64 per rank, 1 torch thread per "
        "rank, 1 rank vs 2 ranks of one 2-worker LocalCluster; median samples/s over the epochs "
        "after the first of two alternating sessions.",
        ["averaging", "1 rank samples/s", "2 ranks samples/s", "ratio", "target"],
        rows,
        f"scaling ratio={ratios[1]:.3f} target=1.8",
    )


if __name__ == "__main__":
    main()
