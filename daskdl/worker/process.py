"""How a rank tunes the worker process it trains in, and gives it back as it was.

- :meth:`ProcessTuning.malloc`: glibc's allocation thresholds, raised while ranks run;
- :meth:`ProcessTuning.denormals`: denormal floats treated as zero;
- :meth:`ProcessTuning.profiler_paused`: Dask's statistical profiler paused.

Ranks of concurrent runs in one worker share each setting, which comes back when the last of
them ends: a :class:`ProcessTuning` counts them, one per worker, owned by the worker's
:class:`daskdl.worker.extension.RunManager`. The module's functions tune a process of one's own (the
benchmarks' plain PyTorch loops) with a tuning of their own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import threading
from contextlib import contextmanager

import torch
from distributed.core import Status

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters
GLIBC_DEFAULT = 128 * 2**10  # what glibc starts each of the three at
# glibc grows the arena of a thread other than the main one in heaps of at most this size
# (2 * DEFAULT_MMAP_THRESHOLD_MAX on 64-bit); a top pad this large keeps an emptied heap.
THREAD_HEAP_BYTES = 64 * 2**20


class ProcessTuning:
    """How the ranks in one worker process tune it, counted so that the last one to end puts
    each setting back."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = {"malloc": 0, "denormals": 0, "profiler": 0}

    def _enter(self, what: str) -> bool:
        """Count a user in; whether it is the first."""
        with self._lock:
            self._users[what] += 1
            return self._users[what] == 1

    def _leave(self, what: str) -> bool:
        """Count a user out; whether it was the last."""
        with self._lock:
            self._users[what] -= 1
            return self._users[what] == 0

    def users(self, what: str) -> int:
        with self._lock:
            return self._users[what]

    @contextmanager
    def malloc(
        self,
        mmap_threshold: int = 32 * 2**20,
        trim_threshold: int = 256 * 2**20,
        top_pad: int = THREAD_HEAP_BYTES,
        force: bool = False,
    ):
        """Let glibc reuse tensor-sized allocations while a rank runs, instead of asking the
        OS.

        Dask's nanny sets ``MALLOC_TRIM_THRESHOLD_=65536`` so that workers hand memory back to
        the OS. In glibc that fixes its allocation thresholds at their small defaults, and two
        things then made every step's tensors fresh memory from the OS, page-faulted in 4 KiB at
        a time:

        - the mmap threshold stays at 128 KiB, so every activation, gradient and received
          message was a fresh ``mmap``: a small CNN lost about a third of its throughput on a
          worker, the all-reduce a fifth of its speed;
        - a rank trains in a worker thread, and glibc serves threads other than the main one
          from heaps that it unmaps as soon as they are empty, unless the top pad covers a whole
          heap: a small CNN's step emptied one every step (3,000-12,000 page faults a step;
          10-15% of its throughput).

        Applied where Dask's setting is in the environment (a nanny's worker), or with
        ``force``. Elsewhere glibc's adaptive thresholds are left alone: setting any one
        parameter ends them for the whole process (though they, too, unmap a thread's emptied
        heaps). The previous settings (with ``force`` alone, glibc's fixed defaults) come back,
        and free memory goes back to the OS, when the last rank of the process ends.
        """
        dask_trim = os.environ.get("MALLOC_TRIM_THRESHOLD_", str(GLIBC_DEFAULT) if force else None)
        if dask_trim is None:
            yield
            return
        if self._enter("malloc"):
            _set_malloc(mmap_threshold, trim_threshold, top_pad)
        try:
            yield
        finally:
            if self._leave("malloc"):
                default_pad = int(os.environ.get("MALLOC_TOP_PAD_", GLIBC_DEFAULT))
                _set_malloc(GLIBC_DEFAULT, int(dask_trim), default_pad, trim=True)

    @contextmanager
    def denormals(self):
        """Treat denormal floats as zero while a rank runs.

        Once a model fits its data, gradients and activations drift into the denormal range,
        where a CPU computes up to a hundred times slower: a small CNN on easy synthetic images
        went from 550 to 87 samples/s. Flushing them changes results by less than float32's
        epsilon. The setting is the process's: it goes back when its last rank ends.
        """
        if self._enter("denormals"):
            torch.set_flush_denormal(True)
        try:
            yield
        finally:
            if self._leave("denormals"):
                torch.set_flush_denormal(False)

    @contextmanager
    def profiler_paused(self, worker, pause: bool = True):
        """Stop the worker's statistical profiler while a rank trains.

        Dask samples every running task's stack 100 times a second on the worker's event loop,
        taking the GIL from the training thread each time; for a rank, one task that runs for
        the whole training, the samples say nothing the run's own events do not. Two ranks on
        two cores trained 2-3% faster with it paused (interleaved runs of
        benchmarks/scaling.py's workload). The profiler runs again when the last rank in this
        worker ends; ``daskdl.pause-dask-profiler: false`` keeps it running.
        """
        callback = worker.periodic_callbacks.get("profile") if pause else None
        if callback is None:  # not asked for, or profiling is off in this worker's config
            yield
            return
        if self._enter("profiler"):
            worker.loop.add_callback(callback.stop)  # PeriodicCallback lives on the loop
        try:
            yield
        finally:
            if self._leave("profiler") and worker.status in (Status.running, Status.paused):
                worker.loop.add_callback(callback.start)


def torch_friendly_malloc(**kwargs):
    """:meth:`ProcessTuning.malloc` for a process of one's own (a benchmark's loop)."""
    return ProcessTuning().malloc(**kwargs)


def flush_denormals():
    """:meth:`ProcessTuning.denormals` for a process of one's own."""
    return ProcessTuning().denormals()


@functools.cache
def give_back_freed() -> None:
    """Hand the memory glibc holds free back to the OS now (``malloc_trim``): after a rank
    let go of much at once, such as a pipeline's other stages."""
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim


def _libc() -> ctypes.CDLL:
    # find_library runs `ldconfig -p` in a subprocess: once per process, not once per rank.
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def _set_malloc(mmap_threshold: int, trim_threshold: int, top_pad: int, trim=False) -> None:
    try:
        libc = _libc()
        libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)
        libc.mallopt(M_TRIM_THRESHOLD, trim_threshold)
        libc.mallopt(M_TOP_PAD, top_pad)
        if trim:
            libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune
