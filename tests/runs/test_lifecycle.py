"""How a run ends when something outside it goes wrong: its client closes, or a rank is stuck
in user code. Either way the run says so, and the cluster trains the next run."""

from __future__ import annotations

import logging
import sys
import time

import cloudpickle
import numpy as np
import pytest
from conftest import poll_for, ranks_gone
from distributed import Client
from torch import nn

import daskdl
from daskdl import Dataset, events
from daskdl.cluster import workers_info

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests

X = np.random.default_rng(0).normal(size=(2000, 4)).astype(np.float32)
y = np.arange(2000) % 2
data = Dataset.from_numpy(X, y, chunks=500)


def _trains(client) -> bool:
    return daskdl.fit(client, "mlp", data, epochs=1, batch_size=64, progress=False).status == (
        "finished"
    )


def test_a_run_whose_client_closed_is_cancelled_and_says_why(fresh_client):
    other = Client(fresh_client.scheduler.address)
    run = daskdl.fit(other, "mlp", data, epochs=200, batch_size=16, block=False, progress=False)
    poll_for(lambda: any(e["kind"] == "step" for e in events.replay(fresh_client, run.run_id)))
    other.close()
    assert run.status == "cancelled" and run.done
    with pytest.raises(daskdl.RunError, match="the client that started it closed before it ended"):
        run.wait()

    poll_for(lambda: ranks_gone(fresh_client), timeout=60, interval=0.5)
    assert _trains(fresh_client)


class StuckOnWorkers(nn.Module):
    """Trains for 2 s on the workers, then never returns from forward (user code stuck in
    I/O, say); the client's dry run is not affected."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.started = None

    def forward(self, x):
        from distributed import get_worker

        try:
            get_worker()
        except ValueError:
            return self.fc(x)
        self.started = self.started or time.monotonic()
        if time.monotonic() - self.started > 2:  # after a few step events
            time.sleep(3600)
        return self.fc(x)


def test_a_rank_stuck_in_user_code_is_cancelled_and_the_cluster_trains_on(fresh_client, caplog):
    run = daskdl.fit(
        fresh_client, StuckOnWorkers, data, epochs=1000, batch_size=16, block=False, progress=False
    )
    poll_for(lambda: any(e["kind"] == "step" for e in events.replay(fresh_client, run.run_id)))
    time.sleep(3)  # the ranks are stuck now
    before = set(workers_info(fresh_client))
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="daskdl.runs.run"):
        run.stop(timeout=3)  # a stop request never reaches a stuck rank: it cancels
    assert time.monotonic() - start < 60
    assert run.status == "cancelled"
    assert "restarting those workers" in caplog.text
    fresh_client.wait_for_workers(2, timeout=60)
    assert set(workers_info(fresh_client)) != before  # the stuck ones were restarted
    with pytest.raises(daskdl.RunError, match="was cancelled"):
        run.wait()
    fresh_client.wait_for_workers(2, timeout=60)
    assert _trains(fresh_client)


def test_cancel_ends_a_healthy_run_without_restarting_workers(fresh_client):
    before = sorted(workers_info(fresh_client))
    run = daskdl.fit(
        fresh_client, "mlp", data, epochs=200, batch_size=16, block=False, progress=False
    )
    poll_for(lambda: any(e["kind"] == "step" for e in events.replay(fresh_client, run.run_id)))
    run.cancel()
    assert run.status == "cancelled"
    assert sorted(workers_info(fresh_client)) == before
    assert _trains(fresh_client)
