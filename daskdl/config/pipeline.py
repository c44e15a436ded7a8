"""The pipeline section of a run's options: how a model is cut into stages and fed.

A specification only (checked once, when made): cutting a model and running its stages is
:mod:`daskdl.parallel.pipeline`'s, the order of a stage's passes
:mod:`daskdl.parallel.schedules`'.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from daskdl.config.values import choice, integer

SCHEDULES = ("1f1b", "gpipe")
BALANCES = ("params", "time")


def check_microbatches(stages: int, microbatches: int, chunks: int) -> None:
    """An interleaved order runs microbatches ``stages`` at a time: a multiple is needed."""
    if chunks > 1 and microbatches % stages:
        raise ValueError(
            f"An interleaved pipeline ({chunks} chunks per stage) runs microbatches {stages} "
            f"at a time: use a multiple of {stages} microbatches, not {microbatches}."
        )


@dataclass(frozen=True)
class Pipeline:
    """How a model is cut into stages and fed: ``fit(..., pipeline=Pipeline(stages=2))``.

    ``stages`` ranks hold one stage each (with more workers, replicas of the pipeline);
    ``microbatches`` per step; ``schedule`` ``"1f1b"`` or ``"gpipe"``; ``balance`` cuts by
    ``"params"`` or by the ``"time"`` each layer takes on the workers; ``split`` gives the
    cut points instead (the indices of the layers that start pieces 1, 2, ...). ``chunks``
    above 1 cuts the model into ``stages * chunks`` pieces, stage ``s`` holding pieces
    ``s, s + stages, ...``: the interleaved schedule, whose bubble is ``chunks`` times
    smaller, for ``chunks`` times the messages (:mod:`daskdl.parallel.schedules`).
    """

    stages: int = 2
    microbatches: int = 4
    schedule: str = "1f1b"
    balance: str = "params"
    split: tuple[int, ...] | None = None
    chunks: int = 1

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: checked and normalised once, here
        set_(self, "stages", integer("stages", self.stages, minimum=1))
        set_(self, "microbatches", integer("microbatches", self.microbatches, minimum=1))
        set_(self, "chunks", integer("chunks", self.chunks, minimum=1))
        choice("schedule", self.schedule, SCHEDULES)
        choice("balance", self.balance, BALANCES)
        if self.chunks > 1 and self.stages == 1:
            raise ValueError(
                f"chunks={self.chunks} interleaves pieces over the stages: use at least 2 "
                "stages, or chunks=1."
            )
        check_microbatches(self.stages, self.microbatches, self.chunks)
        if self.split is not None:
            split = tuple(integer("split", i, minimum=1) for i in self.split)
            n = self.pieces - 1
            if len(split) != n or list(split) != sorted(set(split)):
                raise ValueError(
                    f"split={self.split!r}: give the {n} increasing indices of the layers "
                    f"that start pieces 1..{n} ({self.stages} stages x {self.chunks} chunks)."
                )
            set_(self, "split", split)

    @property
    def pieces(self) -> int:
        """How many runs of consecutive layers the model is cut into."""
        return self.stages * self.chunks

    def layers_of_stage(self, bounds: Sequence[int], stage: int) -> list[int]:
        """The indices of the layers ``stage`` holds, given the pieces' ``bounds``."""
        pieces = range(stage, self.pieces, self.stages)
        return [i for g in pieces for i in range(bounds[g], bounds[g + 1])]

    def as_options(self) -> dict:
        """The :class:`daskdl.TrainConfig` options that say the same."""
        return {
            "pipeline_stages": self.stages,
            "microbatches": self.microbatches,
            "pipeline_schedule": self.schedule,
            "pipeline_balance": self.balance,
            "pipeline_split": ",".join(map(str, self.split)) if self.split else None,
            "pipeline_chunks": self.chunks,
        }
