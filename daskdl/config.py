"""Training configuration: one typed, validated dataclass, turned into a plain dict for events,
checkpoints and the dashboard."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import dask.config
import dask.utils
import yaml

_defaults_file = os.path.join(os.path.dirname(__file__), "daskdl.yaml")
with open(_defaults_file) as f:
    dask.config.update_defaults(yaml.safe_load(f))

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("constant", "cosine", "onecycle")
PRECISIONS = ("fp32", "bf16")
OUTER_OPTIMIZERS = (None, "nesterov")
WIRE_DTYPES = ("fp32", "bf16")
BACKENDS = ("dask", "torch")
DEVICES = ("auto", "cpu", "cuda")
ON_NONFINITE = ("raise", "skip")


@dataclass
class TrainConfig:
    """Everything that decides what a training run computes.

    ``batch_size`` is per rank: the global batch is ``batch_size * world_size``, as with
    PyTorch's DistributedDataParallel. ``sync_every=H > 1`` is local SGD: parameters and
    optimizer state are averaged every H steps instead of gradients every step;
    ``outer_optimizer="nesterov"`` adds a DiLoCo-style outer step (``outer_lr``,
    ``outer_momentum``) on the averaged change.

    ``device="auto"`` trains on the worker's GPU where it sees one (``cuda:0``: dask-cuda
    gives each worker its own GPU first in ``CUDA_VISIBLE_DEVICES``), else on the CPU.
    ``channels_last`` (default: on for images on CUDA) and ``compile`` (``torch.compile``)
    only change speed, not results beyond float rounding. So does ``fused`` (default: on
    CUDA): the optimizer's fused kernel, which also lets a lone rank, or a local SGD rank
    between synchronisations, skip a non-finite step without waiting for the GPU.
    """

    epochs: int = 10
    batch_size: int = 32
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    precision: str = "fp32"
    augment: bool | None = None
    shuffle: bool = True
    seed: int = 0
    eval_batch_size: int = 512
    checkpoint_every: int = 1
    backend: str = "dask"
    sync_every: int = 1
    wire_dtype: str = "fp32"
    bucket_mb: float = 25.0
    outer_optimizer: str | None = None
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    comm_timeout: float | None = None
    torch_threads: int | None = None
    device: str = "auto"
    channels_last: bool | None = None
    compile: bool = False
    fused: bool | None = None
    on_nonfinite: str = "raise"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")

        for name in ("epochs", "batch_size", "eval_batch_size", "checkpoint_every", "sync_every"):
            positive_int(name)
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}. Try lr=0.05.")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}.")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}.")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}.")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}.")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}.")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(
                f"warmup_epochs must be between 0 and epochs ({self.epochs}), "
                f"got {self.warmup_epochs!r}."
            )
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}.")
        if self.wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire_dtype must be one of {WIRE_DTYPES}, got {self.wire_dtype!r}.")
        if self.outer_optimizer not in OUTER_OPTIMIZERS:
            raise ValueError(
                f"outer_optimizer must be one of {OUTER_OPTIMIZERS}, got {self.outer_optimizer!r}."
            )
        if not self.outer_lr > 0:
            raise ValueError(f"outer_lr must be positive, got {self.outer_lr!r}.")
        if not 0 <= self.outer_momentum < 1:
            raise ValueError(f"outer_momentum must be in [0, 1), got {self.outer_momentum!r}.")
        if not (isinstance(self.bucket_mb, (int, float)) and self.bucket_mb > 0):
            raise ValueError(f"bucket_mb must be a positive number, got {self.bucket_mb!r}.")
        if self.comm_timeout is not None and self.comm_timeout <= 0:
            raise ValueError(f"comm_timeout must be positive seconds, got {self.comm_timeout!r}.")
        if self.torch_threads is not None:
            positive_int("torch_threads")
        if self.fused not in (None, True, False):
            raise ValueError(f"fused must be True, False or None (auto), got {self.fused!r}.")
        if self.on_nonfinite not in ON_NONFINITE:
            raise ValueError(
                f"on_nonfinite must be one of {ON_NONFINITE}, got {self.on_nonfinite!r}."
            )
        if self.device not in DEVICES:
            raise ValueError(
                f"device must be one of {DEVICES}, got {self.device!r}. Each rank uses its "
                "worker's GPU (cuda:0 under dask-cuda) or the CPU."
            )

    @property
    def timeout(self) -> float:
        if self.comm_timeout is not None:
            return float(self.comm_timeout)
        return dask.utils.parse_timedelta(dask.config.get("daskdl.comm-timeout"))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"Unknown training option(s) {unknown}; known options are {sorted(known)}."
            )
        return cls(**values)
