"""Encryption at rest: AES-GCM data keys, from raw bytes or a passphrase (scrypt)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt


class DecryptionError(ValueError):
    """Encrypted data that the key given cannot open: a wrong key, or modified data."""


NONCE_BYTES = 12


@dataclass(frozen=True)
class DataKey:
    """A 256-bit AES-GCM key, from raw bytes or a passphrase (scrypt with a per-data-set salt)."""

    material: bytes

    def __repr__(self) -> str:
        return "DataKey(...)"

    def encrypt(self, plaintext: bytes, context: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + AESGCM(self.material).encrypt(nonce, plaintext, context)

    def decrypt(self, blob: bytes, context: bytes, what: str) -> bytes:
        try:
            return AESGCM(self.material).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], context)
        except InvalidTag:
            raise DecryptionError(
                f"cannot decrypt {what}: the key is wrong, or the file was modified."
            ) from None


def data_key(key: str | bytes | DataKey, salt: bytes) -> DataKey:
    """``key``: 16, 24 or 32 raw bytes, or a passphrase (str) stretched with scrypt."""
    if isinstance(key, DataKey):
        return key
    if isinstance(key, str):
        if len(key) < 8:
            raise ValueError("a passphrase must have at least 8 characters.")
        stretched = Scrypt(salt=salt, length=32, n=2**14, r=8, p=1).derive(key.encode())
        return DataKey(stretched)
    if isinstance(key, bytes) and len(key) in (16, 24, 32):
        return DataKey(key)
    raise TypeError(
        f"key must be 16, 24 or 32 bytes (AES) or a passphrase str, got "
        f"{type(key).__name__}{f' of {len(key)} bytes' if isinstance(key, bytes) else ''}. "
        "os.urandom(32) makes one."
    )
