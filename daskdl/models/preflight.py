"""What is checked before any rank starts, so that a bad model, bad data or a checkpoint of
another run fails at once, on the client, with an error that names what was seen and the fix,
instead of on every worker from deep inside torch or Dask.

- :func:`check_factory`: a model factory can be called the way daskdl calls it, and sent to
  the workers.
- :func:`dry_run`: the model is built once and runs forward, the loss, backward and the
  metrics on a few real training samples.
- :func:`check_resume`: a checkpoint fits the model, data and optimizer asked for.

The data's own checks (values, targets, shapes, categories) are :mod:`daskdl.data.validate`'s.
"""

from __future__ import annotations

import logging
import warnings

import cloudpickle
import numpy as np
import torch

from daskdl import models
from daskdl.objective import metrics as metrics_
from daskdl.objective.task import Objective, describe_loss

logger = logging.getLogger(__name__)

DRY_RUN_SAMPLES = 8


class ModelCheckError(ValueError):
    """The model cannot train on this data: the message says what was seen and the fix."""


def check_factory(spec: models.ModelSpec) -> None:
    """A model name is known; a factory's signature fits one of the accepted forms, and Dask
    can pickle it."""
    if not models.check(spec):
        return  # a registered model: its name and options travel
    check_picklable(spec, f"The model factory {models.describe(spec)}")


def check_picklable(obj, what: str) -> None:
    """``obj`` (a model factory, a loss, a metric) can travel to the workers."""
    try:
        cloudpickle.dumps(obj)  # as Dask sends it (without Dask's error log)
    except Exception as e:  # noqa: BLE001 - whatever pickling raises, the fix is the same
        raise ModelCheckError(
            f"{what} cannot be sent to the workers ({type(e).__name__}: {e}). Dask pickles it "
            "(with cloudpickle) for every rank: define it at module level, and keep objects "
            "that cannot be pickled (locks, open files, clients, generators) out of what it "
            "refers to."
        ) from None


def _build(spec: models.ModelSpec, input_shape: tuple[int, ...], n_classes: int, seed: int):
    with torch.random.fork_rng(devices=[]):  # the user's own random state is left as it was
        torch.manual_seed(seed)
        return models.build(spec, input_shape, n_classes)


def _check_parameters(model: torch.nn.Module, name: str) -> None:
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        total = sum(1 for _ in model.parameters())
        raise ModelCheckError(
            f"The model {name} has no trainable parameter ({total} parameters, none with "
            "requires_grad=True): there is nothing to train or average. Unfreeze at least one "
            "layer (p.requires_grad_(True)), or evaluate it without training."
        )
    named = (("parameter", model.named_parameters()), ("buffer", model.named_buffers()))
    for what, tensors in named:
        for key, t in tensors:
            if (t.is_floating_point() or t.is_complex()) and t.dtype != torch.float32:
                raise ModelCheckError(
                    f"The model's {what} {key!r} is {t.dtype}; daskdl trains float32 models "
                    "(the features are float32 and gradients are averaged in float32; "
                    "precision='bf16' trains in bfloat16 autocast). Build the model in "
                    "float32: leave out .double() / .half() / dtype=... ."
                )


def dry_run(
    spec: models.ModelSpec,
    X: np.ndarray,
    y: np.ndarray,
    objective: Objective,
    seed: int = 0,
    metrics: dict | None = None,
) -> torch.nn.Module:
    """Build the model and run forward, the loss, backward and the metrics on the samples
    ``X, y`` (a few real ones) on the client's CPU, as a rank would; return the model.

    Every problem is a :class:`ModelCheckError` naming what was seen (types, shapes) and the
    fix. Parameters that took no part in the forward pass are logged: ranks leave them alone,
    as plain PyTorch does.
    """
    input_shape = tuple(int(s) for s in X.shape[1:])
    name = models.describe(spec)
    model = _build(spec, input_shape, objective.n_outputs, seed)
    _check_parameters(model, name)
    xb = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
    yb = torch.from_numpy(np.asarray(y, dtype=objective.target_dtype))
    seen = f"a batch of shape {tuple(xb.shape)} (float32)"
    model.train()
    with torch.random.fork_rng(devices=[]):
        try:
            out = model(xb)
        except Exception as e:  # noqa: BLE001 - the user's forward may raise anything
            raise ModelCheckError(
                f"The model {name} failed on {seen}: {type(e).__name__}: {e}. Its forward "
                f"must take samples of shape {input_shape} with the batch first."
                + layout_hint(input_shape)
            ) from e
    if layout_hint(input_shape):
        logger.warning("The model %s ran on %s.%s", name, seen, layout_hint(input_shape))
    _check_output(out, name, seen, len(xb), objective, tuple(yb.shape))
    loss = _check_loss(objective, out, yb, seen)
    try:
        loss.backward()
    except Exception as e:  # noqa: BLE001
        raise ModelCheckError(
            f"Backward through the model {name} failed on {seen}: {type(e).__name__}: {e}."
        ) from e
    _check_metrics(metrics or {}, objective, out.detach(), yb)
    unused = [k for k, p in model.named_parameters() if p.requires_grad and p.grad is None]
    if unused:
        logger.info(
            "Parameters %s of %s took no part in the forward pass; they are left alone "
            "(no weight decay, no momentum) on every rank where no rank uses them.",
            unused,
            name,
        )
    model.zero_grad(set_to_none=True)
    return model


