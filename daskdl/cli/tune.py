"""``daskdl tune``: a tuning study from the command line, its search space in a YAML file."""

from __future__ import annotations

import logging
import sys
from contextlib import ExitStack

from daskdl.tuning.parts import PRUNERS, SAMPLERS

EXAMPLE = """example search.yaml:

  model: {choices: [small_cnn, mlp]}
  mlp.hidden: {choices: [64, 256]}
  lr: {low: 0.001, high: 0.3, log: true}
  batch_size: {choices: [32, 64]}
  augment: {choices: [true, false]}
  weight_decay: 0.0005        # a plain value: every trial
"""


def add_parser(sub) -> None:
    import argparse

    from daskdl.cli import arguments as cli

    p = sub.add_parser(
        "tune",
        help="tune hyperparameters and choose a model: many runs sharing one cluster",
        description="A tuning study (Optuna underneath): trials, each a daskdl run, as many at "
        "once as the cluster's workers hold, pruned early when they are losing.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--space", required=True, help="the search space, a YAML file (below)")
    cli.data_arguments(p)
    cli.cluster_arguments(p, "local cluster; with --scheduler, workers to use (default all)")
    p.add_argument("--n-trials", type=cli.count, default=20, help="trials to run (default 20)")
    p.add_argument("--epochs", type=cli.count, default=10, help="each trial's epochs (default 10)")
    p.add_argument("--metric", default="val_accuracy", help="what to optimise (a history column)")
    p.add_argument(
        "--direction",
        choices=["maximize", "minimize"],
        help="default: from --metric's name (losses and errors are minimised, accuracies and "
        "scores maximised)",
    )
    p.add_argument("--pruner", choices=PRUNERS, default="asha")
    p.add_argument("--sampler", choices=SAMPLERS, default="tpe")
    p.add_argument("--ranks-per-trial", type=cli.count, default=1, help="workers per trial")
    p.add_argument(
        "--max-concurrent", type=cli.count, help="trials at once (default: as many as fit)"
    )
    p.add_argument("--storage", help="a journal file or database URL that keeps the study")
    p.add_argument("--study-name", default="daskdl", help="the study's name in --storage")
    p.add_argument(
        "--resume", action="store_true", help="go on with the study in --storage (its name)"
    )
    p.add_argument("--out", help="folder for the trials' checkpoints (out/trial-NNNN)")
    p.add_argument("--seed", type=int, default=0, help="seeds the sampler and the data split")
    cli.logger_arguments(p)


# tune()'s arguments as the command line names them, for errors raised in tune()'s terms.
FLAGS = {
    "direction=": "--direction ",
    "storage=": "--storage ",
    "resume=True": "--resume",
    "resume=False": "no --resume",
    "study_name": "--study-name",
    "out=": "--out ",
    "metric=": "--metric ",
    "tune()": "daskdl tune",
}


def tune(args) -> int:
    try:
        return _tune(args)
    except ValueError as e:
        message = str(e)
        for python, flag in FLAGS.items():
            message = message.replace(python, flag)
        raise ValueError(message) from None


def _tune(args) -> int:
    from daskdl.cli import arguments as cli
    from daskdl.tuning import space
    from daskdl.tuning.study import tune

    search = space.load(args.space)
    train, test = cli.load_dataset(args)
    with ExitStack() as stack:
        client = cli.client_for(args, stack)
        logging.getLogger("optuna").setLevel(logging.WARNING)  # daskdl logs each trial
        study = tune(
            client, search, train, val=test, n_trials=args.n_trials, epochs=args.epochs,
            metric=args.metric, direction=args.direction, pruner=args.pruner,
            sampler=args.sampler, ranks_per_trial=args.ranks_per_trial,
            max_concurrent=args.max_concurrent, storage=args.storage,
            study_name=args.study_name, resume=args.resume, out=args.out, seed=args.seed,
            loggers=args.loggers,
        )  # fmt: skip
        trials = study.trials.drop(columns=[args.metric, "error"])
        print(trials.to_string(index=False), file=sys.stderr)
        best = study.best
        params = " ".join(f"{k}={v}" for k, v in best.params.items())
        where = f" out={best.checkpoint}" if best.checkpoint else ""
        print(f"best trial={best.number} {args.metric}={best.value:.4f} {params}{where}")
    return 0
