"""What every `daskdl` subcommand shares: argument types, the cluster, data and tracker flags,
one flag per training option, the data set and the client they ask for, and errors written with
the flags' names."""

from __future__ import annotations

import argparse
import re
from contextlib import ExitStack

from daskdl.config import options as config
from daskdl.objective.task import TASKS


def count(text: str) -> int:
    """An argparse type: a positive integer (``--workers 0`` is an error, not the default)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 0-65535 (0: any), got {text!r}")
    return value


def cluster_arguments(p, what: str = "local cluster") -> None:
    p.add_argument("--scheduler", help="address of a running scheduler, e.g. tls://host:8786")
    p.add_argument("--workers", type=count, default=None, help=f"workers of the {what}")
    p.add_argument("--tls-ca-file", help="CA certificate of a TLS cluster (with --scheduler)")
    p.add_argument("--tls-cert", help="this client's TLS certificate")
    p.add_argument("--tls-key", help="this client's TLS private key")
    p.add_argument(
        "--secure",
        action="store_true",
        help="local cluster only: TLS on every connection, with a certificate made for it",
    )


def logger_arguments(p) -> None:
    from daskdl.runs.trackers import NAMES

    p.add_argument(
        "--loggers", nargs="+", choices=NAMES, default=None,
        help="experiment trackers for the metrics: tensorboard (in --out), mlflow "
        "(MLFLOW_TRACKING_URI, else ./mlflow.db), csv",
    )  # fmt: skip


def data_arguments(p) -> None:
    """The data set: a built-in one, or the user's files; its validation split."""
    from daskdl import datasets

    names = ", ".join([*datasets.REGISTRY, "cifar10 (with --data-path)"])
    p.add_argument("--dataset", help=f"a built-in data set (default digits): {names}")
    p.add_argument("--data-path", help="folder of the CIFAR-10 binary files")
    data = p.add_argument_group("your own data (instead of --dataset)")
    data.add_argument(
        "--data",
        help="Parquet, CSV (globs too), Zarr, netCDF, .npz/.npy, or a Dataset.save folder",
    )
    data.add_argument("--label", nargs="+", help="target column(s), variable or array")
    data.add_argument("--features", nargs="+", help="feature columns (default: all the others)")
    data.add_argument(
        "--categorical", nargs="+", help="columns to encode as categories (Parquet, CSV)"
    )
    data.add_argument(
        "--task", choices=TASKS, help="what the targets are (default: from their type)"
    )
    data.add_argument("--sample-dim", help="the samples' dimension (Zarr, netCDF)")
    p.add_argument("--test-size", type=float, default=0.2, help="fraction held out for validation")
    p.add_argument(
        "--no-standardize",
        dest="standardize",
        action="store_false",
        help="skip per-channel standardisation of the features",
    )


def config_arguments(p) -> None:
    """One flag per :class:`daskdl.TrainConfig` field, with its type, default, choices and
    help: the options are defined there once."""
    groups = {
        name: p.add_argument_group(f"{name} options (daskdl.TrainConfig): {sec.about}")
        for name, sec in config.SECTIONS.items()
    }
    for f in config.fields():
        group = groups[f.metadata["section"]]
        flag = "--" + f.name.replace("_", "-")
        kind = config.base_type(f)
        kwargs = {"dest": f.name, "default": f.default}
        help = f.metadata["help"]
        if f.metadata["choices"] is not None:
            kwargs["choices"] = [c for c in f.metadata["choices"] if c is not None]
        elif kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
            if f.default is None:
                help += " (default: automatic)"
        else:
            kwargs["type"] = {"int": int, "float": float, "str": str}[kind]
        if f.default is not None and kwargs.get("action") is None:
            help += f" (default: {f.default})"
        group.add_argument(flag, help=help.replace("%", "%%"), **kwargs)


def config_options(args) -> dict:
    """The training options of parsed ``args``."""
    return {f.name: getattr(args, f.name) for f in config.fields()}


def load_dataset(args):
    from daskdl import datasets
    from daskdl.data import sources

    if args.data:
        if args.dataset or args.data_path:
            raise ValueError(
                "Give --data (your own files) or --dataset (a built-in one), not both."
            )
        label = args.label[0] if args.label and len(args.label) == 1 else args.label
        data = sources.read(
            args.data, label, args.features, args.task, args.sample_dim, None, args.categorical
        )
        train, test = data.split(args.test_size, args.seed)
        if args.standardize:
            train, test = train.standardize(), test.standardize(like=train)
        return train, test
    for flag in ("label", "features", "task", "sample_dim", "categorical"):
        if getattr(args, flag):
            raise ValueError(f"--{flag.replace('_', '-')} is for --data (your own files).")
    args.dataset = args.dataset or "digits"
    if args.dataset == "cifar10" and not args.data_path:
        raise ValueError("--dataset cifar10 needs --data-path FOLDER with the .bin files.")
    if args.data_path and args.dataset != "cifar10":
        raise ValueError(f"--data-path is only for --dataset cifar10, not {args.dataset}.")
    return datasets.train_test(
        args.dataset, args.data_path, args.test_size, args.seed, args.standardize
    )


def run_meta(args) -> dict:
    """What the run records about its data, for the dashboard (which resumes built-ins)."""
    if args.data:
        return {"data": str(args.data), "launched_by": "cli"}
    return {"dataset": args.dataset, "data_path": args.data_path, "launched_by": "cli"}


def tls_settings(args):
    """The TLS settings the cluster options ask for (None: plain TCP)."""
    from daskdl import security

    files = (args.tls_ca_file, args.tls_cert, args.tls_key)
    if any(files) and not args.scheduler:
        raise ValueError(
            "--tls-ca-file/--tls-cert/--tls-key attach to a running TLS cluster: give "
            "--scheduler tls://HOST:PORT too (for a local TLS cluster use --secure)."
        )
    if args.secure and args.scheduler:
        raise ValueError(
            "--secure starts a local TLS cluster; to attach to a running one give "
            "--tls-ca-file, --tls-cert and --tls-key with --scheduler."
        )
    return security.tls(*files) if any(files) else None


def client_for(args, stack: ExitStack):
    from daskdl.cluster import connect, local_cluster

    tls = tls_settings(args)
    gpus = getattr(args, "gpus", None)  # only `daskdl train` has --gpus
    if args.scheduler:
        client = connect(args.scheduler, security=tls)
    elif gpus:
        if gpus == "all":
            gpus = True
        elif gpus.isdigit():
            gpus = int(gpus)
        client = local_cluster(gpus=gpus, secure=args.secure)
    else:
        client = local_cluster(n_workers=args.workers, secure=args.secure)
    return stack.enter_context(client)


def as_flags(message: str) -> str:
    """A training option named as Python names it (``batch_size must be ...``,
    ``lr=0.1``) as the command line does (``--batch-size must be ...``, ``--lr 0.1``)."""
    for f in config.fields():
        flag = "--" + f.name.replace("_", "-")
        message = re.sub(rf"^{f.name}\b(?!=)", flag, message)
        message = re.sub(rf"(?<![\w.'\"-]){f.name}=", flag + " ", message)
    return message