def _check_loss(objective: Objective, out, yb, seen: str) -> torch.Tensor:
    what = f"The loss {describe_loss(objective.loss)}"
    try:
        loss = objective.loss_of(out, yb)
    except Exception as e:  # noqa: BLE001 - a user's loss may raise anything
        raise ModelCheckError(
            f"{what} failed on the model's outputs {tuple(out.shape)} and targets "
            f"{tuple(yb.shape)} ({yb.dtype}) for {seen}: {type(e).__name__}: {e}. A loss is "
            "called as loss(outputs, targets) and returns the batch's mean, a scalar tensor."
        ) from e
    if not torch.is_tensor(loss) or loss.ndim != 0 or not loss.is_floating_point():
        got = f"shape {tuple(loss.shape)}" if torch.is_tensor(loss) else type(loss).__name__
        raise ModelCheckError(
            f"{what} returned {got}; it must return one floating-point number as a scalar "
            "tensor (the batch's mean: reduce with .mean())."
        )
    if not loss.requires_grad:
        raise ModelCheckError(
            f"{what} returned a tensor without a gradient: it must be computed from the "
            "outputs with torch operations (no .item(), .detach() or numpy)."
        )
    return loss


def _check_metrics(metrics: dict, objective: Objective, out, yb) -> None:
    preds, targets = objective.metric_inputs(out, yb, None)
    for name, metric in metrics_.build(metrics, objective, "cpu").items():
        try:
            with warnings.catch_warnings():  # a few samples lack most classes: no news
                warnings.simplefilter("ignore")
                metric.update(preds, targets)
                metric.compute()
        except Exception as e:  # noqa: BLE001 - a user's metric may raise anything
            raise ModelCheckError(
                f"The metric {name!r} ({type(metric).__name__}) failed on predictions "
                f"{tuple(preds.shape)} and targets {tuple(targets.shape)} ({targets.dtype}): "
                f"{type(e).__name__}: {e}. Metrics are updated with "
                f"{_METRIC_INPUTS[objective.task]}."
            ) from e


_METRIC_INPUTS = {
    "classification": "(logits (batch, n_classes), class ids (batch,))",
    "multilabel": "(probabilities (batch, k), 0/1 labels (batch, k))",
    "regression": "(predictions, targets), in the targets' units, shaped like the targets",
}


