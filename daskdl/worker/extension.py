"""The worker side's one owner of daskdl's per-worker state: :class:`RunManager`.

Every worker gets one, as ``worker.extensions["daskdl"]``, from :class:`DaskdlPlugin` (as
distributed's ``ShuffleWorkerPlugin`` gives each worker the shuffle's). It holds the runs'
mailboxes, keyed by comm id (a run and its membership generation), the process tuning its
ranks share, and a teardown that wakes every rank still waiting when the worker closes.

A mailbox takes the messages peers send to a rank of the run (``daskdl_put``, the one handler
the plugin adds) and the run's control flags (abort, stop, regroup) that the coordinator sets.
"""

from __future__ import annotations

import asyncio
import logging
import math
import struct
import threading
import time
from collections import OrderedDict

import msgpack
import numpy as np
from distributed import WorkerPlugin, get_worker
from distributed.comm import CommClosedError
from tornado.iostream import StreamClosedError

from daskdl.worker.process import ProcessTuning

EXTENSION = "daskdl"
HANDLER = "daskdl_put"
LINK_HANDLER = "daskdl_link"
# A link's frame: the length of a msgpack header (tag, dtype, shape), the header, the raw
# bytes. Length 0 ends the link: the comm goes back to carrying Dask messages.
FRAME = struct.Struct("!I")

logger = logging.getLogger(__name__)


class CollectiveError(RuntimeError):
    """A collective could not complete."""


class PeerTimeoutError(CollectiveError):
    """A peer did not deliver its part of a collective in time (it died or is stuck)."""


class CollectiveAborted(CollectiveError):
    """The coordinator aborted the run (another rank failed, or the run was cancelled)."""


class Mailbox:
    """Messages for one run in one worker process, and the run's control flags.

    A rank's thread waits for a message with :meth:`take`; a collective running on the
    worker's event loop waits with :meth:`arrive`, and may :meth:`post` the array a message
    is to be read into, so that it lands where it belongs without a copy.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._items: dict[str, np.ndarray] = {}
        self._waiters: dict[str, asyncio.Future] = {}
        self._posted: dict[str, np.ndarray] = {}
        self.aborted: str | None = None
        self.stop_requested = False
        self.regroup_requested = False
        self.released = 0  # epochs the client let a run with an epoch gate go on after

    def put(self, tag: str, data: np.ndarray) -> None:
        with self._cond:
            # Posted while the message was already being read into an array of its own: the
            # post must not keep its buffer alive (for ZeRO-3, a whole unit of parameters).
            self._posted.pop(tag, None)
            waiter = self._waiters.pop(tag, None)
            if waiter is None:
                self._items[tag] = data
                self._cond.notify_all()
        if waiter is not None and not waiter.done():
            waiter.set_result(data)

    def abort(self, reason: str) -> None:
        with self._cond:
            self.aborted = reason
            self._cond.notify_all()
            waiters = list(self._waiters.values())
            self._waiters.clear()
        for waiter in waiters:  # abort may come from any thread; waiters live on the loop
            waiter.get_loop().call_soon_threadsafe(_fail, waiter, CollectiveAborted(reason))

    def post(self, tag: str, into: np.ndarray) -> None:
        """Read the message ``tag``, when it comes over a link, into ``into`` (contiguous,
        of its dtype and shape) rather than into a new array."""
        with self._cond:
            if tag not in self._items:  # one that came already must not keep ``into`` alive
                self._posted[tag] = into

    def release(self, epochs: int) -> None:
        with self._cond:
            self.released = max(self.released, epochs)
            self._cond.notify_all()

    def wait_released(self, epochs: int, timeout: float) -> bool:
        """Wait until :meth:`release` reached ``epochs`` (or the run was aborted: its ranks
        find out at their next collective); whether it did within ``timeout``."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self.released >= epochs or self.aborted is not None, timeout
            )

    def unpost(self, prefix: str) -> None:
        """Forget the posts of tags starting with ``prefix`` (a collective that failed)."""
        with self._cond:
            for tag in [t for t in self._posted if t.startswith(prefix)]:
                del self._posted[tag]

    def landing(self, tag: str, dtype: str, shape) -> np.ndarray:
        """Where the link reads message ``tag`` into: its posted array, or a new one."""
        with self._cond:
            into = self._posted.pop(tag, None)
        if into is not None and into.dtype.str == dtype and into.shape == tuple(shape):
            return into
        return np.empty(shape, dtype=dtype)

    async def arrive(self, tag: str, timeout: float, describe_peer) -> np.ndarray:
        """:meth:`take` for a coroutine on the worker's event loop (where messages arrive)."""
        with self._cond:
            if self.aborted is not None:
                raise CollectiveAborted(self.aborted)
            if tag in self._items:
                return self._items.pop(tag)
            waiter = self._waiters[tag] = asyncio.get_running_loop().create_future()
        try:
            return await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            with self._cond:
                self._waiters.pop(tag, None)
            raise PeerTimeoutError(_late(timeout, describe_peer(), tag)) from None

    def take(self, tag: str, timeout: float, describe_peer) -> np.ndarray:
        check_timeout(timeout)
        deadline = time.monotonic() + timeout
        with self._cond:
            while tag not in self._items:
                if self.aborted is not None:
                    raise CollectiveAborted(self.aborted)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PeerTimeoutError(_late(timeout, describe_peer(), tag))
                self._cond.wait(min(left, 1.0))
            return self._items.pop(tag)


