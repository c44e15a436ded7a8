"""The Dask all-reduce: exact sums for any number of ranks and buffer size, and timeouts."""

from __future__ import annotations

import time
import uuid
import weakref

import numpy as np
import pytest
from distributed import Client, LocalCluster, Nanny, Scheduler, SpecCluster, get_worker

import daskdl
from daskdl.cluster import workers_info
from daskdl.collectives import comm, hierarchy
from daskdl.worker.extension import Mailbox


def _allreduce(
    run_id, rank, peers, n, timeout, rounds=3, wire="fp32", dtype=np.float64, algorithm="ring"
):
    direct_bytes = 2**40 if algorithm == "direct" else 0
    # "pieces": 1001 float64 on 3 ranks are chunks of 2672, 2672 and 2664 bytes, and pieces of
    # 2668 bytes cut them into 2, 2 and 1 pieces: sender and receiver must still agree.
    piece_bytes = 2668 if algorithm == "pieces" else 4 * 2**20
    group = comm.DaskGroup(
        get_worker(), run_id, rank, peers, timeout, piece_bytes, direct_bytes=direct_bytes
    )
    if algorithm == "pieces":
        group.block = 97  # float32 pieces are added and divided in blocks: uneven ones too
    try:
        out = []
        for k in range(rounds):
            buf = np.random.default_rng([rank, k]).normal(size=n).astype(dtype)
            out.append(group.allreduce_(buf, wire).copy())
        return out
    finally:
        group.close()


@pytest.fixture(scope="module")
def three():
    with daskdl.local_cluster(n_workers=3, threads_per_worker=1) as c:
        comm.ensure_plugin(c)
        yield c


def _run_allreduce(client, peers, n, **options) -> list:
    """Every rank's results of :func:`_allreduce`, one rank on each worker of ``peers``."""
    run_id = uuid.uuid4().hex
    futures = [
        client.submit(_allreduce, run_id, r, peers, n, 20, workers=[w], pure=False, **options)
        for r, w in enumerate(peers)
    ]
    return client.gather(futures)


def _assert_sums(results, n, tol):
    """Every rank's sums match numpy's within ``tol`` and are bit-identical to every other
    rank's, so replicas never drift apart."""
    for k in range(len(results[0])):
        expected = sum(np.random.default_rng([r, k]).normal(size=n) for r in range(len(results)))
        for rank_results in results:
            np.testing.assert_allclose(rank_results[k], expected, rtol=tol, atol=tol)
        for rank_results in results[1:]:
            np.testing.assert_array_equal(rank_results[k], results[0][k])


@pytest.mark.integration
@pytest.mark.parametrize("algorithm", ["ring", "direct", "pieces"])
@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("n", [1, 2, 1001, 30_000])
def test_allreduce_sums_exactly_like_numpy(three, ranks, n, algorithm):
    peers = sorted(workers_info(three))[:ranks]
    _assert_sums(_run_allreduce(three, peers, n, algorithm=algorithm), n, 1e-12)


@pytest.mark.integration
@pytest.mark.parametrize("algorithm", ["ring", "direct", "pieces"])
@pytest.mark.parametrize("ranks", [2, 3])
def test_bf16_on_the_wire(three, ranks, algorithm):
    peers = sorted(workers_info(three))[:ranks]
    results = _run_allreduce(
        three, peers, 10_001, wire="bf16", dtype=np.float32, algorithm=algorithm
    )
    # bfloat16 keeps 8 bits of mantissa; each partial sum is rounded once per hop.
    _assert_sums(results, 10_001, 2e-2)
    assert all(rounds.dtype == np.float32 for rounds in results[0])


@pytest.mark.integration
def test_five_ranks_pipeline_through_every_hop():
    # Five ranks pass pieces on through three intermediate reduce-scatter hops and three
    # all-gather hops, each piece forwarded as soon as it arrives (6 to 8 pieces a chunk).
    with daskdl.local_cluster(n_workers=5, threads_per_worker=1) as client:
        comm.ensure_plugin(client)
        peers = sorted(workers_info(client))
        exact = _run_allreduce(client, peers, 10_001, algorithm="pieces")
        bf16 = _run_allreduce(
            client, peers, 50_003, wire="bf16", dtype=np.float32, algorithm="pieces"
        )
    _assert_sums(exact, 10_001, 1e-12)
    _assert_sums(bf16, 50_003, 5e-2)


@pytest.mark.integration
def test_a_missing_peer_times_out(three):
    peers = sorted(workers_info(three))[:2]
    run_id = uuid.uuid4().hex
    start = time.monotonic()
    # Rank 1 never joins: rank 0 must give up after its timeout, naming the peer.
    future = three.submit(_allreduce, run_id, 0, peers, 10, 2, workers=[peers[0]], pure=False)
    with pytest.raises(comm.PeerTimeoutError, match=f"rank 1 \\({peers[1]}\\)"):
        future.result()
    assert time.monotonic() - start < 15


