"""Sharded optimizer state (ZeRO stage 1): each of P ranks keeps 1/P of it.

All parameters live in one flat float32 buffer that the model's parameters are views of, and
backward writes their gradients into a second one. A step reduce-scatters the gradients (each
rank gets the average of its chunk, :meth:`daskdl.comm.DaskGroup.owned`), the rank's own
optimizer updates only that chunk, and an all-gather hands every rank the whole updated
parameter vector: the ring's two halves, which an all-reduce runs back to back. The
optimizer's state (momentum, Adam's moments) exists for the chunk alone.

Every update rule daskdl trains with (SGD with momentum and weight decay, AdamW) works element
by element, so the sharded step computes what the unsharded one does. Checkpoints stay
layout-free: :meth:`ShardedOptimizer.state_dict` gathers the state into the format of the
plain optimizer over the model's parameters, and :meth:`load_state_dict` takes that format,
whatever number of ranks wrote it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from daskdl.comm import DaskGroup


class ShardedOptimizer:
    """``make(params)`` (say ``lambda ps: torch.optim.AdamW(ps, lr=1e-3)``) over this rank's
    chunk of ``model``'s parameters, with gradients averaged over ``group``.

    Use it as an optimizer: ``zero_grad()``, ``loss.backward()``, ``step()``. The model must
    start alike on every rank (build it from the same seed). ``wire="bf16"`` sends gradients
    and parameters as bfloat16 (parameters then round to bfloat16 at every step).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        make: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
        group: DaskGroup,
        wire: str = "fp32",
    ):
        self.params = [p for p in model.parameters() if p.requires_grad]
        if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in self.params):
            raise ValueError(
                "ShardedOptimizer keeps float32 parameters on the CPU (the GPU path is not "
                "built yet): move the model with .float().cpu(), or leave shard= unset."
            )
        self.group, self.wire = group, wire
        sizes = [p.numel() for p in self.params]
        self.offsets = np.cumsum([0, *sizes])
        total = int(self.offsets[-1])
        self.flat = torch.empty(total)
        self.grads = torch.zeros(total)
        with torch.no_grad():
            for p, a, b in zip(self.params, self.offsets[:-1], self.offsets[1:]):
                self.flat[a:b].copy_(p.reshape(-1))
                p.data = self.flat[a:b].view_as(p)  # gathered parameters land in the model
                p.grad = self.grads[a:b].view_as(p)  # backward accumulates into the buffer
        self.owned = group.owned(total)
        # A view: the optimizer updates the flat buffer in place, and weights loaded into
        # the model afterwards (a resume) are the chunk's at once.
        self.shard = torch.nn.Parameter(self.flat[self.owned])
        self.optimizer = make([self.shard])

    @property
    def param_groups(self) -> list[dict]:
        """The chunk's optimizer's groups: set ``lr`` here, as on any optimizer."""
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = False) -> None:
        # The gradients stay views of the flat buffer: zeroed in place, never set to None.
        self.grads.zero_()

    def step(self) -> None:
        size = self.group.size
        chunk = self.group.reduce_scatter_(self.grads.numpy(), self.wire, divide_by=size)
        self.shard.grad = torch.from_numpy(chunk)
        self.optimizer.step()
        self.group.all_gather_(self.flat.numpy(), self.wire)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """The state of the plain optimizer over the model's parameters, gathered from every
        rank (call it on every rank): what an unsharded run checkpoints."""
        local = self.optimizer.state_dict()
        chunk_state = local["state"].get(0, {})
        full: dict[int, dict] = {i: {} for i in range(len(self.params))}
        for name, value in chunk_state.items():
            if torch.is_tensor(value) and value.shape == self.shard.shape:
                whole = torch.zeros(len(self.flat))
                whole[self.owned] = value
                self.group.all_gather_(whole.numpy())
                for i, (a, b) in enumerate(zip(self.offsets[:-1], self.offsets[1:])):
                    full[i][name] = whole[a:b].view_as(self.params[i]).clone()
            else:  # a step count, the same on every rank
                for i in full:
                    full[i][name] = value.clone() if torch.is_tensor(value) else value
        groups = [{**g, "params": list(range(len(self.params)))} for g in local["param_groups"]]
        return {"state": {i: s for i, s in full.items() if s}, "param_groups": groups}

    def load_state_dict(self, state: dict) -> None:
        """Load the plain optimizer's state (from any layout's checkpoint): this rank's chunk
        of it."""
        per_param = state["state"]
        chunk: dict = {}
        names = {name for s in per_param.values() for name in s}
        for name in names:
            values = [per_param.get(i, {}).get(name) for i in range(len(self.params))]
            if all(torch.is_tensor(v) and v.shape == p.shape for v, p in zip(values, self.params)):
                whole = torch.cat([v.reshape(-1).float() for v in values])
                chunk[name] = whole[self.owned].clone()
            else:
                chunk[name] = next(v for v in values if v is not None)
        [group] = state["param_groups"]
        self.optimizer.load_state_dict(
            {"state": {0: chunk} if chunk else {}, "param_groups": [{**group, "params": [0]}]}
        )