def _late(timeout: float, peer: str, tag: str) -> str:
    return (
        f"waited {timeout:g}s for {peer} (message {tag}); the peer died or is stuck. "
        "Raise comm_timeout= if steps are legitimately slow."
    )


def _fail(waiter: asyncio.Future, error: Exception) -> None:
    if not waiter.done():
        waiter.set_exception(error)


def check_timeout(timeout: float) -> None:
    # A NaN deadline never passes (every comparison with it is false), and an infinite one
    # never comes: either would let a rank wait for a dead peer for ever.
    if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"A collective's timeout must be finite seconds > 0, got {timeout!r}.")


class RunManager:
    """daskdl's state in one worker: the runs' mailboxes, the shared process tuning, and the
    models that predictions use."""

    # Models kept for prediction, the most recently used first out of the cache last.
    KEEP_MODELS = 2

    def __init__(self, worker) -> None:
        self.worker = worker
        self.tuning = ProcessTuning()
        self._boxes: dict[str, Mailbox] = {}
        self._lock = threading.Lock()
        self.closed = False
        self._models: OrderedDict[str, object] = OrderedDict()
        self._model_lock = threading.Lock()
        self.models_built = 0

    def model(self, key: str, build):
        """The model of weights ``key`` (a digest), built once (``build()``) while it is among
        the last few used, whichever of the worker's threads asks first."""
        with self._model_lock:
            model = self._models.get(key)
            if model is None:
                model = self._models[key] = build()
                self.models_built += 1
                while len(self._models) > self.KEEP_MODELS:
                    self._models.popitem(last=False)
            self._models.move_to_end(key)
            return model

    def mailbox(self, comm_id: str) -> Mailbox:
        """The mailbox of ``comm_id``, made by whichever comes first: the rank that reads or
        a peer's message."""
        with self._lock:
            box = self._boxes.get(comm_id)
            if box is None:
                box = self._boxes[comm_id] = Mailbox()
                if self.closed:
                    box.abort("the worker is closing")
            return box

    def discard(self, comm_id: str) -> None:
        with self._lock:
            self._boxes.pop(comm_id, None)

    @property
    def runs(self) -> list[str]:
        """The comm ids this worker holds a mailbox for."""
        with self._lock:
            return sorted(self._boxes)

    def put(self, run_id: str, tag: str, data) -> None:
        # The handler, called on the worker's event loop for each message; a plain function
        # costs less than a coroutine, and senders ask for no reply.
        self.mailbox(run_id).put(tag, data)

    async def link(self, comm, run_id: str) -> None:
        """The handler of a peer's link: the frames that follow on ``comm`` are this run's
        messages, read straight into their arrays (no Dask serialization, no copy), until an
        empty frame hands the comm back to Dask."""
        stream, box = comm.stream, self.mailbox(run_id)
        try:
            while True:
                (size,) = FRAME.unpack(await stream.read_bytes(FRAME.size))
                if size == 0:
                    return
                tag, dtype, shape = msgpack.loads(await stream.read_bytes(size))
                data = box.landing(tag, dtype, shape)
                if data.nbytes:
                    await stream.read_into(memoryview(data).cast("B"))  # type: ignore[arg-type]
                box.put(tag, data)
        except (StreamClosedError, CommClosedError) as e:
            # The peer is gone, or gave up mid-message: its ranks' waits report it.
            logger.debug("link of run %s from %s closed: %s", run_id, comm.peer_address, e)
            comm.abort()

    def close(self) -> None:
        """The worker is closing: every rank still waiting on a peer here gives up at once."""
        with self._lock:
            self.closed = True
            boxes = list(self._boxes.values())
        for box in boxes:
            box.abort("the worker is closing")


def manager(worker=None) -> RunManager:
    """The worker's :class:`RunManager` (made here if the plugin has not run yet, as for a
    group built by hand)."""
    worker = worker or get_worker()
    extension = worker.extensions.get(EXTENSION)
    if extension is None:
        extension = worker.extensions.setdefault(EXTENSION, RunManager(worker))
        worker.handlers.setdefault(HANDLER, extension.put)
        worker.handlers.setdefault(LINK_HANDLER, extension.link)
    return extension


class DaskdlPlugin(WorkerPlugin):
    """Gives each worker its :class:`RunManager` and daskdl's two handlers."""

    name = "daskdl"
    idempotent = True

    def setup(self, worker) -> None:
        extension = manager(worker)
        worker.handlers[HANDLER] = extension.put
        worker.handlers[LINK_HANDLER] = extension.link

    def teardown(self, worker) -> None:
        extension = worker.extensions.get(EXTENSION)
        if extension is not None:
            extension.close()
