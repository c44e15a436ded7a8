"""Training configuration: one typed, validated dataclass, turned into a plain dict for events,
checkpoints and the dashboard."""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass

import dask.config
import dask.utils
import yaml

from daskdl.config.pipeline import Pipeline
from daskdl.config.values import choice, flag, integer, real  # noqa: F401 - config_.integer etc.

_defaults_file = os.path.join(os.path.dirname(__file__), "daskdl.yaml")
with open(_defaults_file) as f:
    dask.config.update_defaults(yaml.safe_load(f))


@dataclass(frozen=True)
class Section:
    """A group of options that belong to one owner: its name, what it is about, and whether
    every run's contract uses it (``launch`` takes those; the others are ``fit``'s loop's)."""

    name: str
    about: str
    contract: bool = False


SECTIONS: dict[str, Section] = {}


def section(name: str, about: str, contract: bool = False):
    """A section, and the function that declares its options: each a :class:`TrainConfig`
    field with its default, its help (for ``fit``'s docstring, the command line, the
    dashboard and the docs) and, for a choice, its choices."""
    SECTIONS[name] = Section(name, about, contract)

    def option(default, help: str, choices: tuple | None = None):
        meta = {"help": help, "choices": choices, "section": name}
        return dataclasses.field(default=default, metadata=meta)

    return option


in_optimisation = section(
    "optimisation", "the optimizer, its schedule, the steps and the model's speed"
)
in_layout = section("layout", "how the training state is spread over the ranks")
in_pipeline = section("pipeline", "a model cut into stages, one rank each (daskdl.Pipeline)")
in_averaging = section("averaging", "how the ranks agree, in every run", contract=True)
in_data = section("data", "how each rank reads its shard", contract=True)
in_run = section("run", "the run itself: seed, device, waits and failures", contract=True)


