"""Sharded training state (ZeRO): each of P ranks keeps 1/P of it.

The parameters are cut into *units*, each one flat float32 buffer that its parameters are
views of, and every rank owns one chunk of every unit
(:meth:`daskdl.collectives.comm.DaskGroup.owned`).

- ``shard="optimizer"`` (ZeRO-1): one unit, the whole model, held in full on every rank. A
  step reduce-scatters the gradients (each rank gets the average of its chunk), the rank's
  optimizer updates only its chunk, and an all-gather hands every rank the updated
  parameters: the ring's two halves, which an all-reduce runs back to back. The optimizer's
  state (momentum, Adam's moments) exists for the chunk alone.
- ``shard="full"`` (ZeRO-3, FSDP): a unit per module of up to ``unit_bytes`` of parameters,
  and a rank keeps only its chunk of each. A unit is all-gathered just before its module's
  forward and again before its backward, and freed after each (its storage resized to
  nothing, so autograd's saved views see the parameters again when they are gathered); its
  gradients are reduce-scattered into the rank's chunk as soon as backward has made them.

Every update rule daskdl trains with (SGD with momentum and weight decay, AdamW) works element
by element, so a sharded step computes what the unsharded one does. Checkpoints stay
layout-free: :meth:`ShardedOptimizer.state_dict` gathers the state into the plain optimizer's
format over the model's parameters, and :meth:`load_state_dict` takes that format, whatever
number of ranks wrote it.

Every rank must run the same modules in the same order (as data-parallel training does), or
the gathers of ``shard="full"`` would pair different units: a forward pass on one rank alone
(scoring a shard of another size, say) goes inside :meth:`ShardedOptimizer.gathered`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch

from daskdl.checkpoint import files as checkpoint
from daskdl.collectives.base import Group
from daskdl.parallel import pipeline
from daskdl.parallel.averaging import flagged_ranks, rank_flag
from daskdl.parallel.base import Averager

SHARDS = (None, "optimizer", "full")


class _Unit:
    """Parameters kept as one flat float32 buffer that they are views of, of which this rank
    owns the chunk ``owned``: as a view of the buffer (``keep``), or as its own tensor while
    the buffer is freed between uses."""

    def __init__(self, params: list[torch.nn.Parameter], group: Group, keep: bool):
        self.params = params
        self.offsets = np.cumsum([0, *(p.numel() for p in params)])
        self.size = int(self.offsets[-1])
        self.owned = group.owned(self.size)
        self.flat = torch.empty(self.size)
        with torch.no_grad():
            for p, a, b in zip(params, self.offsets[:-1], self.offsets[1:]):
                self.flat[a:b].copy_(p.reshape(-1))
                p.data = self.flat[a:b].view_as(p)
        chunk = self.flat[self.owned]
        # A view (kept in full): the optimizer updates the buffer in place, and weights loaded
        # into the model (a resume) are the chunk's at once.
        self.shard = torch.nn.Parameter(chunk if keep else chunk.clone())
        self.held = True
        self.grads: torch.Tensor | None = None
        self.ready = 0  # gradients accumulated in this backward pass
        if not keep:
            self.free()

    @property
    def gradients(self) -> torch.Tensor:
        """The gradient buffer, which ``zero_grad`` makes before any backward."""
        if self.grads is None:
            raise RuntimeError("no gradient buffer yet: call the optimizer's zero_grad() first")
        return self.grads

    def hold(self) -> None:
        """Make room for the whole unit."""
        self.flat.untyped_storage().resize_(self.size * 4)
        self.held = True

    def gather(self, group: Group, wire: str) -> None:
        """The whole unit, from every rank's chunk."""
        self.hold()
        # Through a buffer of its own: a storage that numpy has seen can no longer be resized.
        whole = np.empty(self.size, np.float32)
        whole[self.owned] = self.shard.detach().numpy()
        group.all_gather_(whole, wire)
        with torch.no_grad():
            self.flat.copy_(torch.from_numpy(whole))

    def free(self) -> None:
        self.flat.untyped_storage().resize_(0)
        self.held = False

    def bind_grads(self) -> None:
        """A zeroed gradient buffer that backward accumulates into (kept where the unit
        is)."""
        if self.grads is None:
            self.grads = torch.zeros(self.size)
        else:
            self.grads.zero_()
        self.ready = 0
        for p, view in zip(self.params, self.views(self.grads)):
            p.grad = view

    def collect_grads(self) -> None:
        """Gradients that backward made outside the buffer (the loop set ``grad`` to None
        after ``zero_grad``, say) copied into it."""
        for p, view in zip(self.params, self.views(self.gradients)):
            if p.grad is None:
                view.zero_()
            elif p.grad.data_ptr() != view.data_ptr():
                view.copy_(p.grad)
                p.grad = view

    def views(self, values: torch.Tensor) -> list[torch.Tensor]:
        """A flat tensor of the unit's size, cut into its parameters' shapes."""
        return [
            values[a:b].view_as(p)
            for p, a, b in zip(self.params, self.offsets[:-1], self.offsets[1:])
        ]


