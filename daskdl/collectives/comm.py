"""Gradient averaging between ranks over Dask's own worker-to-worker comms.

Every worker runs :class:`daskdl.worker.extension.DaskdlPlugin`, which adds two handlers to the
worker's comm server (the way Dask's P2P shuffle adds its handlers). A rank opens one connection per
peer with ``worker.rpc.connect`` (so it is TLS on a TLS cluster) and hands it to the peer's
``daskdl_link`` handler; from then on the connection carries bare frames, read straight into
the arrays they are for, and dropped in the run's mailbox (held by the worker's
:class:`daskdl.worker.extension.RunManager`). Comms without a byte stream send each message to
``daskdl_put`` as a Dask message instead. The scheduler never sees the bytes: the client-side
coordinator only tells every rank the addresses of its peers.

The all-reduce is a ring: a reduce-scatter then an all-gather, each rank sending
``2 (P - 1) / P`` of the buffer, the same volume as gloo's ring, run on the worker's event loop
where the pieces arrive. Every wait has a timeout, so a dead peer becomes
:class:`PeerTimeoutError` instead of a hang, and the coordinator can abort a collective at once
with :func:`abort`.
"""

from __future__ import annotations

import asyncio
import warnings
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import torch
from distributed.comm import Comm
from distributed.protocol import to_serialize
from distributed.worker import Worker

from daskdl.collectives.base import Group
from daskdl.collectives.hierarchy import TwoLevel, two_level_layout
from daskdl.worker.extension import (  # noqa: F401 - the errors are part of this module's API
    FRAME,
    HANDLER,
    LINK_HANDLER,
    CollectiveAborted,
    CollectiveError,
    DaskdlPlugin,
    Mailbox,
    PeerTimeoutError,
    check_timeout,
    manager,
)

WIRE_DTYPES = ("fp32", "bf16")


def _frame(stream, tag: str, data: np.ndarray):
    """Queue ``data`` as one frame on a link's stream; tornado keeps a large buffer by
    reference (no copy) until the future it returns, done once the socket has taken the last
    byte."""
    data = np.ascontiguousarray(data)
    header = msgpack.dumps((tag, data.dtype.str, data.shape))
    done = stream.write(FRAME.pack(len(header)) + header)
    if data.nbytes:
        done = stream.write(memoryview(data).cast("B"))  # type: ignore[arg-type]  # numpy's stubs
    return done


def _to_wire(piece: np.ndarray, wire: str) -> np.ndarray:
    if wire == "fp32":
        return piece
    # numpy has no bfloat16: torch converts, and the bits travel as uint16 (as
    # daskdl.collectives.kernels reads them).
    return torch.from_numpy(piece).to(torch.bfloat16).view(torch.uint16).numpy()


def _bf16(bits: np.ndarray) -> torch.Tensor:
    """The bfloat16 tensor whose bits ``bits`` (uint16) holds, sharing its memory.

    A received message is read-only; torch only reads it here (it is the source of a copy or
    an add), so it is viewed in place rather than copied, and torch's warning about
    non-writable memory is silenced for this module alone.
    """
    return torch.from_numpy(bits).view(torch.bfloat16)


warnings.filterwarnings("ignore", message="The given NumPy array is not writable", module=__name__)


def _from_wire(data: np.ndarray, wire: str) -> np.ndarray:
    if wire == "fp32":
        return data
    return torch.from_numpy(data).view(torch.bfloat16).float().numpy()


def _check_wire(buf: np.ndarray, wire: str) -> None:
    if wire not in WIRE_DTYPES:
        raise ValueError(f"wire must be one of {WIRE_DTYPES}, got {wire!r}.")
    if wire == "bf16" and buf.dtype != np.float32:
        raise TypeError(f"wire='bf16' needs a float32 buffer, got {buf.dtype}.")


def abort(run_id: str, reason: str, dask_worker=None) -> None:
    """Make every current and future wait of ``run_id`` in this worker fail at once.

    Meant for ``client.run(abort, run_id, reason)``.
    """
    manager(dask_worker).mailbox(run_id).abort(reason)


def request_stop(run_id: str, dask_worker=None) -> None:
    """Ask the ranks of ``run_id`` in this worker to stop after the current step.

    The flag travels with the next all-reduce, so all ranks stop after the same step.
    """
    manager(dask_worker).mailbox(run_id).stop_requested = True


