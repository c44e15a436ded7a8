"""``fit``'s steps for a pipelined model (``pipeline_stages > 1``): one stage per rank.

Each replica's first stage reads the batches of the replica's shard; a step runs them through
the stages in microbatches (:class:`daskdl.parallel.pipeline.Stage`), after which every rank
updates its own stage's parameters. One small all-reduce per step lets all ranks agree on the
stop request, on non-finite steps (then no rank updates) and on the step's loss. The
validation set goes through the stages the same way, scored on the last stage; checkpoints
gather the stages into one whole model (and optimizer state) on rank 0, which any layout
resumes from. The epochs around the steps are :class:`daskdl.training.fitloop.Trainer`'s.
"""

from __future__ import annotations

import numpy as np
import torch

from daskdl import models
from daskdl.objective import metrics as metrics_
from daskdl.parallel.averaging import flagged_ranks, rank_flag
from daskdl.parallel.layouts import layout_of
from daskdl.rank.context import RankContext
from daskdl.training.base import Step, TrainingSpec
from daskdl.training.engine import make_optimizer
from daskdl.worker import process


class StageSteps:
    """One rank's stage of a pipelined fit run, its optimizer, and how it takes a step."""

    skips_together = True  # the step's all-reduce tells every rank at once
    device = torch.device("cpu")  # pipelines run on the CPU so far

    def __init__(self, loop: TrainingSpec, ctx: RankContext):
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
        self.data_parallel = self.stage.replicas
        self._stop = False

    def batches(self, epoch: int, first_step: int):
        ctx = self.ctx
        if self.stage.is_first:
            return ctx.batches(
                "train", self.cfg.batch_size, epoch, self.cfg.shuffle, start=first_step
            )
        return ctx.idle_batches(epoch, self.steps, start=first_step)

    def train(self) -> None:
        self.stage.module.train()

    def step(self, xb, yb, lr: float, stop_requested: bool) -> Step:
        correct = torch.zeros((), dtype=torch.int64)

        def loss_fn(outputs, targets):
            nonlocal correct
            correct += self.objective.correct(outputs.detach(), targets)
            return self.objective.loss_of(outputs, targets)

        if self.opt is not None:
            self.opt.zero_grad()
            for group in self.opt.param_groups:
                group["lr"] = lr
        loss = self.stage.train_step(xb, yb, loss_fn)
        self._stop, bad_ranks, loss_sum = self._agree(loss, stop_requested)
        if not bad_ranks and self.opt is not None:
            self.opt.step()
        # The replicas' mean loss, the same on every rank (the last stages computed it).
        agreed = torch.tensor(loss_sum / self.stage.replicas, dtype=torch.float64)
        return Step(agreed, correct, bad_ranks)

    def _agree(self, loss, stop_requested: bool) -> tuple[bool, list[int], float]:
        """Every rank's stop request, the ranks whose loss or gradients were not finite, and
        the replicas' summed loss: one all-reduce."""
        bad = loss is not None and not torch.isfinite(loss)
        for p in self.stage.parameters():
            bad = bad or (p.grad is not None and not torch.isfinite(p.grad).all())
        rank = self.ctx.rank
        control = np.array([float(stop_requested), float(bad) * rank_flag(rank), 0.0])
        if loss is not None:
            control[2] = float(loss)
        control = self.ctx.all_reduce(control)
        bad_ranks = flagged_ranks(round(control[1]), self.ctx.world_size)
        return control[0] > 0, bad_ranks, float(control[2])

    def step_done(self, global_step: int, end_of_epoch: bool) -> bool:
        return self._stop

    def stop(self) -> bool:
        # The step's all-reduce told every rank; the context's agreement (one more
        # all-reduce, once) records it as any loop's would.
        return self.ctx.should_stop

    def step_event(self, fields: dict) -> dict:
        stats = self.stage.stats
        step_time = stats["step"]
        return {
            **fields,
            "stage": self.stage.index,
            "forward_time": stats["forward"],
            "backward_time": stats["backward"],
            "step_time": step_time,
            "bubble": stats["wait"] / step_time if step_time else 0.0,
            "activation_bytes": stats["bytes_sent"],
            "samples_per_s": self.cfg.batch_size / step_time if step_time else 0.0,
        }

    def validate(self, scores: dict) -> np.ndarray:
        """The validation set through the stages, scored on the last ones."""
        sums = np.zeros(2)  # the validation loss sum and count (last stages)
        scale = self.loop.val_scale

        def score(outputs, yb):
            loss = self.objective.loss_of(outputs, self.objective.model_targets(yb, scale))
            sums[:] += [float(loss) * len(yb), len(yb)]
            metrics_.update(scores, *self.objective.metric_inputs(outputs, yb, scale))

        self.stage.evaluate(self._val_batches() if self.stage.is_first else None, score)
        return sums

    def _val_batches(self):
        size = self.cfg.eval_batch_size
        for X, y in self.ctx.partitions("val"):
            for start in range(0, len(X), size):
                yield X[start : start + size], y[start : start + size]

    def checkpoint(self, epoch: int, step: int) -> None:
        self.ctx.checkpoint(epoch, self.stage, self.opt, step=step)

    def model_tensors(self) -> dict | None:
        """The whole trained model on rank 0 (every rank of replica 0 takes part), once
        training is over: the optimizer's state and the gradients go first, to make room."""
        self.opt = None
        return layout_of(self.stage).trained_model(keep=self.ctx.is_main)
