"""Training configuration: one typed, validated dataclass, turned into a plain dict for events,
checkpoints and the dashboard."""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from dataclasses import dataclass

import dask.config
import dask.utils
import numpy as np
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
        """Check every option once, here, and store it as a plain Python value.

        Numbers may come as any ``numbers`` type (numpy scalars from a grid, say); they are
        checked for type, range and finiteness (a NaN timeout would make a wait endless) and
        kept as ``int`` or ``float``, so the config stays JSON for events and checkpoints.
        """
        for name in ("epochs", "batch_size", "eval_batch_size", "checkpoint_every", "sync_every"):
            setattr(self, name, integer(name, getattr(self, name), minimum=1))
        self.seed = integer("seed", self.seed, minimum=0)
        if self.seed >= 2**63:  # torch.manual_seed's limit
            raise ValueError(f"seed must be below 2**63, got {self.seed}.")
        if self.torch_threads is not None:
            self.torch_threads = integer("torch_threads", self.torch_threads, minimum=1)
        self.lr = real("lr", self.lr, low=0, open_low=True, hint=" Try lr=0.05.")
        self.momentum = real("momentum", self.momentum, low=0, high=1, open_high=True)
        self.weight_decay = real("weight_decay", self.weight_decay, low=0)
        self.warmup_epochs = real("warmup_epochs", self.warmup_epochs, low=0, high=self.epochs)
        self.bucket_mb = real("bucket_mb", self.bucket_mb, low=0, open_low=True)
        self.outer_lr = real("outer_lr", self.outer_lr, low=0, open_low=True)
        self.outer_momentum = real(
            "outer_momentum", self.outer_momentum, low=0, high=1, open_high=True
        )
        if self.comm_timeout is not None:
            self.comm_timeout = real(
                "comm_timeout",
                self.comm_timeout,
                low=0,
                open_low=True,
                hint=" It is how long (seconds) a rank waits for a peer before giving up.",
            )
        for name in ("nesterov", "shuffle", "compile"):
            setattr(self, name, flag(name, getattr(self, name)))
        for name in ("augment", "channels_last", "fused"):
            setattr(self, name, flag(name, getattr(self, name), allow_none=True))
        for name, choices in (
            ("optimizer", OPTIMIZERS),
            ("schedule", SCHEDULES),
            ("precision", PRECISIONS),
            ("backend", BACKENDS),
            ("wire_dtype", WIRE_DTYPES),
            ("outer_optimizer", OUTER_OPTIMIZERS),
            ("on_nonfinite", ON_NONFINITE),
        ):
            choice(name, getattr(self, name), choices)
        choice(
            "device",
            self.device,
            DEVICES,
            " Each rank uses its worker's GPU (cuda:0 under dask-cuda) or the CPU.",
        )

    @property
    def timeout(self) -> float:
        if self.comm_timeout is not None:
            return float(self.comm_timeout)
        configured = dask.config.get("daskdl.comm-timeout")
        try:
            return dask.utils.parse_timedelta(configured)
        except (KeyError, ValueError, TypeError):
            raise ValueError(
                f"daskdl.comm-timeout is {configured!r} in the Dask config, not a duration: "
                "set it like '60s' (or pass comm_timeout= in seconds)."
            ) from None

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


def integer(name: str, value, minimum: int | None = None) -> int:
    """``value`` as an ``int`` (any integral number: numpy's too, not ``bool``), at least
    ``minimum``; else a ``ValueError`` naming the option."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        hint = ""
        if isinstance(value, numbers.Real) and float(value).is_integer():
            hint = f" Pass {name}={int(value)}."
        raise ValueError(f"{name} must be an integer, got {value!r}.{hint}")
    value = int(value)
    if minimum is not None and value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {what}, got {value}.")
    return value


def real(
    name: str,
    value,
    low: float | None = None,
    high: float | None = None,
    open_low: bool = False,
    open_high: bool = False,
    hint: str = "",
) -> float:
    """``value`` as a finite ``float`` in the range given; else a ``ValueError`` naming the
    option, the range and what was seen."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}.{hint}")
    value = float(value)
    too_low = low is not None and (value <= low if open_low else value < low)
    too_high = high is not None and (value >= high if open_high else value > high)
    if not math.isfinite(value) or too_low or too_high:
        if low is not None and high is not None:
            what = f"in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
        elif low is not None:
            what = f"{'>' if open_low else '>='} {low:g}"
        else:
            what = "finite"
        what = "a positive number" if (low == 0 and open_low and high is None) else what
        raise ValueError(f"{name} must be {what}, got {value!r}.{hint}")
    return value


def flag(name: str, value, allow_none: bool = False) -> bool | None:
    """``value`` as a ``bool`` (numpy's too), or ``None`` where that means "automatic"."""
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    what = "True, False or None (automatic)" if allow_none else "True or False"
    raise ValueError(f"{name} must be {what}, got {value!r}.")


def choice(name: str, value, choices: tuple, hint: str = ""):
    if not any(value is c or (isinstance(value, str) and value == c) for c in choices):
        raise ValueError(f"{name} must be one of {choices}, got {value!r}.{hint}")
    return value
