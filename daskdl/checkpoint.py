"""Checkpoints: a directory with ``model.safetensors``, ``optimizer.safetensors`` and
``manifest.json`` (config, epoch, step, shard plan, SHA-256 of each file).

A checkpoint is written under a temporary name, fsynced, then renamed into place, so a crash
mid-write never leaves a half-written checkpoint under a real name. Loading checks every digest
before a tensor is read, and nothing is ever unpickled: tensors come from safetensors, the rest
from JSON.
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

FORMAT = "daskdl-checkpoint"
VERSION = 1
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
MANIFEST = "manifest.json"
PREFIX = "epoch-"
OUTER = "outer"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not match its manifest."""


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
    return {k: v.detach().cpu().contiguous().numpy() for k, v in model.state_dict().items()}


def optimizer_tensors(
    optimizer: torch.optim.Optimizer, outer: dict[str, np.ndarray] | None = None
) -> tuple[dict[str, np.ndarray], list]:
    """Split an optimizer's state into tensors (for safetensors) and JSON-able param groups.

    ``outer`` is the state of a local-SGD outer optimizer, kept under ``outer.<name>``.
    """
    state = optimizer.state_dict()
    tensors = {f"{OUTER}.{name}": value for name, value in (outer or {}).items()}
    for index, slots in state["state"].items():
        for name, value in slots.items():
            value = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{index}.{name}"] = value.detach().cpu().contiguous().numpy()
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
) -> Path:
    """Write checkpoint ``epoch-NNNN`` under ``directory`` atomically; return its path.

    ``keep`` old checkpoints are kept (the newest ones); ``None`` keeps all.
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
        _write(tmp / MANIFEST, json.dumps(doc, indent=1, sort_keys=True).encode())
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


def read_manifest(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        doc = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a checkpoint: it has no {MANIFEST}.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / MANIFEST} is not valid JSON ({e}).") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{path / MANIFEST} is not a daskdl checkpoint manifest.")
    if doc.get("version") != VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {doc.get('version')}; this daskdl reads "
            f"version {VERSION}."
        )
    return doc


def load(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict, dict]:
    """Verify and read one checkpoint: ``(model tensors, optimizer state, manifest)``.

    Every file's SHA-256 is checked against the manifest before any tensor is parsed.
    """
    path = Path(path)
    doc = read_manifest(path)
    blobs = {}
    for name in (MODEL_FILE, OPTIMIZER_FILE):
        try:
            data = (path / name).read_bytes()
        except FileNotFoundError:
            raise CheckpointError(f"{path} is incomplete: {name} is missing.") from None
        if _sha256(data) != doc.get("files", {}).get(name):
            raise CheckpointError(
                f"{path / name} does not match the SHA-256 in its manifest: the file is "
                "truncated, corrupted or was modified. Resume from an earlier checkpoint."
            )
        blobs[name] = data
    model = load_numpy(blobs[MODEL_FILE])
    opt = optimizer_state(load_numpy(blobs[OPTIMIZER_FILE]), doc["optimizer_param_groups"])
    return model, opt, doc


def load_latest(directory: str | os.PathLike) -> tuple[Path, dict[str, np.ndarray], dict, dict]:
    """The newest checkpoint that verifies, under a run directory or its ``checkpoints/``:
    ``(path, model tensors, optimizer state, manifest)``.

    ``directory`` may also be one checkpoint. Newer checkpoints that fail verification are
    skipped with a warning.
    """
    path = Path(directory)
    if (path / MANIFEST).exists():
        return (path, *load(path))
    candidates = list_checkpoints(path / "checkpoints") or list_checkpoints(path)
    if not candidates:
        raise CheckpointError(
            f"No checkpoint in {str(path)!r}: expected {PREFIX}NNNN directories there or in "
            f"its checkpoints/ folder. Was the run started with out={str(path)!r}?"
        )
    for candidate in reversed(candidates):
        try:
            return (candidate, *load(candidate))
        except CheckpointError as e:
            warnings.warn(f"Skipping checkpoint {candidate}: {e}", stacklevel=2)
    raise CheckpointError(f"None of the {len(candidates)} checkpoints in {path} verifies.")