def release_epoch(run_id: str, epochs: int, dask_worker=None) -> None:
    """Let the ranks of ``run_id`` (a run with ``epoch_gate``) in this worker go on after
    ``epochs`` epochs."""
    manager(dask_worker).mailbox(run_id).release(epochs)


def request_regroup(run_id: str, dask_worker=None) -> None:
    """Ask the ranks of ``run_id`` in this worker to hand their state back at the end of the
    current epoch, so that the run can go on with more ranks (workers that joined)."""
    manager(dask_worker).mailbox(run_id).regroup_requested = True


def ensure_plugin(client) -> None:
    """Every worker (and every worker that joins later) gets daskdl's extension."""
    client.register_plugin(DaskdlPlugin())


@dataclass
class _Link:
    """The one connection a rank sends to a peer on, kept for the group's life and written in
    order: pieces arrive in the order they were sent, so the peer works on the first while the
    rest are on their way, and no message waits for a connection from the pool.

    Over a stream (TCP or TLS) the comm is handed to the peer's ``daskdl_link`` handler once,
    and then carries bare frames (see :data:`daskdl.worker.extension.FRAME`): no serialization on
    either side, and the peer reads each message straight into the array it is for. Other comms send
    each message as a Dask message.
    """

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # made on the worker's loop
    comm: Comm | None = None

    @property
    def stream(self):
        return getattr(self.comm, "stream", None)

    def abort(self) -> None:
        if self.comm is not None:
            self.comm.abort()
            self.comm = None


def owned_chunk(rank: int, size: int, n: int) -> slice:
    """Rank ``rank``'s chunk of a buffer of ``n`` elements among ``size`` ranks: chunk
    ``(rank + 1) % size`` of ``np.array_split``, the ring's order."""
    q, extra = divmod(n, size)  # np.array_split: the first `extra` chunks hold one more
    c = (rank + 1) % size
    start = c * q + min(c, extra)
    return slice(start, start + q + (c < extra))


