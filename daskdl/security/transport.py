"""Keys on the wire: TLS settings for clients, and a warning before a secret crosses the network
unencrypted."""

from __future__ import annotations

import ipaddress
import warnings
from pathlib import Path

from daskdl.cluster import workers_info


class KeyTransportWarning(UserWarning):
    """A secret key is about to travel to workers over unencrypted network connections."""


def host_of(address: str) -> str:
    """``"10.0.0.5"`` from ``"tcp://10.0.0.5:8786"`` (IPv6 brackets removed)."""
    rest = address.split("://", 1)[-1]
    return rest.rsplit(":", 1)[0].strip("[]")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_if_sent_in_clear(client, what: str) -> None:
    """Warn when ``what`` (a key inside a task) would cross the network without TLS: some
    worker or the scheduler has a non-loopback address that is not ``tls://``."""
    clear = [
        a
        for a in [client.scheduler.address, *workers_info(client)]
        if not a.startswith("tls://") and not is_loopback(host_of(a))
    ]
    if clear:
        warnings.warn(
            f"{what} goes to the workers inside a task, and {len(clear)} of the cluster's "
            f"endpoints take unencrypted network connections (e.g. {clear[0]}): anyone on the "
            "path can read it. Use a TLS cluster (daskdl.local_cluster(secure=True), or dask "
            "scheduler/worker --tls-ca-file/--tls-cert/--tls-key).",
            KeyTransportWarning,
            stacklevel=3,
        )


def tls(ca_file: str | None = None, cert: str | None = None, key: str | None = None):
    """A ``distributed.Security`` for a client of a TLS cluster, with encryption required."""
    from distributed.security import Security

    given = {"ca_file": ca_file, "cert": cert, "key": key}
    missing = [name for name, value in given.items() if not value]
    if missing and len(missing) < 3:
        flags = ", ".join(f"--tls-{m.replace('_', '-')}" for m in missing)
        raise ValueError(f"TLS needs a CA file, a certificate and its key; missing {flags}.")
    for name, value in given.items():
        if value and not Path(value).is_file():
            raise FileNotFoundError(f"the TLS {name.replace('_', ' ')} {value} does not exist.")
    return Security(
        tls_ca_file=ca_file,
        tls_client_cert=cert,
        tls_client_key=key,
        require_encryption=True,
    )