@dataclass
class TrainConfig:
    """Every option of a training run, each defined once: type, default, choices and help.

    ``fit(..., **options)``, ``daskdl train --option`` and the dashboard's launcher are made
    from these fields; ``TrainConfig.to_dict()`` is what events, ``config.json`` and
    checkpoints record.

    ``batch_size`` is per rank: the global batch is ``batch_size * world_size``, as with
    PyTorch's DistributedDataParallel. ``sync_every=H > 1`` is local SGD: parameters and
    optimizer state are averaged every H steps instead of gradients every step;
    ``outer_optimizer="nesterov"`` adds a DiLoCo-style outer step (``outer_lr``,
    ``outer_momentum``) on the averaged change.
    """

    epochs: int = in_optimisation(10, "passes over the training data")
    batch_size: int = in_optimisation(
        32, "samples per step and rank (the global batch is this x ranks)"
    )
    lr: float = in_optimisation(0.05, "peak learning rate")
    optimizer: str = in_optimisation("sgd", "the optimizer", ("sgd", "adamw"))
    momentum: float = in_optimisation(0.9, "SGD momentum")
    nesterov: bool = in_optimisation(False, "Nesterov momentum (SGD)")
    weight_decay: float = in_optimisation(
        5e-4, "L2 penalty (SGD) or decoupled weight decay (AdamW)"
    )
    schedule: str = in_optimisation(
        "cosine", "learning-rate schedule after warm-up", ("constant", "cosine", "onecycle")
    )
    warmup_epochs: float = in_optimisation(0.0, "epochs of linear learning-rate warm-up")
    precision: str = in_optimisation(
        "fp32", "bf16: bfloat16 autocast on the forward pass", ("fp32", "bf16")
    )
    augment: bool | None = in_optimisation(
        None, "random crops and flips of images (default: on for colour images of >= 16 px)"
    )
    shuffle: bool = in_optimisation(True, "reshuffle each rank's shard every epoch (seeded)")
    eval_batch_size: int = in_optimisation(512, "samples per batch when scoring the validation set")
    checkpoint_every: int = in_optimisation(1, "epochs between checkpoints (with out=)")
    channels_last: bool | None = in_optimisation(
        None, "channels-last memory for conv nets (default: on for images on CUDA)"
    )
    compile: bool = in_optimisation(False, "torch.compile the model on each rank (speed only)")
    fused: bool | None = in_optimisation(
        None, "the optimizer's fused kernel (default: on CUDA); skips non-finite steps on the GPU"
    )

    shard: str | None = in_layout(
        None,
        "spread the training state over the ranks: optimizer (ZeRO-1: each rank keeps 1/P of "
        "the optimizer's state) or full (ZeRO-3: parameters and gradients too, gathered per "
        "module as forward and backward reach it)",
        (None, "optimizer", "full"),
    )

    pipeline_stages: int = in_pipeline(
        1, "cut the model into this many stages, one rank each (daskdl.Pipeline); 1: none"
    )
    microbatches: int = in_pipeline(4, "microbatches per step and replica of a pipeline")
    pipeline_schedule: str = in_pipeline(
        "1f1b",
        "a pipeline's order of passes: 1f1b (one forward, one backward) or gpipe",
        ("1f1b", "gpipe"),
    )
    pipeline_balance: str = in_pipeline(
        "params", "cut a pipeline by parameters or by the layers' measured time", ("params", "time")
    )
    pipeline_split: str | None = in_pipeline(
        None, "a pipeline's cut points: the layers that start pieces 1, 2, ... ('3,7')"
    )
    pipeline_chunks: int = in_pipeline(
        1,
        "pieces of the model each pipeline stage holds, interleaved (stage s: pieces s, "
        "s + stages, ...): a bubble that many times smaller, for that many times the messages",
    )

    backend: str = in_averaging(
        "dask",
        "dask: all-reduce over Dask's worker-to-worker comms (TLS where the cluster has it); "
        "torch: a torch.distributed gloo group",
        ("dask", "torch"),
    )
    sync_every: int = in_averaging(
        1, "1: average gradients every step; H > 1: local SGD, average parameters every H"
    )
    wire_dtype: str = in_averaging(
        "fp32", "bf16 sends gradients between ranks as bfloat16: half the bytes", ("fp32", "bf16")
    )
    allreduce: str = in_averaging(
        "auto",
        "the dask backend's all-reduce: auto (two-level, within each host then across hosts, "
        "where the ranks span hosts with as many on each; else one ring) or ring",
        ("auto", "ring"),
    )
    bucket_mb: float = in_averaging(
        25.0, "gradients are all-reduced in buckets of about this many MB, as backward makes them"
    )
    outer_optimizer: str | None = in_averaging(
        None, "nesterov: a DiLoCo-style outer step at each local-SGD average", (None, "nesterov")
    )
    outer_lr: float = in_averaging(0.7, "outer step's learning rate (outer_optimizer)")
    outer_momentum: float = in_averaging(0.9, "outer step's momentum (outer_optimizer)")

    stream: bool | None = in_data(
        None,
        "compute each rank's partitions as it trains instead of holding its shard in memory "
        "(default: when the data would take over half the workers' memory limits)",
    )
    prefetch: int = in_data(2, "streamed partitions each rank computes ahead of training")
    shuffle_buffer: int = in_data(
        4096, "streamed samples each batch is drawn from, across the partitions in flight"
    )

    seed: int = in_run(0, "seeds the weights, the shuffles and the augmentation")
    device: str = in_run(
        "auto",
        "auto: each rank on its worker's GPU (cuda:0 under dask-cuda) where it has one, else "
        "the CPU",
        ("auto", "cpu", "cuda"),
    )
    torch_threads: int | None = in_run(None, "torch threads per rank (default: worker threads)")
    comm_timeout: float | None = in_run(
        None, "seconds a rank waits for a peer before giving up (default: daskdl.comm-timeout)"
    )
    on_nonfinite: str = in_run(
        "raise",
        "a NaN or infinite loss or gradient: raise (end the run naming the step) or skip it on "
        "every rank",
        ("raise", "skip"),
    )
    max_failures: int = in_run(
        2, "workers the run may lose (and regroup without) before it fails; 0: none"
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every option once, here, and store it as a plain Python value.

        Numbers may come as any ``numbers`` type (numpy scalars from a grid, say); they are
        checked for type, range and finiteness (a NaN timeout would make a wait endless) and
        kept as ``int`` or ``float``, so the config stays JSON for events and checkpoints.
        """
        for name in (
            "epochs", "batch_size", "eval_batch_size", "checkpoint_every", "sync_every",
            "pipeline_stages", "microbatches", "pipeline_chunks",
        ):  # fmt: skip
            setattr(self, name, integer(name, getattr(self, name), minimum=1))
        self.seed = integer("seed", self.seed, minimum=0)
        self.max_failures = integer("max_failures", self.max_failures, minimum=0)
        self.prefetch = integer("prefetch", self.prefetch, minimum=0)
        self.shuffle_buffer = integer("shuffle_buffer", self.shuffle_buffer, minimum=0)
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
        for name in ("augment", "channels_last", "fused", "stream"):
            setattr(self, name, flag(name, getattr(self, name), allow_none=True))
        for f in dataclasses.fields(self):
            if f.metadata["choices"] is not None:
                choice(f.name, getattr(self, f.name), f.metadata["choices"])
        if self.shard is not None and (self.sync_every != 1 or self.outer_optimizer):
            raise ValueError(
                f"shard={self.shard!r} averages gradients every step, and sync_every="
                f"{self.sync_every} is local SGD, which averages whole replicas: choose one."
            )
        if self.pipeline_stages > 1 and (self.shard or self.sync_every != 1):
            raise ValueError(
                f"pipeline_stages={self.pipeline_stages} cuts the model over the ranks; "
                "shard= and sync_every= work on whole replicas: use one or the other."
            )
        if self.pipeline_chunks > 1 and self.pipeline_stages == 1:
            raise ValueError(
                f"pipeline_chunks={self.pipeline_chunks} interleaves a pipeline's stages: set "
                "pipeline_stages to 2 or more as well, or leave pipeline_chunks at 1."
            )
        pipe = self.pipeline()
        if self.pipeline_split is not None and pipe is not None:
            self.pipeline_split = ",".join(str(i) for i in pipe.split or ())
        if self.shard == "full" and self.compile:
            raise ValueError(
                "shard='full' gathers each module's parameters in hooks around its forward, "
                "which torch.compile would trace away: leave compile off with it."
            )

    def pipeline(self) -> Pipeline | None:
        """The run's :class:`daskdl.Pipeline` (``None`` without one)."""
        if self.pipeline_stages == 1:
            return None
        split = self.pipeline_split
        return Pipeline(
            stages=self.pipeline_stages,
            microbatches=self.microbatches,
            schedule=self.pipeline_schedule,
            balance=self.pipeline_balance,
            split=tuple(_split_points(split)) if split else None,
            chunks=self.pipeline_chunks,
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
        check_names(values)
        return cls(**values)

    @classmethod
    def defaults(cls) -> dict:
        return {f.name: f.default for f in dataclasses.fields(cls)}


def _split_points(text) -> list[int]:
    if isinstance(text, (list, tuple)):
        return [int(i) for i in text]
    try:
        return [int(i) for i in str(text).split(",")]
    except ValueError:
        raise ValueError(
            f"pipeline_split={text!r}: give the layers that start stages 1, 2, ... as "
            "integers separated by commas, like '3,7'."
        ) from None


def fields() -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(TrainConfig)


def names_in(*sections: str) -> tuple[str, ...]:
    """The options of ``sections``, in their order."""
    return tuple(f.name for f in fields() if f.metadata["section"] in sections)


def contract_options() -> tuple[str, ...]:
    """The options every run's contract uses: what ``launch`` takes."""
    return names_in(*(name for name, sec in SECTIONS.items() if sec.contract))


def base_type(f: dataclasses.Field) -> str:
    """A field's type without ``| None``: ``"int"``, ``"float"``, ``"bool"`` or ``"str"``
    (what the command line parses and the dashboard shows it as)."""
    return f.type.split("|")[0].strip()


def check_names(options) -> None:
    """An error naming each unknown option, with the nearest known one."""
    known = [f.name for f in fields()]
    unknown = [name for name in options if name not in known]
    if unknown:
        hints = []
        for name in unknown:
            near = difflib.get_close_matches(name, known, n=1)
            hints.append(f"{name!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
        raise ValueError(
            f"Unknown training option(s) {', '.join(hints)}; the options are {sorted(known)}."
        )


def options_doc() -> str:
    """The options as numpydoc parameters, for ``fit``'s docstring."""
    lines = []
    for f in fields():
        choices = f.metadata["choices"]
        kind = " | ".join(map(repr, choices)) if choices else _type_name(f.type)
        lines.append(f"    {f.name} : {kind}, default {f.default!r}")
        lines.append(f"        {f.metadata['help']}.")
    return "\n".join(lines)


def options_table() -> str:
    """The options as Markdown, a table per section (docs/options.md's, which a test keeps
    equal to this)."""
    parts = []
    for sec in SECTIONS.values():
        who = "every run (`fit` and `launch`)" if sec.contract else "`fit`'s loop"
        about = f"{sec.about[0].upper()}{sec.about[1:]}: options of {who}."
        rows = [f"### {sec.name.capitalize()}", "", about, "", "| option | default | |"]
        rows.append("| --- | --- | --- |")
        for f in fields():
            if f.metadata["section"] != sec.name:
                continue
            choices = f.metadata["choices"]
            what = f.metadata["help"]
            if choices:
                what += "; one of " + ", ".join(f"`{c!r}`" for c in choices)
            rows.append(f"| `{f.name}` | `{f.default!r}` | {what} |")
        parts.append("\n".join(rows))
    return "\n\n".join(parts)


def _type_name(annotation) -> str:
    return str(annotation).replace("typing.", "")
