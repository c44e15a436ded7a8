"""Validation metrics: names for the common ones, any ``torchmetrics.Metric`` for the rest.

Every metric is a torchmetrics object: each rank updates its own on its validation shard, then
the metric's state (never its value) is combined over the ranks, so that the value is the one
the whole validation set gives in one process, whatever the shards' sizes. Ranks combine states
over daskdl's collective (:func:`values`); ``Run.evaluate`` merges the states of partitions
(:func:`merge`).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torchmetrics import Metric, classification, regression

from daskdl.objective.task import Objective

MetricSpec = str | Metric


def _classification(name: str, n: int) -> Metric:
    if name == "top5" and n < 5:
        raise ValueError(f"top5 needs at least 5 classes; the data have {n}.")
    return {
        "accuracy": lambda: classification.MulticlassAccuracy(n, average="micro"),
        "top5": lambda: classification.MulticlassAccuracy(n, top_k=5, average="micro"),
        "f1": lambda: classification.MulticlassF1Score(n, average="macro"),
        "precision": lambda: classification.MulticlassPrecision(n, average="macro"),
        "recall": lambda: classification.MulticlassRecall(n, average="macro"),
    }[name]()


def _multilabel(name: str, k: int) -> Metric:
    return {
        "accuracy": lambda: classification.MultilabelAccuracy(k, average="micro"),
        "exact_match": lambda: classification.MultilabelExactMatch(k),
        "f1": lambda: classification.MultilabelF1Score(k, average="macro"),
        "precision": lambda: classification.MultilabelPrecision(k, average="macro"),
        "recall": lambda: classification.MultilabelRecall(k, average="macro"),
    }[name]()


def _regression(name: str, _k: int) -> Metric:
    makers: dict[str, Callable[[], Metric]] = {
        "mae": regression.MeanAbsoluteError,
        "mse": regression.MeanSquaredError,
        "rmse": lambda: regression.MeanSquaredError(squared=False),
        # Several targets: the R^2 of each, averaged (as scikit-learn does).
        "r2": lambda: regression.R2Score(multioutput="uniform_average"),
    }
    return makers[name]()


BUILTIN: dict[str, tuple[Sequence[str], Callable[[str, int], Metric]]] = {
    "classification": (("accuracy", "top5", "f1", "precision", "recall"), _classification),
    "multilabel": (("accuracy", "exact_match", "f1", "precision", "recall"), _multilabel),
    "regression": (("mae", "mse", "rmse", "r2"), _regression),
}
DEFAULTS = {
    "classification": ("accuracy",),
    "multilabel": ("accuracy", "f1"),
    "regression": ("mae", "rmse", "r2"),
}


def normalize(metrics, task: str) -> dict[str, MetricSpec]:
    """``metrics=`` as given (None, a name, names, a Metric, or a dict of names to either) as
    a dict of names to specs; an error naming the choices for an unknown one."""
    if metrics is None:
        metrics = DEFAULTS[task]
    if isinstance(metrics, (str, Metric)):
        metrics = [metrics]
    if isinstance(metrics, Mapping):
        items = list(metrics.items())
    elif isinstance(metrics, Sequence):
        items = [(_name_of(m), m) for m in metrics]
    else:
        raise TypeError(
            f"metrics must be names, torchmetrics.Metric objects, or a dict of names to "
            f"either, got {type(metrics).__name__}."
        )
    known = BUILTIN[task][0]
    out: dict[str, MetricSpec] = {}
    for name, spec in items:
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"A metric's name must be a plain identifier, got {name!r}.")
        if isinstance(spec, str) and spec not in known:
            raise ValueError(
                f"Unknown metric {spec!r} for task={task!r}; built-in ones are {list(known)}, "
                "or pass a torchmetrics.Metric object."
            )
        if not isinstance(spec, (str, Metric)):
            raise TypeError(
                f"Metric {name!r} is a {type(spec).__name__}; give a built-in name or a "
                "torchmetrics.Metric object (a function would not combine exactly over ranks)."
            )
        if name in out:
            raise ValueError(f"Two metrics are named {name!r}; give them names with a dict.")
        out[name] = spec
    return out


def _name_of(spec) -> str:
    return spec if isinstance(spec, str) else type(spec).__name__.lower()


def build(specs: Mapping[str, MetricSpec], objective: Objective, device) -> dict[str, Metric]:
    """Fresh metric objects on ``device``: built-in ones accumulate in float64."""
    out = {}
    for name, spec in specs.items():
        if isinstance(spec, str):
            metric = BUILTIN[objective.task][1](spec, objective.n_outputs)
            metric.set_dtype(torch.float64)
        else:
            metric = copy.deepcopy(spec)
            metric.reset()
        out[name] = metric.to(device)
    return out


def update(metrics: Mapping[str, Metric], preds: torch.Tensor, targets: torch.Tensor) -> None:
    for name, metric in metrics.items():
        try:
            metric.update(preds, targets)
        except Exception as e:
            e.add_note(f"(daskdl: while metric {name!r} was updated on a batch)")
            raise


def values(metrics: Mapping[str, Metric], group=None) -> dict[str, float | list]:
    """Each metric's value, as a float (or a list, for a metric that returns several).

    With a ``group`` of several ranks (every rank calls this, in the same order), each state
    is first combined over the ranks as torchmetrics combines it over a process group (sums
    summed, lists concatenated), through ``group``'s all-reduce.
    """
    gather = _gatherer(group) if group is not None and group.size > 1 else None
    out = {}
    with warnings.catch_warnings():
        # A rank without validation data computes too (its peers need its empty state).
        warnings.filterwarnings(
            "ignore", message=".*compute.*before.*update", module="torchmetrics"
        )
        for name, metric in metrics.items():
            if gather is not None:
                metric.dist_sync_fn, metric.distributed_available_fn = gather, _always
            out[name] = as_number(metric.compute())
    return out


def _always() -> bool:
    return True


def as_number(value) -> float | list:
    if torch.is_tensor(value):
        value = value.detach().cpu()
        return float(value) if value.numel() == 1 else value.double().tolist()
    return float(value)


def _gatherer(group):
    """An all-gather over ``group`` from its all-reduce: every rank fills its own slot of a
    zeroed float64 buffer, so the sum is every rank's tensor, exactly (a float32 or an
    integer count below 2**53 survives float64 unchanged)."""

    def gather(tensor: torch.Tensor, group_arg=None, **_) -> list[torch.Tensor]:
        t = tensor.detach()
        shapes = np.zeros((group.size, 9))
        if t.ndim > 8:
            raise ValueError(f"A metric state of {t.ndim} dimensions cannot be combined.")
        shapes[group.rank, 0] = t.ndim
        shapes[group.rank, 1 : 1 + t.ndim] = t.shape
        group.allreduce_(shapes.reshape(-1))
        dims = [tuple(int(d) for d in row[1 : 1 + int(row[0])]) for row in shapes]
        sizes = [math.prod(d) for d in dims]
        flat = np.zeros(sum(sizes))
        start = sum(sizes[: group.rank])
        flat[start : start + sizes[group.rank]] = t.cpu().double().numpy().reshape(-1)
        group.allreduce_(flat)
        out, offset = [], 0
        for d, n in zip(dims, sizes):
            piece = torch.from_numpy(flat[offset : offset + n].reshape(d))
            out.append(piece.to(dtype=t.dtype, device=t.device))
            offset += n
        return out

    return gather


def merge(parts: Sequence[Mapping[str, Metric]]) -> dict[str, Metric]:
    """One metric per name from partitions' metrics (``Run.evaluate``)."""
    first, *rest = parts
    merged = {name: copy.deepcopy(m) for name, m in first.items()}
    for part in rest:
        for name, metric in part.items():
            try:
                merged[name].merge_state(metric)
            except RuntimeError as e:
                raise ValueError(
                    f"Metric {name!r} ({type(metric).__name__}) cannot combine the scores of "
                    f"several partitions: {e}"
                ) from None
    return merged


@torch.no_grad()
def score(
    model,
    X: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    autocast,
    objective: Objective,
    metrics: Mapping[str, Metric],
    data_scale=None,
    device=None,
    channels_last: bool = False,
) -> np.ndarray:
    """Score one shard: update ``metrics`` batch by batch and return its summed loss and its
    count (to be summed over ranks or partitions). ``data_scale``: how ``y`` was
    standardised, where it was."""
    was_training = model.training
    model.eval()
    device = device or X.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, len(X), batch_size):
        xb = X[start : start + batch_size].to(device, non_blocking=True)
        yb = y[start : start + batch_size].to(device, non_blocking=True)
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with autocast:
            outputs = model(xb)
        loss = objective.loss_of(outputs, objective.model_targets(yb, data_scale))
        loss_sum += loss.double() * len(xb)
        update(metrics, *objective.metric_inputs(outputs, yb, data_scale))
    model.train(was_training)
    return np.array([loss_sum.item(), len(X)], dtype=np.float64)
