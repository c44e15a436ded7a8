"""``fit``'s steps on a whole replica per rank: the model built alike on every rank, gradients
averaged with its peers every step (or parameters every few, local SGD), or the training state
sharded over the ranks (ZeRO); the validation shard scored where it is held."""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch

from daskdl import models
from daskdl.objective import metrics as metrics_
from daskdl.parallel import averaging
from daskdl.parallel.layouts import layout_of
from daskdl.parallel.sharding import ShardedOptimizer
from daskdl.rank.context import RankContext
from daskdl.training.base import Step, TrainingSpec
from daskdl.training.engine import make_optimizer, prepare_optimizer, train_step


class ReplicaSteps:
    """One rank's replica, optimizer and averager, and how it takes a step."""

    def __init__(self, loop: TrainingSpec, ctx: RankContext):
        self.loop, self.ctx = loop, ctx
        self.cfg = cfg = ctx.options
        self.device = ctx.device
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest kernels
        shape = loop.input_shape
        self.channels_last = len(shape) == 3 and (
            cfg.channels_last if cfg.channels_last is not None else self.device.type == "cuda"
        )
        self.augment = cfg.augment if cfg.augment is not None else _auto_augment(shape)
        self.objective = loop.objective
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.model = models.build(loop.model, shape, self.objective.n_outputs).to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stubs lack it
        fused = cfg.fused if cfg.fused is not None else self.device.type == "cuda"
        self.opt: torch.optim.Optimizer | ShardedOptimizer
        if cfg.shard:  # the optimizer over this rank's part of the state, and its averager
            fused = False
            self.opt = ctx.sharded(self.model, lambda ps: make_optimizer(ps, cfg), cfg.shard)
        else:
            self.opt = make_optimizer(self.model.parameters(), cfg, fused)
        self.sync = ctx.averaging(self.model, self.opt)
        self.start_epoch = ctx.restore(self.model, self.opt, averaging=self.sync)
        prepare_optimizer(self.opt, fused)
        if not cfg.shard:  # sharded state goes with a lost rank: regroups use checkpoints
            ctx.follow(self.model, self.opt, averaging=self.sync)
        self.data_parallel = ctx.world_size
        self.skips_together = self.sync.skips_together
        self.val = None  # the validation shard, where it is held in memory
        if "val" in ctx.datasets and not ctx.streamed("val"):
            Xv, yv = ctx.shard("val")
            if self.device.type == "cuda" and Xv.nbytes <= 0.25 * _free(self.device):
                Xv, yv = Xv.to(self.device), yv.to(self.device)
            self.val = [(Xv, yv)]
        self.autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if cfg.precision == "bf16"
            else nullcontext()
        )
        # Compiled for speed only: checkpoints and results come from the plain module.
        self.forward = torch.compile(self.model) if cfg.compile else self.model

    def batches(self, epoch: int, first_step: int):
        cfg = self.cfg
        return self.ctx.batches(
            "train", cfg.batch_size, epoch, cfg.shuffle, start=first_step, augment=self.augment,
            channels_last=self.channels_last,
        )  # fmt: skip

    def train(self) -> None:
        self.model.train()

    def step(self, xb, yb, lr: float, stop_requested: bool) -> Step:
        for g in self.opt.param_groups:
            g["lr"] = lr
        loss, n_correct = train_step(
            self.forward, self.opt, xb, yb, self.sync, self.autocast, stop_requested,
            self.objective,
        )  # fmt: skip
        return Step(loss, n_correct, self.sync.bad_ranks, self.sync.pending_bad)

    def step_done(self, global_step: int, end_of_epoch: bool) -> bool:
        return self.sync.step_done(global_step, end_of_epoch=end_of_epoch)

    def stop(self) -> bool:
        return self.ctx.should_stop

    def step_event(self, fields: dict) -> dict:
        if self.device.type == "cuda":
            fields["gpu_memory"] = torch.cuda.memory_allocated(self.device)
            fields["gpu_utilization"] = _gpu_utilization(self.device)
        return fields

    def whole(self):
        """The model's parameters whole on this rank meanwhile (a collective with
        ``shard="full"``, which keeps only a chunk of them outside forward and backward)."""
        return self.opt.gathered() if self.cfg.shard else nullcontext()

    def validate(self, scores: dict) -> np.ndarray:
        averaging.average_buffers(self.model, self.ctx.group)  # batch-norm statistics
        sums = np.zeros(2)
        with self.whole():  # ranks score shards of different sizes
            for Xv, yv in self.val or self.ctx.partitions("val"):
                sums += metrics_.score(
                    self.forward, Xv, yv, self.cfg.eval_batch_size, self.autocast,
                    self.objective, scores, self.loop.val_scale, self.device,
                    self.channels_last,
                )  # fmt: skip
        return sums

    def checkpoint(self, epoch: int, step: int) -> None:
        self.ctx.checkpoint(epoch, self.model, self.opt, averaging=self.sync, step=step)

    def model_tensors(self) -> dict | None:
        """The trained model's state on rank 0 (sharded: gathered by every rank)."""
        return layout_of(self.model, self.opt).trained_model(keep=self.ctx.is_main)


def _free(device: torch.device) -> int:
    return torch.cuda.mem_get_info(device)[0]


def _gpu_utilization(device: torch.device) -> float | None:
    try:  # needs nvidia-ml-py; a missing library only costs the dashboard one number
        return float(torch.cuda.utilization(device))
    except Exception:
        return None


def _auto_augment(input_shape: tuple[int, ...]) -> bool:
    # Crops and flips suit natural colour images (CIFAR-like), not digits or tabular data.
    return len(input_shape) == 3 and input_shape[0] == 3 and min(input_shape[1:]) >= 16
