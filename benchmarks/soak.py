"""Soak: a 2-rank run of at least 2,000 steps; does worker memory stay flat?

    python benchmarks/soak.py [--steps 2000]

small_cnn on the digits, batch 8 per rank, per-step gradient averaging, a checkpoint every
epoch. Memory is each rank's worker RSS from its step events: the last report of the first
epoch against the last report of the run. Ends with
``soak ratio=<end RSS / first-epoch RSS, the worse rank> target=1.05``.
"""

from __future__ import annotations

import argparse
import math
import tempfile

import dask
from _report import report

import daskdl
from daskdl import events


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    train, test = daskdl.datasets.train_test("digits")
    batch = 8
    with daskdl.local_cluster(n_workers=2, threads_per_worker=1) as client:
        train = train.persist(client)
        steps_per_epoch = math.ceil(len(train) / 2 / batch)
        epochs = max(2, math.ceil(args.steps / steps_per_epoch) + 1)
        with (
            tempfile.TemporaryDirectory() as out,
            dask.config.set({"daskdl.log-interval": "0.25s"}),
        ):
            run = daskdl.fit(
                client,
                "small_cnn",
                train,
                val=test,
                epochs=epochs,
                batch_size=batch,
                out=out,
                progress=False,
            )
        log = events.replay(client, run.run_id)
    steps = [e for e in log if e["kind"] == "step"]
    total_steps = int(run.history["step"].iloc[-1])
    rows, ratios = [], []
    for rank in sorted({e["rank"] for e in steps}):
        mine = [e for e in steps if e["rank"] == rank]
        first = [e for e in mine if e["epoch"] == 1][-1]["rss"]
        end = mine[-1]["rss"]
        ratios.append(end / first)
        peak = max(e["rss"] for e in mine)
        rows.append([rank, first / 2**20, peak / 2**20, end / 2**20, end / first])
    ratio = max(ratios)
    report(
        "soak",
        f"small_cnn on the digits, 2 ranks, batch {batch}, {epochs} epochs = {total_steps} "
        "steps, a checkpoint every epoch; worker RSS (MiB) from the ranks' step events. Final "
        f"val_accuracy {run.history['val_accuracy'].iloc[-1]:.4f}.",
        ["rank", "RSS after epoch 1", "max RSS", "RSS at the end", "end / epoch 1"],
        rows,
        f"soak ratio={ratio:.3f} target=1.05",
    )
    assert total_steps >= args.steps, f"only {total_steps} steps"


if __name__ == "__main__":
    main()
