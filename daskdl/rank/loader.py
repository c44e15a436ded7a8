"""A rank's shard and the batches it trains on.

Held in memory (:class:`ShardLoader`), the partitions the shard plan gave a rank arrive on its
worker as Dask task dependencies (moved worker-to-worker, never through the client); the
loader joins them once and then cuts batches by index: a seeded reshuffle every epoch,
wrap-around so that every rank runs the same number of full batches, and augmentation on the
training device. Streamed (:class:`StreamLoader`), the rank computes its partitions as it
goes, in a seeded order per epoch, and mixes the samples in flight in a shuffle buffer.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from daskdl.data.preprocess import augment_images


def epoch_order(n: int, steps: int, batch: int, seed: int, epoch: int, rank: int, shuffle: bool):
    """Sample indices for one epoch of one rank: ``steps * batch`` of them.

    A shard shorter than that wraps around (with a fresh permutation), so every rank runs the
    same number of full batches even when shards are uneven.
    """
    need = steps * batch
    if not shuffle:
        return np.arange(need) % n
    rng = np.random.default_rng([seed, epoch, rank])
    perms = [rng.permutation(n) for _ in range(math.ceil(need / n))]
    return np.concatenate(perms)[:need]


def concat(parts: Sequence[np.ndarray], dtype) -> torch.Tensor:
    if not len(parts):
        return torch.empty(0)
    if len(parts) == 1:  # no copy where the one part already is what is asked for
        part = np.ascontiguousarray(parts[0], dtype=dtype)
        # Received over the network, a part can be a read-only view of the message.
        return torch.from_numpy(part if part.flags.writeable else part.copy())
    return torch.from_numpy(np.ascontiguousarray(np.concatenate(parts), dtype=dtype))


class ShardLoader:
    """Batches of ``batch_size`` from the partitions ``X_parts``/``y_parts``, ``steps`` per epoch.

    Examples
    --------
    >>> X, y = np.zeros((10, 2), np.float32), np.arange(10)
    >>> loader = ShardLoader([X[:6], X[6:]], [y[:6], y[6:]], batch_size=4, steps=3, seed=0)
    >>> [tuple(xb.shape) for xb, yb in loader.epoch(0)]
    [(4, 2), (4, 2), (4, 2)]
    """

    def __init__(
        self,
        X_parts: Sequence[np.ndarray],
        y_parts: Sequence[np.ndarray],
        batch_size: int,
        steps: int,
        seed: int,
        rank: int = 0,
        shuffle: bool = True,
        augment: bool = False,
        device: torch.device | str = "cpu",
        channels_last: bool = False,
        device_fraction: float = 0.5,
        y_dtype=np.int64,
    ):
        self.X = concat(X_parts, np.float32)
        self.y = concat(y_parts, y_dtype)
        self.batch_size, self.steps = batch_size, steps
        self.seed, self.rank, self.shuffle = seed, rank, shuffle
        self.augment, self.device = augment, torch.device(device)
        self.channels_last = channels_last
        # On a GPU, the whole shard moves there once when it takes at most ``device_fraction``
        # of the free memory; otherwise each batch is gathered on the host, in pinned memory,
        # and copied asynchronously.
        self.on_device = False
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            if self.X.nbytes + self.y.nbytes <= device_fraction * free:
                self.X, self.y = self.X.to(self.device), self.y.to(self.device)
                self.on_device = True

    def __len__(self) -> int:
        return self.steps

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of ``epoch``, from batch ``start`` on."""
        B = self.batch_size
        order = epoch_order(len(self.X), self.steps, B, self.seed, epoch, self.rank, self.shuffle)
        # Augmentation draws on the training device (see augment_images).
        gen = _augment_generator(self.device, self.seed, epoch, self.rank)
        on_host = self.X.device.type == "cpu"
        if on_host:
            X, y = self.X.numpy(), self.y.numpy()
        else:
            order = torch.from_numpy(order).to(self.X.device)
        pin = self.device.type == "cuda" and not self.on_device
        for s in range(start, self.steps):
            idx = order[s * B : (s + 1) * B]
            if on_host:
                # numpy gathers rows as fast as torch.index_select, and a batch's few labels
                # with less overhead per call (torch's own X[idx] takes twice as long).
                xb, yb = torch.from_numpy(X[idx]), torch.from_numpy(y[idx])
            else:
                xb = torch.index_select(self.X, 0, idx)
                yb = torch.index_select(self.y, 0, idx)
            yield deliver(xb, yb, self.device, pin, self.augment and gen, self.channels_last)


