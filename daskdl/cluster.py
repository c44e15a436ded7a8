"""``local_cluster``: a Dask cluster on this machine, set up the way daskdl ranks like it;
``connect`` to a running one; ``workers_info``: the workers a scheduler has now."""

from __future__ import annotations

import numbers
import os
from contextlib import nullcontext
from typing import Any

import dask
import dask.utils
import torch
from distributed import Client, LocalCluster
from distributed.security import Security

from daskdl.config.options import integer


class _OwningClient(Client):
    """A client that shuts its cluster down when it closes (as a client that started its own
    LocalCluster does), so ``with local_cluster(gpus=True) as client:`` cleans up."""

    def close(self, *args, **kwargs):
        try:
            return super().close(*args, **kwargs)
        finally:
            self.cluster.close()


def connect(address: str, timeout: str = "10s", security=None) -> Client:
    """A client of the running scheduler at ``address`` (``security``: a
    ``distributed.Security``, for a TLS cluster); an unreachable one is a ``ConnectionError``
    that says how to start one."""
    if address.startswith("tls://") and security is None:
        raise ValueError(
            f"{address} is a TLS scheduler: give its CA file, a client certificate and its key "
            "(--tls-ca-file, --tls-cert, --tls-key; or daskdl.security.tls(...))."
        )
    try:
        _answers(address, security, dask.utils.parse_timedelta(timeout))
        return Client(address, timeout=timeout, security=security)
    except (OSError, TimeoutError) as e:
        raise ConnectionError(
            f"could not reach the scheduler at {address} ({e or type(e).__name__}). Start one "
            "with `dask scheduler` and workers with `dask worker ADDRESS`, or drop --scheduler "
            "to use a local cluster."
        ) from None


def _answers(address: str, security, seconds: float) -> None:
    """The scheduler at ``address`` answers within ``seconds``: a server that accepts the
    connection and never answers would hold ``Client(address)`` for good (seen: over
    300 s), whatever its ``timeout``."""
    import asyncio
    import concurrent.futures

    from distributed.core import rpc

    args = security.get_connection_args("client") if security is not None else {}

    async def identity():
        r = rpc(address, connection_args=args, timeout=seconds)
        try:
            await asyncio.wait_for(r.identity(), seconds)
        finally:
            await r.close_rpc()

    # On a thread of its own: the caller may be inside a running event loop (a notebook).
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="daskdl-connect")
    try:
        pool.submit(asyncio.run, identity()).result(timeout=seconds + 5)
    except TimeoutError:  # asyncio's and concurrent.futures' are this one since 3.11
        raise TimeoutError(f"no answer within {seconds:g} s") from None
    finally:
        pool.shutdown(wait=False)


def workers_info(client: Client) -> dict[str, dict]:
    """The scheduler's information on each of its workers (address -> info), fetched now.

    Not ``client.scheduler_info()["workers"]``: that returns the client's cached copy, which
    the client's own periodic refresh (every 2 s, without per-worker information) can replace
    between the fetch and the read, so that a healthy cluster looks as if it had no workers.
    """
    return client.sync(client.scheduler.identity, n_workers=-1)["workers"]


def local_cluster(
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    memory_limit: str | float = "auto",
    dashboard_address: str | None = "127.0.0.1:0",
    gpus: bool | int | list[int] | str = False,
    secure: bool | Security = False,
    **kwargs: Any,
) -> Client:
    """A ``distributed.Client`` over a cluster of worker processes on this machine.

    Workers and Dask's dashboard listen on 127.0.0.1 only, so nothing is exposed to the
    network. Each worker gets an equal share of the cores (one rank per worker, each rank's
    torch using its worker's threads); pass ``dashboard_address=None`` for no dashboard.

    ``gpus=True`` starts a dask-cuda ``LocalCUDACluster`` instead: one worker per visible GPU,
    each seeing its own GPU as ``cuda:0``. ``gpus=2`` takes the first two, ``gpus=[0, 2]`` (or
    ``"0,2"``) those devices. Needs ``pip install "daskdl[cuda]"``.

    ``secure=True`` encrypts and authenticates every connection with TLS (scheduler, workers,
    this client, and daskdl's all-reduce, which uses the same comms), with a certificate made
    for this cluster alone (``Security.temporary()``); a plain-TCP client is refused. Pass a
    ``distributed.Security`` with your own certificate files (and ``require_encryption=True``)
    to use those instead.

    Dask's housekeeping runs less often on these clusters (``daskdl.quiet-housekeeping``): the
    event-loop health tick every 200 ms and the system monitor every 2 s.

    Examples
    --------
    >>> client = local_cluster(n_workers=2)   # doctest: +SKIP
    >>> client.dashboard_link                 # doctest: +SKIP
    'http://127.0.0.1:8787/status'
    >>> client = local_cluster(gpus=True)     # doctest: +SKIP
    >>> client = local_cluster(secure=True)   # doctest: +SKIP
    >>> client.scheduler.address              # doctest: +SKIP
    'tls://127.0.0.1:40241'
    """
    if dashboard_address is not None:
        _check_address("dashboard_address", dashboard_address)
    _check_memory_limit(memory_limit)
    if gpus is not False and n_workers is not None:
        raise ValueError(
            f"n_workers={n_workers!r} with gpus={gpus!r}: a GPU cluster has one worker per GPU. "
            "Choose the GPUs with gpus= (a count or device ids) and leave out n_workers."
        )
    security = _tls_security(secure) if secure else None
    if security is not None:
        kwargs.update(security=security, protocol="tls://")
    with _housekeeping():
        if gpus is not False:
            return _cuda_cluster(
                gpus, threads_per_worker, memory_limit, dashboard_address, **kwargs
            )
        return _cpu_cluster(
            n_workers, threads_per_worker, memory_limit, dashboard_address, **kwargs
        )


