"""``local_cluster``: a Dask cluster on this machine, set up the way daskdl ranks like it."""

from __future__ import annotations

import os

from distributed import Client


def local_cluster(
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    memory_limit: str | float = "auto",
    dashboard_address: str | None = "127.0.0.1:0",
    **kwargs,
) -> Client:
    """A ``distributed.Client`` over a ``LocalCluster`` of worker processes on this machine.

    Workers and Dask's dashboard listen on 127.0.0.1 only, so nothing is exposed to the
    network. Each worker gets an equal share of the cores (one rank per worker, each rank's
    torch using its worker's threads); pass ``dashboard_address=None`` for no dashboard.

    Examples
    --------
    >>> client = local_cluster(n_workers=2)   # doctest: +SKIP
    >>> client.dashboard_link                 # doctest: +SKIP
    'http://127.0.0.1:8787/status'
    """
    cores = os.cpu_count() or 1
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