def _check_output(out, name: str, seen: str, batch: int, objective: Objective, target_shape):
    n = objective.n_outputs
    what = {"classification": "logits", "multilabel": "label logits"}.get(objective.task, "values")
    want = f"one tensor of {what} shaped (batch, {n})"
    if isinstance(out, (tuple, list, dict)):
        kind = type(out).__name__
        raise ModelCheckError(
            f"The model {name} returned a {kind} on {seen}; daskdl's loss needs {want}. "
            "Return the outputs alone from forward (for a model that returns several, "
            "wrap it in a module whose forward returns model(x)[0])."
        )
    if not torch.is_tensor(out):
        raise ModelCheckError(
            f"The model {name} returned {type(out).__name__} on {seen}; daskdl needs {want}."
        )
    if not out.is_floating_point():
        raise ModelCheckError(
            f"The model {name} returned {out.dtype} values on {seen}; {what} must be floats "
            "(leave out argmax or rounding at the end of forward)."
        )
    shape = tuple(out.shape)
    if objective.task == "regression" and len(target_shape) == 1 and shape == (batch,):
        return  # one value per sample, unbatched by the model itself: fits (n,) targets
    if out.ndim != 2 or shape[0] != batch:
        fix = "squeeze the extra dimensions" if out.ndim > 2 else "keep the batch dimension"
        if out.ndim >= 2 and shape[0] != batch:
            fix = "keep the batch first and do not mix samples"
        raise ModelCheckError(
            f"The model {name} returned a tensor of shape {shape} on {seen}; daskdl needs "
            f"{want}, here ({batch}, {n}): {fix}."
        )
    if objective.task == "classification" and shape[1] < n:
        raise ModelCheckError(
            f"The model {name} gives {shape[1]} outputs per sample, but the labels have "
            f"{n} classes (0..{n - 1}): its last layer needs n_classes "
            "outputs. A factory f(input_shape, n_classes) is given n_classes; or pass "
            "n_classes to the Dataset if the labels are fewer than they look."
        )
    if objective.task != "classification" and shape[1] != n:
        targets = "labels" if objective.task == "multilabel" else "regression targets"
        raise ModelCheckError(
            f"The model {name} gives {shape[1]} outputs per sample, but the data have {n} "
            f"{targets} per sample (y of shape {target_shape}): its last layer needs {n} "
            "outputs. A factory f(input_shape, n_outputs) is given that number."
        )


def check_resume(
    model: torch.nn.Module,
    tensors: dict[str, np.ndarray],
    manifest: dict,
    path,
    input_shape: tuple[int, ...],
    objective: Objective,
    config: dict,
    categories: dict | None = None,
) -> None:
    """Whether the checkpoint at ``path`` fits the run asked for; one error naming every
    difference otherwise (before any rank starts, not as a ``load_state_dict`` error on each)."""
    problems = weight_problems(model, tensors)
    if tuple(manifest.get("input_shape", input_shape)) != tuple(input_shape):
        problems.append(f"samples were {tuple(manifest['input_shape'])}, now {tuple(input_shape)}")
    if categories is not None and manifest.get("categories") != categories:
        problems.append("its categorical features' categories differ from the data's")
    task = manifest.get("task", "classification")
    if task != objective.task:
        problems.append(f"it learned {task}, this run {objective.task}")
    n = manifest.get("n_outputs", manifest.get("n_classes", objective.n_outputs))
    if task == objective.task and n != objective.n_outputs:
        what = "classes" if task == "classification" else "outputs"
        problems.append(f"it has {n} {what}, the data {objective.n_outputs}")
    before = manifest.get("config", {})
    for option in ("optimizer", "outer_optimizer"):
        if option in before and before[option] != config[option]:
            problems.append(f"{option} was {before[option]!r}, now {config[option]!r}")
    if problems:
        raise ModelCheckError(
            f"Checkpoint {path} does not fit this run ({manifest.get('model', '?')} before): "
            + "; ".join(problems)
            + ". Resume with the model, data, task and optimizer it was trained with, or start a "
            "new run (another out=, without resume=)."
        )


def layout_hint(input_shape: tuple[int, ...]) -> str:
    """A hint where images look channels-last, (H, W, C), for models that take them
    channels-first, (C, H, W), as PyTorch's do; else ''."""
    if len(input_shape) != 3:
        return ""
    first, *_, last = input_shape
    if last in (1, 3, 4) and first not in (1, 3, 4) and first > 4:
        return (
            f" The images look channels-last, (height, width, channels) = {input_shape}: "
            "PyTorch's models take them channels-first, (channels, height, width); give "
            "X.transpose(0, 3, 1, 2) (xarray: ds.transpose(sample, channel, y, x))."
        )
    return ""


def weight_problems(model: torch.nn.Module, tensors: dict[str, np.ndarray]) -> list[str]:
    """How a checkpoint's tensors do not fit ``model``: the tensors each lacks, and those
    whose shapes differ (empty when they fit)."""
    problems = []
    wanted = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in tensors.items()}
    missing = sorted(set(wanted) - set(have))
    unexpected = sorted(set(have) - set(wanted))
    if missing:
        problems.append(f"the checkpoint lacks {_some(missing)} of the model")
    if unexpected:
        problems.append(f"it has {_some(unexpected)}, which the model lacks")
    shapes = [f"{k} {have[k]} vs {wanted[k]}" for k in wanted if k in have and have[k] != wanted[k]]
    if shapes:
        problems.append(f"tensor shapes differ (checkpoint vs model): {_some(shapes)}")
    return problems


def _some(items: list[str], n: int = 5) -> str:
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(map(str, items[:n])) + more
