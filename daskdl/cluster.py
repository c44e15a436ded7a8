"""``local_cluster``: a Dask cluster on this machine, set up the way daskdl ranks like it."""

from __future__ import annotations

import os

import torch
from distributed import Client


class _OwningClient(Client):
    """A client that shuts its cluster down when it closes (as a client that started its own
    LocalCluster does), so ``with local_cluster(gpus=True) as client:`` cleans up."""

    def close(self, *args, **kwargs):
        try:
            return super().close(*args, **kwargs)
        finally:
            self.cluster.close()


def connect(address: str, timeout: str = "10s") -> Client:
    """A client of the running scheduler at ``address``; an unreachable one is a
    ``ConnectionError`` that says how to start one."""
    try:
        return Client(address, timeout=timeout)
    except OSError as e:
        raise ConnectionError(
            f"could not reach the scheduler at {address} ({e}). Start one with "
            "`dask scheduler` and workers with `dask worker ADDRESS`, or drop --scheduler "
            "to use a local cluster."
        ) from None


def local_cluster(
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    memory_limit: str | float = "auto",
    dashboard_address: str | None = "127.0.0.1:0",
    gpus: bool | int | list[int] | str = False,
    **kwargs,
) -> Client:
    """A ``distributed.Client`` over a cluster of worker processes on this machine.

    Workers and Dask's dashboard listen on 127.0.0.1 only, so nothing is exposed to the
    network. Each worker gets an equal share of the cores (one rank per worker, each rank's
    torch using its worker's threads); pass ``dashboard_address=None`` for no dashboard.

    ``gpus=True`` starts a dask-cuda ``LocalCUDACluster`` instead: one worker per visible GPU,
    each seeing its own GPU as ``cuda:0``. ``gpus=2`` takes the first two, ``gpus=[0, 2]`` (or
    ``"0,2"``) those devices. Needs ``pip install "daskdl[cuda]"``.

    Examples
    --------
    >>> client = local_cluster(n_workers=2)   # doctest: +SKIP
    >>> client.dashboard_link                 # doctest: +SKIP
    'http://127.0.0.1:8787/status'
    >>> client = local_cluster(gpus=True)     # doctest: +SKIP
    """
    cores = os.cpu_count() or 1
    if gpus is not False:
        return _cuda_cluster(gpus, threads_per_worker, memory_limit, dashboard_address, **kwargs)
    n_workers = n_workers or min(cores, 4)
    if n_workers < 1:
        raise ValueError(f"n_workers must be at least 1, got {n_workers}.")
    threads_per_worker = threads_per_worker or max(1, cores // n_workers)
    # The client starts the LocalCluster itself, so closing the client shuts the cluster down.
    return Client(
        n_workers=n_workers,
        threads_per_worker=threads_per_worker,
        processes=True,
        host="127.0.0.1",
        dashboard_address=dashboard_address,
        memory_limit=memory_limit,
        **kwargs,
    )


def _cuda_cluster(gpus, threads_per_worker, memory_limit, dashboard_address, **kwargs) -> Client:
    available = torch.cuda.device_count()
    if available == 0:
        raise RuntimeError(
            "local_cluster(gpus=...) found no CUDA GPU (torch.cuda.device_count() is 0, torch "
            f"{torch.__version__}). On a machine without GPUs use local_cluster(n_workers=...)."
        )
    if gpus is True:
        devices = list(range(available))
    elif isinstance(gpus, int) and not isinstance(gpus, bool):
        devices = list(range(gpus))
    elif isinstance(gpus, str):
        devices = [int(d) for d in gpus.split(",") if d.strip()]
    else:
        devices = [int(d) for d in gpus]
    bad = [d for d in devices if not 0 <= d < available]
    if not devices or bad:
        raise ValueError(
            f"gpus={gpus!r} names no usable device: this machine has GPUs 0..{available - 1}."
        )
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError as e:
        raise ImportError(
            'local_cluster(gpus=...) needs dask-cuda: pip install "daskdl[cuda]".'
        ) from e
    cores = os.cpu_count() or 1
    cluster = LocalCUDACluster(
        CUDA_VISIBLE_DEVICES=devices,
        threads_per_worker=threads_per_worker or max(1, cores // len(devices)),
        host="127.0.0.1",
        dashboard_address=dashboard_address,
        memory_limit=memory_limit,
        **kwargs,
    )
    return _OwningClient(cluster)
