"""Workers that stop answering, and predictions whose worker dies."""

from __future__ import annotations

import collections
import os
import signal
import time

import numpy as np
import pytest
from conftest import poll_for
from distributed.diagnostics.plugin import SchedulerPlugin

import daskdl
from daskdl import Dataset, events


def _memberships(client, run) -> list[dict]:
    return [e for e in events.replay(client, run.run_id) if e["kind"] == "membership"]


def _follow_until(run, predicate, timeout: float) -> None:
    """Follow the run (its coordinator acts while someone waits on it) until ``predicate()``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout}s"
        try:
            run.wait(timeout=0.5)
        except TimeoutError:
            pass


@pytest.mark.parametrize("stream", [False, True], ids=["in-memory", "streamed"])
def test_a_stopped_worker_is_dropped_and_rejoins_when_it_resumes(fresh_client, stream):
    train, val = daskdl.datasets.train_test("digits")
    run = daskdl.fit(
        fresh_client, "mlp", train, val=val, epochs=30, batch_size=8, seed=0, comm_timeout=3,
        stream=stream, progress=False, block=False,
    )  # fmt: skip
    poll_for(lambda: len(run.history) >= 1, timeout=60)
    victim = run.workers[1]
    pid = fresh_client.run(os.getpid, workers=[victim])[victim]
    os.kill(pid, signal.SIGSTOP)
    try:
        # Twice the comm timeout without a heartbeat: the run goes on with the other worker.
        _follow_until(run, lambda: _memberships(fresh_client, run), timeout=60)
        [dropped] = _memberships(fresh_client, run)
        assert list(dropped["lost"]) == [victim] and dropped["world_size"] == 1
        assert run.status == "running"
    finally:
        os.kill(pid, signal.SIGCONT)
    # Answering again, it is told its old rank is over, and joins at an epoch's end.
    _follow_until(run, lambda: len(_memberships(fresh_client, run)) >= 2, timeout=90)
    joined = _memberships(fresh_client, run)[1]
    assert list(joined["joined"]) == [victim] and joined["world_size"] == 2
    assert joined["step_in_epoch"] == 0  # at an epoch boundary
    run.wait(timeout=240)
    assert run.status == "finished" and run.lost == [victim]
    assert run.history["epoch"].tolist() == list(range(1, 31))  # no epoch lost or run twice
    assert run.history["val_accuracy"].iloc[-1] >= 0.9


class PredictionCounter(SchedulerPlugin):
    """How often each prediction block was computed."""

    name = "prediction-counter"

    def __init__(self):
        self.computed = collections.Counter()

    def transition(self, key, start, finish, *args, **kwargs):
        if finish == "memory" and "daskdl-predict" in str(key):
            self.computed[str(key)] += 1


def _computed(dask_scheduler):
    return dict(dask_scheduler.plugins[PredictionCounter.name].computed)


def test_a_prediction_recomputes_only_the_blocks_a_dead_worker_held(fresh_client):
    train, test = daskdl.datasets.train_test("digits")
    run = daskdl.fit(fresh_client, "mlp", train, epochs=2, progress=False)
    X = test.X.rechunk(40)  # 9 blocks over the 2 workers
    reference = run.predict(Dataset.from_dask(X, test.y.rechunk(40))).compute()
    fresh_client.register_plugin(PredictionCounter())
    preds = fresh_client.persist(run.predict(Dataset.from_dask(X, test.y.rechunk(40))))
    poll_for(lambda: len(fresh_client.run_on_scheduler(_computed)) == X.numblocks[0])
    holders = fresh_client.who_has(preds)
    victim = run.workers[0]
    lost = {str(k) for k, where in holders.items() if list(where) == [victim]}
    assert 0 < len(lost) < X.numblocks[0]
    os.kill(fresh_client.run(os.getpid, workers=[victim])[victim], signal.SIGKILL)
    np.testing.assert_array_equal(preds.compute(), reference)
    again = {k for k, n in fresh_client.run_on_scheduler(_computed).items() if n > 1}
    assert again == lost
