"""``daskdl predict``: a checkpoint's predictions over a data set's files, written beside them
(Parquet or CSV for tabular input, with its index; Zarr for arrays). The checkpoint's model
takes the files as they are: its features by name, standardised with its training statistics
(:mod:`daskdl.data.inputs`)."""

from __future__ import annotations

import shutil
import sys
from contextlib import ExitStack
from pathlib import Path


def add_parser(sub) -> None:
    from daskdl.cli.arguments import cluster_arguments
    from daskdl.prediction.partitions import PRECISIONS

    p = sub.add_parser(
        "predict",
        help="predict with a trained model over a data set's files",
        description="Predictions of a checkpoint's model (verified first, as --resume "
        "verifies) over Parquet, CSV, Zarr, netCDF, .npy/.npz or Dataset.save files, as they "
        "are (the checkpoint applies its features' order and standardisation), on a Dask "
        "cluster: Parquet or CSV out for tabular input (its index kept), Zarr for arrays.",
    )
    cluster_arguments(p)
    p.add_argument("--checkpoint", required=True, help="a checkpoint or run directory")
    p.add_argument("--data", required=True, help="the samples to predict on")
    p.add_argument(
        "--out", required=True, help="where to write: preds.parquet, preds.csv or preds.zarr"
    )
    p.add_argument(
        "--output",
        choices=["labels", "proba", "logits", "values"],
        help="labels (a classifier's default), proba (a multi-label model's), logits, or a "
        "regression's values (in the targets' units)",
    )
    p.add_argument("--features", nargs="+", help="feature columns (default: the checkpoint's)")
    p.add_argument("--sample-dim", help="the samples' dimension of a Zarr or netCDF data set")
    p.add_argument("--batch-size", type=int, default=1024, help="samples per forward pass")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--precision", choices=list(PRECISIONS), default="fp32")
    p.add_argument("--verify-key", help="key that verifies the checkpoint's signature")
    p.add_argument(
        "--on-nan",
        choices=["raise", "propagate"],
        default="raise",
        help="samples with NaN or infinite features: refused (raise), or NaN predictions "
        "(label -1) (propagate)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def predict(args) -> int:
    from distributed import as_completed, futures_of

    from daskdl.cli.arguments import client_for
    from daskdl.data import inputs, sources
    from daskdl.prediction.partitions import from_checkpoint, predictions

    out = _check_out(args)
    predictor, weights, manifest = from_checkpoint(
        args.checkpoint, None, args.output, args.batch_size, args.device, args.precision,
        args.verify_key, args.on_nan,
    )  # fmt: skip
    trained = manifest.get("features")
    fmt = sources.detect_or_glob(args.data)
    named = fmt in ("parquet", "csv", "zarr", "netcdf")  # columns or variables by name
    features = args.features or (trained if named else None)
    X, index = sources.read_samples(
        args.data, features, manifest.get("categories"), args.sample_dim
    )
    kind = _kind(out, index is not None)
    with ExitStack() as stack:
        client = client_for(args, stack)
        names = features if named and features is not None else None
        expected = inputs.Trained.from_manifest(manifest, predictor.input_shape)
        X = inputs.conform_array(client, X, names, None, expected, "--data")
        preds = predictions(client, X, predictor, weights, index)
        # Held on the workers while the bar runs, and written from there (predictions are
        # small beside the samples they come from).
        preds = client.persist(preds)
        _follow(futures_of(preds), as_completed, args.progress)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        if kind == "parquet":
            preds.to_parquet(out)
        elif kind == "csv":
            preds.to_csv(out, single_file=True)
        else:
            preds.to_zarr(str(out))
        n = len(preds)
    print(f"predictions={n} output={predictor.output} out={out} epoch={manifest['epoch']}")
    return 0


def _check_out(args) -> Path:
    out = Path(args.out)
    if out.resolve() == Path(args.data).resolve():
        raise ValueError(
            f"--out {out} is --data: predictions would replace the samples. Give --out "
            "another path, such as preds.parquet."
        )
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"--out {out} exists; choose another path or pass --overwrite.")
    return out


def _kind(out: Path, tabular: bool) -> str:
    """How predictions are written: by ``--out``'s suffix, which must suit the input."""
    suffix = out.suffix.lower()
    kinds = ("parquet", "csv") if tabular else ("zarr",)
    if suffix[1:] in kinds:
        return suffix[1:]
    what = "Tabular input (Parquet, CSV)" if tabular else "Array input"
    shown = " or ".join(f"--out {out.with_suffix('.' + k)}" for k in kinds)
    if suffix in (".parquet", ".csv", ".zarr"):
        raise ValueError(f"{what} is written as {' or '.join(kinds)}: give {shown}.")
    if suffix:  # p.txt, p.json: not a format predictions are written in
        raise ValueError(f"--out {out}: {what} is written as {' or '.join(kinds)}: give {shown}.")
    return kinds[0]  # a folder's name: Parquet (or Zarr) files in it


def _follow(futures, as_completed, progress: bool) -> None:
    from tqdm import tqdm

    bar = tqdm(total=len(futures), unit="partition", disable=not progress, file=sys.stderr)
    for _ in as_completed(futures):
        bar.update()
    bar.close()
