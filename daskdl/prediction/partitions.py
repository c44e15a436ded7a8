"""Predictions of a trained model over partitioned data, on the cluster: one block per input
partition, lazily, as a Dask array (or a Dask dataframe with the input's index).

The weights go to each worker once, scattered ahead of the graph (never embedded in every
task), and each worker builds the model once per set of weights, keyed by their digest
(:meth:`daskdl.worker.extension.RunManager.model`); losing a worker costs only the blocks it held.
``Run.predict`` and :func:`predict` (from a checkpoint, verified first) share this module.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import dask
import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd
import torch
from distributed import Client, get_client

from daskdl import models, security
from daskdl.checkpoint import files as checkpoint
from daskdl.config import options as config_
from daskdl.data import inputs
from daskdl.data.dataset import Dataset
from daskdl.objective.task import Objective, Scale
from daskdl.rank.context import resolve_device
from daskdl.worker.extension import manager

OUTPUTS = {
    "classification": ("labels", "proba", "logits"),
    "multilabel": ("labels", "proba", "logits"),
    "regression": ("values",),
}
DEFAULT_OUTPUT = {"classification": "labels", "multilabel": "proba", "regression": "values"}
PRECISIONS = ("fp32", "bf16")
ON_NAN = ("raise", "propagate")


@dataclass(frozen=True)
class Predictor:
    """What every prediction task carries (the weights travel apart): small."""

    model: models.ModelSpec
    input_shape: tuple[int, ...]
    objective: Objective
    output: str
    digest: str  # of the weights: the worker's model cache key
    batch_size: int = 1024
    device: str = "auto"
    precision: str = "fp32"
    on_nan: str = "raise"  # samples with NaN or infinite features: refused, or NaN out

    @property
    def width(self) -> int | None:
        """Values per sample, or None for one value per sample."""
        obj = self.objective
        if obj.task == "classification" and self.output == "labels":
            return None
        if obj.task == "regression" and obj.target_ndim == 1:
            return None
        return obj.n_outputs

    @property
    def dtype(self):
        if self.output == "labels":
            return np.dtype(np.int64)
        return np.dtype(np.float32 if self.objective.task != "regression" else np.float64)

    def columns(self) -> list[str]:
        """Column names of dataframe predictions."""
        if self.width is None:
            return ["prediction"]
        return [f"{self.output}_{i}" for i in range(self.width)]


def make_predictor(
    model, input_shape, objective: Objective, key: str, output, batch_size, device, precision,
    on_nan: str = "raise",
) -> Predictor:  # fmt: skip
    """A checked :class:`Predictor` for the weights of digest ``key``."""
    task = objective.task
    output = DEFAULT_OUTPUT[task] if output is None else output
    if output not in OUTPUTS[task]:
        raise ValueError(
            f"output={output!r} does not suit a {task} model; choose one of {list(OUTPUTS[task])}."
        )
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}.")
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}.")
    if on_nan not in ON_NAN:
        raise ValueError(f"on_nan must be one of {list(ON_NAN)}, got {on_nan!r}.")
    batch_size = config_.integer("batch_size", batch_size, minimum=1)
    return Predictor(
        model, tuple(input_shape), objective, output, key, batch_size, device, precision, on_nan
    )


def digest(weights: dict[str, np.ndarray]) -> str:
    """A content key for a state dict: names, shapes, dtypes and bytes."""
    h = hashlib.sha256()
    for name in sorted(weights):
        value = np.ascontiguousarray(weights[name])
        h.update(f"{name}:{value.dtype}:{value.shape};".encode())
        h.update(value.tobytes())
    return h.hexdigest()[:32]


def predictions(client, data, predictor: Predictor, weights, index=None):
    """Lazy predictions of ``data`` (a Dataset, or a Dask array of samples): a Dask array with
    one block per partition, or a Dask dataframe where the Dataset came from one (its index
    kept), or where ``index`` (a Dask index, a partition per block) is given. ``weights``: a
    state dict, or a future of one already on the workers."""
    X = data.X if isinstance(data, Dataset) else data
    if not isinstance(X, da.Array):
        raise TypeError(
            f"data must be a daskdl.Dataset or a Dask array of samples, got {type(data).__name__}."
        )
    if tuple(X.shape[1:]) != predictor.input_shape:
        raise ValueError(
            f"data has samples of shape {tuple(X.shape[1:])}, but the model takes "
            f"{predictor.input_shape}."
        )
    X = X.rechunk({i: -1 for i in range(1, X.ndim)})
    held = weights
    if isinstance(weights, dict):
        # One future for the whole state dict under a fresh key (a content hash could reuse a
        # key that an earlier call is releasing); the graph refers to it and keeps it alive.
        [held] = client.scatter([weights], broadcast=True, hash=False)
    width = predictor.width
    chunks = (X.chunks[0],) if width is None else (X.chunks[0], (width,))
    drop = list(range(1, X.ndim)) if width is None else list(range(2, X.ndim))
    kwargs = {"new_axis": 1} if width is not None and X.ndim == 1 else {}
    out = X.map_blocks(
        predict_block,
        predictor,
        held,
        dtype=predictor.dtype,
        chunks=chunks,
        drop_axis=drop,
        name=f"daskdl-predict-{predictor.output}-{dask.base.tokenize(X.name, predictor)}",
        meta=np.empty((0,) * len(chunks), predictor.dtype),
        **kwargs,
    )
    index = getattr(data, "index", None) if index is None else index
    return out if index is None else _as_frame(out, index, predictor)


def _as_frame(out: da.Array, index: dd.Index, predictor: Predictor) -> dd.DataFrame:
    columns = predictor.columns()
    blocks = out.to_delayed(optimize_graph=False).ravel()
    # Optimised as the samples were when they became an array (to_dask_array): Dask may join
    # small Parquet partitions, and the index must be cut as the samples were.
    parts = index.to_delayed()
    if len(parts) != len(blocks):
        raise ValueError(
            f"the data's index has {len(parts)} partitions and its samples {len(blocks)}: "
            "predict on the Dataset as from_dataframe made it (split() and dropna() drop it)."
        )
    frame = dask.delayed(_frame, pure=True)
    meta = pd.DataFrame({c: np.empty(0, predictor.dtype) for c in columns})
    meta.index = index._meta
    return dd.from_delayed(
        [frame(b, i, columns) for b, i in zip(blocks, parts)],
        meta=meta,
        divisions=index.divisions if len(index.divisions) == len(parts) + 1 else None,
    )


def _frame(block: np.ndarray, index: pd.Index, columns: list[str]) -> pd.DataFrame:
    if len(block) != len(index):
        raise ValueError(
            f"a partition of the data has {len(index)} index entries but {len(block)} samples: "
            "its features and its index do not come from the same rows."
        )
    return pd.DataFrame(block.reshape(len(block), len(columns)), index=index, columns=columns)


def predict_block(
    X: np.ndarray, predictor: Predictor, weights: dict, block_info=None
) -> np.ndarray:
    """One partition's predictions, on the worker that holds it (a GPU where it has one)."""
    bad = _nonfinite_rows(X)
    if bad.any() and predictor.on_nan == "raise":
        where = (block_info or {}).get(0, {}).get("chunk-location", ("?",))[0]
        raise ValueError(
            f"Partition {where} of the data has {int(bad.sum())} samples with NaN or infinite "
            f"features (the first at row {int(np.argmax(bad))} of the partition): a model "
            "cannot predict them. Drop them first (Dataset.dropna(), or ddf.dropna()), or "
            "pass on_nan='propagate' (CLI: --on-nan propagate) for NaN predictions (label -1)."
        )
    out = _predict(X, predictor, weights)
    if bad.any():
        out[bad] = -1 if predictor.output == "labels" else np.nan
    return out


