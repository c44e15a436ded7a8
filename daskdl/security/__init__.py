"""Security: signing keys and signatures, encrypted data keys, TLS settings.

Users reach these as ``daskdl.security.<name>`` (``tls``, ``keygen``, ``load_key``, ``Key``, ...);
each lives in the module of its concern.
"""

from daskdl.security.encryption import NONCE_BYTES, DataKey, DecryptionError, data_key
from daskdl.security.signing import (
    ED25519,
    ENV_KEY_FILE,
    ENV_SECRET,
    ENV_VERIFY_FILE,
    HMAC,
    MIN_SECRET_BYTES,
    Key,
    KeyFileError,
    SignatureError,
    canonical_json,
    check_signature,
    keygen,
    load_key,
    signature_document,
    signing_key,
    verify_key,
)
from daskdl.security.transport import (
    KeyTransportWarning,
    host_of,
    is_loopback,
    tls,
    warn_if_sent_in_clear,
)

__all__ = [
    "DataKey",
    "DecryptionError",
    "ED25519",
    "ENV_KEY_FILE",
    "ENV_SECRET",
    "ENV_VERIFY_FILE",
    "HMAC",
    "Key",
    "KeyFileError",
    "KeyTransportWarning",
    "MIN_SECRET_BYTES",
    "NONCE_BYTES",
    "SignatureError",
    "canonical_json",
    "check_signature",
    "data_key",
    "host_of",
    "is_loopback",
    "keygen",
    "load_key",
    "signature_document",
    "signing_key",
    "tls",
    "verify_key",
    "warn_if_sent_in_clear",
]
