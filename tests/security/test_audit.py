"""``daskdl audit`` against real clusters: a plain one started with ``dask scheduler`` on
every interface, TLS clusters (daskdl's own and one started with certificate files), and
checkpoints signed, unsigned and tampered with."""

from __future__ import annotations

import datetime
import json
import socket
import subprocess
import sys
import time

import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import daskdl
from daskdl import security
from daskdl.cli import audit

DASKDL = [sys.executable, "-m", "daskdl"]
DASK = [sys.executable, "-m", "dask"]


# Keys set in the developer's or CI's environment would change what these tests see.
pytestmark = pytest.mark.usefixtures("no_signing_keys")


def _areas(report, severity):
    return {f.area for f in report.at_or_above(severity)}


@pytest.mark.integration
def test_plain_local_cluster_lacks_tls_and_a_secure_one_does_not():
    with daskdl.local_cluster(n_workers=2, threads_per_worker=1) as client:
        plain = audit.audit(client)
    (tls,) = [f for f in plain.findings if f.area == "cluster"]
    assert tls.severity == "medium" and tls.message.startswith("no TLS: 3 of 3 endpoints")
    assert "exposure" not in _areas(plain, "low")  # local_cluster binds to loopback only
    with daskdl.local_cluster(n_workers=2, threads_per_worker=1, secure=True) as client:
        secure = audit.audit(client)
    assert not any(f.message.startswith("no TLS") for f in secure.findings)
    assert _areas(secure, "medium") == set()
    assert any("TLS on the scheduler and all 2 workers" in f.message for f in secure.findings)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(scheduler_args, worker_args, address, security_kwargs=None, tmp_path=None):
    from distributed import Client

    procs = [subprocess.Popen([*DASK, "scheduler", *scheduler_args], stderr=subprocess.DEVNULL)]
    procs.append(
        subprocess.Popen(
            [*DASK, "worker", address, "--nthreads", "1", *worker_args], stderr=subprocess.DEVNULL
        )
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            with Client(address, timeout="5s", **(security_kwargs or {})) as c:
                c.wait_for_workers(1, timeout=60)
            return procs
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _stop(procs):
    for p in reversed(procs):
        p.terminate()
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


@pytest.mark.integration
def test_cli_flags_a_cluster_open_to_the_network(tmp_path):
    # `dask scheduler` and `dask worker` with their defaults listen on every interface.
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    dashboard = _free_port()
    procs = _start(
        ["--port", str(port), "--dashboard-address", f":{dashboard}"],
        ["--local-directory", str(tmp_path)],
        address,
    )
    try:
        proc = subprocess.run(
            [*DASKDL, "audit", "--scheduler", address, "--json"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        _stop(procs)
    assert proc.returncode == 1, proc.stderr
    findings = json.loads(proc.stdout)["findings"]
    high = [f for f in findings if f["severity"] == "high"]
    assert any(f["area"] == "cluster" and f["message"].startswith("no TLS") for f in high)
    (board,) = [f for f in high if f["area"] == "dashboard"]
    assert f":{dashboard}" in board["message"] and "without TLS" in board["message"]
    assert any(f["area"] == "exposure" and f["message"].startswith("tcp://") for f in high)
    assert "at or above high" in proc.stderr


def _certificates(folder):
    """A CA and a certificate it signed for 127.0.0.1, as a site's PKI would issue."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dask")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = {
        "ca.pem": ca.public_bytes(serialization.Encoding.PEM),
        "cert.pem": cert.public_bytes(serialization.Encoding.PEM),
        "key.pem": key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return [str(folder / name) for name in files]


@pytest.mark.integration
def test_cli_passes_a_tls_cluster_started_with_certificate_files(tmp_path):
    ca, cert, key = _certificates(tmp_path)
    tls = ["--tls-ca-file", ca, "--tls-cert", cert, "--tls-key", key]
    port = _free_port()
    address = f"tls://127.0.0.1:{port}"
    procs = _start(
        [*tls, "--host", "127.0.0.1", "--port", str(port), "--dashboard-address", "127.0.0.1:0"],
        # Even with --no-dashboard a worker's HTTP server (/health, /metrics) listens on
        # 0.0.0.0 (the audit found it): bind it to loopback too.
        [*tls, "--host", "127.0.0.1", "--dashboard-address", "127.0.0.1:0"]
        + ["--local-directory", str(tmp_path)],
        address,
        {"security": security.tls(ca, cert, key)},
    )
    try:
        proc = subprocess.run(
            [*DASKDL, "audit", "--scheduler", address, *tls, "--fail-on", "medium"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        refused = subprocess.run(
            [*DASKDL, "audit", "--scheduler", address], capture_output=True, text=True
        )
    finally:
        _stop(procs)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no TLS" not in proc.stdout and "TLS on the scheduler and all 1 workers" in proc.stdout
    assert refused.returncode == 2 and "TLS scheduler" in refused.stderr


def test_checkpoints_and_robustness(client, tmp_path):
    train, test = daskdl.datasets.train_test("digits")
    key_file, pub_file = security.keygen(tmp_path / "keys")
    out = tmp_path / "run"
    run = daskdl.fit(
        client, "mlp", train, val=test, epochs=3, out=out, signing_key=key_file, progress=False
    )
    report = audit.audit(checkpoint=out, robustness=True, epsilons=(0.05, 0.5), verify_key=pub_file)
    checks = [f for f in report.findings if f.area == "checkpoint"]
    assert len(checks) == 3 and all(f.message.endswith("verify") for f in checks)
    (measured,) = [f for f in report.findings if f.area == "robustness"]
    clean = run.history["val_accuracy"].iloc[-1]
    assert f"clean accuracy {clean:.3f}" in measured.message  # the run's own validation

    # Tampered by hand: the audit refuses it (high), and the CLI fails on it.
    target = out / "checkpoints" / "epoch-0003" / "manifest.json"
    target.write_text(target.read_text().replace('"epoch": 3', '"epoch": 30'))
    proc = subprocess.run(
        [*DASKDL, "audit", "--checkpoint", str(out), "--key", str(pub_file)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "epoch-0003: REFUSED" in proc.stdout and "epoch-0002: signature" in proc.stdout


def test_fgsm_moves_inputs_along_the_loss_gradient_sign():
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 2)
    X = torch.randn(64, 2)
    y = model(X).argmax(1)  # the model is right on every sample
    accuracy = audit.fgsm_accuracy(model, X, y, epsilons=(0.0001, 10.0))
    assert accuracy[0.0] == 1.0 and accuracy[0.0001] > 0.9 and accuracy[10.0] == 0.0
    # The same step by hand for one sample.
    x = X[:1].clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(model(x), y[:1]).backward()
    moved = model(X[:1] + 10.0 * x.grad.sign()).argmax(1)
    assert moved.item() != y[0].item()