def _nonfinite_rows(X: np.ndarray) -> np.ndarray:
    """Which samples hold a NaN or infinite feature. Row sums first (NaN or infinite where a
    row holds one, or where finite values overflow: those rows are checked one by one): 2.4
    against 6 ms for 31,250 x 256 floats, beside a 54 ms forward pass of the mlp."""
    flat = X.reshape(len(X), int(np.prod(X.shape[1:])))
    with np.errstate(over="ignore", invalid="ignore"):
        suspect = ~np.isfinite(flat.sum(axis=1))
    bad = np.zeros(len(X), dtype=bool)
    if suspect.any():
        bad[suspect] = ~np.isfinite(flat[suspect]).all(axis=1)
    return bad


def _predict(X: np.ndarray, predictor: Predictor, weights: dict) -> np.ndarray:
    device = resolve_device(predictor.device)
    model = manager().model(predictor.digest, lambda: _build(predictor, weights, device))
    obj = predictor.objective
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if predictor.precision == "bf16"
        else nullcontext()
    )
    outs = []
    # As a training rank runs: glibc's thresholds raised (a worker's nanny pins them so low
    # that every activation is a fresh mmap) and denormals flushed; counted, so the last
    # task of the process puts them back.
    tuning = manager().tuning
    with tuning.malloc(), tuning.denormals(), torch.inference_mode(), autocast:
        for start in range(0, len(X), predictor.batch_size):
            xb = torch.from_numpy(np.ascontiguousarray(X[start : start + predictor.batch_size]))
            outs.append(_finish(model(xb.to(device, torch.float32)).float(), obj, predictor))
    if not outs:
        shape = (0,) if predictor.width is None else (0, predictor.width)
        return np.empty(shape, predictor.dtype)
    return np.concatenate(outs).astype(predictor.dtype, copy=False)


