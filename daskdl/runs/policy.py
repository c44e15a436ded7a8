"""What a run's coordinator does next, decided from one look at the run: pure functions of
plain values, so that every transition has a table test and no cluster (Ray Train v2's
failure and scaling policies are made the same way).

::

    running ──► regrouping ──► running        a worker lost (within max_failures) or joined
    running ──► finished | stopped            rank 0 returned (stopped: by run.stop())
    running ──► failed | cancelled            a rank raised, too many workers lost, cancel()

:func:`decide` maps an :class:`Observation` to a decision; :func:`liveness` says which workers
can hold a rank. :class:`daskdl.runs.coordinator.Coordinator` observes and carries them out.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class State(enum.Enum):
    RUNNING = "running"
    REGROUPING = "regrouping"
    FINISHED = "finished"
    STOPPED = "stopped"
    FAILED = "failed"
    CANCELLED = "cancelled"


ENDED = (State.FINISHED, State.STOPPED, State.FAILED, State.CANCELLED)


@dataclass(frozen=True)
class Observation:
    """One look at a running run's rank tasks and the cluster.

    ``failed``: ranks whose task raised; ``gone``: ranks whose worker can no longer hold it;
    ``handed_back``: why the finished ranks returned a state instead of a result (``"join"``
    for workers that joined, anything else for a peer they lost); ``newcomers``: live workers
    outside the run; ``stopped``: rank 0's result says the run was stopped (when all are done).
    """

    ranks: int
    client_closed: bool = False
    cancelled: bool = False
    failed: tuple[int, ...] = ()
    gone: tuple[int, ...] = ()
    all_done: bool = False
    handed_back: tuple[str, ...] = ()
    newcomers: bool = False
    may_grow: bool = False  # the run was given all workers, regroups, and has not asked yet
    lost_before: int = 0
    max_failures: int = 0
    stopped: bool = False


@dataclass(frozen=True)
class Wait:
    """Nothing to do: look again."""


@dataclass(frozen=True)
class AskToGrow:
    """Ask the ranks to regroup at the epoch's end, with the workers that joined."""


@dataclass(frozen=True)
class Regroup:
    """Go on without the workers of ranks ``gone``; ``joined``: with the ones that joined."""

    gone: tuple[int, ...] = ()
    joined: bool = False


@dataclass(frozen=True)
class ConfirmLoss:
    """Ranks handed back a lost peer that the scheduler still lists: wait for it to notice."""


@dataclass(frozen=True)
class Finish:
    state: State


@dataclass(frozen=True)
class Fail:
    """End the run: ``why`` is one of ``"client closed"``, ``"cancelled"``, ``"rank failed"``
    (``ranks``: which), ``"too many lost"`` or ``"every worker gone"``."""

    why: str
    state: State = State.FAILED
    ranks: tuple[int, ...] = ()


Decision = Wait | AskToGrow | Regroup | ConfirmLoss | Finish | Fail


def decide(seen: Observation) -> Decision:
    """The transition one look at a running run calls for.

    >>> decide(Observation(ranks=2, gone=(1,), max_failures=1))
    Regroup(gone=(1,), joined=False)
    >>> decide(Observation(ranks=2, gone=(1,), max_failures=0))
    Fail(why='too many lost', state=<State.FAILED: 'failed'>, ranks=(1,))
    """
    if seen.client_closed:
        return Fail("client closed", State.CANCELLED)
    if seen.cancelled:
        return Fail("cancelled", State.CANCELLED)
    if seen.gone:
        # A rank that failed beside a lost worker most likely failed because of it.
        if seen.lost_before + len(seen.gone) > seen.max_failures:
            return Fail("too many lost", ranks=seen.gone)
        if len(seen.gone) == seen.ranks:
            return Fail("every worker gone", ranks=seen.gone)
        return Regroup(seen.gone)
    if seen.failed:
        return Fail("rank failed", ranks=seen.failed)
    if not seen.all_done:
        return AskToGrow() if seen.newcomers and seen.may_grow else Wait()
    if "join" in seen.handed_back:
        return Regroup(joined=True)
    if seen.handed_back:
        return ConfirmLoss()
    return Finish(State.STOPPED if seen.stopped else State.FINISHED)


@dataclass(frozen=True)
class Heard:
    """A worker's last heartbeat as the scheduler reports it, and when (the client's clock)
    that value last changed."""

    last_seen: float
    changed_at: float


LEAVING = ("closing", "closing_gracefully", "closed")


def liveness(
    workers: dict[str, dict], heard: dict[str, Heard], now: float, silence: float
) -> tuple[set[str], set[str], dict[str, Heard]]:
    """The workers that can hold a rank, those dropped as silent, and the heartbeats as of
    ``now``.

    ``workers``: the scheduler's ``{address: info}`` (``status``, ``last_seen``). A leaving
    worker (retiring, closing) counts as gone at once, so its peers regroup without waiting
    for it to close; so does one whose heartbeat has not changed for ``silence`` seconds (a
    stopped process, a frozen machine), long before the scheduler's ``worker-ttl``.

    >>> live, silent, _ = liveness({"a": {}, "b": {"status": "closing"}}, {}, 10.0, 4.0)
    >>> sorted(live), sorted(silent)
    (['a'], [])
    """
    now_heard: dict[str, Heard] = {}
    live, silent = set(), set()
    for addr, info in workers.items():
        seen = info.get("last_seen", 0.0)
        before = heard.get(addr)
        now_heard[addr] = before if before and before.last_seen == seen else Heard(seen, now)
        if info.get("status") in LEAVING:
            continue
        if now - now_heard[addr].changed_at > silence:
            silent.add(addr)
            continue
        live.add(addr)
    return live, silent, now_heard
