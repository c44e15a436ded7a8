"""The two-level all-reduce: within each host, across hosts, within each host again.

A ring treats every peer alike: each of its ``2 (P - 1)`` steps pays one message's latency,
and with ranks on several hosts some of those steps cross the network. With ``L`` ranks on
each of ``H`` hosts, the two-level all-reduce

1. reduce-scatters within each host (``L - 1`` steps), so each local rank holds the host's sum
   of one ``1/L`` chunk of the buffer;
2. all-reduces that chunk across hosts, in ``L`` rings of ``H`` ranks running side by side
   (one per local index: ``2 (H - 1)`` steps, each moving ``1/L`` of the buffer);
3. all-gathers within each host (``L - 1`` steps).

It sends as many bytes over each host's network link as the flat ring, in ``2 (H - 1)`` network
steps instead of up to ``2 (P - 1)``. ``docs/collectives.md`` models both and says where the
two-level form wins (from about 16 ranks on two or more hosts, within the issue's 64).

The ranks of every host must be as many (the chunks of step 2 must line up); where they are not
(a regroup left one host short, say), and on one host, the flat ring runs instead.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from distributed.comm import get_address_host

if TYPE_CHECKING:
    import numpy as np

    from daskdl.collectives.base import PointToPoint

ALGORITHMS = ("auto", "ring")

logger = logging.getLogger(__name__)


def hosts(peers: list[str]) -> list[list[int]]:
    """The ranks on each host, hosts in the order of their first rank.

    >>> hosts(["tcp://10.0.0.1:1", "tcp://10.0.0.2:1", "tcp://10.0.0.1:2", "tcp://10.0.0.2:2"])
    [[0, 2], [1, 3]]
    """
    by_host: dict[str, list[int]] = {}
    for rank, address in enumerate(peers):
        by_host.setdefault(get_address_host(address), []).append(rank)
    return list(by_host.values())


def two_level_layout(peers: list[str], algorithm: str = "auto") -> list[list[int]] | None:
    """The per-host rank lists the two-level all-reduce runs over, or ``None`` where the flat
    ring runs: ``algorithm="ring"``, one host, one rank per host, or hosts with unequal counts.

    >>> two_level_layout(["tcp://a:1", "tcp://a:2", "tcp://b:1", "tcp://b:2"])
    [[0, 1], [2, 3]]
    >>> two_level_layout(["tcp://a:1", "tcp://a:2", "tcp://b:1"]) is None
    True
    >>> two_level_layout(["tcp://a:1", "tcp://a:2", "tcp://b:1", "tcp://b:2"], "ring") is None
    True
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"allreduce must be one of {ALGORITHMS}, got {algorithm!r}.")
    if algorithm == "ring":
        return None
    layout = hosts(peers)
    counts = {len(ranks) for ranks in layout}
    if len(layout) < 2 or len(counts) > 1 or counts == {1}:
        return None
    return layout


class TwoLevel:
    """One rank's part in the two-level all-reduce of ``group``: the subgroup of its host and
    the subgroup of its local index across hosts."""

    def __init__(self, group: PointToPoint, layout: list[list[int]]):
        host = next(h for h, ranks in enumerate(layout) if group.rank in ranks)
        index = layout[host].index(group.rank)
        self.local = group.subgroup(layout[host], f"host{host}")
        self.across = group.subgroup([ranks[index] for ranks in layout], f"across{index}")
        logger.debug(
            "rank %d: two-level all-reduce, %d hosts x %d ranks",
            group.rank,
            len(layout),
            len(layout[0]),
        )

    def allreduce_(self, buf: np.ndarray, wire: str, divide_by: int) -> np.ndarray:
        chunk = self.local.reduce_scatter_(buf, wire)  # a view: summed across hosts in place
        self.across.allreduce_(chunk, wire, divide_by)
        return self.local.all_gather_(buf, wire)

    def close(self) -> None:
        self.local.close()
        self.across.close()