def _finish(logits: torch.Tensor, obj: Objective, predictor: Predictor) -> np.ndarray:
    output = predictor.output
    if obj.task == "regression":
        return obj.scores(logits.double()).cpu().numpy()
    if obj.task == "multilabel" and output != "proba":
        raw = obj.fit_outputs(logits)  # labels from the logits' sign: exact where 0.5 rounds
        return ((raw > 0).long() if output == "labels" else raw).cpu().numpy()
    scores = obj.scores(logits)  # class logits, or label probabilities
    if output == "labels":
        scores = scores.argmax(1)
    elif output == "proba" and obj.task == "classification":
        scores = torch.softmax(scores, 1)
    return scores.cpu().numpy()


def _build(predictor: Predictor, weights: dict, device: torch.device) -> torch.nn.Module:
    # Dask runs a partition per worker thread: that is the parallelism, not torch's threads
    # within each (which would oversubscribe the cores).
    torch.set_num_threads(1)
    obj = predictor.objective
    return models.trained(predictor.model, predictor.input_shape, obj.n_outputs, weights).to(device)


@runtime_checkable
class Predicts(Protocol):
    """What :func:`predict` takes instead of a checkpoint: a :class:`daskdl.Run` (this package
    sits below the runs, which use it, so it names the ability, not the class)."""

    def predict(self, data, **options): ...


def predict(
    checkpoint_or_run: str | os.PathLike | Predicts,
    data: Dataset | da.Array | pd.DataFrame | dd.DataFrame,
    model: models.ModelSpec | None = None,
    *,
    client: Client | None = None,
    index: dd.Index | None = None,
    output: str | None = None,
    batch_size: int = 1024,
    device: str = "auto",
    precision: str = "fp32",
    verify_key: str | os.PathLike | security.Key | None = None,
    on_nan: str = "raise",
) -> da.Array | dd.DataFrame | str:
    """Predictions of a checkpoint's model over ``data`` (see :meth:`daskdl.Run.predict`).

    ``checkpoint_or_run`` is a checkpoint folder, a run directory (its newest checkpoint
    that verifies) or a :class:`Run`; checkpoints are checked as ``resume=`` checks them:
    signature and digests, before any tensor is used. The checkpoint carries what the model
    needs from raw data (feature names in order, standardisation statistics, categorical
    codes, the targets' scale) and applies it, as :meth:`daskdl.Run.predict` does.
    ``model`` rebuilds a model given to ``fit`` as a factory, or a ``launch`` loop's model
    (whose predictions are its outputs as they are: a loop records no task); weights that
    do not fit it are refused before any task, naming the tensors. ``client``: the current
    one by default; ``index``: a Dask index (a partition per block of ``data``) to return a
    dataframe with.

    Examples
    --------
    >>> preds = daskdl.predict("runs/digits", test)                    # doctest: +SKIP
    >>> preds = daskdl.predict("runs/loop", X, model=make_net)          # doctest: +SKIP
    """
    if isinstance(checkpoint_or_run, Predicts):
        return checkpoint_or_run.predict(
            data, output=output, batch_size=batch_size, device=device, precision=precision,
            on_nan=on_nan,
        )  # fmt: skip
    client = client if client is not None else get_client()
    sample_shape = _sample_shape(data)
    predictor, weights, manifest = from_checkpoint(
        checkpoint_or_run, model, output, batch_size, device, precision, verify_key, on_nan,
        sample_shape,
    )  # fmt: skip
    trained = inputs.Trained.from_manifest(manifest, predictor.input_shape)
    X, found = inputs.samples(client, data, trained)
    return predictions(client, X, predictor, weights, index if index is not None else found)


