"""``fit``'s training loop: a ``train_fn`` of a :class:`daskdl.RankContext`, as a user's is.

One :class:`Trainer` runs every layout's epochs: the batches, the learning-rate schedule, the
rule for non-finite steps, the throttled step events, the epoch's metrics agreed over the
ranks, validation and the checkpoint cadence. What a step *is* belongs to a step runner
(:class:`StepRunner`): a whole replica that averages its gradients or parameters
(:class:`daskdl.training.replica.ReplicaSteps`, also sharded), or a pipeline stage
(:class:`daskdl.training.stages.StageSteps`), as torchtitan's one trainer branches once for
pipelines.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import numpy as np
import psutil
import torch

from daskdl.objective import metrics as metrics_
from daskdl.rank.context import RankContext
from daskdl.training.base import StepRunner, TrainingSpec
from daskdl.training.engine import lr_at
from daskdl.training.replica import ReplicaSteps
from daskdl.training.stages import StageSteps


@dataclass
class FitLoop(TrainingSpec):
    """The built-in loop, with what it trains: small, so that it travels with every rank."""

    def __call__(self, ctx: RankContext) -> dict | None:
        pipelined = ctx.options.pipeline_stages > 1
        runner = StageSteps(self, ctx) if pipelined else ReplicaSteps(self, ctx)
        trainer = Trainer(self, ctx, runner)
        cfg, start = ctx.options, runner.start_epoch
        for epoch in range(start, cfg.epochs):
            metrics = trainer.train_epoch(epoch, ctx.resume_step if epoch == start else 0)
            if metrics is None:  # every rank agreed to stop
                break
            trainer.finish_epoch(epoch, metrics)
            if epoch + 1 < cfg.epochs:
                ctx.wait_for_release(epoch + 1)
            if epoch + 1 < cfg.epochs and ctx.should_regroup:
                ctx.regroup()  # workers joined: go on with more ranks
        tensors = runner.model_tensors()
        return {"model": tensors} if ctx.is_main else None


class Trainer:
    """One rank's epochs, whatever its layout: the loop around a :class:`StepRunner`."""

    def __init__(self, loop: TrainingSpec, ctx: RankContext, runner: StepRunner):
        self.loop, self.ctx, self.runner = loop, ctx, runner
        self.cfg = ctx.options
        self.objective = loop.objective
        self.steps = ctx.steps_per_epoch("train", self.cfg.batch_size)
        self.has_val = "val" in ctx.datasets
        self.process = psutil.Process(os.getpid())
        self._base = 0  # the run's step count when the epoch being trained began

    def train_epoch(self, epoch: int, first_step: int = 0) -> dict | None:
        """One pass over this rank's shard (from batch ``first_step``, when a regrouped run
        starts part-way); ``None`` if the run was stopped part-way."""
        cfg, steps, ctx, runner = self.cfg, self.steps, self.ctx, self.runner
        runner.train()
        t_epoch = self._last_log = time.perf_counter()
        self._logged_steps = 0
        skipped = 0
        device = runner.device
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        # Non-finite steps flagged on the device (see GradientAveraging.pending_bad), read
        # when a step is logged, which waits for the device anyway.
        flags = torch.zeros(steps, dtype=torch.bool, device=device)
        self._flags_read = first_step
        lr = lr_at(epoch * steps + first_step, steps * cfg.epochs, cfg, steps)
        self._base = base = ctx.steps_before(epoch, steps)
        for s, (xb, yb) in enumerate(runner.batches(epoch, first_step), first_step):
            global_step = base + s
            lr = lr_at(epoch * steps + s, steps * cfg.epochs, cfg, steps)
            step = runner.step(xb, yb, lr, ctx.stop_requested)
            if step.pending is not None:
                flags[s] = step.pending
                loss_sum += torch.where(step.pending, 0.0, step.loss)
                correct += torch.where(step.pending, 0, step.correct)
            elif step.bad_ranks:
                self._nonfinite(epoch, s, global_step, step.bad_ranks)
                skipped += 1
            else:
                loss_sum += step.loss
                correct += step.correct
            stopped = runner.step_done(global_step, end_of_epoch=s == steps - 1)
            logged = self._log_step(epoch, s, global_step, step.loss, lr, stopped)
            if logged and step.pending is not None:
                skipped += self._read_flags(flags, epoch, s + 1)
            if stopped and runner.stop():
                return None
        train_time = time.perf_counter() - t_epoch
        ran = steps - first_step
        applied = ran - skipped
        # No step ran when a regrouped run picks up an epoch whose steps were all done.
        accuracy = correct.item() / (applied * cfg.batch_size) if applied else float("nan")
        return {
            "step": base + steps,
            "train_loss": loss_sum.item() / applied if applied else float("nan"),
            "train_accuracy": accuracy if self.objective.is_classifier else None,
            "skipped_steps": skipped,
            "samples_per_s": runner.data_parallel * cfg.batch_size * ran / train_time,
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
        fields = {
            "epoch": epoch + 1,
            "step": global_step + 1,
            "loss": value,
            "samples_per_s": n_steps * self.cfg.batch_size / (now - self._last_log),
            "step_time": (now - self._last_log) / n_steps,
            "rss": self.process.memory_info().rss,
            "lr": lr,
        }
        self.ctx.emit("step", **self.runner.step_event(fields))
        self._last_log, self._logged_steps = now, s + 1
        return True

    def finish_epoch(self, epoch: int, metrics: dict) -> None:
        """Evaluate, agree on the epoch's metrics, log the epoch, and checkpoint."""
        ctx, cfg, runner = self.ctx, self.cfg, self.runner
        # One small all-reduce: this rank's training means, its validation loss sum and count
        # (zeros on a rank that scores none; every rank joins either way), its skipped steps;
        # then the metrics' states.
        sums = np.zeros(5)
        sums[0] = metrics["train_loss"]
        sums[1] = metrics["train_accuracy"] or 0.0
        sums[4] = metrics["skipped_steps"]
        scores = {}
        if self.has_val:
            scores = metrics_.build(self.loop.metrics, self.objective, runner.device)
            sums[2:4] = runner.validate(scores)
        sums = ctx.all_reduce(sums)
        metrics["train_loss"] = float(sums[0] / ctx.world_size)
        if metrics["train_accuracy"] is not None:
            # Ranks that scored no training samples (a pipeline's first stages) add zeros.
            metrics["train_accuracy"] = float(sums[1] / runner.data_parallel)
        # Skipped by every rank at once: counted once. Local SGD's ranks skip on their own.
        shared = runner.skips_together
        metrics["skipped_steps"] = int(round(sums[4] / (ctx.world_size if shared else 1)))
        if self.has_val:
            metrics["val_loss"] = float(sums[2] / sums[3]) if sums[3] else None
            for name, value in metrics_.values(scores, ctx.group).items():
                metrics[f"val_{name}"] = value
            if self.objective.loss == "cross_entropy" and metrics["val_loss"] is not None:
                # exp(mean cross-entropy): the language models' metric, for any classifier.
                metrics["val_perplexity"] = math.exp(min(metrics["val_loss"], 700.0))
        ctx.log(epoch, **metrics)
        done = epoch + 1
        if done % cfg.checkpoint_every == 0 or done == cfg.epochs:
            runner.checkpoint(epoch, metrics["step"])