def _augment_generator(device: torch.device, seed: int, epoch: int, rank: int):
    """The seeded random state of one epoch's augmentation on one rank."""
    return torch.Generator(device).manual_seed(hash((seed, epoch, rank)) % 2**63)


def deliver(xb, yb, device, pin: bool, augment, channels_last: bool):
    """A batch on the training device: pinned and copied asynchronously from the host,
    augmented there (``augment``: the generator, or False), in channels-last memory."""
    if pin:
        xb, yb = xb.pin_memory(), yb.pin_memory()
    xb = xb.to(device, non_blocking=True)
    yb = yb.to(device, non_blocking=True)
    if augment:
        xb = augment_images(xb, augment)
    if channels_last:
        xb = xb.contiguous(memory_format=torch.channels_last)
    return xb, yb


def stream_plan(
    sizes: Sequence[int], steps: int, batch: int, buffer: int, seed: int, epoch: int,
    rank: int, shuffle: bool,
) -> list[tuple[list[int], np.ndarray | None]]:  # fmt: skip
    """One epoch of a streamed shard, decided from the partition sizes alone: for each step,
    the partitions read into the pool before it, and the pool positions its batch takes.

    Partitions come in a seeded order, reshuffled every epoch and on every further pass of
    a shard smaller than the epoch; the pool holds up to ``buffer`` samples besides a
    batch, and each batch draws its samples from all of it at random. A pass is drained
    before the next begins, and a batch that takes the last samples of one pass fills up
    from the next: every sample comes once per pass, as in memory (:func:`epoch_order`),
    so the largest shard's samples each come once per epoch.
    Unshuffled, the samples come in order.

    >>> [ins for ins, _ in stream_plan([4, 4], 4, 2, 0, 0, 0, 0, shuffle=False)]
    [[0], [], [1], []]
    """
    rng = np.random.default_rng([seed, epoch, rank])
    live = [i for i, n in enumerate(sizes) if n]

    def next_pass() -> deque:
        return deque(int(i) for i in (rng.permutation(live) if shuffle else live))

    todo, held, plan = next_pass(), 0, []
    want = buffer + batch if shuffle else batch
    # Which pass each pool position holds, moved as the pool moves its samples, so that a
    # batch that straddles two passes takes the older pass's last samples first: every
    # sample of a pass is drawn before any of the next (as the in-memory order does).
    passes = _Pool([np.empty(want + max(sizes, default=0), np.int64)])
    n_pass = 0
    for _ in range(steps):
        inserts = []
        while held < want:
            if not todo:
                if held >= batch:
                    break  # drain this pass before the next
                todo, n_pass = next_pass(), n_pass + 1
            p = todo.popleft()
            inserts.append(p)
            passes.insert([np.full(sizes[p], n_pass)])
            held += sizes[p]
        draws = _draw(passes.held(), batch, rng) if shuffle else None
        passes.take(draws, batch)
        held -= batch
        plan.append((inserts, draws))
    return plan


def _draw(passes: np.ndarray, batch: int, rng: np.random.Generator) -> np.ndarray:
    """``batch`` pool positions at random, all of the oldest passes' first: the positions
    of passes older than the one the batch ends in, and a random choice within that one."""
    first = passes.min()
    if passes.max() == first:  # the usual case: one pass in the pool
        return rng.choice(len(passes), batch, replace=False)
    order = np.argsort(passes, kind="stable")
    last = passes[order[batch - 1]]  # the pass the batch ends in
    older = np.flatnonzero(passes < last)
    within = np.flatnonzero(passes == last)
    chosen = rng.choice(within, batch - len(older), replace=False)
    return rng.permutation(np.concatenate([older, chosen]))