def _sample_shape(data) -> tuple[int, ...] | None:
    """One sample's shape, where ``data`` says it (a launch checkpoint records none)."""
    X = data.X if isinstance(data, Dataset) else data
    if isinstance(X, (pd.DataFrame, dd.DataFrame)):
        return (len(X.columns),)
    return tuple(int(s) for s in X.shape[1:]) if isinstance(X, da.Array) else None


def from_checkpoint(
    checkpoint_or_run,
    model=None,
    output=None,
    batch_size=1024,
    device="auto",
    precision="fp32",
    verify_key=None,
    on_nan="raise",
    sample_shape=None,
) -> tuple[Predictor, dict, dict]:
    """The predictor and weights of a checkpoint (verified), and its manifest."""
    key = security.verify_key(verify_key)
    path, weights, _, manifest = checkpoint.load_latest(checkpoint_or_run, key)
    spec = model if model is not None else manifest.get("model_spec")
    if spec is None:
        if manifest.get("launched_by") == "launch":
            raise ValueError(
                f"{path} is a checkpoint of a launch() loop, whose model is the loop's own: "
                "pass it as model= (a registered model's name, or a factory), as the loop "
                "built it."
            )
        raise ValueError(
            f"The checkpoint's model ({manifest.get('model')}) was built by a factory of the "
            "user's: pass it as model= to rebuild it."
        )
    spec = tuple(spec) if isinstance(spec, list) else spec
    if "task" not in manifest:  # a launch loop's: its outputs as they are
        objective, input_shape = _loop_objective(spec, weights, sample_shape, path, output)
        output = "values"
    else:
        input_shape = tuple(manifest["input_shape"])
        scale = manifest.get("target_scale")
        objective = Objective(
            manifest["task"],
            manifest["n_outputs"],
            None,
            Scale(**scale) if scale else None,
            manifest.get("target_ndim", 1),
        )
        if model is not None:
            _check_weights(spec, input_shape, objective.n_outputs, weights, path)
    predictor = make_predictor(
        spec, input_shape, objective, digest(weights), output, batch_size, device,
        precision, on_nan,
    )  # fmt: skip
    return predictor, weights, manifest


def _check_weights(spec, input_shape, n_outputs: int, weights: dict, path) -> torch.nn.Module:
    """The model ``spec`` builds here, once, and the checkpoint's tensors fit it: refused
    before any task otherwise, naming the tensors (as ``resume=`` does)."""
    from daskdl.models import preflight

    built = models.build(spec, input_shape, n_outputs)
    problems = preflight.weight_problems(built, weights)
    if problems:
        raise preflight.ModelCheckError(
            f"The checkpoint {path} does not fit the model {models.describe(spec)}: "
            + "; ".join(problems)
            + ". Pass as model= the model the checkpoint was trained with."
        )
    return built


def _loop_objective(spec, weights: dict, sample_shape, path, output):
    """What a launch loop's checkpoint predicts: the model's outputs as they are (values),
    their width found by one sample through the model."""
    if output not in (None, "values", "logits"):
        raise ValueError(
            f"output={output!r}: {path} is a launch() loop's checkpoint, which records no task, "
            "so its predictions are the model's outputs as they are (output='logits')."
        )
    if sample_shape is None:
        raise TypeError("data must be a daskdl.Dataset or a Dask array of samples.")
    # A factory f(input_shape, n_outputs) needs a width: the last tensor's first axis (the
    # output layer's), checked with every other tensor below.
    last = list(weights.values())[-1] if weights else np.zeros(1)
    built = _check_weights(spec, sample_shape, int(np.shape(last)[0]), weights, path)
    with torch.no_grad():
        width = built(torch.zeros((1, *sample_shape))).reshape(1, -1).shape[1]
    return Objective("regression", width, None, None, 2), sample_shape
