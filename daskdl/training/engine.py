"""The pieces of ``fit``'s training step (:mod:`daskdl.training.fitloop` runs them): the
learning-rate schedule, the optimizer, one forward-backward-update step with its agreement with the
other ranks, and the batch-norm statistics the ranks share."""

from __future__ import annotations

import math

import torch

from daskdl.config.options import TrainConfig
from daskdl.objective.task import Objective


def lr_at(step: int, total: int, cfg: TrainConfig, steps_per_epoch: int) -> float:
    """The learning rate for a global step: linear warm-up, then the chosen schedule."""
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "onecycle":
        # Up for the first 30% (when no explicit warm-up), then cosine annealing to 0.
        if warmup == 0 and progress < 0.3:
            return cfg.lr * (0.1 + 0.9 * progress / 0.3)
        start = 0.0 if warmup else 0.3
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * (progress - start) / (1 - start)))
    return cfg.lr


def make_optimizer(params, cfg: TrainConfig, fused: bool = False) -> torch.optim.Optimizer:
    """SGD or AdamW over ``params``. ``fused`` updates all parameters in one kernel, and
    skips a non-finite step on the device (``found_inf``), which lets a rank that decides
    alone (a single rank, or local SGD between synchronisations) run on a GPU without
    waiting for it every step (see ``train_step``)."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(
            params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None
        )
    return torch.optim.SGD(
        params,
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov and cfg.momentum > 0,
        weight_decay=cfg.weight_decay,
        # None, not False: False would also turn off the default foreach kernels.
        fused=fused or None,
    )


def prepare_optimizer(opt, fused: bool) -> None:
    """After a checkpoint's state is loaded (its param_groups carry the saving run's
    ``fused``): this run's choice, and momentum buffers that exist from the start.

    Fused SGD allocates its momentum buffers uninitialised on its first step and fills them
    in the kernel, unless that step is skipped (``found_inf``): then the next step would read
    garbage. Zeros are exact: with no dampening, ``0.9 * 0 + g`` is the ``g`` the first step
    would have stored.
    """
    for group in opt.param_groups:
        group["fused"], group["foreach"] = (True if fused else None), None
        if isinstance(opt, torch.optim.SGD) and fused and group["momentum"] > 0:
            for p in group["params"]:
                opt.state[p].setdefault("momentum_buffer", torch.zeros_like(p))


def train_step(model, opt, xb, yb, sync, autocast, stop_requested: bool, objective: Objective):
    """Forward, backward, agree with the other ranks, update. Returns this rank's loss and
    number of correct predictions on the batch (classification), as tensors on the device:
    reading them (``.item()``) would make the host wait for a GPU every step."""
    sync.zero_grad()
    with autocast:
        outputs = model(xb)
    loss = objective.loss_of(outputs, yb)
    loss.backward()
    # Per-step averaging all-reduces the gradients here (local SGD only notes the stop request);
    # either way it checks the loss and gradients, and no rank steps on non-finite ones.
    sync.backward_done(stop_requested, loss.detach())
    if sync.pending_bad is not None:
        # The fused optimizer skips the update on the device when the flag is set.
        opt.found_inf = sync.pending_bad.float()
        opt.step()
    elif not sync.bad_ranks:
        opt.step()
    return loss.detach(), objective.correct(outputs, yb)