def _check_address(name: str, address) -> None:
    # Dask takes a bare name for a host, fails to resolve it, and then hangs for a minute
    # closing the half-started cluster.
    host, _, port = str(address).rpartition(":")
    if not isinstance(address, str) or not port.isdigit() or (host and " " in host):
        raise ValueError(
            f"{name} must be 'host:port' (such as '127.0.0.1:8787', or '127.0.0.1:0' for any "
            f"free port) or None for none, got {address!r}."
        )


def _check_memory_limit(memory_limit) -> None:
    # Dask finds a bad limit only when it starts the workers, after the client has made itself
    # the default one: every later computation in the process would wait on it forever.
    if not isinstance(memory_limit, str) or memory_limit == "auto":
        return
    try:
        dask.utils.parse_bytes(memory_limit)
    except ValueError as e:
        raise ValueError(
            f"memory_limit={memory_limit!r}: {e}. Give bytes ('4GB', '512MiB'), a fraction of "
            "this machine's memory (0.5), or 'auto'."
        ) from None


def _cpu_cluster(
    n_workers, threads_per_worker, memory_limit, dashboard_address, **kwargs
) -> Client:
    cores = os.cpu_count() or 1
    n_workers = min(cores, 4) if n_workers is None else integer("n_workers", n_workers, 1)
    if threads_per_worker is None:
        threads_per_worker = max(1, cores // n_workers)
    threads_per_worker = integer("threads_per_worker", threads_per_worker, 1)
    options = dict(
        n_workers=n_workers,
        threads_per_worker=threads_per_worker,
        processes=True,
        host="127.0.0.1",
        dashboard_address=dashboard_address,
        memory_limit=memory_limit,
        **kwargs,
    )
    if "security" in kwargs:
        return _OwningClient(LocalCluster(**options), security=kwargs["security"])
    # The client starts the LocalCluster itself, so closing the client shuts the cluster down.
    return Client(**options)


# Every Dask server (scheduler, nanny, worker) runs these on its event loop, at intervals meant
# for interactive work; the ranks' cores pay for them (``daskdl.quiet-housekeeping``).
QUIET_HOUSEKEEPING = {
    "distributed.admin.tick.interval": "200ms",
    "distributed.admin.system-monitor.interval": "2s",
}


def _housekeeping():
    # Read when each server starts; nannies hand the config to their worker processes.
    if dask.config.get("daskdl.quiet-housekeeping"):
        return dask.config.set(QUIET_HOUSEKEEPING)
    return nullcontext()


def _tls_security(secure: bool | Security) -> Security:
    if secure is True:
        security = Security.temporary()  # a self-signed CA and certificate, in memory only
    elif isinstance(secure, Security):
        security = secure
    else:
        raise TypeError(
            f"secure must be True or a distributed.Security, got {type(secure).__name__}."
        )
    if not security.require_encryption:
        raise ValueError(
            "secure=Security(...) must have require_encryption=True: otherwise plain TCP "
            "connections would still be accepted."
        )
    return security


def _cuda_cluster(gpus, threads_per_worker, memory_limit, dashboard_address, **kwargs) -> Client:
    available = torch.cuda.device_count()
    if available == 0:
        raise RuntimeError(
            "local_cluster(gpus=...) found no CUDA GPU (torch.cuda.device_count() is 0, torch "
            f"{torch.__version__}). On a machine without GPUs use local_cluster(n_workers=...)."
        )
    if gpus is True:
        devices = list(range(available))
    elif isinstance(gpus, numbers.Integral) and not isinstance(gpus, bool):
        devices = list(range(integer("gpus", gpus, 1)))
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
    if threads_per_worker is None:
        threads_per_worker = max(1, cores // len(devices))
    cluster = LocalCUDACluster(
        CUDA_VISIBLE_DEVICES=devices,
        threads_per_worker=integer("threads_per_worker", threads_per_worker, 1),
        host="127.0.0.1",
        dashboard_address=dashboard_address,
        memory_limit=memory_limit,
        **kwargs,
    )
    return _OwningClient(cluster, security=kwargs.get("security"))
