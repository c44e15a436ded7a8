"""Serving the dashboard: the shared client, and the server behind ``daskdl dashboard``."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

_clients: dict[tuple, object] = {}
_lock = threading.Lock()


def shared_client(scheduler: str | None = None, workers: int | None = None):
    """One client per scheduler address in this server process, shared by every session.

    Without an address, a local cluster (``daskdl.local_cluster``) is started once.
    """
    from daskdl.cluster import connect, local_cluster

    key = (scheduler, workers)
    with _lock:
        client = _clients.get(key)
        if client is None or client.status in ("closing", "closed"):
            client = connect(scheduler) if scheduler else local_cluster(n_workers=workers)
            _clients[key] = client
        return client


def free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def serve(
    client,
    address: str = "127.0.0.1",
    port: int = 0,
    runs_dir: str | Path = "runs",
    show: bool = False,
    on_ready=None,
):
    """Serve the dashboard for ``client`` until interrupted (``daskdl dashboard``)."""
    import panel as pn

    from daskdl.webapp.app import App

    pn.extension("tabulator")
    port = port or free_port(address)
    origins = [f"{address}:{port}"]
    if address in ("127.0.0.1", "localhost"):
        origins += [f"localhost:{port}", f"127.0.0.1:{port}"]
    if on_ready is not None:
        on_ready(f"http://{address}:{port}/")
    return pn.serve(
        {"/": lambda: App(client, runs_dir).template()},
        address=address,
        port=port,
        websocket_origin=origins,
        show=show,
        title="daskdl",
        threaded=False,
        verbose=False,
    )
