"""Serving the dashboard: the shared client, and the server behind ``daskdl dashboard``."""

from __future__ import annotations

import secrets
import socket
import threading
from pathlib import Path

from distributed import Client

from daskdl import security

_clients: dict[tuple, Client] = {}
_lock = threading.Lock()


def shared_client(
    scheduler: str | None = None, workers: int | None = None, security=None, secure=False
):
    """One client per scheduler address in this server process, shared by every session.

    Without an address, a local cluster (``daskdl.local_cluster``, TLS with ``secure``) is
    started once; ``security`` is a ``distributed.Security`` for a TLS scheduler.
    """
    from daskdl.cluster import connect, local_cluster

    key = (scheduler, workers, bool(secure))
    with _lock:
        client = _clients.get(key)
        if client is None or client.status in ("closing", "closed"):
            if scheduler:
                client = connect(scheduler, security=security)
            else:
                client = local_cluster(n_workers=workers, secure=secure)
            _clients[key] = client
        return client


def check_exposure(address: str, basic_auth: str | None, insecure: bool) -> None:
    """Refuse to serve beyond this machine without a password, unless told it is meant."""
    if security.is_loopback(address) or basic_auth or insecure:
        return
    raise ValueError(
        f"--address {address} would let anyone who can reach this machine start and stop "
        "training runs (and run code on the cluster). Give --basic-auth PASSWORD (or a file "
        "of user:password pairs), or --insecure if the network is trusted."
    )


def check_port(address: str, port: int) -> int:
    """``port``, if a server could listen on it at ``address`` now; else an ``OSError`` that
    names it and the fix (before anything announces the address)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Tornado binds
        try:
            s.bind((address, port))
        except OSError as e:
            raise OSError(
                f"cannot listen on {address}:{port} ({e.strerror or e}): another program (a "
                "dashboard already running?) has it. Choose another with --port, or --port 0 "
                "for any free one."
            ) from None
    return port


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
    basic_auth: str | None = None,
    cookie_secret: str | None = None,
    insecure: bool = False,
):
    """Serve the dashboard for ``client`` until interrupted (``daskdl dashboard``).

    Beyond loopback it needs ``basic_auth`` (Panel's login page; a password, or a JSON file
    of users) or ``insecure=True``. Sessions are signed with ``cookie_secret``, a random one
    when none is given (logins then last as long as the server).
    """
    import panel as pn

    from daskdl.webapp.app import App

    check_exposure(address, basic_auth, insecure)
    pn.extension("tabulator")
    port = check_port(address, port) if port else free_port(address)
    origins = [f"{address}:{port}"]
    if security.is_loopback(address) or address in ("0.0.0.0", "::"):
        origins += [f"localhost:{port}", f"127.0.0.1:{port}"]
    if address in ("0.0.0.0", "::"):
        # Every name of this machine a browser may use; not "*", which would let any web
        # page open a session with a logged-in user's cookie.
        host = socket.gethostname()
        names = {host, socket.getfqdn()}
        try:
            names.update(socket.gethostbyname_ex(host)[2])
        except OSError:
            pass
        origins += [f"{name}:{port}" for name in sorted(names)]
    auth = {}
    if basic_auth:
        auth = dict(basic_auth=basic_auth, cookie_secret=cookie_secret or secrets.token_urlsafe(32))
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
        **auth,
    )