@pytest.mark.integration
def test_abort_wakes_a_waiting_rank(three):
    peers = sorted(workers_info(three))[:2]
    run_id = uuid.uuid4().hex
    future = three.submit(_allreduce, run_id, 0, peers, 10, 60, workers=[peers[0]], pure=False)
    time.sleep(0.5)
    three.run(comm.abort, run_id, "cancelled by test", workers=[peers[0]])
    with pytest.raises(comm.CollectiveAborted, match="cancelled by test"):
        future.result(timeout=20)


def _send_then_overwrite(run_id, rank, peers, n):
    group = comm.DaskGroup(get_worker(), run_id, rank, peers, timeout=30)
    try:
        if rank == 1:
            # The receiver's event loop stalls for a while, as a busy peer's would: the
            # sender's socket fills up long before the message has left.
            get_worker().loop.add_callback(time.sleep, 1.5)
            return bool((group._recv(0, "m") == 1).all())
        time.sleep(0.5)
        data = np.ones(n, dtype=np.uint8)
        group._wait_sent(group._send(1, "m", data), 1)
        data[:] = 0  # a sent buffer is the sender's again
        return True
    finally:
        group.close()


@pytest.mark.integration
def test_a_sent_buffer_can_be_changed_at_once(three):
    # Dask's Comm.write returns once a message is queued; daskdl's send is done only when the
    # socket has taken every byte, so the ring may write into a piece it has just sent.
    peers = sorted(workers_info(three))[:2]
    run_id = uuid.uuid4().hex
    futures = [
        three.submit(_send_then_overwrite, run_id, r, peers, 64 * 2**20, workers=[w], pure=False)
        for r, w in enumerate(peers)
    ]
    assert three.gather(futures) == [True, True]


@pytest.mark.integration
def test_allreduce_over_websocket_comms():
    # A comm without a tornado stream (Dask's ws://) cannot say when a message has left: such
    # sends carry a copy, and the sums are as exact as over tcp://.
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            protocol="ws://",
            host="127.0.0.1",
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):
        comm.ensure_plugin(client)
        peers = sorted(workers_info(client))
        results = _run_allreduce(client, peers, 1001, algorithm="pieces")
    _assert_sums(results, 1001, 1e-12)


def _halves(run_id, rank, peers, n, wire, rounds=2):
    """Each round: reduce-scatter, the owned chunk scaled by the rank (as an optimizer would
    update its shard), all-gather; then a send around the ring."""
    group = comm.DaskGroup(get_worker(), run_id, rank, peers, 20, piece_bytes=4000)
    try:
        out = []
        for k in range(rounds):
            buf = np.random.default_rng([rank, k]).normal(size=n).astype(np.float32)
            owned = group.owned(n)
            chunk = group.reduce_scatter_(buf, wire, divide_by=len(peers)).copy()
            buf[owned] = chunk * (rank + 1)
            out.append((owned, chunk, group.all_gather_(buf, wire).copy()))
        group.send((rank + 1) % len(peers), "hello", np.full(3, rank, np.int64))
        got = group.recv((rank - 1) % len(peers), "hello")
        return out, got
    finally:
        group.close()


def _check_halves(client, peers, n, wire, tol):
    run_id = uuid.uuid4().hex
    results = client.gather(
        [
            client.submit(_halves, run_id, r, peers, n, wire, workers=[w], pure=False)
            for r, w in enumerate(peers)
        ]
    )
    p = len(peers)
    for k in range(2):
        mean = sum(np.random.default_rng([r, k]).normal(size=n) for r in range(p)) / p
        expected = np.empty(n)
        owners = [results[r][0][k][0] for r in range(p)]
        assert sorted((s.start, s.stop) for s in owners)[0][0] == 0  # the chunks cover it all
        assert sum(s.stop - s.start for s in owners) == n
        for r, (rounds, _) in enumerate(results):
            owned, chunk, _ = rounds[k]
            np.testing.assert_allclose(chunk, mean[owned], rtol=tol, atol=tol)
            expected[owned] = chunk * (r + 1)
        for rounds, _ in results:
            np.testing.assert_array_equal(rounds[k][2], results[0][0][k][2])  # bit-identical
            np.testing.assert_allclose(rounds[k][2], expected, rtol=tol, atol=tol)
    for r, (_, got) in enumerate(results):
        assert got.tolist() == [(r - 1) % p] * 3


@pytest.mark.parametrize("wire,tol", [("fp32", 1e-5), ("bf16", 5e-2)])
@pytest.mark.parametrize("ranks", [2, 3])
def test_reduce_scatter_and_all_gather_are_the_rings_halves(three, ranks, wire, tol):
    peers = sorted(workers_info(three))[:ranks]
    _check_halves(three, peers, 10_001, wire, tol)


