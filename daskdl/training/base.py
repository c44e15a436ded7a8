"""What ``fit``'s one loop (:class:`daskdl.training.fitloop.Trainer`) and its step runners
share: what a run trains (:class:`TrainingSpec`), what a step leaves (:class:`Step`), and what
the loop needs of a layout's steps (:class:`StepRunner`)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from daskdl import models
from daskdl.objective.task import Objective, Scale


@dataclass
class TrainingSpec:
    """What ``fit`` trains: small, so that it travels with every rank."""

    model: models.ModelSpec
    input_shape: tuple[int, ...]
    objective: Objective
    metrics: dict = field(default_factory=dict)  # validation metrics: names or Metric objects
    val_scale: Scale | None = None  # how the validation targets were standardised
    log_interval: float = 0.5  # seconds between step events


@dataclass
class Step:
    """What one step left: this rank's loss and correct predictions (tensors, on the device:
    read only when logged), the ranks whose loss or gradients were not finite, or that flag
    still on the device (``pending``: the optimizer skipped on it there)."""

    loss: torch.Tensor
    correct: torch.Tensor
    bad_ranks: list[int]
    pending: torch.Tensor | None = None


class StepRunner(Protocol):
    """What the one loop needs from a layout: its state, and how it takes a step."""

    start_epoch: int  # where a resumed or regrouped run starts
    device: torch.device
    # The ranks that train on different samples (a replica's ranks, a pipeline's replicas):
    # samples per step are this times the batch size.
    data_parallel: int
    skips_together: bool  # a non-finite step is skipped by every rank at once

    def batches(self, epoch: int, first_step: int) -> Iterable: ...

    def train(self) -> None:
        """Put the model in training mode."""
        ...

    def step(self, xb, yb, lr: float, stop_requested: bool) -> Step: ...

    def step_done(self, global_step: int, end_of_epoch: bool) -> bool:
        """After the update: whether the ranks asked to stop (agreed by :meth:`stop`)."""
        ...

    def stop(self) -> bool:
        """Whether every rank agreed to stop now."""
        ...

    def step_event(self, fields: dict) -> dict:
        """The ``step`` event's fields, with the layout's own."""
        ...

    def validate(self, scores: dict) -> np.ndarray:
        """Score this rank's part of the validation set into ``scores``: its loss sum and
        sample count (zeros where it scores none), after the ranks agree on their buffers."""
        ...

    def checkpoint(self, epoch: int, step: int) -> None: ...

    def model_tensors(self) -> dict | None: ...
