"""The rank loop: what one long-lived task on one Dask worker does for a whole run.

Every rank builds the same model from the same seed, trains on the partitions the shard plan
gave it, and averages gradients with its peers after every backward pass. Rank 0 also reports
epochs and writes checkpoints.
"""

from __future__ import annotations

import copy
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import psutil
import torch
from distributed import get_worker

from daskdl import averaging, checkpoint, events, models, rundir, security
from daskdl import metrics as metrics_
from daskdl.comm import CollectiveError, DaskGroup, make_group
from daskdl.config import TrainConfig
from daskdl.loader import ShardLoader, concat
from daskdl.objective import Objective, Scale
from daskdl.worker import manager


@dataclass
class RankSpec:
    """Everything one rank needs besides its data: small, so it travels with the task."""

    run_id: str
    rank: int
    peers: list[str]
    model: models.ModelSpec
    input_shape: tuple[int, ...]
    objective: Objective
    config: dict
    n_train_parts: int
    steps_per_epoch: int
    has_val: bool = False
    metrics: dict = field(default_factory=dict)  # validation metrics: names or Metric objects
    val_scale: Scale | None = None  # how the validation targets were standardised
    start_epoch: int = 0
    out: str | None = None
    staging: str | None = None  # a replacing run's folder until its first checkpoint
    manifest: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    # Resolved from the client's dask.config: workers may have other settings.
    log_interval: float = 0.5
    keep_checkpoints: int | None = 3
    pause_profiler: bool = True
    # Elastic training: the ranks of one membership talk under their own comm id, and a
    # regrouped run starts part-way through an epoch.
    comm_id: str = ""
    start_step: int = 0
    elastic: bool = False
    signing_key: security.Key | None = None  # signs the checkpoints rank 0 writes


@dataclass
class RankContext:
    """What rank code can ask about where it runs; logging is gated on ``is_main`` by callers."""

    rank: int
    world_size: int
    device: torch.device
    run_id: str
    worker: object

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def log(self, kind: str, **fields) -> None:
        events.emit(self.worker, self.run_id, kind, rank=self.rank, **fields)


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


def make_optimizer(
    model: torch.nn.Module, cfg: TrainConfig, fused: bool = False
) -> torch.optim.Optimizer:
    """SGD or AdamW. ``fused`` updates all parameters in one kernel, and skips a non-finite
    step on the device (``found_inf``), which lets a rank that decides alone (a single
    rank, or local SGD between synchronisations) run on a GPU without waiting for it every
    step (see ``train_step``)."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(
            model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None
        )
    return torch.optim.SGD(
        model.parameters(),
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov and cfg.momentum > 0,
        weight_decay=cfg.weight_decay,
        # None, not False: False would also turn off the default foreach kernels.
        fused=fused or None,
    )


def load_resumed(model: torch.nn.Module, opt: torch.optim.Optimizer, resume: dict) -> None:
    """Load the model and optimizer state a resumed or regrouped run starts from, leaving
    ``resume`` as it was.

    ``resume`` is a task input, one object on the worker that holds it, which Dask sends to the
    other ranks' workers when they ask for it; the optimizer keeps (and steps in place) the
    tensors it is given, so it gets copies, or a peer could start from this rank's steps.
    """
    model.load_state_dict({k: torch.from_numpy(v) for k, v in resume["model"].items()})
    opt_state = resume["optimizer"]
    opt.load_state_dict(copy.deepcopy({k: opt_state[k] for k in ("state", "param_groups")}))


def prepare_optimizer(opt: torch.optim.Optimizer, fused: bool) -> None:
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


def average_buffers(model: torch.nn.Module, group: DaskGroup) -> None:
    """Batch-norm statistics differ per rank; average them so every replica evaluates alike."""
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    if not buffers or group.size == 1:
        return
    flat = torch.cat([b.reshape(-1) for b in buffers])
    group.allreduce_mean_(flat)
    offset = 0
    for b in buffers:
        b.copy_(flat[offset : offset + b.numel()].view_as(b))
        offset += b.numel()


def resolve_device(name: str) -> torch.device:
    """``"auto"``: the worker's GPU if it sees one, else the CPU. dask-cuda puts each worker's
    own GPU first in ``CUDA_VISIBLE_DEVICES``, so that is always ``cuda:0``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device='cuda', but this worker sees no CUDA GPU.")
        return torch.device("cuda", 0)
    return torch.device("cpu")


