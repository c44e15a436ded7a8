"""``Dataset.save`` / ``Dataset.load``: a data set on disk, one file per partition, optionally
encrypted with AES-GCM.

Layout: ``dataset.json`` (shapes, dtypes, classes, one entry per partition) and
``part-NNNNN.safetensors`` (``part-NNNNN.enc`` when encrypted). Each partition is written and
read by a Dask task, on the worker that holds or needs it, so the path must be one that every
worker sees (a shared file system on a multi-machine cluster), as for checkpoints.

Encrypted partitions are ``nonce || AES-GCM(safetensors bytes)``; the data set's id and the
partition's index and length are authenticated with it, so partitions cannot be swapped,
reordered or moved between data sets unnoticed. A ``check`` in ``dataset.json`` (the
encryption of a constant, authenticated with the rest of the metadata) tells a wrong key, or
modified metadata, before any partition is read. Plain partitions carry a SHA-256 instead.
Nothing is unpickled: tensors come from safetensors, the rest from JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import dask
import dask.array as da
import numpy as np
from safetensors.numpy import load as load_numpy
from safetensors.numpy import save as save_numpy

from daskdl import security
from daskdl.checkpoint.files import parse_document
from daskdl.data import preprocess
from daskdl.objective.task import Scale

FORMAT = "daskdl-dataset"
VERSION = 1
META = "dataset.json"
CHECK_PLAINTEXT = b"daskdl-dataset-key-check"


class DatasetFileError(ValueError):
    """A saved data set that is missing, incomplete, or does not match its metadata."""


def _warn_if_sent_in_clear(what: str) -> None:
    try:
        from distributed import default_client

        client = default_client()
    except (ImportError, ValueError):  # no distributed client: the key stays in this process
        return
    security.warn_if_sent_in_clear(client, what)


def _context(dataset_id: str, index: int, rows: int) -> bytes:
    return f"daskdl-dataset:{dataset_id}:part:{index}:rows:{rows}".encode()


def _write_part(X: np.ndarray, y: np.ndarray, path: str, key, dataset_id: str, index: int):
    data = save_numpy({"X": np.ascontiguousarray(X), "y": np.ascontiguousarray(y)})
    if key is not None:
        data = key.encrypt(data, _context(dataset_id, index, len(X)))
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return len(X), hashlib.sha256(data).hexdigest()


def _read_part(path: str, key, dataset_id: str, index: int, rows: int, sha256: str | None):
    name = Path(path).name
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DatasetFileError(f"{path} is missing: the saved data set is incomplete.") from None
    if key is not None:
        data = key.decrypt(data, _context(dataset_id, index, rows), name)
    elif hashlib.sha256(data).hexdigest() != sha256:
        raise DatasetFileError(
            f"{path} does not match the SHA-256 in {META}: it is truncated, corrupted or was "
            "modified."
        )
    arrays = load_numpy(data)
    X, y = arrays["X"], arrays["y"]
    if len(X) != rows or len(y) != rows:
        raise DatasetFileError(f"{path} holds {len(X)} samples; {META} says {rows}.")
    return X, y


def save(ds, path: str | os.PathLike, key=None, overwrite: bool = False) -> Path:
    """Write ``ds`` under ``path`` (see the module docstring); return the path.

    Written to a temporary folder beside ``path`` and renamed into place, so a failed save
    leaves no half-written data set, and an existing one is replaced only with ``overwrite``
    (and only once the new one is complete).
    """
    # Absolute: the workers that write the partitions may run in another directory.
    root = Path(path).resolve()
    if root.exists() and (not root.is_dir() or any(root.iterdir())) and not overwrite:
        raise FileExistsError(
            f"{root} already exists and is not empty; not overwriting it. Choose another "
            "path, or pass overwrite=True."
        )
    dataset_id = uuid.uuid4().hex
    encryption = None
    data_key = None
    if key is not None:
        salt = os.urandom(16)
        data_key = security.data_key(key, salt)
        _warn_if_sent_in_clear("The data set's encryption key")
        kdf = "scrypt" if isinstance(key, str) else None
        encryption = {"cipher": "AES-GCM", "kdf": kdf, "salt": salt.hex()}
    suffix = ".enc" if key is not None else ".safetensors"
    tmp = root.parent / f".{root.name}.tmp-{dataset_id[:8]}"
    tmp.mkdir(parents=True)
    try:
        names = [f"part-{i:05d}{suffix}" for i in range(ds.npartitions)]
        writes = [
            dask.delayed(_write_part, pure=False)(x, y, str(tmp / name), data_key, dataset_id, i)
            for i, (x, y, name) in enumerate(
                zip(ds.X.to_delayed().ravel(), ds.y.to_delayed().ravel(), names)
            )
        ]
        written = dask.compute(*writes)
        scale = standardized = None
        if ds.target_scale is not None:
            stats = Scale.from_arrays(*dask.compute(*ds.target_scale))
            scale = [stats.mean, stats.std]
        if ds.standardized is not None:  # so that a loaded copy is not standardised twice
            values = dask.compute(ds.standardized.mean, ds.standardized.std)
            standardized = preprocess.to_record(*values)
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "id": dataset_id,
            "n_classes": ds.known_n_classes,
            "task": ds.task,
            "classes": ds.classes,
            "features": ds.features,
            "categories": ds.categories,
            "target_scale": scale,
            "standardized": standardized,
            "x": {"dtype": str(ds.X.dtype), "sample_shape": list(ds.sample_shape)},
            "y": {"dtype": str(ds.y.dtype), "sample_shape": list(ds.y.shape[1:])},
            "partitions": [
                {"file": name, "rows": rows, **({} if key is not None else {"sha256": digest})}
                for name, (rows, digest) in zip(names, written)
            ],
            "encryption": encryption,
        }
        if data_key is not None:
            check = data_key.encrypt(CHECK_PLAINTEXT, security.canonical_json(doc))
            doc["encryption"]["check"] = check.hex()
        with open(tmp / META, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        if root.exists():
            old = root.parent / f".{root.name}.old-{dataset_id[:8]}"
            os.rename(root, old)
            os.rename(tmp, root)
            shutil.rmtree(old)
        else:
            os.rename(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def load(path: str | os.PathLike, key=None) -> tuple[da.Array, da.Array, dict]:
    """The lazy arrays of a data set written by :func:`save`, and what the data set records
    beside them (``n_classes``, ``task``, ``classes``, ``features``, ``categories``,
    ``target_scale``, ``standardized``), from which :meth:`daskdl.Dataset.load` makes one."""
    root = Path(path).resolve()  # read by workers, which may run in another directory
    try:
        raw = (root / META).read_bytes()
    except FileNotFoundError:
        raise DatasetFileError(
            f"{root} is not a saved data set: it has no {META} (Dataset.save writes one)."
        ) from None
    doc = parse_document(raw, root / META, FORMAT, VERSION, "data set", DatasetFileError)
    encryption = doc.get("encryption")
    data_key = None
    if encryption is not None:
        if key is None:
            raise ValueError(f"{root} is encrypted: pass key=... (the key it was saved with).")
        data_key = security.data_key(key, bytes.fromhex(encryption["salt"]))
        _warn_if_sent_in_clear("The data set's encryption key")
        unchecked = {**doc, "encryption": {k: v for k, v in encryption.items() if k != "check"}}
        try:
            check = data_key.decrypt(
                bytes.fromhex(encryption["check"]),
                security.canonical_json(unchecked),
                str(root / META),
            )
            opened = check == CHECK_PLAINTEXT
        except (ValueError, KeyError, TypeError):  # DecryptionError is a ValueError
            opened = False
        if not opened:
            raise security.DecryptionError(
                f"cannot open {root}: the key is wrong, or {META} was modified."
            )
    elif key is not None:
        raise ValueError(f"{root} is not encrypted; load it without key=.")

    sample_shape = tuple(doc["x"]["sample_shape"])
    x_dtype, y_dtype = np.dtype(doc["x"]["dtype"]), np.dtype(doc["y"]["dtype"])
    y_shape = tuple(doc["y"].get("sample_shape", ()))
    xs, ys = [], []
    for i, part in enumerate(doc["partitions"]):
        rows = int(part["rows"])
        read = dask.delayed(_read_part)(
            str(root / part["file"]),
            data_key,
            doc["id"],
            i,
            rows,
            part.get("sha256"),
            dask_key_name=f"daskdl-load-{doc['id']}-{i}",
        )
        xs.append(da.from_delayed(read[0], shape=(rows, *sample_shape), dtype=x_dtype))
        ys.append(da.from_delayed(read[1], shape=(rows, *y_shape), dtype=y_dtype))
    meta = {name: doc.get(name) for name in ("n_classes", "task", "classes", "features")}
    meta["categories"] = doc.get("categories")
    meta["target_scale"] = meta["standardized"] = None
    if doc.get("target_scale") is not None:
        mean, std = (np.asarray(v, dtype=np.float32) for v in doc["target_scale"])
        if not y_shape:  # (n,) targets: scalar statistics
            mean, std = mean.reshape(()), std.reshape(())
        meta["target_scale"] = (da.from_array(mean), da.from_array(std))
    if doc.get("standardized") is not None:
        record = preprocess.from_record(doc["standardized"])
        meta["standardized"] = preprocess.Standardization(*record)
    return da.concatenate(xs), da.concatenate(ys), meta
