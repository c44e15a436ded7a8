"""The three ways a rank holds the training state, behind one
:class:`~daskdl.parallel.base.StateLayout`: a whole :class:`Replica`, a :class:`Shard` of it
(ZeRO, through a :class:`~daskdl.parallel.sharding.ShardedOptimizer`), a pipeline's
:class:`StagePart`. :func:`layout_of` picks one from what a loop trains; nothing else tells them
apart."""

from __future__ import annotations

import copy

import torch

from daskdl.checkpoint import files as checkpoint
from daskdl.collectives.base import Group
from daskdl.config.options import TrainConfig
from daskdl.parallel import averaging
from daskdl.parallel.base import Averager, StateLayout
from daskdl.parallel.pipeline import Stage
from daskdl.parallel.sharding import ShardedOptimizer


def _tensors(state: dict) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in state["model"].items()}


def _load_optimizer(optimizer, state: dict) -> None:
    # ``state`` is a task input, one object on the worker that holds it, which Dask sends to
    # the other ranks' workers; the optimizer keeps (and steps in place) the tensors it is
    # given, so it gets copies, or a peer could start from this rank's steps.
    opt_state = state.get("optimizer")
    if optimizer is not None and opt_state:
        optimizer.load_state_dict(
            copy.deepcopy({k: opt_state[k] for k in ("state", "param_groups")})
        )


class Replica:
    """The whole model and its optimizer, alike on every rank."""

    spread = False

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None):
        self.model, self.optimizer = model, optimizer

    def state(self, keep: bool) -> tuple[dict | None, dict | None]:
        opt = self.optimizer.state_dict() if self.optimizer is not None else None
        return checkpoint.model_tensors(self.model), opt

    def load(self, state: dict) -> None:
        self.model.load_state_dict(_tensors(state))
        _load_optimizer(self.optimizer, state)

    def handed_back(self) -> dict | None:
        return None

    def check_followable(self) -> None:
        pass

    def trained_model(self, keep: bool) -> dict | None:
        return checkpoint.model_tensors(self.model) if keep else None

    def averager(self, group: Group, cfg: TrainConfig) -> Averager:
        return averaging.make(self.model, self.optimizer, group, cfg)


class Shard:
    """The model whole between steps, the optimizer's state in one chunk per rank."""

    spread = True

    def __init__(self, model: torch.nn.Module, optimizer: ShardedOptimizer):
        self.model, self.optimizer = model, optimizer

    def state(self, keep: bool) -> tuple[dict | None, dict | None]:
        # Gathered by every rank (a unit at a time), kept by the one that writes.
        opt = self.optimizer.state_dict(keep=keep)
        return self.optimizer.model_tensors(self.model, keep=keep), opt

    def load(self, state: dict) -> None:
        with self.optimizer.gathered(False):
            self.model.load_state_dict(_tensors(state))
        _load_optimizer(self.optimizer, state)

    def handed_back(self) -> dict | None:
        return None

    def check_followable(self) -> None:
        raise ValueError(
            "A ShardedOptimizer's state is spread over the ranks, and a lost rank takes its "
            "chunk with it: such a run goes on from its last ctx.checkpoint, so do not "
            "follow it."
        )

    def trained_model(self, keep: bool) -> dict | None:
        # Gathered by every rank a unit at a time: the optimizer's state goes first.
        self.optimizer.optimizer.state.clear()
        self.optimizer.zero_grad()
        return self.optimizer.model_tensors(self.model, keep=keep)

    def averager(self, group: Group, cfg: TrainConfig) -> Averager:
        return self.optimizer  # it averages as it reduce-scatters the gradients


class StagePart:
    """A pipeline stage's layers and their optimizer: one part of the model per rank."""

    spread = True

    def __init__(self, stage: Stage, optimizer: torch.optim.Optimizer | None):
        self.stage, self.optimizer = stage, optimizer

    def state(self, keep: bool) -> tuple[dict | None, dict | None]:
        # The stages send theirs to rank 0, which puts the whole model together.
        whole = self.stage.gather(self.optimizer, keep=keep) or {}
        return whole.get("model"), whole.get("optimizer")

    def load(self, state: dict) -> None:
        tensors, opt_state = self.stage.stage_state(state)
        self.stage.module.load_state_dict(tensors)
        if self.optimizer is not None and opt_state:
            self.optimizer.load_state_dict(opt_state)

    def handed_back(self) -> dict | None:
        return self.stage.handed_back(self.optimizer)

    def check_followable(self) -> None:
        pass

    def trained_model(self, keep: bool) -> dict | None:
        # Every rank of replica 0 sends its stage; the gradients go first, to make room.
        self.stage.module.zero_grad(set_to_none=True)
        whole = self.stage.gather(None, keep=keep)
        return whole["model"] if whole else None

    def averager(self, group: Group, cfg: TrainConfig) -> Averager:
        raise ValueError(
            "A pipeline stage averages its gradients with its replicas inside "
            "stage.train_step(): train it without ctx.averaging()."
        )


def layout_of(model: torch.nn.Module | Stage, optimizer=None) -> StateLayout:
    """The layout of what a loop trains: a :class:`~daskdl.parallel.pipeline.Stage` is a
    stage's part, a :class:`~daskdl.parallel.sharding.ShardedOptimizer` a shard."""
    if isinstance(model, Stage):
        return StagePart(model, optimizer)
    if isinstance(optimizer, ShardedOptimizer):
        return Shard(model, optimizer)
    return Replica(model, optimizer)
