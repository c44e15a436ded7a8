"""Pipeline parallelism against one rank holding the whole model, and the training state a
rank of a sharded run holds.

    python benchmarks/pipeline.py [--width 1024] [--layers 8] [--n 16384] [--batch 2048]
                                  [--microbatches 8] [--chunks 2]

The model: ``layers`` equal ``Linear(width, width)`` + ReLU blocks and a classifier, so its
two halves cost the same. ``fit`` trains it on synthetic features for two epochs on 1 rank,
then as a 2-stage pipeline on 2 workers (1F1B, GPipe, and interleaved 1F1B with ``chunks``
pieces per stage), in alternating rounds, in this one process run; the figure is each run's
second-epoch samples/s, the median over the rounds. The ideal for 2 stages and m
microbatches is ``2m / (m + 1)`` times one rank (the bubble); interleaving shrinks the
bubble to ``1 / chunks`` of a microbatch, for an ideal of ``2m / (m + 1 / chunks)``. Beside
them, the machine's ceiling: two plain processes at once, each running half the model's
forward, backward and AdamW step on the batch in m microbatches, against one process running
the whole model on the whole batch (no messages, no bubble).

Then, on 2 ranks with AdamW: the bytes of parameters, gradients and optimizer state a rank
holds after a step, unsharded, with ``shard="optimizer"`` (ideal 0.75 of unsharded) and with
``shard="full"`` (ideal 0.5); targets at most 0.8 and 0.6.
Ends with ``pipeline ratio=<the best schedule's speed-up / 2m / (m + 1)> target=0.9``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import dask.array as da
import numpy as np
import torch
import torch.multiprocessing as mp
from _report import report

import daskdl
from daskdl import Dataset, Pipeline
from daskdl.parallel import sharding

TARGET = 0.9
STATE_TARGETS = {"optimizer": 0.8, "full": 0.6}


def blocks(width: int, layers: int):
    def factory(input_shape, n_outputs):
        mods = []
        for _ in range(layers):
            mods += [torch.nn.Linear(width, width), torch.nn.ReLU()]
        return torch.nn.Sequential(*mods, torch.nn.Linear(width, n_outputs))

    return factory


def data(n: int, width: int) -> Dataset:
    # Made lazily on the workers: numpy arrays would travel inside the graph.
    X = da.random.default_rng(0).normal(size=(n, width), chunks=(n // 4, width))
    X = X.astype(np.float32)
    return Dataset.from_dask(X, X[:, :10].argmax(axis=1).astype(np.int64))


def _plain(width, layers, batch, microbatches, queue, steps=6):
    """Seconds per step of ``layers`` blocks on ``batch`` samples in ``microbatches``."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = blocks(width, layers)((width,), 10)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch // microbatches, width)
    times = []
    for _ in range(steps + 2):
        t0 = time.perf_counter()
        opt.zero_grad()
        for _ in range(microbatches):
            model(x).sum().backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    queue.put(statistics.median(times[2:]))


def ceiling(width: int, layers: int, batch: int, m: int) -> float:
    """Speed-up of two processes with half the model each over one with all of it."""
    ctx = mp.get_context("spawn")

    def timed(n, layers_each, microbatches):
        queue = ctx.Queue()
        procs = [
            ctx.Process(target=_plain, args=(width, layers_each, batch, microbatches, queue))
            for _ in range(n)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        return max(queue.get() for _ in procs)

    return timed(1, layers, 1) / timed(2, layers // 2, m)


def throughput(client, factory, train, batch: int, **options) -> float:
    run = daskdl.fit(
        client, factory, train, epochs=2, batch_size=batch, optimizer="adamw", lr=1e-3,
        progress=False, max_failures=0, **options,
    )  # fmt: skip
    return float(run.history["samples_per_s"].iloc[-1])


def _state_bytes(ctx):
    """Bytes a rank holds after one AdamW step: unsharded and each sharding."""
    torch.manual_seed(0)
    model = blocks(ctx.config["width"], ctx.config["layers"])((ctx.config["width"],), 10)
    x = torch.randn(32, ctx.config["width"])

    def adamw(params):
        return torch.optim.AdamW(params, lr=1e-3)

    out = {}
    for shard in (None, "optimizer", "full"):
        prepared = ctx.prepare(copy.deepcopy(model), adamw, shard=shard)
        m, opt = prepared
        opt.zero_grad()
        m(x).square().mean().backward()
        opt.step()
        if shard is None:  # counted as a sharded optimizer counts its own
            tensors = [*m.parameters(), *(p.grad for p in m.parameters())]
            out["none"] = sharding.storage_bytes(tensors + sharding.optimizer_state(opt))
        else:
            out[shard] = opt.state_bytes()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--chunks", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    factory, train = blocks(args.width, args.layers), data(args.n, args.width)
    m, v = args.microbatches, args.chunks
    ideal = 2 * m / (m + 1)
    interleaved = f"2 stages x {v} chunks, interleaved 1F1B"
    ideals = {"1 rank, whole model": 1.0, interleaved: 2 * m / (m + 1 / v)}
    cases = {
        "1 rank, whole model": dict(workers=1),
        "2 stages, 1F1B": dict(pipeline=Pipeline(stages=2, microbatches=m)),
        "2 stages, GPipe": dict(pipeline=Pipeline(stages=2, microbatches=m, schedule="gpipe")),
        interleaved: dict(pipeline=Pipeline(stages=2, microbatches=m, chunks=v)),
    }
    speeds: dict[str, list[float]] = {name: [] for name in cases}
    with daskdl.local_cluster(n_workers=2, threads_per_worker=1) as client:
        for _ in range(args.rounds):
            for name, options in cases.items():
                speeds[name].append(throughput(client, factory, train, args.batch, **options))
        config = {"width": args.width, "layers": args.layers}
        state = daskdl.launch(client, _state_bytes, {"train": train}, config, workers=2,
                              progress=False).result  # fmt: skip
    machine = ceiling(args.width, args.layers, args.batch, m)
    base = statistics.median(speeds["1 rank, whole model"])
    rows = [["ceiling: 2 plain processes, half each", "", machine, ideal]]
    for name, values in speeds.items():
        s = statistics.median(values)
        rows.append([name, round(s), s / base, ideals.get(name, ideal)])
    for shard, ideal_share in (("optimizer", 0.75), ("full", 0.5)):
        share = state[shard] / state["none"]
        rows.append([f"state per rank, shard={shard!r}", state[shard], share, ideal_share])
        print(f"shard={shard}: {share:.3f} of unsharded (target <= {STATE_TARGETS[shard]})")
    best = max((n for n in speeds if "stages" in n), key=lambda n: statistics.median(speeds[n]))
    speedup = statistics.median(speeds[best]) / base
    ratio = speedup / ideal
    print(f"best, {best}: {speedup:.3f} x one rank, {speedup / machine:.3f} of the ceiling")
    report(
        "pipeline",
        f"{args.layers} x Linear({args.width}) + ReLU, batch {args.batch}, {m} microbatches, "
        f"{args.n} samples x 2 epochs (second epoch), median of {args.rounds} rounds; ratio: "
        f"the best schedule ({best}) over 2m/(m+1); state: bytes per rank after one AdamW "
        "step on 2 ranks",
        ["case", "samples/s or bytes", "vs 1 rank / unsharded", "ideal"],
        rows,
        f"pipeline ratio={ratio:.3f} target={TARGET}",
    )


if __name__ == "__main__":
    main()
