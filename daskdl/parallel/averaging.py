"""How the replicas on different ranks stay in agreement.

- :class:`GradientAveraging`: average the gradients after every backward pass (synchronous
  data-parallel SGD, what DDP does). ``sync_every=1``.
- :class:`LocalSGD`: every rank takes ``sync_every`` optimizer steps on its own, then the
  parameters and the optimizer's momentum are averaged. An optional outer optimizer
  (DiLoCo-style Nesterov momentum on the averaged change) makes long intervals work.

Both carry the stop request in their all-reduce, so every rank stops after the same step.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import cast

import numpy as np
import torch

from daskdl.collectives.base import Group


def _float_state(opt: torch.optim.Optimizer, p: torch.Tensor) -> list[torch.Tensor]:
    """The optimizer's per-parameter tensors (momentum, Adam moments); not step counters."""
    return [v for v in opt.state.get(p, {}).values() if torch.is_tensor(v) and v.shape == p.shape]


# Which ranks saw a non-finite loss or gradient travels as bits of one float of a step's
# all-reduce: exact up to 2**24, so ranks from 23 on share the last bit.
_FLAG_BITS = 23


def rank_flag(rank: int) -> float:
    """This rank's bit, to add to the all-reduced flags when its step was not finite."""
    return 2.0 ** min(rank, _FLAG_BITS)


def flagged_ranks(flags: int, size: int) -> list[int]:
    """The ranks whose bits are set in the summed ``flags`` (23 and above share one)."""
    return [r for r in range(size) if flags >> min(r, _FLAG_BITS) & 1]