class _Pool:
    """Samples in flight: columns of equal length (sample ids, features, targets), filled
    by whole partitions, emptied a batch at a time."""

    def __init__(self, columns: list[np.ndarray]):
        self.columns, self.head, self.n = columns, 0, 0

    def insert(self, values: Sequence[np.ndarray]) -> None:
        if self.head:  # what is left moves to the front first
            for c in self.columns:
                c[: self.n - self.head] = c[self.head : self.n]
            self.n, self.head = self.n - self.head, 0
        m = len(values[0])
        for c, v in zip(self.columns, values):
            c[self.n : self.n + m] = v
        self.n += m

    def take(self, draws: np.ndarray | None, batch: int) -> list[np.ndarray]:
        if draws is None:  # in order
            out = [c[self.head : self.head + batch].copy() for c in self.columns]
            self.head += batch
            return out
        out = [c[draws] for c in self.columns]
        # The last samples move into the holes the batch left (those not taken themselves).
        m = self.n - batch
        holes = draws[draws < m]
        movers = np.setdiff1d(np.arange(m, self.n), draws, assume_unique=True)
        for c in self.columns:
            c[holes] = c[movers]
        self.n = m
        return out

    def held(self) -> np.ndarray:
        return self.columns[0][self.head : self.n]


class StreamLoader:
    """Batches of a streamed shard (:class:`daskdl.data.streaming.PartitionReader`): the same
    number per epoch as :class:`ShardLoader` gives, in the order :func:`stream_plan` makes.

    Memory: the pool (``buffer`` + a batch + a partition of samples) and the partitions read
    ahead, whatever the shard's size. ``epoch(e, start)`` replays the plan's first
    ``start`` steps on sample ids alone, then reads only the partitions whose samples are
    still in the pool, so a regrouped or resumed run goes on where it was. The partition
    sizes and sample shapes are the reader's shard's (``reader.shard``)."""

    def __init__(
        self, reader, batch_size: int, steps: int, seed: int, rank: int, shuffle: bool,
        buffer: int, augment: bool, device, channels_last: bool,
    ):  # fmt: skip
        shard = reader.shard
        self.reader, self.sizes = reader, [int(n) for n in shard.sizes]
        self.batch_size, self.steps = batch_size, steps
        self.seed, self.rank, self.shuffle, self.buffer = seed, rank, shuffle, buffer
        self.augment, self.device = augment, torch.device(device)
        self.channels_last = channels_last
        self.offsets = np.cumsum([0, *self.sizes])
        capacity = (buffer if shuffle else 0) + batch_size + max(self.sizes)
        self.pool = _Pool([
            np.empty(capacity, np.int64),
            np.empty((capacity, *shard.sample_shape), np.float32),
            np.empty((capacity, *shard.target_shape), reader.y_dtype),
        ])  # fmt: skip

    def __len__(self) -> int:
        return self.steps

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        B = self.batch_size
        plan = stream_plan(
            self.sizes, self.steps, B, self.buffer, self.seed, epoch, self.rank, self.shuffle
        )
        held = self._held_at(plan, start)
        owner = np.searchsorted(self.offsets, held, side="right") - 1
        now = [int(p) for p in np.unique(owner)]
        parts = self.reader.stream([*now, *(p for ins, _ in plan[start:] for p in ins)])
        pool = self.pool
        pool.head, pool.n = 0, len(held)
        ids, X, y = pool.columns
        ids[: len(held)] = held
        for p in now:  # the pool as it was after step `start`, from the partitions still in it
            Xp, yp = next(parts)
            slots = np.flatnonzero(owner == p)
            rows = held[slots] - self.offsets[p]
            X[slots], y[slots] = Xp[rows], yp[rows]
        gen = _augment_generator(self.device, self.seed, epoch, self.rank)
        pin = self.device.type == "cuda"
        for inserts, draws in plan[start:]:
            for p in inserts:
                Xp, yp = next(parts)
                pool.insert([np.arange(self.offsets[p], self.offsets[p + 1]), Xp, yp])
                del Xp, yp
            _, xs, ys = pool.take(draws, B)
            xb, yb = torch.from_numpy(xs), torch.from_numpy(ys)
            yield deliver(xb, yb, self.device, pin, self.augment and gen, self.channels_last)
        parts.close()

    def _held_at(self, plan, start: int) -> np.ndarray:
        """The ids of the samples in the pool after the plan's first ``start`` steps."""
        if not start:
            return np.empty(0, np.int64)
        ids = _Pool([np.empty(len(self.pool.columns[0]), np.int64)])
        for inserts, draws in plan[:start]:
            for p in inserts:
                ids.insert([np.arange(self.offsets[p], self.offsets[p + 1])])
            ids.take(draws, self.batch_size)
        return ids.held().copy()
