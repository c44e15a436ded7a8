"""A rank's shard in memory and the batches it trains on.

The partitions the shard plan gave a rank arrive on its worker as Dask task dependencies (moved
worker-to-worker, never through the client); the loader joins them once and then cuts batches
by index: a seeded reshuffle every epoch, wrap-around so that every rank runs the same number of
full batches, and augmentation on the training device.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from daskdl.preprocess import augment_images


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
        gen = torch.Generator(self.device).manual_seed(hash((self.seed, epoch, self.rank)) % 2**63)
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
            if pin:
                xb, yb = xb.pin_memory(), yb.pin_memory()
            xb = xb.to(self.device, non_blocking=True)
            yb = yb.to(self.device, non_blocking=True)
            if self.augment:
                xb = augment_images(xb, gen)
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yield xb, yb
