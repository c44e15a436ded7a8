"""What a run's collective group offers, declared once: :class:`Group` (every backend) and
:class:`PointToPoint` (groups that also send to one peer, which pipelines need).

Two backends implement them: :class:`daskdl.collectives.comm.DaskGroup` (rings over Dask's
worker comms: both protocols) and :class:`daskdl.collectives.comm.TorchGroup`
(``torch.distributed``: a :class:`Group` only). Code that needs a collective names the
protocol, not a class, as Lightning Fabric's ``Collective`` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from daskdl.worker.extension import Mailbox


@runtime_checkable
class Group(Protocol):
    """The ranks of one run (``size`` of them; this one is ``rank``) and their collectives.

    Buffers are flat numpy arrays (or CPU tensors) reduced in place; ``wire`` is the
    precision they travel in (``"fp32"``, ``"bf16"``, ``"fp16"``), ``divide_by`` what the sum
    is divided by (the size for a mean). ``box`` is the run's mailbox on this worker (stop and
    regroup requests, messages in), ``timeout`` how long a peer may stay silent.
    """

    rank: int
    size: int
    timeout: float
    box: Mailbox

    def allreduce_(self, buf, wire: str = "fp32", divide_by: int = 1): ...

    def allreduce_mean_(self, buf, wire: str = "fp32"): ...

    def owned(self, n: int) -> slice:
        """The slice of an ``n``-long buffer this rank owns after a reduce-scatter."""
        ...

    def reduce_scatter_(self, buf: np.ndarray, wire: str = "fp32", divide_by: int = 1): ...

    def all_gather_(self, buf: np.ndarray, wire: str = "fp32"): ...

    def close(self) -> None: ...


@runtime_checkable
class PointToPoint(Group, Protocol):
    """A :class:`Group` whose ranks also send to one another, and that can be cut into
    subgroups (a host's ranks, a pipeline stage's replicas)."""

    peers: list[str]

    def send(self, dest: int, tag: str, data: np.ndarray) -> None: ...

    def isend(self, dest: int, tag: str, data: np.ndarray): ...

    def recv(self, src: int, tag: str) -> np.ndarray: ...

    def subgroup(self, ranks: list[int], name: str) -> PointToPoint: ...
