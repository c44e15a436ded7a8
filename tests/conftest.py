from __future__ import annotations

import logging
import os
import signal
import time

import pytest
import torch

import daskdl

# Ranks and the test process share two cores; one torch thread each keeps them from fighting.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


def poll_for(predicate, timeout: float = 30.0, interval: float = 0.05):
    """Wait until ``predicate()`` is true (instead of sleeping a guessed time)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def ranks_gone(client) -> bool:
    """Whether no task runs on any worker (rank tasks secede from the thread pool, so they
    count among the long-running ones, not the executing)."""
    running = client.run(
        lambda dask_worker: len(dask_worker.state.executing) + len(dask_worker.state.long_running)
    )
    return not any(running.values())


class Recording:
    """A Lightning-style experiment tracker that records what it is given (tests of the
    trackers, and of runs that log to one)."""

    def __init__(self, fail_on: str | None = None):
        self.fail_on = fail_on
        self.params, self.metrics, self.status = [], [], None

    def log_hyperparams(self, params):
        self.params.append(params)

    def log_metrics(self, metrics, step):
        if self.fail_on == "log_metrics":
            raise ConnectionError("tracking server down")
        self.metrics.append((step, metrics))

    def finalize(self, status):
        self.status = status


@pytest.fixture(scope="session")
def client():
    """Two worker processes with one thread each, shared by the tests that do not break it."""
    with daskdl.local_cluster(n_workers=2, threads_per_worker=1) as c:
        yield c


@pytest.fixture
def fresh_client():
    """A cluster of its own, for tests that kill or exhaust workers."""
    with daskdl.local_cluster(n_workers=2, threads_per_worker=1) as c:
        yield c


@pytest.fixture
def three_workers():
    with daskdl.local_cluster(n_workers=3, threads_per_worker=1) as c:
        yield c


def kill_mid_epoch(client, run, rank: int = 2, epoch: int = 2) -> str:
    """SIGKILL ``rank``'s worker once it has reported steps of ``epoch``; its address."""
    from daskdl import events

    poll_for(
        lambda: any(
            e["kind"] == "step" and e["epoch"] == epoch and e["rank"] == rank
            for e in events.replay(client, run.run_id)
        ),
        timeout=60,
    )
    victim = run.workers[rank]
    os.kill(client.run(os.getpid, workers=[victim])[victim], signal.SIGKILL)
    return victim


@pytest.fixture
def no_signing_keys(monkeypatch):
    """No signing or verify key from the environment (see daskdl.security)."""
    from daskdl import security

    for name in (security.ENV_SECRET, security.ENV_KEY_FILE, security.ENV_VERIFY_FILE):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def no_rank_may_start(monkeypatch):
    """Any rank task submitted fails the test: every bad input must be found before."""
    from daskdl.runs.launching import Launch

    def submit(*args, **kwargs):
        raise AssertionError("a rank task was submitted before the problem was found")

    monkeypatch.setattr(Launch, "submit", submit)


# Dask's threads log while the session cluster shuts down, after pytest has closed its capture
# streams; without this every such line prints a "Logging error" traceback.
logging.raiseExceptions = False


@pytest.fixture(scope="session")
def digits_split():
    """scikit-learn's digits, split 80/20 with seed 0 and standardised with the train stats."""
    train, test = daskdl.datasets.digits().split(test_size=0.2, seed=0)
    return train.standardize(), test.standardize(like=train)


# The fixtures that start a cluster: a test that takes one is an integration test. Tests that
# start their own (clusters, dask scheduler/worker processes, the CLI, a browser, a notebook)
# are marked `integration` where they are defined.
CLUSTER_FIXTURES = {"client", "fresh_client", "three_workers"}


def pytest_collection_modifyitems(config, items):
    integration = pytest.mark.integration
    for item in items:
        if CLUSTER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(integration)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