def rank_main(spec: RankSpec, resume: dict | None, *parts: np.ndarray) -> dict | None:
    """The body of one rank task. ``parts`` are (X, y) blocks: the training partitions first,
    then the validation partitions; Dask delivered them to this worker before the task started.
    """
    tuning = manager().tuning
    with (
        tuning.malloc(),
        tuning.denormals(),
        tuning.profiler_paused(get_worker(), spec.pause_profiler),
    ):
        return _rank_main(spec, resume, *parts)


def _rank_main(spec: RankSpec, resume: dict | None, *parts: np.ndarray) -> dict | None:
    rank = Rank(spec, resume, parts)
    try:
        for epoch in range(spec.start_epoch, rank.cfg.epochs):
            first = spec.start_step if epoch == spec.start_epoch else 0
            metrics = rank.train_epoch(epoch, first)
            if metrics is None:  # every rank agreed to stop
                break
            rank.finish_epoch(epoch, metrics)
            rank.position = (epoch + 1, 0)
            if rank.regroup and spec.elastic and epoch + 1 < rank.cfg.epochs:
                return rank.elastic_state(None)  # workers joined: go on with more ranks
    except CollectiveError as e:
        if not spec.elastic:
            raise
        # A peer is gone. This replica is as it was after the last step every rank finished
        # (a failed collective never reaches the optimizer): hand it to the coordinator,
        # which regroups the survivors and carries on from here.
        return rank.elastic_state(e)
    finally:
        rank.sync.close()
        rank.group.close()
    if not rank.ctx.is_main:
        return None
    return {
        "model": checkpoint.model_tensors(rank.model),
        "history": rank.history,
        "stopped": rank.stopped,
    }


