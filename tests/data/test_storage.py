"""Dataset.save / Dataset.load: plain and AES-GCM-encrypted partitions on real disk, written
and read by the workers of a real cluster."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import daskdl
from daskdl.data.storage import DatasetFileError
from daskdl.security import DecryptionError


@pytest.fixture(scope="module")
def digits():
    train, test = daskdl.datasets.train_test("digits")
    return train, test


def _same(a, b):
    (Xa, ya), (Xb, yb) = a.compute(), b.compute()
    np.testing.assert_array_equal(Xa, Xb)
    np.testing.assert_array_equal(ya, yb)


def test_round_trip_keeps_partitions_classes_and_trains(client, digits, tmp_path):
    train, test = digits
    text = daskdl.Dataset.from_numpy(np.ones((40, 3)), np.arange(40) % 2, chunks=10)
    text.classes = ["neg", "pos"]
    path = text.save(tmp_path / "text")
    back = daskdl.Dataset.load(path)
    assert back.classes == ["neg", "pos"] and back.npartitions == 4
    _same(text, back)

    path = train.save(tmp_path / "train")
    assert sorted(os.listdir(path))[:2] == ["dataset.json", "part-00000.safetensors"]
    back = daskdl.Dataset.load(path)
    assert back.npartitions == train.npartitions and back.sample_shape == (1, 8, 8)
    _same(train, back)
    run = daskdl.fit(client, "mlp", back, val=test, epochs=2, progress=False)
    assert run.history["val_accuracy"].iloc[-1] >= 0.9


@pytest.mark.parametrize(
    "key", [os.urandom(32), "a passphrase for the cache"], ids=["raw", "passphrase"]
)
def test_encrypted_partitions_are_unreadable_without_the_key(client, digits, tmp_path, key):
    train, _ = digits
    path = train.save(tmp_path / "enc", key=key)
    X, _ = train.compute()
    first = (path / "part-00000.enc").read_bytes()
    # Neither the safetensors header nor any sample's bytes appear on disk.
    assert b'"dtype"' not in first and X[0].tobytes() not in first
    _same(train, daskdl.Dataset.load(path, key=key))
    wrong = os.urandom(32) if isinstance(key, bytes) else "another passphrase!"
    with pytest.raises(DecryptionError, match="the key is wrong"):
        daskdl.Dataset.load(path, key=wrong)
    with pytest.raises(ValueError, match="is encrypted: pass key="):
        daskdl.Dataset.load(path)


def test_modified_encrypted_files_are_refused(client, digits, tmp_path):
    train, _ = digits
    key = os.urandom(32)
    path = train.save(tmp_path / "enc", key=key)
    part = path / "part-00003.enc"
    blob = bytearray(part.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    part.write_bytes(bytes(blob))
    with pytest.raises(DecryptionError, match="part-00003.enc"):
        daskdl.Dataset.load(path, key=key).compute()
    # Two untouched partitions swapped: each is authenticated with its place.
    a, b = path / "part-00001.enc", path / "part-00002.enc"
    a_bytes, b_bytes = a.read_bytes(), b.read_bytes()
    a.write_bytes(b_bytes)
    b.write_bytes(a_bytes)
    with pytest.raises(DecryptionError, match="part-0000[12].enc"):
        daskdl.Dataset.load(path, key=key).X.blocks[1].compute()
    meta = json.loads((path / "dataset.json").read_text())
    meta["partitions"][0]["rows"] -= 1
    (path / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DecryptionError, match="dataset.json was modified"):
        daskdl.Dataset.load(path, key=key)


def test_plain_files_are_checked_and_nothing_is_overwritten(client, digits, tmp_path):
    train, test = digits
    path = train.save(tmp_path / "plain")
    with pytest.raises(FileExistsError, match="not overwriting"):
        test.save(path)
    _same(train, daskdl.Dataset.load(path))  # the refused save left it as it was
    with pytest.raises(ValueError, match="not encrypted"):
        daskdl.Dataset.load(path, key=os.urandom(32))
    part = path / "part-00000.safetensors"
    part.write_bytes(part.read_bytes()[:-1])
    with pytest.raises(DatasetFileError, match="does not match the SHA-256"):
        daskdl.Dataset.load(path).compute()
    test.save(path, overwrite=True)
    _same(test, daskdl.Dataset.load(path))
    with pytest.raises(DatasetFileError, match="not a saved data set"):
        daskdl.Dataset.load(tmp_path)
    with pytest.raises(TypeError, match="16, 24 or 32 bytes"):
        train.save(tmp_path / "bad", key=b"short")
    assert not (tmp_path / "bad").exists()


def test_a_relative_path_means_the_clients_directory(client, digits, tmp_path, monkeypatch):
    # The session cluster's workers were started in another directory.
    train, _ = digits
    monkeypatch.chdir(tmp_path)
    train.save("relative")
    assert (tmp_path / "relative" / "dataset.json").exists()
    assert len(list((tmp_path / "relative").glob("part-*"))) == train.npartitions
    _same(train, daskdl.Dataset.load("relative"))
