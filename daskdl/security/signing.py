"""Keys for signed checkpoints: Ed25519 key pairs and HMAC secrets, signatures over manifests.

Signing: an Ed25519 key pair (``daskdl keygen``; the private key signs, the public key only
verifies) or an HMAC-SHA256 shared secret (signs and verifies). What is signed is the exact
bytes of a checkpoint's ``manifest.json``, which holds the SHA-256 of every other file.

Where keys come from when none is passed:

- signing: ``DASKDL_SIGNING_KEY`` (an HMAC secret, the text itself), else
  ``DASKDL_SIGNING_KEY_FILE`` (an Ed25519 private key or an HMAC secret file);
- verifying: ``DASKDL_VERIFY_KEY_FILE`` (an Ed25519 public key or an HMAC secret file), else
  whatever signs (an Ed25519 private key verifies with its public half).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ED25519 = "ed25519"
HMAC = "hmac-sha256"
ENV_SECRET = "DASKDL_SIGNING_KEY"
ENV_KEY_FILE = "DASKDL_SIGNING_KEY_FILE"
ENV_VERIFY_FILE = "DASKDL_VERIFY_KEY_FILE"
MIN_SECRET_BYTES = 16


class KeyFileError(ValueError):
    """A key file or secret that cannot be used."""


class SignatureError(ValueError):
    """A signature that is missing, malformed, made with another key, or does not verify."""


# --- signing keys ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    """Key material that travels as plain bytes (cryptography's key objects do not pickle), to
    the rank that writes checkpoints. ``private`` is False for an Ed25519 public key."""

    algorithm: str
    material: bytes
    private: bool = True

    def __repr__(self) -> str:  # never print the secret
        return f"Key({self.algorithm}, id={self.key_id}, private={self.private})"

    @property
    def key_id(self) -> str:
        """A short fingerprint that names the key (for Ed25519, of the public key)."""
        if self.algorithm == ED25519:
            return hashlib.sha256(self._public_raw()).hexdigest()[:16]
        return hashlib.sha256(b"daskdl-hmac-key-id\0" + self.material).hexdigest()[:16]

    def _public_raw(self) -> bytes:
        if not self.private:
            return self.material
        public = Ed25519PrivateKey.from_private_bytes(self.material).public_key()
        return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def sign(self, message: bytes) -> bytes:
        if self.algorithm == HMAC:
            return hmac.new(self.material, message, hashlib.sha256).digest()
        if not self.private:
            raise KeyFileError("an Ed25519 public key only verifies; signing needs the private key")
        return Ed25519PrivateKey.from_private_bytes(self.material).sign(message)

    def verify(self, message: bytes, signature: bytes) -> bool:
        if self.algorithm == HMAC:
            return hmac.compare_digest(self.sign(message), signature)
        try:
            Ed25519PublicKey.from_public_bytes(self._public_raw()).verify(signature, message)
        except InvalidSignature:
            return False
        return True


def _secret(text: str | bytes, where: str) -> Key:
    raw = text.encode() if isinstance(text, str) else text
    raw = raw.strip()
    if len(raw) < MIN_SECRET_BYTES:
        raise KeyFileError(
            f"the HMAC secret from {where} is {len(raw)} bytes; use at least {MIN_SECRET_BYTES} "
            "(`daskdl keygen --hmac DIR` writes a random one)."
        )
    return Key(HMAC, raw)


def load_key(source: str | os.PathLike | bytes | Key) -> Key:
    """A key from a file written by ``daskdl keygen`` (Ed25519 PEM or an HMAC secret file),
    PEM bytes, or a :class:`Key`."""
    if isinstance(source, Key):
        return source
    if isinstance(source, bytes):
        data, where = source, "the bytes given"
    else:
        path = Path(source)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise KeyFileError(f"cannot read the key file {path}: {e.strerror}.") from None
        where = str(path)
    if data.lstrip().startswith(b"-----BEGIN"):
        try:
            key: object  # a private or a public key, of whichever kind the file holds
            if b"PRIVATE KEY" in data:
                key = serialization.load_pem_private_key(data, password=None)
            else:
                key = serialization.load_pem_public_key(data)
        except ValueError as e:
            raise KeyFileError(f"{where} is not a readable PEM key ({e}).") from None
        if isinstance(key, Ed25519PrivateKey):
            raw = key.private_bytes(
                serialization.Encoding.Raw,
                serialization.PrivateFormat.Raw,
                serialization.NoEncryption(),
            )
            return Key(ED25519, raw)
        if isinstance(key, Ed25519PublicKey):
            raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            return Key(ED25519, raw, private=False)
        raise KeyFileError(f"{where} holds a {type(key).__name__}; daskdl signs with Ed25519 keys.")
    return _secret(data, where)


def signing_key(explicit: str | os.PathLike | bytes | Key | None = None) -> Key | None:
    """The key that signs checkpoints: ``explicit``, else the environment; None if no key."""
    if explicit is not None:
        return load_key(explicit)
    if os.environ.get(ENV_SECRET):
        return _secret(os.environ[ENV_SECRET], f"${ENV_SECRET}")
    if os.environ.get(ENV_KEY_FILE):
        return load_key(os.environ[ENV_KEY_FILE])
    return None


def verify_key(explicit: str | os.PathLike | bytes | Key | None = None) -> Key | None:
    """The key that checkpoints must verify with: ``explicit``, else the environment."""
    if explicit is not None:
        return load_key(explicit)
    if os.environ.get(ENV_VERIFY_FILE):
        return load_key(os.environ[ENV_VERIFY_FILE])
    return signing_key()


def keygen(directory: str | os.PathLike, kind: str = ED25519, force: bool = False) -> list[Path]:
    """Write a new key to ``directory``: ``daskdl.key`` (private, mode 0600) and ``daskdl.pub``
    for Ed25519; ``daskdl.secret`` (mode 0600) for HMAC. Never overwrites unless ``force``."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    if kind == ED25519:
        private = Ed25519PrivateKey.generate()
        files = {
            "daskdl.key": private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            "daskdl.pub": private.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        }
    elif kind == HMAC:
        files = {"daskdl.secret": secrets.token_hex(32).encode() + b"\n"}
    else:
        raise ValueError(f"kind must be {ED25519!r} or {HMAC!r}, got {kind!r}.")
    existing = [root / name for name in files if (root / name).exists()]
    if existing and not force:
        raise FileExistsError(
            f"{', '.join(map(str, existing))} already exists; not overwriting a key (a lost "
            "private key cannot sign again). Choose another folder or pass force=True (--force)."
        )
    written = []
    for name, data in files.items():
        path = root / name
        secret = name != "daskdl.pub"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        written.append(path)
    return written


# --- signatures --------------------------------------------------------------------------------


def signature_document(key: Key, message: bytes) -> bytes:
    """The signature file's bytes: canonical JSON, so that any change to it is detectable."""
    doc = {"algorithm": key.algorithm, "key_id": key.key_id, "signature": key.sign(message).hex()}
    return canonical_json(doc)


def canonical_json(doc: dict) -> bytes:
    """One byte string per document (sorted keys, no spaces): what is signed or authenticated."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def check_signature(key: Key, message: bytes, document: bytes, what: str) -> None:
    """Raise :class:`SignatureError` unless ``document`` is ``key``'s signature of ``message``.

    The document must be exactly as :func:`signature_document` writes it: a byte changed
    anywhere (even where a lenient parser would not notice) is a refusal.
    """
    try:
        doc = json.loads(document)
        canonical = isinstance(doc, dict) and canonical_json(doc) == document
        raw = bytes.fromhex(doc["signature"]) if canonical else b""
        canonical = canonical and raw.hex() == doc["signature"]
    except (ValueError, UnicodeDecodeError, KeyError, TypeError):
        canonical = False
    if not canonical:
        raise SignatureError(f"the signature of {what} is malformed (the file was modified).")
    if doc.get("algorithm") != key.algorithm or doc.get("key_id") != key.key_id:
        raise SignatureError(
            f"{what} is signed with {doc.get('algorithm')} key {doc.get('key_id')}, not with the "
            f"verify key ({key.algorithm} {key.key_id})."
        )
    if not key.verify(message, raw):
        raise SignatureError(
            f"the signature of {what} does not verify: it was modified after it was signed."
        )
