"""``fit``'s loop for a pipelined model (``pipeline_stages > 1``): one stage per rank.

Each replica's first stage reads the batches of the replica's shard; a step runs them through
the stages in microbatches (:class:`daskdl.parallel.pipeline.Stage`), after which every rank updates
its own stage's parameters. One small all-reduce per step lets all ranks agree on the stop
request, on non-finite steps (then no rank updates) and on the step's loss. The validation
set goes through the stages the same way, scored on the last stage; checkpoints gather the
stages into one whole model (and optimizer state) on rank 0, which any layout resumes from.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np
import psutil
import torch

from daskdl import models
from daskdl.objective import metrics as metrics_
from daskdl.rank.context import RankContext
from daskdl.training.engine import lr_at, make_optimizer
from daskdl.worker import process


class PipelineTrainer:
    """One rank's stage of a pipelined fit run, its optimizer, and how it trains an epoch."""

    def __init__(self, loop, ctx: RankContext):
        self.loop, self.ctx = loop, ctx
        self.cfg = cfg = ctx.options
        pipe = cfg.pipeline()
        if pipe is None:
            raise ValueError("the pipeline loop needs pipeline_stages: pass pipeline=.")
        self.pipe = pipe
        self.objective = loop.objective
        shape = loop.input_shape
        torch.manual_seed(cfg.seed)  # the same whole model on every rank, then cut
        model = models.build(loop.model, shape, self.objective.n_outputs)
        g = torch.Generator().manual_seed(cfg.seed)
        sample = torch.randn(max(1, cfg.batch_size // self.pipe.microbatches), *shape, generator=g)
        self.stage = ctx.pipeline(model, self.pipe, sample)
        # Targets travel as float32; the loss takes them in the task's dtype.
        kind = np.empty(0, dtype=self.objective.target_dtype)
        self.stage.target_dtype = torch.from_numpy(kind).dtype
        del model  # the other stages' layers go, and their memory back to the OS
        process.give_back_freed()
        params = list(self.stage.parameters())
        self.opt = make_optimizer(params, cfg) if params else None
        self.start_epoch = ctx.restore(self.stage, self.opt)
        ctx.follow(self.stage, self.opt)  # a regroup goes on from a complete replica
        self.steps = ctx.steps_per_epoch("train", cfg.batch_size)
        self.has_val = "val" in ctx.datasets
        self.process = psutil.Process(os.getpid())

    def train_epoch(self, epoch: int, first_step: int = 0) -> dict | None:
        cfg, ctx, stage, B = self.cfg, self.ctx, self.stage, self.cfg.batch_size
        stage.module.train()
        t_epoch = last_log = time.perf_counter()
        batches = (
            ctx.batches("train", B, epoch, cfg.shuffle, start=first_step)
            if stage.is_first
            else ctx.idle_batches(epoch, self.steps, start=first_step)
        )
        sums = np.zeros(3)  # loss, correct, skipped
        correct = torch.zeros((), dtype=torch.int64)
        lr = lr_at(epoch * self.steps + first_step, self.steps * cfg.epochs, cfg, self.steps)
        base = ctx.steps_before(epoch, self.steps)

        def loss_fn(outputs, targets):
            nonlocal correct
            correct += self.objective.correct(outputs.detach(), targets)
            return self.objective.loss_of(outputs, targets)

        # Run to the end, so that the context counts the last step finished too.
        for s, (xb, yb) in enumerate(batches, first_step):
            global_step = base + s
            lr = lr_at(epoch * self.steps + s, self.steps * cfg.epochs, cfg, self.steps)
            if self.opt is not None:
                self.opt.zero_grad()
                for group in self.opt.param_groups:
                    group["lr"] = lr
            loss = stage.train_step(xb, yb, loss_fn)
            stop, bad, loss_sum = self._agree(loss)
            if bad:
                self._nonfinite(epoch, s, global_step)
                sums[2] += 1
            elif self.opt is not None:
                self.opt.step()
            if not bad:
                sums[0] += loss_sum / stage.replicas
            now = time.perf_counter()
            if now - last_log >= self.loop.log_interval or s == self.steps - 1 or stop:
                self._emit_step(epoch, global_step, loss_sum / stage.replicas, lr)
                last_log = now
            if stop:
                ctx.stopped = True
                return None
        ran = self.steps - first_step
        applied = ran - sums[2]
        train_time = time.perf_counter() - t_epoch
        agreed = ctx.all_reduce(float(correct))
        return {
            "step": base + self.steps,
            "train_loss": sums[0] / applied if applied else float("nan"),
            "train_accuracy": agreed / (applied * B * stage.replicas)
            if applied and self.objective.is_classifier
            else None,
            "skipped_steps": int(sums[2]),
            "samples_per_s": stage.replicas * B * ran / train_time,
            "epoch_time": train_time,
            "lr": lr,
            "val_loss": None,
        }

    def _agree(self, loss) -> tuple[bool, bool, float]:
        """Every rank's stop request, whether any rank's loss or gradients were not finite,
        and the replicas' summed loss: one all-reduce."""
        bad = loss is not None and not torch.isfinite(loss)
        for p in self.stage.parameters():
            bad = bad or (p.grad is not None and not torch.isfinite(p.grad).all())
        control = np.array([float(self.ctx.stop_requested), float(bad), 0.0])
        if loss is not None:
            control[2] = float(loss)
        control = self.ctx.all_reduce(control)
        return control[0] > 0, control[1] > 0, float(control[2])

    def _nonfinite(self, epoch: int, s: int, global_step: int) -> None:
        where = f"step {global_step + 1} (epoch {epoch + 1}, batch {s + 1} of the epoch)"
        if self.cfg.on_nonfinite == "raise":
            raise FloatingPointError(
                f"Non-finite loss or gradient in the pipeline at {where}; the step was not "
                "applied. Lower lr, check the data, or pass on_nonfinite='skip'."
            )
        if self.ctx.is_main:
            self.ctx.emit("nonfinite", epoch=epoch + 1, step=global_step + 1, batch=s + 1)

    def _emit_step(self, epoch: int, global_step: int, loss: float, lr: float) -> None:
        stats = self.stage.stats
        self.ctx.emit(
            "step",
            epoch=epoch + 1,
            step=global_step + 1,
            loss=loss,
            lr=lr,
            stage=self.stage.index,
            forward_time=stats["forward"],
            backward_time=stats["backward"],
            step_time=stats["step"],
            bubble=stats["wait"] / stats["step"] if stats["step"] else 0.0,
            activation_bytes=stats["bytes_sent"],
            samples_per_s=self.cfg.batch_size / stats["step"] if stats["step"] else 0.0,
            rss=self.process.memory_info().rss,
        )

    def finish_epoch(self, epoch: int, metrics: dict) -> None:
        """Score the validation set through the stages, log the epoch, checkpoint."""
        ctx, cfg, stage = self.ctx, self.cfg, self.stage
        sums = np.zeros(2)  # the validation loss sum and count (last stages)
        if self.has_val:
            scores = metrics_.build(self.loop.metrics, self.objective, torch.device("cpu"))
            scale = self.loop.val_scale

            def score(outputs, yb):
                loss = self.objective.loss_of(outputs, self.objective.model_targets(yb, scale))
                sums[:] += [float(loss) * len(yb), len(yb)]
                metrics_.update(scores, *self.objective.metric_inputs(outputs, yb, scale))

            stage.evaluate(self._val_batches() if stage.is_first else None, score)
            sums = ctx.all_reduce(sums)
            metrics["val_loss"] = float(sums[0] / sums[1]) if sums[1] else None
            for name, value in metrics_.values(scores, ctx.group).items():
                metrics[f"val_{name}"] = value
            if self.objective.loss == "cross_entropy" and metrics["val_loss"] is not None:
                metrics["val_perplexity"] = math.exp(min(metrics["val_loss"], 700.0))
        ctx.log(epoch, **metrics)
        done = epoch + 1
        if done % cfg.checkpoint_every == 0 or done == cfg.epochs:
            ctx.checkpoint(epoch, stage, self.opt, step=metrics["step"])

    def _val_batches(self):
        size = self.cfg.eval_batch_size
        for X, y in self.ctx.partitions("val"):
            for start in range(0, len(X), size):
                yield X[start : start + size], y[start : start + size]

    def model_tensors(self) -> dict | None:
        """The whole trained model on rank 0 (every rank of replica 0 takes part), once
        training is over: the optimizer's state and the gradients go first, to make room."""
        self.opt = None
        self.stage.module.zero_grad(set_to_none=True)
        whole = self.stage.gather(None, keep=self.ctx.is_main)
        return whole["model"] if whole else None
