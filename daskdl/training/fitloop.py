"""``fit``'s training loop: a ``train_fn`` of a :class:`daskdl.RankContext`, as a user's is.

Every rank builds the same model from the context's seeded random state, trains on the batches
of its shard, and averages gradients (or, with local SGD, parameters) with its peers; after
every epoch the ranks agree on batch-norm statistics, score their validation shards, combine
the metrics' states and log the epoch; rank 0 writes the checkpoints.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import psutil
import torch

from daskdl import models
from daskdl.checkpoint import files as checkpoint
from daskdl.objective import metrics as metrics_
from daskdl.objective.task import Objective, Scale
from daskdl.parallel import averaging
from daskdl.parallel.sharding import ShardedOptimizer
from daskdl.rank.context import RankContext
from daskdl.training.engine import (
    lr_at,
    make_optimizer,
    prepare_optimizer,
    train_step,
)
from daskdl.training.pipeloop import PipelineTrainer


@dataclass
class FitLoop:
    """The built-in loop, with what it trains: small, so that it travels with every rank."""

    model: models.ModelSpec
    input_shape: tuple[int, ...]
    objective: Objective
    metrics: dict = field(default_factory=dict)  # validation metrics: names or Metric objects
    val_scale: Scale | None = None  # how the validation targets were standardised
    log_interval: float = 0.5  # seconds between step events

    def __call__(self, ctx: RankContext) -> dict | None:
        pipelined = ctx.options.pipeline_stages > 1
        trainer = PipelineTrainer(self, ctx) if pipelined else Trainer(self, ctx)
        cfg, start = ctx.options, trainer.start_epoch
        for epoch in range(start, cfg.epochs):
            metrics = trainer.train_epoch(epoch, ctx.resume_step if epoch == start else 0)
            if metrics is None:  # every rank agreed to stop
                break
            trainer.finish_epoch(epoch, metrics)
            if epoch + 1 < cfg.epochs:
                ctx.wait_for_release(epoch + 1)
            if epoch + 1 < cfg.epochs and ctx.should_regroup:
                ctx.regroup()  # workers joined: go on with more ranks
        tensors = trainer.model_tensors()
        return {"model": tensors} if ctx.is_main else None


class Trainer:
    """One rank's replica, optimizer and averager, and how it trains an epoch."""

    def __init__(self, loop: FitLoop, ctx: RankContext):
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
        self.steps = ctx.steps_per_epoch("train", cfg.batch_size)
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
        self.has_val = "val" in ctx.datasets
        self.val = None  # the validation shard, where it is held in memory
        if self.has_val and not ctx.streamed("val"):
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
        self.process = psutil.Process(os.getpid())
        self._base = 0  # the run's step count when the epoch being trained began

    def model_tensors(self) -> dict | None:
        """The trained model's state on rank 0 (sharded: gathered by every rank, once
        training is over: the optimizer's state goes first, to make room)."""
        if isinstance(self.opt, ShardedOptimizer):  # shard=
            self.opt.optimizer.state.clear()
            self.opt.zero_grad()
            return self.opt.model_tensors(self.model, keep=self.ctx.is_main)
        return checkpoint.model_tensors(self.model) if self.ctx.is_main else None

    def whole(self):
        """The model's parameters whole on this rank meanwhile (a collective with
        ``shard="full"``, which keeps only a chunk of them outside forward and backward)."""
        return self.opt.gathered() if self.cfg.shard else nullcontext()

    def train_epoch(self, epoch: int, first_step: int = 0) -> dict | None:
        """One pass over this rank's shard (from batch ``first_step``, when a regrouped run
        starts part-way); ``None`` if the run was stopped part-way."""
        cfg, steps, B, ctx = self.cfg, self.steps, self.cfg.batch_size, self.ctx
        self.model.train()
        t_epoch = self._last_log = time.perf_counter()
        self._logged_steps = 0
        skipped = 0
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        # Non-finite steps flagged on the device (see GradientAveraging.pending_bad), read
        # when a step is logged, which waits for the device anyway.
        flags = torch.zeros(steps, dtype=torch.bool, device=self.device)
        self._flags_read = first_step
        lr = lr_at(epoch * steps + first_step, steps * cfg.epochs, cfg, steps)
        self._base = base = ctx.steps_before(epoch, steps)
        batches = ctx.batches(
            "train", B, epoch, cfg.shuffle, start=first_step, augment=self.augment,
            channels_last=self.channels_last,
        )  # fmt: skip
        for s, (xb, yb) in enumerate(batches, first_step):
            global_step = base + s
            lr = lr_at(epoch * steps + s, steps * cfg.epochs, cfg, steps)
            for g in self.opt.param_groups:
                g["lr"] = lr
            loss, n_correct = train_step(
                self.forward, self.opt, xb, yb, self.sync, self.autocast,
                ctx.stop_requested, self.objective,
            )  # fmt: skip
            pending = self.sync.pending_bad
            if pending is not None:
                flags[s] = pending
                loss_sum += torch.where(pending, 0.0, loss)
                correct += torch.where(pending, 0, n_correct)
            elif self.sync.bad_ranks:
                self._nonfinite(epoch, s, global_step, self.sync.bad_ranks)
                skipped += 1
            else:
                loss_sum += loss
                correct += n_correct
            stopped = self.sync.step_done(global_step, end_of_epoch=s == steps - 1)
            if self._log_step(epoch, s, global_step, loss, lr, stopped) and pending is not None:
                skipped += self._read_flags(flags, epoch, s + 1)
            if stopped and ctx.should_stop:
                return None
        train_time = time.perf_counter() - t_epoch
        ran = steps - first_step
        applied = ran - skipped
        return {
            "epoch": epoch + 1,
            "step": base + steps,
            # No step ran when a regrouped run picks up an epoch whose steps were all done.
            "train_loss": loss_sum.item() / applied if applied else float("nan"),
            "train_accuracy": (correct.item() / (applied * B) if applied else float("nan"))
            if self.objective.is_classifier
            else None,
            "skipped_steps": skipped,
            "samples_per_s": ctx.world_size * B * ran / train_time,
            "epoch_time": train_time,
            "lr": lr,
            "val_loss": None,
        }

    def _read_flags(self, flags: torch.Tensor, epoch: int, upto: int) -> int:
        """Report the steps flagged non-finite since the last read; how many."""
        bad = (flags[self._flags_read : upto].nonzero().flatten() + self._flags_read).tolist()
        self._flags_read = upto
        for s in bad:
            self._nonfinite(epoch, s, self._base + s, [self.ctx.rank])
        return len(bad)

    def _nonfinite(self, epoch: int, s: int, global_step: int, ranks: list[int]) -> None:
        where = f"step {global_step + 1} (epoch {epoch + 1}, batch {s + 1} of the epoch)"
        if self.cfg.on_nonfinite == "raise":
            raise FloatingPointError(
                f"Non-finite loss or gradient on rank(s) {ranks} at {where}; the step was not "
                "applied. Lower lr, train in fp32, check the data, or pass "
                "on_nonfinite='skip' to skip such steps."
            )
        if self.ctx.rank == ranks[0]:  # one event per skipped step, from a rank that saw it
            self.ctx.emit(
                "nonfinite", epoch=epoch + 1, step=global_step + 1, batch=s + 1, ranks=ranks
            )

    def _log_step(self, epoch, s, global_step, loss: torch.Tensor, lr: float, stopped) -> bool:
        """Log a ``step`` event, throttled (an event per step would cost more than a small
        model's step), but always on an epoch's last step and when stopping; whether it did."""
        now = time.perf_counter()
        last_step = s == self.steps - 1
        if now - self._last_log < self.loop.log_interval and not last_step and not stopped:
            return False
        value = loss.item()  # waits for the device: once per log interval, not per step
        now = time.perf_counter()
        n_steps = s + 1 - self._logged_steps
        extra: dict[str, float | None] = {}
        if self.device.type == "cuda":
            extra["gpu_memory"] = torch.cuda.memory_allocated(self.device)
            extra["gpu_utilization"] = _gpu_utilization(self.device)
        self.ctx.emit(
            "step",
            epoch=epoch + 1,
            step=global_step + 1,
            loss=value,
            samples_per_s=n_steps * self.cfg.batch_size / (now - self._last_log),
            step_time=(now - self._last_log) / n_steps,
            rss=self.process.memory_info().rss,
            lr=lr,
            **extra,
        )
        self._last_log, self._logged_steps = now, s + 1
        return True

    def finish_epoch(self, epoch: int, metrics: dict) -> None:
        """Agree on batch-norm statistics, evaluate, log the epoch, and checkpoint."""
        ctx, cfg = self.ctx, self.cfg
        averaging.average_buffers(self.model, ctx.group)
        # One small all-reduce: this rank's training means, its validation loss sum and count
        # (zeros on a rank without validation partitions; every rank joins either way), its
        # skipped steps; then the metrics' states.
        sums = np.zeros(5)
        sums[0] = metrics["train_loss"]
        sums[1] = metrics["train_accuracy"] or 0.0
        sums[4] = metrics["skipped_steps"]
        if self.has_val:
            scores = metrics_.build(self.loop.metrics, self.objective, self.device)
            with self.whole():  # ranks score shards of different sizes
                for Xv, yv in self.val or ctx.partitions("val"):
                    sums[2:4] += metrics_.score(
                        self.forward, Xv, yv, cfg.eval_batch_size, self.autocast,
                        self.objective, scores, self.loop.val_scale, self.device,
                        self.channels_last,
                    )  # fmt: skip
        sums = ctx.all_reduce(sums)
        metrics["train_loss"] = float(sums[0] / ctx.world_size)
        if metrics["train_accuracy"] is not None:
            metrics["train_accuracy"] = float(sums[1] / ctx.world_size)
        # Per-step averaging skips a step on every rank at once: count it once. Local SGD
        # ranks skip on their own: count every rank's.
        shared = self.sync.skips_together
        metrics["skipped_steps"] = int(round(sums[4] / (ctx.world_size if shared else 1)))
        if self.has_val:
            metrics["val_loss"] = float(sums[2] / sums[3])
            for name, value in metrics_.values(scores, ctx.group).items():
                metrics[f"val_{name}"] = value
            if self.objective.loss == "cross_entropy":
                # exp(mean cross-entropy): the language models' metric, for any classifier.
                metrics["val_perplexity"] = math.exp(min(metrics["val_loss"], 700.0))
        del metrics["epoch"]
        ctx.log(epoch, **metrics)
        done = epoch + 1
        if done % cfg.checkpoint_every == 0 or done == cfg.epochs:
            ctx.checkpoint(epoch, self.model, self.opt, averaging=self.sync, step=metrics["step"])


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
