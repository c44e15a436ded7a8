"""A tuning study with ASHA against the same study without pruning, on one 2-worker cluster.

    python benchmarks/tune.py [--trials 16] [--epochs 8] [--n 4096] [--noise 8]

The search: ``small_cnn`` (width 16 or 32) or ``mlp`` (hidden 64 or 256), learning rate from
0.003 to 0.3 (log), augmentation on or off, on noisy synthetic 3x32x32 images (``--noise 8``);
random sampling with one seed, so both studies try the same configurations. Each trial has the
same epoch budget.
Run in this one process run: the study with ASHA (Optuna's successive halving), then the
exhaustive one. For each: wall time, the best validation accuracy, and the workers'
utilisation (the time trials held them, over the study's wall time times the workers).
Ends with ``tune ratio=<no-pruning wall / ASHA wall> target=2.5``; the best accuracy with ASHA
should be within one point of the exhaustive study's, utilisation at least 0.9.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

from _report import report

import daskdl

TARGET = 2.5


def space(trial):
    kind = trial.suggest_categorical("model", ["small_cnn", "mlp"])
    if kind == "small_cnn":
        model = ("small_cnn", {"width": trial.suggest_categorical("width", [16, 32])})
    else:
        model = ("mlp", {"hidden": trial.suggest_categorical("hidden", [64, 256])})
    return {
        "model": model,
        "lr": trial.suggest_float("lr", 0.003, 0.3, log=True),
        "augment": trial.suggest_categorical("augment", [True, False]),
    }


def study(client, train, val, pruner: str, trials: int, epochs: int):
    t = time.perf_counter()
    result = daskdl.tune(
        client, space, train, val=val, n_trials=trials, epochs=epochs, pruner=pruner,
        sampler="random", batch_size=64, torch_threads=1, seed=0,
    )  # fmt: skip
    wall = time.perf_counter() - t
    states = result.trials["state"].value_counts().to_dict()
    return wall, result.best.value, result.utilization, states


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--noise", type=float, default=8.0)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    logging.getLogger("optuna").setLevel(logging.WARNING)
    # Noisy enough that configurations differ (at noise 2 most reached 1.0, and ASHA, which
    # keeps the top quarter at each rung, kept the ties).
    data = daskdl.datasets.synthetic_images(args.n + 1024, noise=args.noise, chunks=1024)
    train, val = data.split(1024 / (args.n + 1024), seed=0)
    rows, walls = [], {}
    with daskdl.local_cluster(n_workers=2, threads_per_worker=1) as client:
        for pruner in ("asha", "none"):
            wall, best, use, states = study(client, train, val, pruner, args.trials, args.epochs)
            walls[pruner] = wall
            rows.append([pruner, wall, best, use, str(states)])
            print(f"{pruner}: {wall:.1f} s, best val_accuracy {best:.4f}, utilisation {use:.2f}")
    ratio = walls["none"] / walls["asha"]
    report(
        "tune",
        f"{args.trials} trials of {args.epochs} epochs (small_cnn width 16/32 or mlp hidden "
        "64/256, lr 0.003-0.3 log, augmentation on/off; random sampling, seed 0) on "
        f"{args.n:,} synthetic 3x32x32 images (noise {args.noise:g}), 1,024 held out, batch "
        "64, 2 workers of one thread: ASHA (Optuna's SuccessiveHalvingPruner) against no "
        "pruning, in one run. "
        "Utilisation: the time trials held the workers over wall time x workers.",
        ["pruner", "wall s", "best val_accuracy", "utilisation", "trials"],
        rows,
        f"tune ratio={ratio:.3f} target={TARGET}",
    )


if __name__ == "__main__":
    main()