class Rank:
    """The state of one rank: its shard, its replica, its optimizer and its peers."""

    def __init__(self, spec: RankSpec, resume: dict | None, parts: tuple[np.ndarray, ...]):
        worker = get_worker()
        self.spec = spec
        self.cfg = cfg = TrainConfig.from_dict(spec.config)
        torch.set_num_threads(cfg.torch_threads or max(1, worker.state.nthreads))
        self.device = resolve_device(cfg.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest kernels
        images = len(spec.input_shape) == 3
        self.channels_last = images and (
            cfg.channels_last if cfg.channels_last is not None else self.device.type == "cuda"
        )
        self.ctx = RankContext(spec.rank, len(spec.peers), self.device, spec.run_id, worker)
        n = 2 * spec.n_train_parts
        augment = cfg.augment if cfg.augment is not None else _auto_augment(spec.input_shape)
        self.objective = objective = spec.objective
        self.loader = ShardLoader(
            parts[0:n:2],
            parts[1:n:2],
            cfg.batch_size,
            spec.steps_per_epoch,
            cfg.seed,
            spec.rank,
            cfg.shuffle,
            augment,
            self.device,
            self.channels_last,
            y_dtype=objective.target_dtype,
        )
        self.Xv = concat(parts[n::2], np.float32)
        self.yv = concat(parts[n + 1 :: 2], objective.target_dtype)
        if self.loader.on_device:  # room for the training shard: the validation one goes too
            self.Xv, self.yv = self.Xv.to(self.device), self.yv.to(self.device)

        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.model = models.build(spec.model, spec.input_shape, objective.n_outputs)
        self.model = self.model.to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        fused = cfg.fused if cfg.fused is not None else self.device.type == "cuda"
        self.opt = make_optimizer(self.model, cfg, fused)
        if resume is not None:
            load_resumed(self.model, self.opt, resume)
        prepare_optimizer(self.opt, fused)
        self.group = make_group(
            cfg.backend, worker, spec.comm_id or spec.run_id, spec.rank, spec.peers, cfg.timeout
        )
        self.sync = averaging.make(self.model, self.opt, self.group, cfg)
        if resume is not None:
            self.sync.load_state(resume["optimizer"].get("outer", {}))
        self.autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if cfg.precision == "bf16"
            else nullcontext()
        )
        # Compiled for speed only: checkpoints and results come from the plain module.
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        self.process = psutil.Process(os.getpid())
        self.worker, self.task_key = worker, worker.get_current_task()
        self.history = list(spec.history)
        self.stopped = False
        self.position = (spec.start_epoch, spec.start_step)  # (epoch, steps of it done)
        self.regroup = False

    def elastic_state(self, error: Exception | None) -> dict:
        epoch, step = self.position
        return {
            "elastic": "join" if error is None else f"{type(error).__name__}: {error}",
            "rank": self.ctx.rank,
            "epoch": epoch,
            "step": step,
            "steps_per_epoch": self.spec.steps_per_epoch,
            "model": checkpoint.model_tensors(self.model),
            "optimizer": checkpoint.optimizer_tensors(self.opt, outer=self.sync.state_tensors()),
            "history": self.history,
        }

    def train_epoch(self, epoch: int, first_step: int = 0) -> dict | None:
        """One pass over this rank's shard (from batch ``first_step``, when a regrouped run
        starts part-way); ``None`` if the run was stopped part-way."""
        cfg, steps, B = self.cfg, self.spec.steps_per_epoch, self.cfg.batch_size
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
        for s, (xb, yb) in enumerate(self.loader.epoch(epoch, first_step), first_step):
            global_step = epoch * steps + s
            lr = lr_at(global_step, steps * cfg.epochs, cfg, steps)
            for g in self.opt.param_groups:
                g["lr"] = lr
            loss, n_correct = train_step(
                self.forward,
                self.opt,
                xb,
                yb,
                self.sync,
                self.autocast,
                self.group.box.stop_requested,
                self.objective,
            )
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
            self.stopped = self.sync.step_done(global_step, end_of_epoch=s == steps - 1)
            self.position = (epoch, s + 1)
            if self._log_step(epoch, s, global_step, loss, lr) and pending is not None:
                skipped += self._read_flags(flags, epoch, s + 1)
            if self.stopped:
                return None
        loss_sum, correct = loss_sum.item(), correct.item()
        train_time = time.perf_counter() - t_epoch
        ran = steps - first_step
        applied = ran - skipped
        return {
            "epoch": epoch + 1,
            "step": (epoch + 1) * steps,
            # No step ran when a regrouped run picks up an epoch whose steps were all done.
            "train_loss": loss_sum / applied if applied else float("nan"),
            "train_accuracy": (correct / (applied * B) if applied else float("nan"))
            if self.objective.is_classifier
            else None,
            "skipped_steps": skipped,
            "samples_per_s": self.ctx.world_size * B * ran / train_time,
            "epoch_time": train_time,
            "lr": lr,
            "val_loss": None,
        }

    def _orphaned(self) -> bool:
        """Whether the scheduler released this rank's task: its client is gone."""
        task = self.worker.state.tasks.get(self.task_key)
        return task is None or task.state in ("cancelled", "released", "forgotten")

    def _read_flags(self, flags: torch.Tensor, epoch: int, upto: int) -> int:
        """Report the steps flagged non-finite since the last read; how many."""
        steps = self.spec.steps_per_epoch
        bad = (flags[self._flags_read : upto].nonzero().flatten() + self._flags_read).tolist()
        self._flags_read = upto
        for s in bad:
            self._nonfinite(epoch, s, epoch * steps + s, [self.ctx.rank])
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
            self.ctx.log(
                "nonfinite", epoch=epoch + 1, step=global_step + 1, batch=s + 1, ranks=ranks
            )

    def _log_step(
        self, epoch: int, s: int, global_step: int, loss: torch.Tensor, lr: float
    ) -> bool:
        """Log a ``step`` event, throttled (an event per step would cost more than a small
        model's step), but always on an epoch's last step and when stopping; whether it did."""
        now = time.perf_counter()
        last_step = s == self.spec.steps_per_epoch - 1
        if now - self._last_log < self.spec.log_interval and not last_step and not self.stopped:
            return False
        if self._orphaned():
            # Nobody wants the result any more (the client that started the run died, or
            # released it): stop after the next step, on every rank alike, as run.stop() does.
            self.group.box.stop_requested = True
        loss = loss.item()  # waits for the device: once per log interval, not per step
        now = time.perf_counter()
        n_steps = s + 1 - self._logged_steps
        extra = {}
        if self.device.type == "cuda":
            extra["gpu_memory"] = torch.cuda.memory_allocated(self.device)
            extra["gpu_utilization"] = _gpu_utilization(self.device)
        self.ctx.log(
            "step",
            epoch=epoch + 1,
            step=global_step + 1,
            loss=loss,
            samples_per_s=n_steps * self.cfg.batch_size / (now - self._last_log),
            step_time=(now - self._last_log) / n_steps,
            rss=self.process.memory_info().rss,
            lr=lr,
            **extra,
        )
        self._last_log, self._logged_steps = now, s + 1
        return True

    def finish_epoch(self, epoch: int, metrics: dict) -> None:
        """Agree on batch-norm statistics, evaluate, and (rank 0) report and checkpoint."""
        average_buffers(self.model, self.group)
        # One small all-reduce: this rank's training means, its validation loss sum and count
        # (zeros on a rank without validation partitions; every rank joins either way), its
        # skipped steps, its regroup request; then the metrics' states.
        sums = np.zeros(6)
        sums[0] = metrics["train_loss"]
        sums[1] = metrics["train_accuracy"] or 0.0
        sums[4] = metrics["skipped_steps"]
        sums[5] = float(self.group.box.regroup_requested)
        if self.spec.has_val:
            scores = metrics_.build(self.spec.metrics, self.objective, self.device)
            sums[2:4] = metrics_.score(
                self.forward,
                self.Xv,
                self.yv,
                self.cfg.eval_batch_size,
                self.autocast,
                self.objective,
                scores,
                self.spec.val_scale,
                self.device,
                self.channels_last,
            )
        self.group.allreduce_(sums)
        self.regroup = bool(sums[5] > 0)  # every rank agrees to hand back its state now
        metrics["train_loss"] = float(sums[0] / self.ctx.world_size)
        if metrics["train_accuracy"] is not None:
            metrics["train_accuracy"] = float(sums[1] / self.ctx.world_size)
        # Per-step averaging skips a step on every rank at once: count it once. Local SGD
        # ranks skip on their own: count every rank's.
        shared = isinstance(self.sync, averaging.GradientAveraging)
        metrics["skipped_steps"] = int(round(sums[4] / (self.ctx.world_size if shared else 1)))
        if self.spec.has_val:
            metrics["val_loss"] = float(sums[2] / sums[3])
            for name, value in metrics_.values(scores, self.group).items():
                metrics[f"val_{name}"] = value
            if self.objective.loss == "cross_entropy":
                # exp(mean cross-entropy): the language models' metric, for any classifier.
                metrics["val_perplexity"] = math.exp(min(metrics["val_loss"], 700.0))
        self.history.append(metrics)
        if not self.ctx.is_main:
            return
        self.ctx.log("epoch", **metrics)
        done = epoch + 1
        if self.spec.out and (done % self.cfg.checkpoint_every == 0 or done == self.cfg.epochs):
            path = rundir.save_checkpoint(
                self.spec.out,
                self.spec.staging,
                done,
                checkpoint.model_tensors(self.model),
                checkpoint.optimizer_tensors(self.opt, outer=self.sync.state_tensors()),
                {**self.spec.manifest, "step": metrics["step"], "history": self.history},
                self.spec.keep_checkpoints,
                self.spec.signing_key,
            )
            self.ctx.log("checkpoint", epoch=done, path=str(path))


def _gpu_utilization(device: torch.device) -> float | None:
    try:  # needs nvidia-ml-py; a missing library only costs the dashboard one number
        return float(torch.cuda.utilization(device))
    except Exception:
        return None


def _auto_augment(input_shape: tuple[int, ...]) -> bool:
    # Crops and flips suit natural colour images (CIFAR-like), not digits or tabular data.
    return len(input_shape) == 3 and input_shape[0] == 3 and min(input_shape[1:]) >= 16