def _cut(module: torch.nn.Module, cap: int, claimed: set) -> list[tuple[torch.nn.Module, list]]:
    """``shard="full"``'s units: the largest subtrees of at most ``cap`` bytes of parameters;
    a module above it is split into its children, its own parameters a unit of their own."""
    mine = [p for p in module.parameters() if p.requires_grad and id(p) not in claimed]
    children = list(module.children())
    if sum(p.numel() * 4 for p in mine) <= cap or not children:
        claimed.update(id(p) for p in mine)
        return [(module, mine)] if mine else []
    units = [u for child in children for u in _cut(child, cap, claimed)]
    own = [p for p in module.parameters(recurse=False) if p.requires_grad and id(p) not in claimed]
    claimed.update(id(p) for p in own)
    return units + ([(module, own)] if own else [])


def state_bytes_needed(model: torch.nn.Module, cfg, ranks: int) -> int:
    """Bytes of training state a rank of a run with ``cfg`` holds for ``model``: float32
    parameters, gradients and the optimizer's state (AdamW: two moments; SGD with momentum:
    one), per ``cfg.shard``; ``shard="full"`` adds its largest unit, gathered with its
    gradients; a pipeline's rank holds its stage (the largest, cut by parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    weights = 4 * sum(p.numel() for p in params)
    k = 2 if cfg.optimizer == "adamw" else int(cfg.momentum > 0)
    pipe = cfg.pipeline()
    if pipe is not None:  # the largest stage, whole
        layers = pipeline.layers_of(model)
        bounds = pipeline.split_bounds(layers, pipe)
        counts = [
            sum(p.numel() for i in pipe.layers_of_stage(bounds, s) for p in layers[i].parameters())
            for s in range(pipe.stages)
        ]
        return (2 + k) * 4 * max(counts)
    if cfg.shard is None:
        return (2 + k) * weights
    if cfg.shard == "optimizer":
        return 2 * weights + math.ceil(k * weights / ranks)
    units = _cut(model, int(cfg.bucket_mb * 2**20), set())
    largest = max((sum(p.numel() for p in ps) for _, ps in units), default=0)
    return math.ceil((2 + k) * weights / ranks) + 2 * 4 * largest


def optimizer_state(optimizer: torch.optim.Optimizer) -> list:
    """What an optimizer holds per parameter (moments, momentum, step counts)."""
    return [v for s in optimizer.state.values() for v in s.values()]


def storage_bytes(tensors) -> int:
    """Bytes of memory behind ``tensors`` (anything else among them ignored), each storage
    counted once however many views share it."""
    storages = {}
    for t in tensors:
        if torch.is_tensor(t):
            storage = t.untyped_storage()
            storages[storage.data_ptr(), storage.nbytes()] = storage.nbytes()
    return sum(storages.values())


def _tensors(output) -> list[torch.Tensor]:
    """The tensors in a module's output (a tensor, or tuples, lists and dicts of them)."""
    if torch.is_tensor(output):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in _tensors(item)]
    return []


