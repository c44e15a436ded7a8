"""Checkpoints: safetensors + a JSON manifest with digests, atomic, never unpickled."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from daskdl import models
from daskdl.checkpoint import files as checkpoint
from daskdl.checkpoint.files import CheckpointError


def _trained(optimizer="sgd"):
    torch.manual_seed(0)
    model = models.mlp((6,), 3)
    opt = (torch.optim.AdamW if optimizer == "adamw" else torch.optim.SGD)(
        model.parameters(), lr=0.1, **({} if optimizer == "adamw" else {"momentum": 0.9})
    )
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(torch.randn(8, 6)), torch.arange(8) % 3).backward()
        opt.step()
    return model, opt


def _save(root, epoch=1, optimizer="sgd", keep=None):
    model, opt = _trained(optimizer)
    path = checkpoint.save(
        root,
        epoch,
        checkpoint.model_tensors(model),
        checkpoint.optimizer_tensors(opt),
        {"step": 10 * epoch, "plan": [[0], [1]]},
        keep=keep,
    )
    return path, model, opt


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_round_trip(tmp_path, optimizer):
    path, model, opt = _save(tmp_path, optimizer=optimizer)
    assert sorted(p.name for p in path.iterdir()) == [
        "manifest.json",
        "model.safetensors",
        "optimizer.safetensors",
    ]
    tensors, opt_state, manifest = checkpoint.load(path)
    assert manifest["epoch"] == 1 and manifest["step"] == 10 and manifest["plan"] == [[0], [1]]
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(tensors[k], v.numpy())
    fresh, fresh_opt = _trained(optimizer)
    assert opt_state.pop("outer") == {}
    fresh_opt.load_state_dict(opt_state)
    saved, restored = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert saved.keys() == restored.keys()
    for index, slots in saved.items():
        for name, value in slots.items():
            torch.testing.assert_close(torch.as_tensor(value), restored[index][name])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_keep_prunes_old_checkpoints(tmp_path):
    for epoch in range(1, 5):
        _save(tmp_path, epoch, keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["epoch-0003", "epoch-0004"]


@pytest.mark.parametrize("victim", ["model.safetensors", "optimizer.safetensors"])
def test_a_flipped_byte_is_refused(tmp_path, victim):
    path, _, _ = _save(tmp_path)
    data = bytearray((path / victim).read_bytes())
    for position in [0, len(data) // 2, len(data) - 1]:
        corrupt = bytearray(data)
        corrupt[position] ^= 0x01
        (path / victim).write_bytes(bytes(corrupt))
        with pytest.raises(CheckpointError, match="does not match the SHA-256"):
            checkpoint.load(path)


def test_truncated_missing_and_foreign_files_are_refused(tmp_path):
    path, _, _ = _save(tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:100])
    with pytest.raises(CheckpointError, match="truncated"):
        checkpoint.load(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        checkpoint.load(path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        checkpoint.load(path)
    (path / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="not a daskdl checkpoint"):
        checkpoint.load(path)
    with pytest.raises(CheckpointError, match="no manifest.json"):
        checkpoint.load(tmp_path)


def test_load_latest_skips_a_corrupt_newest_checkpoint(tmp_path):
    _save(tmp_path, 1)
    newest, _, _ = _save(tmp_path, 2)
    (newest / "model.safetensors").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="Skipping checkpoint"):
        path, _, _, manifest = checkpoint.load_latest(tmp_path)
    assert path.name == "epoch-0001" and manifest["epoch"] == 1
    with pytest.raises(CheckpointError, match="No checkpoint"):
        checkpoint.load_latest(tmp_path / "nowhere")


_WRITER = """
import sys
import numpy as np
from daskdl.checkpoint import files as checkpoint

root, start = sys.argv[1], int(sys.argv[2])
model = {"w": np.random.default_rng(0).normal(size=25_000_000).astype(np.float32)}  # 100 MB
for epoch in range(start, start + 1000):
    model["w"][0] = epoch
    checkpoint.save(root, epoch, model, ({}, []), {"epoch_marker": epoch}, keep=2)
    print("saved", epoch, flush=True)
"""


@pytest.mark.integration
def test_a_kill_during_a_write_leaves_the_previous_checkpoint(tmp_path):
    import random
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    root = tmp_path / "checkpoints"
    rng = random.Random(0)
    start = 1
    for _ in range(3):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(root), str(start)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for line in proc.stdout:  # wait for two complete checkpoints from this writer
            if line.split()[1] == str(start + 1):
                break
        # Writers save back to back, so a kill now lands in the middle of the next write.
        time.sleep(rng.uniform(0.05, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        path, model, _, manifest = checkpoint.load_latest(root)
        assert manifest["epoch"] >= start + 1 and model["w"][0] == manifest["epoch"]
        start = manifest["epoch"] + 1
    # The killed writes left their temporary directories, never a half checkpoint.
    assert any(p.name.startswith(".tmp-") for p in root.iterdir())
    for ckpt in checkpoint.list_checkpoints(root):
        checkpoint.load(ckpt)  # every checkpoint under a real name verifies
