"""Devices: the CUDA path (``gpu``-marked tests, skipped without CUDA) and the device options
that every machine can check."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import torch
from distributed import get_worker

import daskdl
from daskdl.cluster import workers_info
from daskdl.collectives import comm
from daskdl.config.options import TrainConfig

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


def _params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _images(n=256, seed=0):
    return daskdl.datasets.synthetic_images(n, (3, 16, 16), 4, seed=seed, chunks=n // 4)


QUICK = dict(epochs=2, batch_size=16, lr=0.05, augment=False, progress=False, seed=3)


@needs_no_cuda
def test_gpu_cluster_without_gpus_is_a_clear_error():
    with pytest.raises(RuntimeError, match="found no CUDA GPU"):
        daskdl.local_cluster(gpus=True)


@needs_no_cuda
def test_device_cuda_on_cpu_workers_is_refused_before_training(client):
    with pytest.raises(RuntimeError, match="see no CUDA GPU.*local_cluster\\(gpus=True\\)"):
        daskdl.fit(client, "small_cnn", _images(), device="cuda", **QUICK)


def test_bad_device_names_the_choices():
    with pytest.raises(ValueError, match="device must be one of \\('auto', 'cpu', 'cuda'\\)"):
        TrainConfig(device="tpu")


def test_channels_last_computes_what_the_default_layout_computes(client):
    """Gradients land in buckets with the parameters' own (channels-last) strides."""
    data = _images()
    runs = [
        daskdl.fit(client, "small_cnn", data, device="cpu", channels_last=cl, **QUICK)
        for cl in (False, True)
    ]
    a, b = (_params(r.model) for r in runs)
    assert not torch.equal(a, _params(daskdl.models.small_cnn((3, 16, 16), 4)))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # Results come back in the ordinary layout.
    assert all(p.is_contiguous() for p in runs[1].model.parameters())


def test_compile_trains_and_checkpoints_the_plain_module(client, digits_split, tmp_path):
    train, test = digits_split
    run = daskdl.fit(
        client, "mlp", train, val=test, epochs=2, compile=True, out=tmp_path, progress=False
    )
    assert run.history["val_accuracy"].iloc[-1] >= 0.85
    _, model, _, _ = daskdl.checkpoint.files.load_latest(tmp_path)
    assert not any("_orig_mod" in name for name in model)
    assert set(model) == set(run.model.state_dict())


# --- CUDA ------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_local_cuda_cluster_trains_on_the_gpu(digits_split):
    train, test = digits_split
    with daskdl.local_cluster(gpus=1) as client:
        run = daskdl.fit(
            client,
            "small_cnn",
            train,
            val=test,
            epochs=8,
            precision="bf16",
            device="cuda",
            progress=False,
        )
        steps = [e for e in daskdl.events.replay(client, run.run_id) if e["kind"] == "step"]
    assert run.history["val_accuracy"].iloc[-1] >= 0.9
    assert steps and all(e["gpu_memory"] > 0 for e in steps)


@pytest.mark.gpu
def test_cuda_compile_bf16_channels_last_resnet():
    data = _images(512)
    with daskdl.local_cluster(gpus=1) as client:
        run = daskdl.fit(
            client,
            "resnet18",
            data,
            epochs=2,
            batch_size=64,
            precision="bf16",
            compile=True,
            progress=False,
        )
    assert np.isfinite(run.history["train_loss"]).all()
    assert run.history["train_loss"].iloc[-1] < run.history["train_loss"].iloc[0]


def _cubed_mlp(input_shape, n_classes):
    # x ** 3 overflows float32 for the one sample scaled to 1e20: its loss becomes NaN.
    class Cube(torch.nn.Module):
        def forward(self, x):
            return x * x * x

    return torch.nn.Sequential(Cube(), daskdl.models.mlp(input_shape, n_classes))


@pytest.mark.gpu
@pytest.mark.parametrize("sync_every", [1, 4])
def test_one_rank_on_cuda_skips_a_nonfinite_step_without_waiting_each_step(sync_every):
    # A fused optimizer on CUDA (the default there) skips on the device; flags read at logs.
    # sync_every=4: local SGD, whose ranks decide alone between synchronisations.
    X = np.random.default_rng(0).uniform(-1, 1, size=(200, 8)).astype(np.float32)
    X[130, 0] = 1e20  # batch 14 of 20
    data = daskdl.Dataset.from_numpy(X, np.arange(200) % 3, chunks=100)
    with daskdl.local_cluster(gpus=1) as client:
        run = daskdl.fit(
            client,
            _cubed_mlp,
            data,
            epochs=2,
            batch_size=10,
            shuffle=False,
            on_nonfinite="skip",
            sync_every=sync_every,
            progress=False,
        )
        log = [e for e in daskdl.events.replay(client, run.run_id) if e["kind"] == "nonfinite"]
    assert [(e["epoch"], e["batch"]) for e in log] == [(1, 14), (2, 14)]
    assert list(run.history["skipped_steps"]) == [1, 1]
    assert torch.isfinite(_params(run.model)).all()


def _cuda_allreduce(run_id, rank, peers, n, wire):
    group = comm.DaskGroup(get_worker(), run_id, rank, peers, timeout=30, direct_bytes=0)
    try:
        buf = torch.from_numpy(np.random.default_rng(rank).normal(size=n).astype(np.float32))
        out = group.allreduce_mean_(buf.cuda(), wire)
        return out.cpu().numpy()
    finally:
        group.close()


@pytest.mark.gpu
@pytest.mark.parametrize("wire", ["fp32", "bf16"])
def test_cuda_tensors_are_reduced_through_pinned_buffers(client, wire):
    # Two CPU-cluster workers sharing the first GPU are enough for the staging path.
    comm.ensure_plugin(client)
    peers = sorted(workers_info(client))
    run_id = uuid.uuid4().hex
    futures = [
        client.submit(_cuda_allreduce, run_id, r, peers, 100_003, wire, workers=[w], pure=False)
        for r, w in enumerate(peers)
    ]
    a, b = client.gather(futures)
    expected = sum(np.random.default_rng(r).normal(size=100_003) for r in range(2)) / 2
    tol = 1e-6 if wire == "fp32" else 2e-2
    np.testing.assert_allclose(a, expected, rtol=tol, atol=tol)
    np.testing.assert_array_equal(a, b)


@pytest.mark.gpu
def test_two_ranks_on_cuda_agree_with_two_ranks_on_cpu(client):
    data = _images()
    opts = dict(QUICK, bucket_mb=0.01)
    gpu = daskdl.fit(client, "small_cnn", data, device="cuda", channels_last=False, **opts)
    cpu = daskdl.fit(client, "small_cnn", data, device="cpu", **opts)
    # cuDNN runs float32 convolutions in TF32 by default (torch.backends.cudnn.allow_tf32),
    # so a few parameters differ by ~2e-4 after training (seen on an H200).
    torch.testing.assert_close(_params(gpu.model), _params(cpu.model), rtol=1e-3, atol=1e-3)
