"""No load path unpickles: pickle.load, pickle.loads, pickle.Unpickler (and torch.load) fail
in this thread while every checkpoint, data set and config load runs in it.

Dask's own machinery (its comms in other threads, tokenizing graphs) keeps its pickle: the
rule is about what daskdl reads from disk, not how Dask moves tasks. So a data set's partition
reads, which workers run as tasks, are run here directly.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import threading

import numpy as np
import pytest
import torch

import daskdl
from daskdl import security
from daskdl.checkpoint import files as checkpoint
from daskdl.cli import main as cli
from daskdl.config.options import TrainConfig
from daskdl.data import storage


@contextlib.contextmanager
def unpickling_refused():
    calls: list[str] = []
    here = threading.current_thread()

    def guard(name, original):
        def refuse(*args, **kwargs):
            if threading.current_thread() is here:
                calls.append(name)
                raise AssertionError(f"a daskdl load path called {name}")
            return original(*args, **kwargs)

        return refuse

    with pytest.MonkeyPatch.context() as patch:
        for name in ("load", "loads", "Unpickler"):
            patch.setattr(pickle, name, guard(f"pickle.{name}", getattr(pickle, name)))
        patch.setattr(torch, "load", guard("torch.load", torch.load))
        yield calls
    assert calls == [], f"called while loading: {calls}"


def _partitions(path, key=None):
    """Every partition of a saved data set, read by the function its load tasks run."""
    meta = json.loads((path / storage.META).read_text())
    salt = meta["encryption"] and bytes.fromhex(meta["encryption"]["salt"])
    data_key = security.data_key(key, salt) if key is not None else None
    return [
        storage._read_part(
            str(path / p["file"]), data_key, meta["id"], i, p["rows"], p.get("sha256")
        )
        for i, p in enumerate(meta["partitions"])
    ]


def test_checkpoint_dataset_and_config_loads_never_unpickle(client, tmp_path, no_signing_keys):
    key_file, pub_file = security.keygen(tmp_path / "keys")
    train, test = daskdl.datasets.train_test("digits")
    out = tmp_path / "run"
    run = daskdl.fit(
        client, "mlp", train, val=test, epochs=1, optimizer="adamw", out=out,
        signing_key=key_file, progress=False,
    )  # fmt: skip
    data_key = os.urandom(32)
    plain, secret = train.save(tmp_path / "plain"), train.save(tmp_path / "enc", key=data_key)
    X, y = train.compute()
    ckpt = out / "checkpoints" / "epoch-0001"

    with unpickling_refused():
        model, opt, manifest = checkpoint.load(ckpt, verify_key=pub_file)
        checkpoint.load_latest(out, verify_key=pub_file)
        assert checkpoint.signature_status(ckpt, security.load_key(pub_file)) == "verified"
        assert cli.main(["verify", str(out), "--key", str(pub_file)]) == 0
        config = TrainConfig.from_dict(manifest["config"])
        TrainConfig.from_dict(json.loads((out / "config.json").read_text())["config"])
        for path, key in ((plain, None), (secret, data_key)):
            loaded = daskdl.Dataset.load(path, key=key)
            parts = _partitions(path, key)
            np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), X)
            np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), y)
            assert loaded.npartitions == len(parts)

    assert config.optimizer == "adamw" and opt["state"]
    torch.testing.assert_close(
        {k: torch.from_numpy(v) for k, v in model.items()}, run.model.state_dict()
    )


@pytest.mark.parametrize(
    "load",
    [
        lambda blob: pickle.loads(blob),
        lambda blob: pickle.Unpickler(__import__("io").BytesIO(blob)).load(),
        lambda blob: torch.load(__import__("io").BytesIO(blob), weights_only=False),
    ],
)
def test_the_guard_catches_unpickling(load):
    blob = pickle.dumps({"a": 1})
    with pytest.raises(AssertionError, match="called (pickle|torch)"):
        with unpickling_refused():
            load(blob)