class GradientAveraging:
    """Synchronous data-parallel SGD: gradients averaged over all ranks after every backward.

    As in DDP, all gradients live in one flat buffer that backward writes into (parameters in
    reverse order, the order backward produces them), cut into buckets of about
    ``bucket_bytes`` (the first one smaller, so communication starts early). A bucket's
    all-reduce starts on a communication thread as soon as its last gradient is accumulated,
    overlapping with the rest of the backward pass; ``backward_done`` waits for all of them.
    Buckets are reduced in the same order on every rank whatever order backward finishes them
    in. One extra slot at the end of the last bucket carries the stop request.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        opt: torch.optim.Optimizer | None,
        group: Group,
        wire: str = "fp32",
        bucket_bytes: int = 25 * 2**20,
        first_bucket_bytes: int = 2**20,
        defer_nonfinite: bool = False,
        copy_grads: bool = False,
        on_step=None,
    ):
        self.params = params = [p for p in model.parameters() if p.requires_grad][::-1]
        total = sum(p.numel() for p in params)
        # Slots after the gradients, averaged by the same all-reduce: the stop request, which
        # ranks saw a non-finite loss or gradient (bit r for rank r), and for each parameter
        # whether any rank's backward reached it.
        n_slots = 2 + len(params)
        self.flat = torch.zeros(total + n_slots, dtype=torch.float32, device=params[0].device)
        self.grads = self.flat[:total]
        self.control = self.flat[total:]
        self._views = []  # each parameter's gradient: its place in the flat buffer
        self.group = group
        self.wire = wire
        self._stop = False
        self.bad_ranks: list[int] = []
        # A lone rank whose optimizer can skip a step on the device (fused, ``found_inf``)
        # leaves its non-finite flag there: reading it would make the host wait for the GPU.
        self.defer_nonfinite = defer_nonfinite and group.size == 1
        self.pending_bad: torch.Tensor | None = None
        # Bucket b covers flat[bounds[b]:bounds[b + 1]]; a parameter never straddles two.
        bounds, bucket_of, offset, cap = [0], [], 0, first_bucket_bytes
        for p in params:
            if offset > bounds[-1] and (offset - bounds[-1]) * 4 >= cap:
                bounds.append(offset)
                cap = bucket_bytes
            bucket_of.append(len(bounds) - 1)
            # The parameter's own strides (channels_last conv weights too), so that backward
            # accumulates into the bucket without a layout change.
            self._views.append(self.flat.as_strided(p.shape, p.stride(), offset))
            if not copy_grads:
                p.grad = self._views[-1]
            offset += p.numel()
        bounds.append(total + n_slots)
        self.buckets = [self.flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        self._sizes = np.bincount(bucket_of, minlength=len(self.buckets))
        self._executor = None
        if len(self.buckets) > 1 and group.size > 1:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="daskdl-allreduce")
        self._hooks = [
            p.register_post_accumulate_grad_hook(self._hook(i, b))
            for i, (p, b) in enumerate(zip(params, bucket_of))
        ]
        self._unbound: list[int] = []  # parameters whose grad is None this step
        # A user's loop (daskdl.launch) owns its gradients: they are copied into the buffer
        # as backward makes them and the averages copied back when backward ends, so that
        # optimizer.zero_grad() (set_to_none or not) and accumulation work as in plain torch.
        self.copy_grads, self._on_step, self._in_pass = copy_grads, on_step, False
        self._reset()

    def _reset(self) -> None:
        self._missing = self._sizes.copy()
        self._launched = 0
        self._pending: list[Future] = []
        self._bad = torch.zeros((), dtype=torch.bool, device=self.flat.device)
        self._used = [False] * len(self.params)

    def _check(self, grads: torch.Tensor) -> None:
        # Before the bucket leaves this rank, so that the flag names the rank it came from;
        # a device-side test, with no wait for a GPU.
        self._bad |= ~torch.isfinite(grads).all()

    def _hook(self, index: int, bucket: int):
        def ready(param: torch.Tensor) -> None:
            if self.copy_grads:
                self._copy_in(index, param)
            self._used[index] = True
            if self._executor is not None:
                self._missing[bucket] -= 1
                self._launch_ready()

        return ready

    def _copy_in(self, index: int, param: torch.Tensor) -> None:
        if not self._in_pass:  # the first gradient of this backward
            self._in_pass = True
            self.flat.zero_()
            self._reset()
            # Runs when the autograd engine has finished this backward, as DDP's reducer does.
            torch.autograd.Variable._execution_engine.queue_callback(self._end_pass)
        self._views[index].copy_(cast(torch.Tensor, param.grad))  # the hook runs once it is

    def _end_pass(self) -> None:
        self._in_pass = False
        self.backward_done(self.group.box.stop_requested)
        unbound = set(self._unbound)
        for i, p in enumerate(self.params):
            if i in unbound:
                continue  # no rank's backward reached it: no gradient, as in plain torch
            if p.grad is None:  # reached on other ranks only
                p.grad = self._views[i].clone()
            else:
                p.grad.copy_(self._views[i])
        self._unbound = []
        if self._on_step is not None:
            self._on_step(self)

    skips_together = True  # the flags travel with the gradients: every rank skips at once

    @property
    def stop_agreed(self) -> bool:
        """Whether every rank agreed, at the last backward, to stop."""
        return self._stop

    def skip_step(self) -> None:
        for p in self.params:
            p.grad = None  # optimizer.step() leaves every parameter as it is

    def _launch_ready(self) -> None:
        # The last bucket holds the stop slot: it goes in backward_done.
        while self._launched < len(self.buckets) - 1 and self._missing[self._launched] == 0:
            bucket = self.buckets[self._launched]
            self._check(bucket)
            # Buckets launch from backward hooks only when the executor exists.
            executor = cast(ThreadPoolExecutor, self._executor)
            self._pending.append(executor.submit(self._reduce, bucket))
            self._launched += 1

    def _reduce(self, bucket: torch.Tensor) -> None:
        self.group.allreduce_mean_(bucket, self.wire)

    def zero_grad(self) -> None:
        self.flat.zero_()
        for i in self._unbound:
            self.params[i].grad = self._views[i]
        self._unbound = []
        self._reset()

    def _leave_unused_alone(self, used: list[bool]) -> None:
        """Parameters no rank's backward reached get no gradient at all (``None``), so the
        optimizer leaves them as they are (no weight decay, no momentum), as plain PyTorch
        and DDP do; a parameter that some rank used gets the average, zeros included."""
        self._unbound = [i for i, u in enumerate(used) if not u]
        for i in self._unbound:
            self.params[i].grad = None

    def backward_done(self, stop_requested: bool, loss: torch.Tensor | None = None) -> None:
        """Average the gradients; afterwards ``bad_ranks`` lists the ranks whose loss or
        gradients were not finite (every rank gets the same list, so all skip alike)."""
        if loss is not None:
            self._bad |= ~torch.isfinite(loss)
        if self.group.size == 1:
            self._stop = stop_requested
            self._check(self.grads)
            if self.defer_nonfinite:
                self.pending_bad = self._bad
            else:
                self.bad_ranks = [0] if bool(self._bad) else []
            if not all(self._used):
                self._leave_unused_alone(self._used)
            return
        rank = getattr(self.group, "rank", 0)
        control = self.control
        control[0] = float(stop_requested)
        control[2:] = torch.tensor(self._used, dtype=torch.float32)
        if self._executor is None:
            self._check(self.grads)
            control[1] = self._bad.float() * rank_flag(rank)
            self._reduce(self.flat)
        else:
            # Parameters that took no part in this backward keep zero gradients.
            self._missing[:] = 0
            self._launch_ready()
            last = self.buckets[-1]
            self._check(last[: len(last) - len(control)])
            control[1] = self._bad.float() * rank_flag(rank)
            self._pending.append(self._executor.submit(self._reduce, last))
            for fut in self._pending:
                fut.result()  # re-raises a peer timeout or an abort from the comm thread
        values = control.tolist()  # one read of the agreed flags
        self._stop = values[0] > 0
        flags = round(values[1] * self.group.size)
        self.bad_ranks = flagged_ranks(flags, self.group.size)
        used = [v > 0 for v in values[2:]]
        if not all(used):
            self._leave_unused_alone(used)

    def step_done(self, global_step: int, end_of_epoch: bool) -> bool:
        """Whether every rank agreed to stop after this step."""
        return self._stop

    def state_tensors(self) -> dict[str, np.ndarray]:
        return {}

    def load_state(self, tensors: dict[str, np.ndarray]) -> None:
        pass

    def close(self) -> None:
        for handle in self._hooks:
            handle.remove()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)


class LocalSGD:
    """Local steps, then an average of parameters and optimizer state every ``every`` steps
    and at the end of every epoch (so evaluation and checkpoints see one model).

    With ``outer="nesterov"`` the averaged change since the last synchronisation is treated as
    a gradient for an outer SGD with Nesterov momentum (DiLoCo): ``delta = global - average``,
    ``v = momentum * v + delta``, ``global -= outer_lr * (delta + momentum * v)``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        opt: torch.optim.Optimizer,
        group: Group,
        every: int,
        outer: str | None = None,
        outer_lr: float = 0.7,
        outer_momentum: float = 0.9,
        defer_nonfinite: bool = False,
    ):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.model, self.opt, self.group = model, opt, group
        self.every, self.outer = every, outer
        self.bad_ranks: list[int] = []
        # Ranks step on their own between synchronisations, so with an optimizer that can skip
        # a step on the device (fused, ``found_inf``) no rank needs to read its non-finite flag
        # per step: on a GPU that read would make the host wait for every step.
        self.defer_nonfinite = defer_nonfinite
        self.pending_bad: torch.Tensor | None = None
        self.outer_lr, self.outer_momentum = outer_lr, outer_momentum
        self._stop_requested = False
        self._stop = False
        if outer is not None:
            self.global_params = torch.cat([p.detach().reshape(-1) for p in self.params])
            self.velocity = torch.zeros_like(self.global_params)

    def zero_grad(self) -> None:
        # None, not zeros: a parameter that takes no part in a step then gets no update at
        # all (no weight decay, no momentum), as in plain PyTorch.
        self.opt.zero_grad(set_to_none=True)

    def backward_done(self, stop_requested: bool, loss: torch.Tensor | None = None) -> None:
        """Note a stop request; ``bad_ranks`` is this rank if its loss or gradients are not
        finite (ranks step on their own between synchronisations, so each decides alone), or,
        deferred, ``pending_bad`` is that flag left on the device."""
        self._stop_requested |= stop_requested
        device = self.params[0].device
        bad = torch.zeros((), dtype=torch.bool, device=device)
        if loss is not None:
            bad |= ~torch.isfinite(loss)
        for p in self.params:
            if p.grad is not None:
                bad |= ~torch.isfinite(p.grad).all()
        if self.defer_nonfinite:
            self.pending_bad = bad
        else:
            self.bad_ranks = [getattr(self.group, "rank", 0)] if bool(bad) else []

    def step_done(self, global_step: int, end_of_epoch: bool) -> bool:
        if (global_step + 1) % self.every and not end_of_epoch:
            return False
        return self.synchronise()

    @torch.no_grad()
    def synchronise(self) -> bool:
        """Average parameters and optimizer state over all ranks; returns the agreed stop."""
        tensors = [p.data for p in self.params]
        tensors += [s for p in self.params for s in _float_state(self.opt, p)]
        stop = torch.tensor([float(self._stop_requested)], device=tensors[0].device)
        flat = torch.cat([t.reshape(-1) for t in tensors] + [stop])
        self.group.allreduce_mean_(flat)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
        if self.outer == "nesterov":
            self._outer_step()
        self._stop = bool(flat[-1] > 0)
        return self._stop

    skips_together = False  # ranks step on their own between synchronisations

    @property
    def stop_agreed(self) -> bool:
        """Whether every rank agreed, at the last synchronisation, to stop."""
        return self._stop

    def skip_step(self) -> None:
        for p in self.params:
            p.grad = None  # this rank's optimizer.step() leaves its parameters as they are

    def _outer_step(self) -> None:
        average = torch.cat([p.detach().reshape(-1) for p in self.params])
        delta = self.global_params - average
        self.velocity.mul_(self.outer_momentum).add_(delta)
        self.global_params -= self.outer_lr * (delta + self.outer_momentum * self.velocity)
        offset = 0
        for p in self.params:
            p.data.copy_(self.global_params[offset : offset + p.numel()].view_as(p))
            offset += p.numel()

    def close(self) -> None:
        pass

    def state_tensors(self) -> dict[str, np.ndarray]:
        if self.outer is None:
            return {}
        return {
            "global": self.global_params.cpu().numpy().copy(),
            "velocity": self.velocity.cpu().numpy().copy(),
        }

    def load_state(self, tensors: dict[str, np.ndarray]) -> None:
        if self.outer is not None and tensors:
            device = self.params[0].device
            self.global_params = torch.from_numpy(tensors["global"].copy()).to(device)
            self.velocity = torch.from_numpy(tensors["velocity"].copy()).to(device)


def make(model, opt, group: Group, cfg) -> GradientAveraging | LocalSGD:
    fused = bool(opt.param_groups[0].get("fused"))
    if cfg.sync_every == 1 and cfg.outer_optimizer is None:
        return GradientAveraging(
            model,
            opt,
            group,
            cfg.wire_dtype,
            bucket_bytes=int(cfg.bucket_mb * 2**20),
            defer_nonfinite=fused,
        )
    # Parameters are averaged in float32: bfloat16 would round them (not just their change).
    return LocalSGD(
        model,
        opt,
        group,
        cfg.sync_every,
        cfg.outer_optimizer,
        cfg.outer_lr,
        cfg.outer_momentum,
        defer_nonfinite=fused,
    )


def average_buffers(model: torch.nn.Module, group: Group) -> None:
    """Batch-norm statistics differ per rank; average them so every replica evaluates alike."""
    average_tensors([b for b in model.buffers() if b.is_floating_point()], group)


def average_tensors(tensors: list[torch.Tensor], group: Group) -> None:
    """Average ``tensors`` over ``group``'s ranks in place, in one all-reduce."""
    if not tensors or group.size == 1:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    group.allreduce_mean_(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