class ShardedOptimizer:
    """``make(params)`` (say ``lambda ps: torch.optim.AdamW(ps, lr=1e-3)``) over this rank's
    chunks of ``model``'s parameters, with gradients averaged over ``group``.

    Use it as an optimizer: ``zero_grad()``, ``loss.backward()``, ``step()``. The model must
    start alike on every rank (build it from the same seed). ``shard`` is ``"optimizer"``
    (ZeRO-1) or ``"full"`` (ZeRO-3: parameters and gradients sharded too, units of at most
    ``unit_bytes``). ``wire="bf16"`` sends gradients and parameters as bfloat16 (parameters
    then round to bfloat16 at every step).

    Before each update the ranks agree on the stop request and on whether any rank's loss or
    gradients were not finite (``bad_ranks``; then no rank updates): in ``backward_done``,
    which ``fit``'s loop calls, or else in ``step``, where ``on_bad(self)`` (when given)
    decides whether to raise.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        make: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
        group: Group,
        shard: str = "optimizer",
        wire: str = "fp32",
        unit_bytes: int = 25 * 2**20,
        on_bad: Callable[[Averager], None] | None = None,
    ):
        params = [p for p in model.parameters() if p.requires_grad]
        if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in params):
            raise ValueError(
                "Sharded training keeps float32 parameters on the CPU (the GPU path is not "
                "built yet): move the model with .float().cpu(), or leave shard= unset."
            )
        if shard not in SHARDS[1:]:
            raise ValueError(f"shard must be 'optimizer' or 'full', got {shard!r}.")
        self.group, self.wire, self.full, self.on_bad = group, wire, shard == "full", on_bad
        if self.full:
            cut = _cut(model, unit_bytes, set())
            self.units = [_Unit(ps, group, keep=False) for _, ps in cut]
            self._hooks = self._hook_units([m for m, _ in cut])
        else:
            self.units, self._hooks = [_Unit(params, group, keep=True)], []
        # The order of the gathered state: the model's parameters, as the plain optimizer's.
        self.params = params
        self.optimizer = make([u.shard for u in self.units])
        self.bad_ranks: list[int] = []
        self.pending_bad: torch.Tensor | None = None  # the ranks always agree on the host
        self._bad = torch.zeros((), dtype=torch.bool)
        self._stop = False
        self._agreed = False
        self._holding = 0  # inside gathered(): units stay whole
        self.zero_grad()

    # ------------------------------------------------------------------ shard="full"'s hooks

    def _hook_units(self, modules: list[torch.nn.Module]) -> list:
        hooks = []
        for module, unit in zip(modules, self.units):
            hooks.append(module.register_forward_pre_hook(self._before(unit)))
            hooks.append(module.register_forward_hook(self._after(unit)))
            for p in unit.params:
                hooks.append(p.register_post_accumulate_grad_hook(self._grad_ready(unit)))
        return hooks

    def _gather(self, unit: _Unit) -> None:
        if not unit.held:
            unit.gather(self.group, self.wire)

    def _release(self, unit: _Unit) -> None:
        if unit.held and not self._holding:
            unit.free()

    def _before(self, unit: _Unit):
        def hook(module, args):
            self._gather(unit)

        return hook

    def _after(self, unit: _Unit):
        def before_backward(grad):
            self._gather(unit)
            if unit.grads is None:
                unit.bind_grads()
            return grad

        def hook(module, args, output):
            for t in _tensors(output):  # the first of them to get its gradient gathers the unit
                if t.requires_grad:
                    t.register_hook(before_backward)
            self._release(unit)

        return hook

    def _grad_ready(self, unit: _Unit):
        def hook(param):
            if unit.grads is None:
                raise RuntimeError(
                    "shard='full' reduces a module's gradients when backward has reached each "
                    "of its parameters once, and one reached a parameter again: a module called "
                    "twice in one forward pass, or parameters shared between modules. Use "
                    "shard='optimizer' for such a model."
                )
            unit.ready += 1
            if unit.ready == len(unit.params):
                self._reduce(unit)

        return hook

    def _reduce(self, unit: _Unit) -> None:
        """The unit's gradients, averaged, into this rank's chunk; the rest freed."""
        self._bad |= ~torch.isfinite(unit.gradients).all()
        chunk = self.group.reduce_scatter_(unit.gradients.numpy(), self.wire, self.group.size)
        chunk = torch.from_numpy(chunk.copy())  # not a view: the unit's buffer goes
        if unit.shard.grad is None:
            unit.shard.grad = chunk
        else:
            unit.shard.grad += chunk
        for p in unit.params:
            p.grad = None
        unit.grads = None
        self._release(unit)

    # ------------------------------------------------------------------ the optimizer

    @property
    def param_groups(self) -> list[dict]:
        """The chunks' optimizer's groups: set ``lr`` here, as on any optimizer."""
        return self.optimizer.param_groups

    skips_together = True  # the flags travel with the reduce-scatter

    @property
    def stop_agreed(self) -> bool:
        """Whether every rank agreed, before the last update, to stop."""
        return self._stop

    def skip_step(self) -> None:
        pass  # its own step() skips when any rank's gradients were not finite

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._bad = torch.zeros((), dtype=torch.bool)
        self._agreed = False
        if self.full:
            for unit in self.units:
                unit.shard.grad, unit.grads = None, None
            return
        self.units[0].bind_grads()  # the gradients stay views of the flat buffer

    def backward_done(self, stop_requested: bool, loss: torch.Tensor | None = None) -> None:
        """Agree with the other ranks on the stop request and on non-finite steps."""
        if self.full:  # a unit no backward reached this step still takes part, in order
            for unit in self.units:
                if unit.grads is not None:
                    self._reduce(unit)
        else:
            self.units[0].collect_grads()
            self._bad |= ~torch.isfinite(self.units[0].gradients).all()
        if loss is not None:
            self._bad |= ~torch.isfinite(loss)
        rank, size = self.group.rank, self.group.size
        control = np.array([float(stop_requested), float(self._bad) * rank_flag(rank)])
        if size > 1:
            self.group.allreduce_(control)
        self._stop = control[0] > 0
        flags = round(control[1])
        self.bad_ranks = flagged_ranks(flags, size)
        self._agreed = True

    def step_done(self, global_step: int, end_of_epoch: bool) -> bool:
        return self._stop

    def step(self) -> None:
        if not self._agreed:  # a user's loop: agree here
            self.backward_done(self.group.box.stop_requested)
            if self.bad_ranks and self.on_bad is not None:
                self.on_bad(self)
        self._agreed = False
        if self.bad_ranks:
            return  # every rank skips it alike
        if not self.full:
            [unit] = self.units
            self.group.reduce_scatter_(unit.gradients.numpy(), self.wire, self.group.size)
            unit.shard.grad = unit.gradients[unit.owned]  # the averaged chunk, in place
        self.optimizer.step()
        if not self.full:
            self.group.all_gather_(self.units[0].flat.numpy(), self.wire)

    @contextmanager
    def gathered(self, gather: bool = True) -> Iterator[None]:
        """Every parameter whole on this rank meanwhile (``shard="full"``; a collective, so
        on every rank): to score, save or load weights. Changes made to them meanwhile are
        kept (``gather=False``: room is made but nothing is gathered, to load weights)."""
        if not self.full:
            yield
            return
        self._holding += 1
        try:
            for unit in self.units:
                if gather:
                    self._gather(unit)
                elif not unit.held:
                    unit.hold()
            yield
        finally:
            self._holding -= 1
            if not self._holding:
                with torch.no_grad():
                    for unit in self.units:
                        unit.shard.copy_(unit.flat[unit.owned])
                        unit.free()

    def state_bytes(self) -> int:
        """Bytes of training state this rank holds now: parameters, gradients and the
        optimizer's state, each storage counted once."""
        tensors: list[torch.Tensor] = [*self.params, *(u.shard for u in self.units)]
        tensors += [p.grad for p in tensors if p.grad is not None]
        tensors += [u.grads for u in self.units if u.grads is not None]
        return storage_bytes(tensors + optimizer_state(self.optimizer))

    # ------------------------------------------------------------------ checkpoints

    def _whole(self, values: dict[int, torch.Tensor], keep: bool) -> list[torch.Tensor]:
        """Every unit's chunk of one kind of state (``values[i]``: unit i's), gathered: the
        tensors of the model's parameters, in its order (none where not ``keep``)."""
        per_param = {}
        for i, unit in enumerate(self.units):
            whole = torch.zeros(unit.size)
            whole[unit.owned] = values[i]
            self.group.all_gather_(whole.numpy())
            if keep:
                for p, view in zip(unit.params, unit.views(whole)):
                    per_param[id(p)] = view.clone()
        return [per_param[id(p)] for p in self.params] if keep else []

    def model_tensors(self, model: torch.nn.Module, keep: bool = True) -> dict | None:
        """``model``'s state as numpy arrays (:func:`daskdl.checkpoint.files.model_tensors`),
        gathered a unit at a time (call it on every rank); ``None`` where not ``keep``."""
        if not self.full:
            return checkpoint.model_tensors(model) if keep else None
        names = {id(p): name for name, p in model.named_parameters()}
        gathered = {}
        for unit in self.units:
            self._gather(unit)
            if keep:
                gathered.update({names[id(p)]: checkpoint.copy(p) for p in unit.params})
            self._release(unit)
        if not keep:
            return None
        state = model.state_dict()
        return {k: gathered[k] if k in gathered else checkpoint.copy(v) for k, v in state.items()}

    def state_dict(self, keep: bool = True) -> dict | None:
        """The state of the plain optimizer over the model's parameters, gathered from every
        rank (call it on every rank): what an unsharded run checkpoints; ``None`` where not
        ``keep`` (the gathers still need this rank)."""
        local = self.optimizer.state_dict()
        names = {name for s in local["state"].values() for name in s}
        full: dict[int, dict] = {i: {} for i in range(len(self.params))}
        for name in sorted(names):
            values = {i: local["state"].get(i, {}).get(name) for i in range(len(self.units))}
            first = next(v for v in values.values() if v is not None)
            pairs = zip(values.values(), self.units)
            if all(torch.is_tensor(v) and v.shape == u.shard.shape for v, u in pairs):
                for i, tensor in enumerate(self._whole(values, keep)):
                    full[i][name] = tensor
            else:  # a step count, the same on every rank
                for i in full:
                    full[i][name] = first.clone() if torch.is_tensor(first) else first
        if not keep:
            return None
        groups = [{**g, "params": list(range(len(self.params)))} for g in local["param_groups"]]
        return {"state": {i: s for i, s in full.items() if s}, "param_groups": groups}

    def load_state_dict(self, state: dict) -> None:
        """Load the plain optimizer's state (from any layout's checkpoint): this rank's chunk
        of it."""
        per_param = state["state"]
        index = {id(p): i for i, p in enumerate(self.params)}
        names = {name for s in per_param.values() for name in s}
        chunks: dict[int, dict] = {i: {} for i in range(len(self.units))}
        for name in names:
            values = [per_param.get(i, {}).get(name) for i in range(len(self.params))]
            for u, unit in enumerate(self.units):
                mine = [values[index[id(p)]] for p in unit.params]
                pairs = zip(mine, unit.params)
                if all(torch.is_tensor(v) and v.shape == p.shape for v, p in pairs):
                    whole = torch.cat([v.reshape(-1).float() for v in mine])
                    chunks[u][name] = whole[unit.owned].clone()
                else:
                    chunks[u][name] = next(v for v in values if v is not None)
        [group] = state["param_groups"]
        self.optimizer.load_state_dict(
            {
                "state": {u: s for u, s in chunks.items() if s},
                "param_groups": [{**group, "params": list(range(len(self.units)))}],
            }
        )

    def state_tensors(self) -> dict[str, np.ndarray]:
        return {}  # no outer state: the averager's part of a checkpoint

    def load_state(self, tensors: dict[str, np.ndarray]) -> None:
        pass

    def close(self) -> None:
        for handle in self._hooks:
            handle.remove()
