"""Checkpoints: a directory with ``model.safetensors``, ``optimizer.safetensors``,
``manifest.json`` (config, epoch, step, shard plan, SHA-256 of each file) and, when a signing
key is set, ``signature.json`` (Ed25519 or HMAC-SHA256 over the manifest's exact bytes).

A checkpoint is written under a temporary name, fsynced, then renamed into place, so a crash
mid-write never leaves a half-written checkpoint under a real name. Loading checks the
signature, then every digest, before a tensor is read, and nothing is ever unpickled: tensors
come from safetensors, the rest from JSON. With a verify key (see :mod:`daskdl.security`), an
unsigned or modified checkpoint is refused; without one, loading warns that nothing was
verified.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load as load_numpy
from safetensors.numpy import save as save_numpy

from daskdl import security

FORMAT = "daskdl-checkpoint"
VERSION = 1
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
MANIFEST = "manifest.json"
SIGNATURE = "signature.json"
PREFIX = "epoch-"
OUTER = "outer"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not match its manifest."""


class CheckpointSignatureError(CheckpointError):
    """A checkpoint that is unsigned, signed with another key, or modified since it was signed,
    while a verify key is set."""


class UnverifiedCheckpointWarning(UserWarning):
    """A checkpoint was loaded without a verify key: its origin was not checked."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def model_tensors(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The model's state as numpy arrays of their own: not views of tensors that training
    goes on changing (or, sharded, frees)."""
    return {k: copy(v) for k, v in model.state_dict().items()}


def copy(tensor: torch.Tensor) -> np.ndarray:
    """A tensor's values as a numpy array of its own, on the host."""
    return tensor.detach().to("cpu", copy=True).contiguous().numpy()


def optimizer_tensors(
    optimizer: torch.optim.Optimizer, outer: dict[str, np.ndarray] | None = None
) -> tuple[dict[str, np.ndarray], list]:
    """Split an optimizer's state into tensors (for safetensors) and JSON-able param groups.

    ``outer`` is the state of a local-SGD outer optimizer, kept under ``outer.<name>``.
    """
    return state_tensors(optimizer.state_dict(), outer)


def state_tensors(state: dict, outer: dict[str, np.ndarray] | None = None):
    """:func:`optimizer_tensors` of an optimizer's ``state_dict()``."""
    tensors = {f"{OUTER}.{name}": value for name, value in (outer or {}).items()}
    for index, slots in state["state"].items():
        for name, value in slots.items():
            value = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{index}.{name}"] = copy(value)
    return tensors, state["param_groups"]


def optimizer_state(tensors: dict[str, np.ndarray], param_groups: list) -> dict:
    """The inverse of :func:`optimizer_tensors`: a torch optimizer state dict, plus ``outer``."""
    state: dict[int, dict] = {}
    outer = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        if index == OUTER:
            outer[name] = value
        else:
            state.setdefault(int(index), {})[name] = torch.from_numpy(value.copy())
    return {"state": dict(sorted(state.items())), "param_groups": param_groups, "outer": outer}