class DaskGroup:
    """The ranks of one run, as seen from one rank, talking through its Dask worker.

    Parameters
    ----------
    worker
        The Dask worker this rank runs in.
    run_id
        Distinguishes this run's messages from any other run on the same workers.
    rank, peers
        This rank's index into ``peers``, the worker address of every rank.
    timeout
        Seconds to wait for any one message before raising :class:`PeerTimeoutError`.
    piece_bytes
        Messages are cut to about this size so that reducing overlaps with transfer.
    direct_bytes
        Buffers up to this size skip the ring: every rank sends its whole buffer to every peer
        and adds them up in rank order. One round trip instead of ``2 (P - 1)``, which wins
        when latency, not bandwidth, is the cost (and with 2 ranks it moves the same bytes).
    allreduce
        ``"auto"``: larger buffers go through :class:`daskdl.collectives.hierarchy.TwoLevel` where
        the ranks span hosts with as many (two or more) on each, else round one ring; ``"ring"``:
        always the one ring.
    """

    def __init__(
        self,
        worker: Worker,
        run_id: str,
        rank: int,
        peers: list[str],
        timeout: float,
        piece_bytes: int = 8 * 2**20,
        direct_bytes: int = 2**20,
        allreduce: str = "auto",
    ):
        if worker.address.startswith("inproc://"):
            raise RuntimeError(
                "daskdl ranks need worker processes: the cluster runs workers as threads "
                "(processes=False). Use daskdl.local_cluster() or LocalCluster(processes=True)."
            )
        self.worker = worker
        self.run_id = run_id
        self.rank = rank
        self.peers = list(peers)
        self.size = len(peers)
        self.timeout = timeout
        self.box = manager(worker).mailbox(run_id)
        self.piece_bytes = piece_bytes
        self.direct_bytes = direct_bytes
        self._seq = 0
        self._pinned: dict[tuple, torch.Tensor] = {}
        self._wire_buffers: dict[int, np.ndarray] = {}
        # float32 sums are added then divided block by block: 256 KiB, and as much received,
        # stay in a core's L2 cache between the two passes; smaller blocks cost more torch
        # calls. (bfloat16 sums are finished in one compiled pass: daskdl.collectives.kernels.)
        self.block = 2**16
        self._links: dict[int, _Link] = {}
        self.prefix = ""  # a subgroup's messages are told apart from its parent's by it
        self._parent: DaskGroup | None = None
        self.allreduce = allreduce
        self._layout = two_level_layout(self.peers, allreduce)
        self._two_level: TwoLevel | None = None  # made at first use, once prefix is set

    def subgroup(self, ranks: list[int], name: str) -> DaskGroup:
        """The ranks ``ranks`` of this group (this rank among them) as a group of their own,
        named ``name`` (the same on each of them): its collectives and messages never meet
        the parent's or another subgroup's. A pipeline's stage is one."""
        sub = DaskGroup(
            self.worker, self.run_id, ranks.index(self.rank), [self.peers[i] for i in ranks],
            self.timeout, self.piece_bytes, self.direct_bytes, self.allreduce,
        )  # fmt: skip
        sub.prefix, sub._parent = f"{self.prefix}{name}/", self
        return sub

    @property
    def _loop(self) -> asyncio.AbstractEventLoop:
        return self.worker.loop.asyncio_loop  # type: ignore[attr-defined]  # tornado's stubs lack it

    def _send(self, dest: int, tag: str, data: np.ndarray):
        """Send ``data`` to rank ``dest``; returns a future that is done once ``data`` may be
        changed again."""
        return asyncio.run_coroutine_threadsafe(
            self._write(dest, self.prefix + tag, data), self._loop
        )

    async def _connect(self, dest: int) -> _Link:
        link = self._links.setdefault(dest, _Link())
        if link.comm is None:
            async with link.lock:
                if link.comm is None:
                    comm = await self.worker.rpc.connect(self.peers[dest])
                    if getattr(comm, "stream", None) is not None:
                        opening = {"op": LINK_HANDLER, "run_id": self.run_id, "reply": False}
                        await comm.write(opening)
                    link.comm = comm
        return link

    async def _write(self, dest: int, tag: str, data: np.ndarray) -> None:
        link = await self._connect(dest)
        try:
            if link.stream is not None:
                await _frame(link.stream, tag, data)
            else:
                async with link.lock:  # one message at a time, in order
                    # No reply: the receiving rank's wait (with its timeout) acknowledges.
                    message = {"op": HANDLER, "run_id": self.run_id, "tag": tag}
                    await link.comm.write(  # type: ignore[union-attr]  # _connect set it
                        {**message, "data": to_serialize(data.copy()), "reply": False},
                        on_error="raise",
                    )
        except BaseException:
            # A message cut off half-way (a timeout, a lost peer) leaves the stream unusable.
            link.abort()
            raise

    def _start(self, link: _Link, dest: int, tag: str, data: np.ndarray):
        """On the loop: send ``data`` to ``dest``, queued at once over a stream (so messages
        keep the order they were started in); an awaitable done once ``data`` may change."""
        if link.stream is not None:
            return _frame(link.stream, self.prefix + tag, data)
        return asyncio.ensure_future(self._write(dest, self.prefix + tag, data))

    def _wait_sent(self, fut, dest: int) -> None:
        try:
            fut.result(timeout=self.timeout)
        except TimeoutError:
            fut.cancel()
            raise self._undelivered(dest) from None
        except OSError as e:
            raise self._undelivered(dest, e) from e

    def _recv(self, src: int, tag: str) -> np.ndarray:
        return self.box.take(
            self.prefix + tag,
            self.timeout,
            lambda: f"rank {src} ({self.peers[src]}) from rank {self.rank}",
        )

    def allreduce_(self, buf, wire: str = "fp32", divide_by: int = 1):
        """Sum the 1-D ``buf`` (numpy array or torch tensor) over all ranks, in place; every
        rank ends with bit-identical sums.

        ``wire="bf16"`` sends a float32 buffer as bfloat16, half the bytes; sums are still
        formed in float32, and every rank ends with the same (bf16-rounded) values. A CUDA
        tensor is staged through a pinned host buffer (a copy into pageable memory is about
        30 times slower). ``divide_by`` divides the sums (``allreduce_mean_``), each rank
        dividing only the part it finished.
        """
        if self.size == 1:
            return buf
        if torch.is_tensor(buf):  # checked as the numpy array it is (or is staged in)
            if buf.device.type == "cpu":
                self.allreduce_(buf.numpy(), wire, divide_by)
                return buf
            host = self._pinned_like(buf)
            host.copy_(buf)  # synchronous: waits for the kernels that produced buf
            self.allreduce_(host.numpy(), wire, divide_by)
            buf.copy_(host, non_blocking=True)  # ordered before later kernels on the stream
            return buf
        _check_wire(buf, wire)
        self._seq += 1
        if buf.nbytes <= self.direct_bytes:
            return self._direct(buf, wire, divide_by)
        if self._layout is not None:
            if self._two_level is None:
                self._two_level = TwoLevel(self, self._layout)
            return self._two_level.allreduce_(buf, wire, divide_by)
        return self._ring(buf, wire, divide_by)

    # The ring's two halves apart, for sharded training state: after ``reduce_scatter_`` each
    # rank holds the finished sum of one chunk of the buffer (``owned``), and ``all_gather_``
    # hands every rank's chunk to all. Run back to back they are ``allreduce_``.

    def owned(self, n: int) -> slice:
        """The chunk of a buffer of ``n`` elements that this rank finishes in
        ``reduce_scatter_`` and contributes to ``all_gather_`` (see :func:`owned_chunk`)."""
        return owned_chunk(self.rank, self.size, n)

    def reduce_scatter_(self, buf: np.ndarray, wire: str = "fp32", divide_by: int = 1):
        """Sum the 1-D ``buf`` over the ranks into this rank's ``owned`` chunk of it (divided
        by ``divide_by``); the rest of ``buf`` is left with partial sums. Returns the chunk."""
        self._check(buf, wire)
        if self.size > 1:
            self._seq += 1
            self._ring(buf, wire, divide_by, gather=False)
        elif divide_by != 1:
            buf /= divide_by
        return buf[self.owned(buf.size)]

    def all_gather_(self, buf: np.ndarray, wire: str = "fp32"):
        """Every rank's ``owned`` chunk of the 1-D ``buf`` to every rank, in place (with
        ``wire="bf16"`` each chunk is rounded to bfloat16 on its owner as well, so that every
        rank ends bit-identical)."""
        self._check(buf, wire)
        if self.size > 1:
            self._seq += 1
            self._ring(buf, wire, 1, scatter=False)
        return buf

    def _check(self, buf, wire: str) -> None:
        if not isinstance(buf, np.ndarray) or buf.ndim != 1:
            raise TypeError(f"needs a 1-D numpy array, got {type(buf).__name__}.")
        _check_wire(buf, wire)

    def send(self, dest: int, tag: str, data: np.ndarray) -> None:
        """Send ``data`` to rank ``dest`` under ``tag`` (which its ``recv`` names): a
        pipeline stage's activations or their gradients. Returns once ``data`` may change."""
        self.isend(dest, tag, data)()

    def isend(self, dest: int, tag: str, data: np.ndarray):
        """Start :meth:`send`; returns the function that waits for it (``data`` must not
        change until then)."""
        fut = self._send(dest, f"p2p:{self.rank}:{tag}", data)
        return lambda: self._wait_sent(fut, dest)

    def recv(self, src: int, tag: str) -> np.ndarray:
        """What rank ``src`` sent under ``tag``, waiting up to the group's timeout."""
        return self._recv(src, f"p2p:{src}:{tag}")

    def _ring(
        self, buf: np.ndarray, wire: str, divide_by: int, scatter: bool = True, gather: bool = True
    ) -> np.ndarray:
        """Reduce-scatter then all-gather around the ring, pipelined piece by piece (or one
        of the two: ``scatter``, ``gather``), run on the worker's event loop.

        On the loop, a piece is added to and passed on in the same callback that read it: no
        thread hands it over, and received pieces wait for nobody. Each chunk is cut into pieces
        of about ``piece_bytes`` on the wire, so all ``2 (P - 1)`` steps overlap; the
        reduce-scatter's last step finishes each piece (divides, rounds to the wire format) and
        starts it on the all-gather at once.
        """
        if wire == "bf16":
            from daskdl.collectives import kernels  # noqa: F401 - numba compiles here, not on the loop
        return asyncio.run_coroutine_threadsafe(
            self._ring_loop(buf, wire, divide_by, scatter, gather), self._loop
        ).result()

    async def _ring_loop(
        self, buf: np.ndarray, wire: str, divide_by: int, scatter: bool, gather: bool
    ) -> np.ndarray:
        p, r, tag = self.size, self.rank, self._seq
        right, left = (r + 1) % p, (r - 1) % p
        bf16 = wire == "bf16"
        if bf16:
            from daskdl.collectives import kernels
        chunks = np.array_split(buf, p)
        # The same cut on every rank: it depends only on the buffer's size.
        pieces = [self._cut(chunk, wire) for chunk in chunks]
        # With bf16 a piece's wire form goes into a buffer kept between calls; with fp32 the
        # pieces of ``buf`` travel as they are.
        wired = (
            [self._cut(w, wire) for w in np.array_split(self._scratch(buf.size), p)]
            if bf16
            else pieces
        )
        link = await self._connect(right)
        if not bf16:
            # Finished pieces are read straight into ``buf``; one that came (or began to come)
            # before its post has an array of its own, and is copied.
            for s in range(p - 1 if gather else 0):
                c = (r - s) % p
                for k, piece in enumerate(pieces[c]):
                    self.box.post(f"{self.prefix}{tag}:ag{s}:{k}", piece)
        sent = []  # every send, waited for before returning: ``buf`` is the caller's again

        def send(step: str, k: int, data: np.ndarray) -> None:
            sent.append(self._start(link, right, f"{tag}:{step}:{k}", data))

        async def recv(step: str, k: int) -> np.ndarray:
            return await self.box.arrive(
                f"{self.prefix}{tag}:{step}:{k}",
                self.timeout,
                lambda: f"rank {left} ({self.peers[left]}) from rank {r}",
            )

        try:
            # Reduce-scatter: after p - 1 steps this rank holds the full sum of chunk r + 1.
            for k, piece in enumerate(pieces[r] if scatter else ()):
                if bf16:
                    _bf16(wired[r][k]).copy_(torch.from_numpy(piece))
                send("rs0", k, wired[r][k])
            for s in range(p - 1 if scatter else 0):
                c = (r - s - 1) % p
                last = s == p - 2
                for k, piece in enumerate(pieces[c]):
                    incoming = await recv(f"rs{s}", k)
                    if bf16:
                        if last:
                            kernels.add_divide_round(piece, incoming, wired[c][k], divide_by)
                        else:
                            kernels.add_round(piece, incoming, wired[c][k])
                    else:
                        self._add(piece, incoming, divide_by if last else 1)
                    if gather or not last:
                        send("ag0" if last else f"rs{s + 1}", k, wired[c][k])
            if not scatter:  # this rank's chunk is finished already: it starts the all-gather
                c = (r + 1) % p
                for k, piece in enumerate(pieces[c]):
                    if bf16:
                        _bf16(wired[c][k]).copy_(torch.from_numpy(piece))
                        torch.from_numpy(piece).copy_(_bf16(wired[c][k]))  # as peers get it
                    send("ag0", k, wired[c][k])
            # All-gather: finished pieces travel on around the ring, forwarded as they arrive.
            for s in range(p - 1 if gather else 0):
                c = (r - s) % p
                for k, piece in enumerate(pieces[c]):
                    incoming = await recv(f"ag{s}", k)
                    if s < p - 2:
                        send(f"ag{s + 1}", k, incoming)
                    if bf16:
                        torch.from_numpy(piece).copy_(_bf16(incoming))
                    elif incoming is not piece:  # it came before its place was posted
                        piece[...] = incoming
            await self._sent(sent, right)
        except BaseException:
            link.abort()  # part of a message may be on its way: the stream is unusable
            # A late piece must not be read into ``buf`` once the caller has it back.
            self.box.unpost(f"{self.prefix}{tag}:")
            raise
        return buf

    def _undelivered(self, dest: int, lost: OSError | None = None) -> PeerTimeoutError:
        peer = f"rank {dest} ({self.peers[dest]})"
        if lost is not None:
            return PeerTimeoutError(f"rank {self.rank} lost {peer}: {lost}")
        return PeerTimeoutError(
            f"rank {self.rank} could not deliver to {peer} within {self.timeout:g}s"
        )

    async def _sent(self, sent: list, dest: int) -> None:
        try:
            await asyncio.wait_for(asyncio.gather(*sent), self.timeout)
        except TimeoutError:
            raise self._undelivered(dest) from None
        except OSError as e:
            raise self._undelivered(dest, e) from e

    def _add(self, piece: np.ndarray, incoming: np.ndarray, divide_by: int) -> None:
        # Block by block, so that dividing finds each block still in the CPU's cache; views
        # made in one call (split), as each torch call costs microseconds.
        added = torch.from_numpy(incoming).split(self.block)
        for block, other in zip(torch.from_numpy(piece).split(self.block), added):
            block.add_(other)
            if divide_by != 1:
                block.div_(divide_by)  # once, on the finished piece

    def _cut(self, data: np.ndarray, wire: str) -> list[np.ndarray]:
        """``data`` (a chunk, or its wire form) in pieces of about ``piece_bytes`` on the wire.

        Sender and receiver cut the same chunk index of equal-sized buffers, so they agree.
        """
        wire_bytes = data.size * (2 if wire == "bf16" else data.itemsize)
        return np.array_split(data, max(1, -(-wire_bytes // self.piece_bytes)))

    def _scratch(self, n: int) -> np.ndarray:
        # One per buffer size: gradient buckets of different sizes each keep theirs.
        if n not in self._wire_buffers:
            self._wire_buffers[n] = np.empty(n, dtype=np.uint16)
        return self._wire_buffers[n]

    def _pinned_like(self, tensor: torch.Tensor) -> torch.Tensor:
        key = (tensor.numel(), tensor.dtype)
        host = self._pinned.get(key)
        if host is None:
            host = self._pinned[key] = torch.empty(key[0], dtype=key[1], pin_memory=True)
        return host

    def _direct(self, buf: np.ndarray, wire: str, divide_by: int) -> np.ndarray:
        """Everyone sends everything to everyone; the sum is formed in rank order, so every
        rank computes the same float additions and ends bit-identical."""
        tag = f"{self._seq}:d"
        wired = _to_wire(buf, wire)
        sent = [
            (self._send(dest, f"{tag}:{self.rank}", wired), dest)
            for dest in range(self.size)
            if dest != self.rank
        ]
        parts = [
            wired if src == self.rank else self._recv(src, f"{tag}:{src}")
            for src in range(self.size)
        ]
        parts = [_from_wire(part, wire) for part in parts]
        for fut, dest in sent:
            self._wait_sent(fut, dest)
        total = parts[0].copy()
        for part in parts[1:]:
            total += part
        if divide_by != 1:
            total /= divide_by
        buf[...] = total
        return buf

    def allreduce_mean_(self, buf, wire: str = "fp32"):
        return self.allreduce_(buf, wire, divide_by=self.size)

    def close(self) -> None:
        if self._two_level is not None:
            self._two_level.close()
        if self._parent is None:  # the run's mailbox is the whole group's
            manager(self.worker).discard(self.run_id)
        if self._links:
            try:
                asyncio.run_coroutine_threadsafe(self._release_links(), self._loop).result(
                    timeout=10
                )
            except Exception:  # the worker is shutting down: its comms go with it
                pass

    async def _release_links(self) -> None:
        for dest, link in self._links.items():
            comm, link.comm = link.comm, None
            if comm is None or comm.closed():
                continue
            stream = getattr(comm, "stream", None)
            if stream is not None and stream.writing():
                # Left over from a collective that failed part-way: nobody reads it now.
                comm.abort()
                continue
            if stream is not None:
                await stream.write(FRAME.pack(0))  # the peer's handler gives the comm back
            self.worker.rpc.reuse(self.peers[dest], comm)
        self._links.clear()


class TorchGroup:
    """The same ranks as :class:`DaskGroup`, averaging through ``torch.distributed`` process
    groups instead of Dask's comms (``backend="torch"``): gloo, and NCCL for CUDA tensors.

    Rank 0 opens a ``TCPStore`` on a port the OS picks and publishes its address through the
    scheduler (a ``distributed.Variable``); the others read it there and connect. The process
    group is private to this run (no global default group), so several runs can share workers.
    Stop requests still arrive through the worker's mailbox.
    """

    def __init__(self, worker: Worker, run_id: str, rank: int, peers: list[str], timeout: float):
        import datetime

        import torch.distributed as dist
        from distributed import Variable, get_client
        from distributed.comm import get_address_host

        self.run_id, self.rank, self.size, self.timeout = run_id, rank, len(peers), timeout
        self.worker = worker
        self.box = manager(worker).mailbox(run_id)
        self._variable = Variable(f"daskdl-torch-{run_id}", client=get_client())
        wait = datetime.timedelta(seconds=timeout)
        if rank == 0:
            host = get_address_host(worker.address)
            self._store: Any = dist.TCPStore(
                host, 0, self.size, True, timeout=wait, wait_for_workers=False
            )
            self._variable.set(f"{host}:{self._store.port}")
        else:
            try:
                address = self._variable.get(timeout=timeout)
            except TimeoutError:
                raise PeerTimeoutError(
                    f"rank {rank} waited {timeout:g}s for rank 0 ({peers[0]}) to publish its "
                    "torch.distributed address"
                ) from None
            host, port = address.rsplit(":", 1)
            self._store = dist.TCPStore(host, int(port), self.size, False, timeout=wait)
        # Any: None once closed, and torch's stubs lack the process groups' methods.
        self._pg: Any = dist.ProcessGroupGloo(
            dist.PrefixStore("gloo", self._store), rank, self.size, wait
        )
        self._nccl_pg: Any = None

    def allreduce_(self, buf, wire: str = "fp32", divide_by: int = 1):
        """Sum ``buf`` (numpy array or torch tensor) over all ranks in place: CUDA tensors
        through NCCL, everything else through gloo."""
        if self.size == 1:
            return buf
        if self.box.aborted is not None:
            raise CollectiveAborted(self.box.aborted)
        tensor = buf if torch.is_tensor(buf) else torch.from_numpy(buf)
        group = self._nccl() if tensor.is_cuda else self._pg
        if wire == "bf16":
            sent = tensor.to(torch.bfloat16)
            group.allreduce([sent]).wait()
            tensor.copy_(sent)
        else:
            group.allreduce([tensor]).wait()
        return buf

    def _nccl(self):
        # Made on first use: every rank reaches its first CUDA all-reduce at the same point.
        if self._nccl_pg is None:
            import torch.distributed as dist

            store = dist.PrefixStore("nccl", self._store)
            self._nccl_pg = dist.ProcessGroupNCCL(store, self.rank, self.size)
        return self._nccl_pg

    def allreduce_mean_(self, buf, wire: str = "fp32"):
        self.allreduce_(buf, wire)
        buf /= self.size
        return buf

    def owned(self, n: int) -> slice:
        return owned_chunk(self.rank, self.size, n)

    def reduce_scatter_(self, buf: np.ndarray, wire: str = "fp32", divide_by: int = 1):
        """As :meth:`DaskGroup.reduce_scatter_`. gloo has no reduce-scatter: an all-reduce,
        of which this rank keeps its chunk (twice the ring half's bytes)."""
        self.allreduce_(buf, wire)
        chunk = buf[self.owned(buf.size)]
        if divide_by != 1:
            chunk /= divide_by
        return chunk

    def all_gather_(self, buf: np.ndarray, wire: str = "fp32"):
        """As :meth:`DaskGroup.all_gather_`, as an all-reduce of this rank's chunk and zeros
        (gloo's all-gather wants chunks of one size)."""
        mine = self.owned(buf.size)
        kept = buf[mine].copy()
        buf[:] = 0
        buf[mine] = kept
        return self.allreduce_(buf, wire)

    def close(self) -> None:
        # Tear down in order: the group, then the store; rank 0 removes the published address.
        self._pg = self._nccl_pg = None
        self._store = None
        if self.rank == 0:
            try:
                self._variable.delete()
            except Exception:  # the scheduler may already be gone at shutdown
                pass
        manager(self.worker).discard(self.run_id)


def make_group(
    backend: str,
    worker: Worker,
    run_id: str,
    rank: int,
    peers: list[str],
    timeout: float,
    allreduce: str = "auto",
) -> Group:
    check_timeout(timeout)
    if backend == "torch":
        return TorchGroup(worker, run_id, rank, peers, timeout)
    return DaskGroup(worker, run_id, rank, peers, timeout, allreduce=allreduce)