@pytest.mark.integration
def test_the_collectives_hold_at_eight_ranks():
    with daskdl.local_cluster(n_workers=8, threads_per_worker=1) as client:
        comm.ensure_plugin(client)
        peers = sorted(workers_info(client))
        _assert_sums(_run_allreduce(client, peers, 20_011, algorithm="pieces"), 20_011, 1e-12)
        _check_halves(client, peers, 20_011, "fp32", 1e-5)


@pytest.fixture(scope="module")
def two_hosts():
    """Four worker processes on two loopback addresses, which daskdl sees as two hosts."""
    workers = {
        f"{host}-{i}": {
            "cls": Nanny,
            "options": {"nthreads": 1, "host": host, "dashboard_address": None},
        }
        for host in ("127.0.0.1", "127.0.0.2")
        for i in range(2)
    }
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": None}}
    with SpecCluster(scheduler=scheduler, workers=workers) as cluster, Client(cluster) as c:
        c.wait_for_workers(4)
        comm.ensure_plugin(c)
        yield c


def _allreduce_two_level(run_id, rank, peers, n, wire, algorithm):
    group = comm.DaskGroup(get_worker(), run_id, rank, peers, 20, 4000, 0, algorithm)
    try:
        out = []
        for k in range(2):
            buf = np.random.default_rng([rank, k]).normal(size=n).astype(np.float32)
            out.append(group.allreduce_(buf, wire, divide_by=len(peers)).copy())
        return out, group._two_level is not None
    finally:
        group.close()


@pytest.mark.integration
@pytest.mark.parametrize("wire,tol", [("fp32", 1e-5), ("bf16", 5e-2)])
def test_two_level_allreduce_across_hosts(two_hosts, wire, tol):
    # Ranks interleaved over the hosts: the layout groups them by host, not by rank order.
    info = workers_info(two_hosts)
    by_host = [sorted(a for a in info if f"//{h}:" in a) for h in ("127.0.0.1", "127.0.0.2")]
    peers = [by_host[0][0], by_host[1][0], by_host[0][1], by_host[1][1]]
    n = 30_011
    results = {}
    for algorithm in ("auto", "ring"):
        run_id = uuid.uuid4().hex
        futures = [
            two_hosts.submit(
                _allreduce_two_level, run_id, r, peers, n, wire, algorithm, workers=[w], pure=False
            )
            for r, w in enumerate(peers)
        ]
        results[algorithm] = two_hosts.gather(futures)
    assert all(used for _, used in results["auto"])
    assert not any(used for _, used in results["ring"])
    for k in range(2):
        mean = sum(np.random.default_rng([r, k]).normal(size=n) for r in range(4)) / 4
        for rank_results, _ in results["auto"]:
            np.testing.assert_allclose(rank_results[k], mean, rtol=tol, atol=tol)
            np.testing.assert_array_equal(rank_results[k], results["auto"][0][0][k])
        np.testing.assert_allclose(
            results["auto"][0][0][k], results["ring"][0][0][k], rtol=tol, atol=tol
        )


def test_two_level_layout_groups_ranks_by_host():
    a, b = "tcp://10.0.0.1", "tls://10.0.0.2"
    assert hierarchy.two_level_layout([f"{a}:1", f"{b}:1", f"{a}:2", f"{b}:2"]) == [[0, 2], [1, 3]]
    # One host, one rank per host, unequal hosts, or the ring asked for: one ring.
    assert hierarchy.two_level_layout([f"{a}:1", f"{a}:2"]) is None
    assert hierarchy.two_level_layout([f"{a}:1", f"{b}:1"]) is None
    assert hierarchy.two_level_layout([f"{a}:1", f"{a}:2", f"{b}:1"]) is None
    assert hierarchy.two_level_layout([f"{a}:1", f"{a}:2", f"{b}:1", f"{b}:2"], "ring") is None
    with pytest.raises(ValueError, match="allreduce must be one of"):
        hierarchy.two_level_layout([f"{a}:1"], "tree")


@pytest.mark.integration
def test_a_post_overtaken_by_its_message_does_not_keep_the_buffer_alive():
    # The link began reading the message into an array of its own before the ring posted
    # where it should go: the post must go with the message, or it keeps the caller's whole
    # buffer (for ZeRO-3, a gathered unit of parameters) alive for the rest of the run.
    box = Mailbox()
    buf = np.zeros(1000, np.float32)
    alive = weakref.ref(buf)
    landed = box.landing("t", buf.dtype.str, (500,))  # no post yet: a new array
    box.post("t", buf[:500])
    box.put("t", landed)
    assert box.take("t", 1, lambda: "peer") is landed
    del buf
    assert alive() is None