def save(
    directory: str | os.PathLike,
    epoch: int,
    model: dict[str, np.ndarray],
    optimizer: tuple[dict[str, np.ndarray], list],
    manifest: dict,
    keep: int | None = None,
    key: security.Key | None = None,
) -> Path:
    """Write checkpoint ``epoch-NNNN`` under ``directory`` atomically; return its path.

    ``keep`` old checkpoints are kept (the newest ones); ``None`` keeps all. ``key`` signs the
    manifest.
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{epoch:04d}"
    tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        opt_tensors, param_groups = optimizer
        blobs = {MODEL_FILE: save_numpy(model), OPTIMIZER_FILE: save_numpy(opt_tensors)}
        for name, data in blobs.items():
            _write(tmp / name, data)
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "epoch": epoch,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **manifest,
            "optimizer_param_groups": param_groups,
            "files": {name: _sha256(data) for name, data in blobs.items()},
        }
        manifest_bytes = json.dumps(doc, indent=1, sort_keys=True).encode()
        _write(tmp / MANIFEST, manifest_bytes)
        if key is not None:
            _write(tmp / SIGNATURE, security.signature_document(key, manifest_bytes))
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep is not None:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Checkpoint directories under ``directory``, oldest first (temporary ones excluded)."""
    root = Path(directory)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def checkpoints_at(path: str | os.PathLike) -> list[Path]:
    """``path`` itself if it is a checkpoint, else the checkpoints of the run directory
    ``path`` (in its ``checkpoints/`` folder, or directly in it), oldest first."""
    path = Path(path)
    if (path / MANIFEST).exists():
        return [path]
    return list_checkpoints(path / "checkpoints") or list_checkpoints(path)


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of the checkpoint at ``path``, not verified (see :func:`load`)."""
    path = Path(path)
    return _parse_manifest(path, _read(path, MANIFEST, f"{path} is not a checkpoint"))


def _read(path: Path, name: str, missing: str) -> bytes:
    try:
        return (path / name).read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{missing}: it has no {name}.") from None


def _parse_manifest(path: Path, data: bytes) -> dict:
    return parse_document(data, path / MANIFEST, FORMAT, VERSION, "checkpoint", CheckpointError)


def parse_document(
    data: bytes, file: Path, fmt: str, version: int, kind: str, error: type[Exception]
) -> dict:
    """A daskdl JSON manifest (a checkpoint's, a saved data set's): parsed, with its format
    tag and version checked, or ``error`` saying what is wrong with ``file``."""
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{file} is not valid JSON ({e}).") from None
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise error(f"{file} is not a daskdl {kind} manifest.")
    if doc.get("version") != version:
        raise error(
            f"{file.parent} has {kind} format version {doc.get('version')}; this daskdl reads "
            f"version {version}."
        )
    return doc


def signature_status(path: str | os.PathLike, key: security.Key | None = None) -> str:
    """``"verified"`` (with ``key``), ``"signed"`` (a signature, not checked: no key) or
    ``"unsigned"``; raises :class:`CheckpointSignatureError` when ``key`` refuses it."""
    path = Path(path)
    manifest = _read(path, MANIFEST, f"{path} is not a checkpoint")
    return _check_signature(path, manifest, key)


def _check_signature(path: Path, manifest: bytes, key: security.Key | None) -> str:
    try:
        document = (path / SIGNATURE).read_bytes()
    except FileNotFoundError:
        document = None
    if key is None:
        return "unsigned" if document is None else "signed"
    if document is None:
        raise CheckpointSignatureError(
            f"{path} is not signed, and a verify key ({key.algorithm} {key.key_id}) is set: "
            "refusing it. Re-save it from a run with a signing key, or load it without a "
            "verify key if you trust where it came from."
        )
    try:
        security.check_signature(key, manifest, document, str(path))
    except security.SignatureError as e:
        raise CheckpointSignatureError(f"refusing checkpoint: {e}") from None
    return "verified"


def load(
    path: str | os.PathLike, verify_key: security.Key | str | os.PathLike | None = None
) -> tuple[dict[str, np.ndarray], dict, dict]:
    """Verify and read one checkpoint: ``(model tensors, optimizer state, manifest)``.

    The manifest's signature is checked with ``verify_key`` (default: from the environment,
    see :mod:`daskdl.security`), then every file's SHA-256, before any tensor is parsed.
    """
    path = Path(path)
    key = security.verify_key(verify_key)
    manifest = _read(path, MANIFEST, f"{path} is not a checkpoint")
    status = _check_signature(path, manifest, key)
    if key is None:
        warnings.warn(
            f"Loaded checkpoint {path} ({status}) without verifying who wrote it: no verify "
            f"key is set. Set {security.ENV_VERIFY_FILE} (or {security.ENV_SECRET}) or pass "
            "verify_key=... to refuse checkpoints that are not signed by your key.",
            UnverifiedCheckpointWarning,
            stacklevel=2,
        )
    doc = _parse_manifest(path, manifest)  # the bytes that were verified, not a second read
    blobs = {}
    for name in (MODEL_FILE, OPTIMIZER_FILE):
        try:
            data = (path / name).read_bytes()
        except FileNotFoundError:
            raise CheckpointError(f"{path} is incomplete: {name} is missing.") from None
        if _sha256(data) != doc.get("files", {}).get(name):
            error = CheckpointSignatureError if key is not None else CheckpointError
            raise error(
                f"{path / name} does not match the SHA-256 in its manifest: the file is "
                "truncated, corrupted or was modified. Resume from an earlier checkpoint."
            )
        blobs[name] = data
    try:
        model = load_numpy(blobs[MODEL_FILE])
        tensors = load_numpy(blobs[OPTIMIZER_FILE])
    except Exception as e:  # safetensors' own parse errors (only reachable without a key)
        raise CheckpointError(f"{path} holds an unreadable safetensors file ({e}).") from None
    opt = optimizer_state(tensors, doc["optimizer_param_groups"])
    return model, opt, doc


def load_latest(
    directory: str | os.PathLike, verify_key: security.Key | str | os.PathLike | None = None
) -> tuple[Path, dict[str, np.ndarray], dict, dict]:
    """The newest checkpoint that verifies, under a run directory or its ``checkpoints/``:
    ``(path, model tensors, optimizer state, manifest)``.

    ``directory`` may also be one checkpoint. Without a verify key, newer checkpoints that
    fail their digests are skipped with a warning (a disk can corrupt files); with one, a
    checkpoint that is unsigned or modified is refused with an error instead, never skipped.
    """
    path = Path(directory)
    key = security.verify_key(verify_key)
    if (path / MANIFEST).exists():
        return (path, *load(path, key))
    candidates = checkpoints_at(path)
    if not candidates:
        raise CheckpointError(
            f"No checkpoint in {str(path)!r}: expected {PREFIX}NNNN directories there or in "
            f"its checkpoints/ folder. Was the run started with out={str(path)!r}?"
        )
    for candidate in reversed(candidates):
        try:
            return (candidate, *load(candidate, key))
        except CheckpointSignatureError:
            raise
        except CheckpointError as e:
            warnings.warn(f"Skipping checkpoint {candidate}: {e}", stacklevel=2)
    raise CheckpointError(f"None of the {len(candidates)} checkpoints in {path} verifies.")
