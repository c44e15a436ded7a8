"""What the training state's parallel forms offer, declared once.

- :class:`Averager`: how replicas agree, step by step: per-step gradient averaging
  (:class:`~daskdl.parallel.averaging.GradientAveraging`), local SGD
  (:class:`~daskdl.parallel.averaging.LocalSGD`), or a sharded optimizer that averages as it
  reduce-scatters (:class:`~daskdl.parallel.sharding.ShardedOptimizer`).
- :class:`StateLayout`: how one rank holds the model and optimizer state: a whole replica, a
  shard of it (ZeRO), or a pipeline stage (:mod:`daskdl.parallel.layouts`).

:class:`daskdl.RankContext` and ``fit``'s loop call these, and never test which one they hold.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

if TYPE_CHECKING:
    from daskdl.collectives.base import Group
    from daskdl.config.options import TrainConfig


class Averager(Protocol):
    """Called by a loop around each step: ``zero_grad()``, backward, ``backward_done(stop,
    loss)`` (the gradients agreed; ``bad_ranks`` lists the ranks whose loss or gradients were
    not finite), the optimizer's step (or ``skip_step()``), ``step_done(step, last)``."""

    bad_ranks: list[int]
    # Deferred: the non-finite flag left on the device (the optimizer skips on it there), so
    # that no rank waits to read it every step; None: read into ``bad_ranks``.
    pending_bad: torch.Tensor | None
    # Whether a non-finite step is skipped by every rank at once (one count for all), or by
    # each rank on its own (local SGD: each counts its own).
    skips_together: bool

    @property
    def stop_agreed(self) -> bool: ...

    def zero_grad(self) -> None: ...

    def backward_done(self, stop_requested: bool, loss: torch.Tensor | None = None) -> None: ...

    def skip_step(self) -> None:
        """Make the optimizer's next step leave every parameter as it is."""
        ...

    def step_done(self, global_step: int, end_of_epoch: bool) -> bool: ...

    def state_tensors(self) -> dict[str, np.ndarray]:
        """Its own state, saved beside the optimizer's (local SGD's outer momentum)."""
        ...

    def load_state(self, tensors: dict[str, np.ndarray]) -> None: ...

    def close(self) -> None: ...


class StateLayout(Protocol):
    """One rank's hold on the training state (a model and its optimizer)."""

    # Spread over the ranks (a shard, a stage): a regroup cannot take it from the survivors'
    # memory whole, so none is kept there; it goes on from the checkpoint on disk.
    spread: bool

    def state(self, keep: bool) -> tuple[dict | None, dict | None]:
        """The whole model's tensors and the plain optimizer's state dict (gathered from the
        other ranks where spread; ``keep``: this rank keeps them, else ``None``s)."""
        ...

    def load(self, state: dict) -> None:
        """Load a checkpoint's or a regroup's state (its ``model``, ``optimizer``), leaving it
        as it was."""
        ...

    def handed_back(self) -> dict | None:
        """What this rank alone hands back when the run regroups: a stage's own part (the
        whole replica needs peers that may be gone); ``None``: its :meth:`state`."""
        ...

    def check_followable(self) -> None:
        """Raise, naming why, where the survivors cannot go on from this rank's memory."""
        ...

    def trained_model(self, keep: bool) -> dict | None:
        """The whole model's tensors once training is over (``keep``: on this rank, else
        ``None``); its optimizer's state may go first, to make room."""
        ...

    def averager(self, group: Group, cfg: TrainConfig) -> Averager:
        """How this state agrees with the other ranks' step by step (``cfg.sync_every``)."""
        ...
