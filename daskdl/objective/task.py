"""What a run learns: the task (classes, multi-hot labels or numbers), the loss, and how the
model's outputs meet the targets.

An :class:`Objective` is small and travels with every rank. It turns a batch's outputs and
targets into the loss, into what the metrics read (class logits, label probabilities, or
values in the target's own units), and back from standardised targets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

TASKS = ("classification", "regression", "multilabel")

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

LOSSES: dict[str, LossFn] = {
    "cross_entropy": F.cross_entropy,
    "mse": F.mse_loss,
    "l1": F.l1_loss,
    "huber": F.huber_loss,
    "bce": F.binary_cross_entropy_with_logits,
}
DEFAULT_LOSS = {"classification": "cross_entropy", "regression": "mse", "multilabel": "bce"}


def infer_task(dtype: np.dtype, shape: tuple) -> str:
    """The task labels of this dtype and shape suggest: integers (or booleans) one per sample
    are classes, several per sample multi-hot labels; floats are regression targets."""
    if np.issubdtype(dtype, np.floating):
        return "regression"
    # (n, 1) integers are class ids in a column (an error that says so), not one label.
    return "multilabel" if len(shape) == 2 and shape[1] != 1 else "classification"


def target_dtype(task: str):
    """What a rank holds a task's targets as: class ids, or floats (0/1 labels too, for BCE)."""
    return np.int64 if task == "classification" else np.float32


def check_task(task: str | None) -> str | None:
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {TASKS} (or None: from the labels), got {task!r}.")
    return task


def describe_loss(loss) -> str:
    return loss if isinstance(loss, str) else getattr(loss, "__qualname__", repr(loss))


def check_loss(loss, task: str) -> None:
    """A loss is a known name that suits the task, or a callable ``(outputs, targets)``."""
    if loss is None or callable(loss) and not isinstance(loss, str):
        return
    if not isinstance(loss, str) or loss not in LOSSES:
        raise ValueError(
            f"loss must be one of {sorted(LOSSES)} or a function (outputs, targets) -> scalar "
            f"tensor, got {loss!r}."
        )
    fits = {"cross_entropy": ("classification",), "bce": ("multilabel",)}
    if task not in fits.get(loss, ("regression",)):
        raise ValueError(
            f"loss={loss!r} does not suit task={task!r}; its default is "
            f"{DEFAULT_LOSS[task]!r}. For another pairing, pass the loss as a function."
        )


@dataclass
class Scale:
    """Targets were standardised: ``model_space = (y - mean) / std``, per output."""

    mean: list[float]
    std: list[float]

    @classmethod
    def from_arrays(cls, mean, std) -> Scale:
        """From computed statistics (scalars for (n,) targets, vectors for (n, k))."""
        return cls(np.atleast_1d(mean).tolist(), np.atleast_1d(std).tolist())

    def _tensors(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.mean, dtype=like.dtype, device=like.device)
        std = torch.tensor(self.std, dtype=like.dtype, device=like.device)
        if like.ndim == 1:
            mean, std = mean.reshape(()), std.reshape(())
        return mean, std

    def restore(self, values: torch.Tensor) -> torch.Tensor:
        mean, std = self._tensors(values)
        return values * std + mean

    def apply(self, values: torch.Tensor) -> torch.Tensor:
        mean, std = self._tensors(values)
        return (values - mean) / std

    def to_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std}


@dataclass
class Objective:
    """The task, the number of model outputs, the loss and how targets were scaled.

    ``target_scale`` is the training targets' standardisation (the model's output space);
    regression metrics are computed after undoing it, so they are in the target's units.
    """

    task: str
    n_outputs: int
    loss: str | LossFn | None = None
    target_scale: Scale | None = None
    target_ndim: int = 1  # targets per sample: (n,) or (n, k)

    def __post_init__(self) -> None:
        check_task(self.task)
        check_loss(self.loss, self.task)
        if self.loss is None:
            self.loss = DEFAULT_LOSS[self.task]
        self._loss_fn = LOSSES[self.loss] if isinstance(self.loss, str) else self.loss

    @property
    def target_dtype(self):
        return target_dtype(self.task)

    @property
    def is_classifier(self) -> bool:
        return self.task == "classification"

    def fit_outputs(self, outputs: torch.Tensor) -> torch.Tensor:
        """A regression model's ``(batch, 1)`` output meets targets of shape ``(batch,)``."""
        if self.task == "regression" and self.target_ndim == 1 and outputs.ndim == 2:
            return outputs.squeeze(1)
        return outputs

    def loss_of(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The batch's mean loss, in float32 (bf16 autocast outputs are upcast first)."""
        return self._loss_fn(self.fit_outputs(outputs.float()), targets)

    def correct(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Correct predictions on a batch (classification; zero otherwise), on the device."""
        if not self.is_classifier:
            return torch.zeros((), dtype=torch.int64, device=outputs.device)
        return (outputs.argmax(1) == targets).sum()

    def metric_inputs(
        self, outputs: torch.Tensor, targets: torch.Tensor, data_scale: Scale | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What metrics read: class logits and ids; label probabilities and 0/1 labels; or
        predictions and targets in the target's own units (``data_scale``: how these targets
        were standardised, if at all)."""
        outputs = self.scores(outputs.float())
        if self.task == "multilabel":
            targets = targets.round().long()
        elif self.task == "regression" and data_scale is not None:
            targets = data_scale.restore(targets)
        return outputs, targets

    def scores(self, outputs: torch.Tensor) -> torch.Tensor:
        """What a model's outputs predict: class logits (a wider head's extra ones are no
        class), label probabilities, or values in the targets' own units."""
        outputs = self.fit_outputs(outputs)
        if self.task == "classification":
            return outputs[:, : self.n_outputs]
        if self.task == "multilabel":
            return torch.sigmoid(outputs)
        return self.target_scale.restore(outputs) if self.target_scale is not None else outputs

    def model_targets(self, targets: torch.Tensor, data_scale: Scale | None) -> torch.Tensor:
        """Targets in the model's output space, for the loss: a validation set standardised
        otherwise than the training set (or not at all) is brought to the training scale."""
        if self.task != "regression" or data_scale == self.target_scale:
            return targets
        if data_scale is not None:
            targets = data_scale.restore(targets)
        return self.target_scale.apply(targets) if self.target_scale is not None else targets

    def describe(self) -> dict:
        return {
            "task": self.task,
            "n_outputs": self.n_outputs,
            "loss": describe_loss(self.loss),
            "target_scale": self.target_scale.to_dict() if self.target_scale else None,
            "target_ndim": self.target_ndim,
        }
