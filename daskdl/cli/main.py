"""The ``daskdl`` command line."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from contextlib import ExitStack
from pathlib import Path

from daskdl.cli import predict as cli_predict
from daskdl.cli import security as cli_security
from daskdl.cli import tune as cli_tune
from daskdl.cli.arguments import (
    as_flags,
    client_for,
    cluster_arguments,
    config_arguments,
    config_options,
    data_arguments,
    load_dataset,
    logger_arguments,
    port,
    run_meta,
    tls_settings,
)


def _train_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model on a data set, data-parallel on a Dask cluster",
        description="Train a model data-parallel, one rank per Dask worker. Without "
        "--scheduler, a local cluster of --workers worker processes is started.",
    )
    from daskdl import models

    data_arguments(p)
    p.add_argument(
        "--model", default="small_cnn", help=f"a registered model: {', '.join(models.REGISTRY)}"
    )
    cluster_arguments(p, "local cluster; with --scheduler, ranks to use (default all)")
    config_arguments(p)
    p.add_argument("--out", default=None, help="run directory for checkpoints and metrics")
    p.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in --out"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run in --out (once this run has written its first checkpoint)",
    )
    p.add_argument(
        "--signing-key",
        help="key file that signs the checkpoints (default: DASKDL_SIGNING_KEY[_FILE])",
    )
    p.add_argument(
        "--verify-key",
        help="key file that --resume checks with (default: DASKDL_VERIFY_KEY_FILE, else the "
        "signing key)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false")
    logger_arguments(p)


def train(args) -> int:
    from daskdl.training.launcher import fit

    if args.resume and not args.out:
        raise ValueError("--resume continues the run in --out; give --out DIR.")
    from daskdl.runs import checks

    checks.train_config(None, config_options(args))  # before a cluster is started for it
    train_ds, test_ds = load_dataset(args)
    with ExitStack() as stack:
        client = client_for(args, stack)
        print(
            f"daskdl: cluster {client.scheduler.address}, dashboard {client.dashboard_link}",
            file=sys.stderr,
        )
        run = fit(
            client,
            args.model,
            train_ds,
            val=test_ds,
            **config_options(args),
            workers=args.workers if args.scheduler else None,
            out=args.out,
            resume=args.out if args.resume else None,
            overwrite=args.overwrite,
            signing_key=args.signing_key,
            verify_key=args.verify_key,
            progress=args.progress,
            meta=run_meta(args),
            loggers=args.loggers,
        )
        last = run.history.iloc[-1]
        scores = [c for c in run.history.columns if c.startswith("val_") and c != "val_perplexity"]
        fields = [
            f"run={run.run_id}",
            f"status={run.status}",
            f"epochs={int(last['epoch'])}",
            f"train_loss={last['train_loss']:.4f}",
            *(f"{c}={last[c]:.4f}" for c in scores if isinstance(last[c], float)),
            f"samples_per_s={run.history['samples_per_s'].mean():.0f}",
        ]
        if args.out:
            fields.append(f"out={args.out}")
        print(" ".join(fields))
    return 0


# Small settings for ``daskdl bench``: a few minutes on 2 cores in all. The scripts' own
# defaults (``--full``) are what benchmarks/RESULTS.md records.
BENCHMARKS = {
    "overhead": ["--n", "1024", "--epochs", "2"],
    "allreduce": ["--size", "2000000", "--iters", "10", "--warmup", "2"],
    "scaling": ["--n", "1024", "--epochs", "2", "--rounds", "2"],
    "dataload": ["--n", "4096", "--epochs", "3"],
    "ddp": ["--n", "1024", "--epochs", "2"],
    "words": ["--mb", "40", "--files", "4"],
    "predict": ["--n", "200000", "--rounds", "2"],
    "stream": ["--n", "20000"],
    "pipeline": ["--n", "4096", "--width", "512", "--batch", "1024", "--rounds", "1"],
}
LOWER_IS_BETTER = {"allreduce"}  # a time ratio; the others are throughput ratios


def _bench_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="run the CPU benchmarks with small settings and print one summary table",
        description="Run the benchmark scripts of this checkout's benchmarks/ folder, each in "
        "its own process, and summarise their '<name> ratio=<value> target=<value>' lines.",
    )
    p.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run just these")
    p.add_argument("--full", action="store_true", help="the scripts' own (larger) settings")
    p.add_argument(
        "--record", action="store_true", help="append the tables to benchmarks/RESULTS.md"
    )
    p.add_argument("--benchmarks", help="the benchmarks folder (default: the checkout's)")


def _words_parser(sub) -> None:
    p = sub.add_parser(
        "words",
        help="count the words of text files on a Dask cluster",
        description="Word frequencies over text files (paths or globs), counted per block on "
        "the workers and added up by Dask. Prints the most frequent words.",
    )
    p.add_argument("paths", nargs="+", help="text files or globs, e.g. 'corpus/*.txt'")
    p.add_argument("--top", type=int, default=20, help="how many words to print")
    p.add_argument("--stop-words", choices=["english"], help="leave out English stop words")
    p.add_argument("--min-length", type=int, default=1, help="leave out shorter words")
    p.add_argument(
        "--errors",
        choices=["strict", "replace", "ignore"],
        default="strict",
        help="what to do with bytes that are not UTF-8 (strict: stop, naming the file)",
    )
    p.add_argument("--plot", help="also save a bar chart of the top words (PNG, SVG, PDF)")
    cluster_arguments(p)


def words(args) -> int:
    from daskdl.data import text

    if args.plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise ImportError("--plot needs matplotlib: pip install matplotlib") from None
    with ExitStack() as stack:
        client = client_for(args, stack)
        freqs = text.word_frequencies(
            args.paths,
            stop_words=args.stop_words,
            min_length=args.min_length,
            top=args.top,
            errors=args.errors,
            client=client,
        )
    width = max([len("word"), *map(len, freqs.index)])
    print(f"{'word':<{width}} {'count':>10}")
    for word, count in freqs.items():
        print(f"{word:<{width}} {count:>10}")
    if args.plot:
        fig, ax = plt.subplots(figsize=(8, 0.3 * len(freqs) + 1))
        ax.barh(freqs.index[::-1], freqs.values[::-1])
        ax.set_xlabel("count")
        ax.set_title(f"top {len(freqs)} words")
        fig.tight_layout()
        fig.savefig(args.plot)
        print(f"saved {args.plot}", file=sys.stderr)
    return 0


def _dashboard_parser(sub) -> None:
    p = sub.add_parser(
        "dashboard",
        help="serve the live dashboard for the runs on a cluster",
        description="Serve daskdl's Panel dashboard: watch, start, stop and resume runs. "
        "Without --scheduler, a local cluster of --workers worker processes is started.",
    )
    cluster_arguments(p)
    p.add_argument("--address", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=port, default=5006, help="port (0: any free one)")
    p.add_argument("--runs-dir", default="runs", help="where runs started from the page write")
    p.add_argument("--show", action="store_true", help="open a browser tab")
    p.add_argument(
        "--basic-auth",
        help="password for Panel's login page, or a JSON file of users and passwords; "
        "required for an --address other than loopback",
    )
    p.add_argument("--cookie-secret", help="signs login cookies (default: a random one)")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="serve on a non-loopback --address without a password (trusted networks only)",
    )


def dashboard(args) -> int:
    from daskdl.webapp.serve import check_exposure, check_port, serve, shared_client

    check_exposure(args.address, args.basic_auth, args.insecure)  # before starting a cluster
    if args.port:
        check_port(args.address, args.port)
    if args.insecure and not args.basic_auth:
        print(f"daskdl: warning: serving on {args.address} without a password", file=sys.stderr)
    client = shared_client(args.scheduler, args.workers, tls_settings(args), args.secure)

    def ready(url: str) -> None:
        print(
            f"daskdl dashboard: {url} (cluster {client.scheduler.address}, Dask dashboard "
            f"{client.dashboard_link})",
            flush=True,
        )

    try:
        serve(
            client,
            args.address,
            args.port,
            args.runs_dir,
            args.show,
            on_ready=ready,
            basic_auth=args.basic_auth,
            cookie_secret=args.cookie_secret,
            insecure=args.insecure,
        )
    except KeyboardInterrupt:
        pass
    finally:
        client.close()
    return 0


def _benchmarks_dir(args) -> Path:
    checkout = Path(__file__).resolve().parents[2]  # daskdl/cli/main.py in a checkout
    folder = Path(args.benchmarks or checkout / "benchmarks")
    if not (folder / "_report.py").is_file():
        raise FileNotFoundError(
            f"no benchmark scripts in {folder}: daskdl bench runs those of a daskdl checkout "
            "(pip install -e .), or pass --benchmarks DIR."
        )
    return folder


def bench(args) -> int:
    import os
    import subprocess
    import tempfile
    import time

    folder = _benchmarks_dir(args)
    rows, failed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ)
        if not args.record:
            env["DASKDL_BENCH_RESULTS"] = os.path.join(tmp, "RESULTS.md")
        for name in args.only or list(BENCHMARKS):
            command = [sys.executable, f"{name}.py", *([] if args.full else BENCHMARKS[name])]
            print(f"daskdl bench: {' '.join(command[1:])} ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            found = re.search(
                rf"^{name} ratio=([-\d.e]+) target=([-\d.e]+)$", done.stdout, re.MULTILINE
            )
            if done.returncode != 0 or found is None:
                failed.append(name)
                tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
                print(f"daskdl bench: {name} failed:\n  " + "\n  ".join(tail), file=sys.stderr)
                continue
            ratio, target = float(found[1]), float(found[2])
            met = ratio <= target if name in LOWER_IS_BETTER else ratio >= target
            sense = "<=" if name in LOWER_IS_BETTER else ">="
            rows.append((name, ratio, f"{sense} {target:g}", "yes" if met else "no", seconds))
    print(f"{'benchmark':<10} {'ratio':>7} {'target':>8} {'met':>4} {'seconds':>8}")
    for row in rows:
        print("{:<10} {:>7.3f} {:>8} {:>4} {:>8.0f}".format(*row))
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


def _log_to_stderr() -> None:
    """daskdl's own news (a checkpoint written, a worker lost, a step skipped) as lines on
    stderr, beside the progress bar."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("daskdl: %(message)s"))
    log = logging.getLogger("daskdl")
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    import daskdl  # the root package: its __version__ (it does not import the CLI)

    parser = argparse.ArgumentParser(
        prog="daskdl", description="Distributed deep learning on Dask clusters."
    )
    parser.add_argument("--version", action="version", version=f"daskdl {daskdl.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _bench_parser(sub)
    _dashboard_parser(sub)
    _words_parser(sub)
    cli_predict.add_parser(sub)
    cli_tune.add_parser(sub)
    cli_security.add_parsers(sub)
    args = parser.parse_args(argv)
    _log_to_stderr()
    from daskdl.checkpoint.files import CheckpointError
    from daskdl.runs.run import RunError

    try:
        commands = {
            "train": train,
            "bench": bench,
            "dashboard": dashboard,
            "words": words,
            "predict": cli_predict.predict,
            "tune": cli_tune.tune,
            "keygen": cli_security.keygen,
            "verify": cli_security.verify,
            "audit": cli_security.audit,
        }
        return commands[args.command](args)
    except (
        ValueError,
        TypeError,
        KeyError,
        OSError,
        ImportError,
        RuntimeError,
        CheckpointError,
        RunError,
    ) as e:
        print(f"daskdl: error: {as_flags(_one_line(e))}", file=sys.stderr)
        return 2


def _one_line(e: BaseException) -> str:
    """The error as one line; an OS error in its own words names its path and a fix."""
    if isinstance(e, ConnectionError) or not isinstance(e, OSError) or e.filename is None:
        return " ".join(str(e).split())
    path = e.filename if e.filename2 is None else f"{e.filename} -> {e.filename2}"
    return (
        f"{path}: {e.strerror or e}. Check that the path is right, that its folders exist, and "
        "that you may read or write there."
    )


if __name__ == "__main__":
    sys.exit(main())
