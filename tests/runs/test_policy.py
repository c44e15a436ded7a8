"""The coordinator's decisions as tables: one look at a run in, the transition out. No cluster:
these run in milliseconds (the integration tests in test_fit.py and test_faults.py kill real
workers for the same transitions)."""

from __future__ import annotations

import pytest

from daskdl.runs.policy import (
    AskToGrow,
    ConfirmLoss,
    Fail,
    Finish,
    Heard,
    Observation,
    Regroup,
    State,
    Wait,
    decide,
    liveness,
)

CASES = {
    "ranks still at work": (Observation(ranks=2), Wait()),
    "rank 0 returned": (Observation(ranks=2, all_done=True), Finish(State.FINISHED)),
    "run.stop()": (Observation(ranks=2, all_done=True, stopped=True), Finish(State.STOPPED)),
    "a rank raised": (
        Observation(ranks=3, failed=(1,), all_done=False),
        Fail("rank failed", ranks=(1,)),
    ),
    "lost within max_failures": (
        Observation(ranks=3, gone=(2,), max_failures=1),
        Regroup(gone=(2,)),
    ),
    "a rank failed beside a lost worker: the loss is the cause": (
        Observation(ranks=3, gone=(2,), failed=(0,), max_failures=1),
        Regroup(gone=(2,)),
    ),
    "lost past max_failures": (
        Observation(ranks=3, gone=(2,), max_failures=1, lost_before=1),
        Fail("too many lost", ranks=(2,)),
    ),
    "lost with max_failures=0": (
        Observation(ranks=2, gone=(0,)),
        Fail("too many lost", ranks=(0,)),
    ),
    "every worker gone": (
        Observation(ranks=2, gone=(0, 1), max_failures=5),
        Fail("every worker gone", ranks=(0, 1)),
    ),
    "rank tasks cancelled": (
        Observation(ranks=2, cancelled=True, failed=(0,)),
        Fail("cancelled", State.CANCELLED),
    ),
    "the client closed": (
        Observation(ranks=2, client_closed=True, gone=(1,)),
        Fail("client closed", State.CANCELLED),
    ),
    "a worker joined a run that may grow": (
        Observation(ranks=2, newcomers=True, may_grow=True),
        AskToGrow(),
    ),
    "a worker joined a run given its workers": (
        Observation(ranks=2, newcomers=True, may_grow=False),
        Wait(),
    ),
    "ranks handed back for the newcomers": (
        Observation(ranks=2, all_done=True, handed_back=("join", "join")),
        Regroup(joined=True),
    ),
    "ranks saw a peer vanish that the scheduler still lists": (
        Observation(ranks=2, all_done=True, handed_back=("peer",)),
        ConfirmLoss(),
    ),
}


@pytest.mark.parametrize("seen, decision", CASES.values(), ids=CASES.keys())
def test_decide(seen, decision):
    assert decide(seen) == decision


def test_liveness_drops_leaving_and_silent_workers_and_takes_back_those_heard_again():
    infos = {
        "a": {"last_seen": 1.0},
        "b": {"last_seen": 1.0, "status": "closing_gracefully"},
        "c": {"last_seen": 1.0},
    }
    live, silent, heard = liveness(infos, {}, now=100.0, silence=10.0)
    assert (live, silent) == ({"a", "c"}, set())
    # c's heartbeat stops changing; a's goes on.
    infos["a"]["last_seen"] = 2.0
    live, silent, heard = liveness(infos, heard, now=111.0, silence=10.0)
    assert (live, silent) == ({"a"}, {"c"})
    assert heard["a"] == Heard(2.0, 111.0) and heard["c"] == Heard(1.0, 100.0)
    # c is heard from again: live at once.
    infos["c"]["last_seen"] = 3.0
    live, silent, _ = liveness(infos, heard, now=112.0, silence=10.0)
    assert (live, silent) == ({"a", "c"}, set())


def test_the_examples_in_the_policy_s_docstrings():
    import doctest

    from daskdl.runs import policy

    assert doctest.testmod(policy).failed == 0
