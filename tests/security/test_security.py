"""Keys, signed checkpoints, TLS clusters: each attacked the way a user's adversary would."""

from __future__ import annotations

import json
import os
import random
import stat
import subprocess
import sys

import pytest
import torch
from distributed import Client

import daskdl
from daskdl import models, security
from daskdl.checkpoint import files as checkpoint
from daskdl.checkpoint.files import CheckpointSignatureError
from daskdl.cluster import workers_info

DASKDL = [sys.executable, "-m", "daskdl"]


# Keys set in the developer's or CI's environment would change what these tests see.
pytestmark = pytest.mark.usefixtures("no_signing_keys")


@pytest.fixture(params=[security.ED25519, security.HMAC])
def keys(request, tmp_path):
    """(signing key file, verify key file) of a fresh key of each kind."""
    written = security.keygen(tmp_path / "keys", request.param)
    if request.param == security.ED25519:
        return written[0], written[1]
    return written[0], written[0]


def _checkpoint(root, key=None, epoch=1):
    torch.manual_seed(0)
    model = models.mlp((6,), 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.nn.functional.cross_entropy(model(torch.randn(8, 6)), torch.arange(8) % 3).backward()
    opt.step()
    return checkpoint.save(
        root,
        epoch,
        checkpoint.model_tensors(model),
        checkpoint.optimizer_tensors(opt),
        {"step": 10, "plan": [[0]]},
        key=key,
    )


def test_keygen_writes_private_files_0600_and_never_overwrites(tmp_path):
    key_file, pub_file = security.keygen(tmp_path, security.ED25519)
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert security.load_key(key_file).key_id == security.load_key(pub_file).key_id
    assert not security.load_key(pub_file).private
    (secret,) = security.keygen(tmp_path, security.HMAC)
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    before = key_file.read_bytes()
    with pytest.raises(FileExistsError, match="not overwriting a key"):
        security.keygen(tmp_path, security.ED25519)
    assert key_file.read_bytes() == before
    with pytest.raises(security.KeyFileError, match="signing needs the private key"):
        security.load_key(pub_file).sign(b"x")


def test_bad_keys_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv(security.ENV_SECRET, "short")
    with pytest.raises(security.KeyFileError, match="at least 16"):
        security.signing_key()
    with pytest.raises(security.KeyFileError, match="cannot read the key file"):
        security.load_key(tmp_path / "missing.key")
    bad = tmp_path / "bad.pem"
    bad.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n")
    with pytest.raises(security.KeyFileError, match="not a readable PEM key"):
        security.load_key(bad)


def test_a_signed_checkpoint_verifies_and_its_key_is_hidden(tmp_path, keys):
    signer, verifier = (security.load_key(k) for k in keys)
    path = _checkpoint(tmp_path, signer)
    assert (path / checkpoint.SIGNATURE).exists()
    assert checkpoint.signature_status(path, verifier) == "verified"
    model, _, manifest = checkpoint.load(path, verify_key=keys[1])
    assert manifest["epoch"] == 1 and set(model) == set(models.mlp((6,), 3).state_dict())
    assert signer.material.hex() not in repr(signer)


def test_every_single_byte_flip_is_refused(tmp_path, keys):
    path = _checkpoint(tmp_path, security.load_key(keys[0]))
    verifier = security.load_key(keys[1])
    files = sorted(p for p in path.iterdir())
    assert [p.name for p in files] == [
        "manifest.json",
        "model.safetensors",
        "optimizer.safetensors",
        "signature.json",
    ]
    rng = random.Random(0)
    positions = []
    for f in files:
        size = f.stat().st_size
        # Both ends of every file, then a sample across it: 60 per file, 240 in all.
        chosen = {0, size - 1} | set(rng.sample(range(size), min(size, 58)))
        positions += [(f, i) for i in sorted(chosen)]
    assert len(positions) >= 200
    for n, (f, i) in enumerate(positions):
        original = f.read_bytes()
        flipped = bytearray(original)
        flipped[i] ^= (0x01, 0x20, 0x80, 0xFF)[n % 4]  # subtle and gross changes alike
        f.write_bytes(bytes(flipped))
        try:
            with pytest.raises(CheckpointSignatureError):
                checkpoint.load(path, verify_key=verifier)
        finally:
            f.write_bytes(original)
    checkpoint.load(path, verify_key=verifier)  # and the untouched checkpoint still loads


def test_unsigned_or_foreign_checkpoints_are_refused_and_no_key_warns(tmp_path, keys):
    verifier = security.load_key(keys[1])
    unsigned = _checkpoint(tmp_path / "a")
    with pytest.raises(CheckpointSignatureError, match="is not signed"):
        checkpoint.load(unsigned, verify_key=verifier)
    other_key = security.load_key(security.keygen(tmp_path / "other", security.ED25519)[0])
    foreign = _checkpoint(tmp_path / "b", other_key)
    with pytest.raises(CheckpointSignatureError, match="not with the verify key"):
        checkpoint.load(foreign, verify_key=verifier)
    with pytest.warns(checkpoint.UnverifiedCheckpointWarning, match="without verifying"):
        checkpoint.load(foreign)
    assert checkpoint.signature_status(foreign) == "signed"
    assert checkpoint.signature_status(unsigned) == "unsigned"


def test_with_a_key_a_tampered_newest_checkpoint_is_refused_not_skipped(tmp_path, keys):
    signer = security.load_key(keys[0])
    _checkpoint(tmp_path, signer, epoch=1)
    newest = _checkpoint(tmp_path, signer, epoch=2)
    manifest = newest / checkpoint.MANIFEST
    manifest.write_text(manifest.read_text().replace('"step": 10', '"step": 11'))
    with pytest.raises(CheckpointSignatureError, match="does not verify"):
        checkpoint.load_latest(tmp_path, verify_key=keys[1])


def test_fit_signs_and_resume_refuses_a_checkpoint_tampered_by_hand(client, tmp_path):
    key_file, pub_file = security.keygen(tmp_path / "keys")
    train, test = daskdl.datasets.train_test("digits")
    out = tmp_path / "run"
    opts = dict(epochs=2, progress=False, out=out)
    daskdl.fit(client, "mlp", train, val=test, signing_key=key_file, **opts)
    ckpt = out / "checkpoints" / "epoch-0002"
    assert checkpoint.signature_status(ckpt, security.load_key(pub_file)) == "verified"
    verified = subprocess.run(
        [*DASKDL, "verify", str(out), "--key", str(pub_file)], capture_output=True, text=True
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.count("verified") == 2

    # By hand: give the model a different weight, and fix the digest in the manifest too.
    doc = json.loads((ckpt / "manifest.json").read_text())
    blob = bytearray((ckpt / "model.safetensors").read_bytes())
    blob[-1] ^= 0x01
    (ckpt / "model.safetensors").write_bytes(bytes(blob))
    doc["files"]["model.safetensors"] = checkpoint._sha256(bytes(blob))
    (ckpt / "manifest.json").write_text(json.dumps(doc, indent=1, sort_keys=True))

    refused = subprocess.run(
        [*DASKDL, "verify", str(out), "--key", str(pub_file)], capture_output=True, text=True
    )
    assert refused.returncode == 1
    assert "REFUSED" in refused.stdout and "epoch-0002" in refused.stdout
    with pytest.raises(CheckpointSignatureError, match="does not verify"):
        daskdl.fit(
            client, "mlp", train, val=test, resume=out, verify_key=pub_file, **{**opts, "epochs": 3}
        )
    # Without any key it warns instead (the digest now matches: only a signature catches it).
    with pytest.warns(checkpoint.UnverifiedCheckpointWarning):
        checkpoint.load(ckpt)


@pytest.mark.integration
def test_cli_train_signs_and_resume_checks(tmp_path):
    key_file, pub_file = security.keygen(tmp_path / "keys")
    out = tmp_path / "run"
    common = ["train", "--model", "mlp", "--workers", "1", "--out", str(out), "--no-progress"]
    first = subprocess.run(
        [*DASKDL, *common, "--epochs", "1", "--signing-key", str(key_file)],
        capture_output=True,
        text=True,
    )
    assert first.returncode == 0, first.stderr[-2000:]
    ckpt = out / "checkpoints" / "epoch-0001"
    assert checkpoint.signature_status(ckpt, security.load_key(pub_file)) == "verified"
    (ckpt / checkpoint.SIGNATURE).unlink()
    resumed = subprocess.run(
        [*DASKDL, *common, "--epochs", "2", "--resume", "--verify-key", str(pub_file)],
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 2 and "is not signed" in resumed.stderr


@pytest.mark.integration
def test_verify_without_a_key_says_how_to_give_one(tmp_path):
    path = _checkpoint(tmp_path)
    proc = subprocess.run([*DASKDL, "verify", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "no key to verify with" in proc.stderr


@pytest.mark.integration
def test_keygen_cli(tmp_path):
    proc = subprocess.run(
        [*DASKDL, "keygen", str(tmp_path), "--hmac"], capture_output=True, text=True
    )
    assert proc.returncode == 0 and "key id" in proc.stderr
    again = subprocess.run(
        [*DASKDL, "keygen", str(tmp_path), "--hmac"], capture_output=True, text=True
    )
    assert again.returncode == 2 and "already exists" in again.stderr


def test_the_hmac_secret_from_the_environment_signs_and_verifies(client, tmp_path, monkeypatch):
    monkeypatch.setenv(security.ENV_SECRET, "a shared secret of enough length")
    train, test = daskdl.datasets.train_test("digits")
    daskdl.fit(client, "mlp", train, epochs=1, out=tmp_path, progress=False)
    path = tmp_path / "checkpoints" / "epoch-0001"
    assert checkpoint.signature_status(path, security.verify_key()) == "verified"
    checkpoint.load(path)  # verified with the same secret: no warning, no error
    monkeypatch.setenv(security.ENV_SECRET, "another secret of enough length")
    with pytest.raises(CheckpointSignatureError):
        checkpoint.load(path)


# --- TLS ---------------------------------------------------------------------------------------


@pytest.mark.integration
def test_training_on_a_tls_cluster_and_plain_tcp_is_refused(digits_split):
    train, test = digits_split
    with daskdl.local_cluster(n_workers=2, threads_per_worker=1, secure=True) as client:
        assert client.scheduler.address.startswith("tls://")
        workers = workers_info(client)
        assert len(workers) == 2 and all(w.startswith("tls://") for w in workers)
        # The all-reduce goes worker to worker over the same TLS comms: 2 ranks, both used.
        run = daskdl.fit(client, "mlp", train, val=test, epochs=3, progress=False)
        assert run.history["val_accuracy"].iloc[-1] >= 0.9
        plain = client.scheduler.address.replace("tls://", "tcp://")
        with pytest.raises((OSError, TimeoutError)):
            Client(plain, timeout="3s")
        with pytest.raises(ValueError, match="TLS scheduler"):
            daskdl.cluster.connect(client.scheduler.address)
        with pytest.raises(ValueError, match="plain TCP"):
            daskdl.fit(client, "mlp", train, backend="torch", epochs=1, progress=False)


@pytest.mark.integration
def test_tls_flags_are_checked(tmp_path):
    with pytest.raises(ValueError, match="missing --tls-cert, --tls-key"):
        security.tls(ca_file=str(tmp_path / "ca.pem"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        security.tls(*(str(tmp_path / n) for n in ("ca.pem", "c.pem", "k.pem")))
    proc = subprocess.run(
        [*DASKDL, "words", "x.txt", "--tls-ca-file", "ca.pem"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "give --scheduler tls://" in proc.stderr


@pytest.mark.integration
def test_keys_sent_to_workers_without_tls_over_the_network_warn(tmp_path, digits_split):
    import warnings

    from distributed import LocalCluster

    train, _ = digits_split
    key_file, _ = security.keygen(tmp_path / "keys")
    # Workers on every interface get the machine's address, not loopback.
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, host="0.0.0.0", dashboard_address=None
        ) as cluster,
        Client(cluster) as open_client,
    ):
        (worker,) = workers_info(open_client)
        if security.is_loopback(security.host_of(worker)):
            pytest.skip(f"this machine gave the worker a loopback address ({worker})")
        with pytest.warns(security.KeyTransportWarning, match="signing key goes to the workers"):
            daskdl.fit(
                open_client, "mlp", train, epochs=1, out=tmp_path / "run",
                signing_key=key_file, progress=False,
            )  # fmt: skip
        with pytest.warns(security.KeyTransportWarning, match="encryption key"):
            train.save(tmp_path / "enc", key=os.urandom(32))
    with daskdl.local_cluster(n_workers=1, threads_per_worker=1) as local:
        with warnings.catch_warnings():
            warnings.simplefilter("error", security.KeyTransportWarning)  # loopback: silent
            daskdl.fit(
                local, "mlp", train, epochs=1, out=tmp_path / "run2", signing_key=key_file,
                progress=False,
            )  # fmt: skip
            train.save(tmp_path / "enc2", key=os.urandom(32))
