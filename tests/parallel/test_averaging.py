"""Per-step gradient averaging and local SGD, on real worker processes and real comms."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import torch
from distributed import get_worker

import daskdl
from daskdl import models
from daskdl.cluster import workers_info
from daskdl.collectives import comm
from daskdl.config.options import TrainConfig
from daskdl.objective.task import Objective
from daskdl.parallel import averaging

# What the rank loop trains these small classifiers with (the engine's default objective).
CLASSES = Objective("classification", 3)


class _OneRank:
    """A group of one: its average is its own buffer."""

    size, rank = 1, 0

    def allreduce_mean_(self, array):
        return array


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _train(run_id, rank, peers, mode, steps, every=1, outer=None, optimizer="sgd"):
    """``steps`` steps of an MLP on this rank's fixed batches; returns the flat parameters."""
    torch.manual_seed(0)
    model = models.mlp((6,), 3)
    cfg = TrainConfig(
        lr=0.1, momentum=0.9, optimizer=optimizer, sync_every=every, outer_optimizer=outer
    )
    opt = daskdl.training.engine.make_optimizer(model.parameters(), cfg)
    group = comm.DaskGroup(get_worker(), run_id, rank, peers, timeout=30)
    sync = (
        averaging.GradientAveraging(model, opt, group)
        if mode == "gradients"
        else averaging.LocalSGD(model, opt, group, every, outer)
    )
    rng = np.random.default_rng(rank)
    try:
        for step in range(steps):
            xb = torch.from_numpy(rng.normal(size=(8, 6)).astype(np.float32))
            yb = torch.from_numpy(rng.integers(0, 3, 8))
            daskdl.training.engine.train_step(
                model, opt, xb, yb, sync, torch.autocast("cpu", enabled=False), False, CLASSES
            )
            sync.step_done(step, end_of_epoch=step == steps - 1)
    finally:
        group.close()
    return _flat(model).numpy()


def _both_ranks(client, *args, **kwargs):
    comm.ensure_plugin(client)
    peers = sorted(workers_info(client))
    run_id = uuid.uuid4().hex
    futures = [
        client.submit(_train, run_id, r, peers, *args, workers=[w], pure=False, **kwargs)
        for r, w in enumerate(peers)
    ]
    return client.gather(futures)


def test_local_sgd_every_step_equals_gradient_averaging(client):
    grads = _both_ranks(client, "gradients", 6)
    local = _both_ranks(client, "local", 6, every=1)
    np.testing.assert_array_equal(grads[0], grads[1])
    np.testing.assert_array_equal(local[0], local[1])
    np.testing.assert_allclose(local[0], grads[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("outer", [None, "nesterov"])
def test_local_sgd_replicas_agree_after_every_synchronisation(client, outer):
    a, b = _both_ranks(client, "local", 8, every=4, outer=outer, optimizer="adamw")
    np.testing.assert_array_equal(a, b)
    grads = _both_ranks(client, "gradients", 8)
    assert not np.allclose(a, grads[0])  # H=4 is a different algorithm


@pytest.mark.integration
def test_outer_nesterov_step():
    """delta = global - average; v = m v + delta; global -= lr (delta + m v)."""
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.constant_(model.weight, 1.0)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sync = averaging.LocalSGD(
        model, opt, _OneRank(), every=1, outer="nesterov", outer_lr=0.5, outer_momentum=0.9
    )
    model.weight.data.fill_(0.8)  # the ranks moved the weight by -0.2 since the last sync
    sync.synchronise()
    # delta 0.2, v 0.2, global 1 - 0.5 * (0.2 + 0.18) = 0.81
    assert model.weight.item() == pytest.approx(0.81)
    model.weight.data.fill_(0.71)
    sync.synchronise()
    # delta 0.1, v 0.9 * 0.2 + 0.1 = 0.28, global 0.81 - 0.5 * (0.1 + 0.252) = 0.634
    assert model.weight.item() == pytest.approx(0.634)


def test_digits_with_local_sgd_every_8_steps(client, digits_split):
    train, test = digits_split
    run = daskdl.fit(
        client,
        "small_cnn",
        train,
        val=test,
        epochs=15,
        batch_size=32,
        lr=0.05,
        sync_every=8,
        seed=0,
        progress=False,
    )
    assert run.history["val_accuracy"].iloc[-1] >= 0.97


class _LoopbackGroup:
    """Two ranks that happen to hold the same gradients: their mean is the gradient itself.
    Records the size of each all-reduced buffer."""

    size = 2

    def __init__(self):
        self.calls: list[int] = []

    def allreduce_mean_(self, buf, wire="fp32"):
        self.calls.append(buf.numel())
        return buf


def test_buckets_start_reducing_during_backward():
    torch.manual_seed(0)
    model = models.mlp((64,), 10, hidden=512)
    n_params = sum(p.numel() for p in model.parameters())
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)

    group = _LoopbackGroup()
    # 4 KB buckets: each layer's weight and bias make one.
    sync = averaging.GradientAveraging(
        model, None, group, bucket_bytes=4096, first_bucket_bytes=4096
    )
    try:
        assert len(sync.buckets) == 3
        sync.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        launched_during_backward = len(sync._pending)
        sync.backward_done(stop_requested=False)
    finally:
        sync.close()
    # All but the last bucket (it carries the stop flag) went before backward returned.
    assert launched_during_backward == len(sync.buckets) - 1
    # Every bucket once, in order (last layers first), covering every gradient and the stop slot.
    assert group.calls == [b.numel() for b in sync.buckets]
    # and the stop and non-finite slots, and one "used" slot per parameter tensor
    assert sum(group.calls) == n_params + 2 + len(list(model.parameters()))
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g)
    assert sync.step_done(0, end_of_epoch=False) is False


def test_local_sgd_with_a_fused_optimizer_leaves_the_nonfinite_flag_on_the_device(monkeypatch):
    torch.manual_seed(0)
    model = models.mlp((6,), 3)
    cfg = TrainConfig(lr=0.1, momentum=0.9, sync_every=4)
    opt = daskdl.training.engine.make_optimizer(model.parameters(), cfg, fused=True)
    daskdl.training.engine.prepare_optimizer(opt, fused=True)
    sync = averaging.make(model, opt, _OneRank(), cfg)
    assert isinstance(sync, averaging.LocalSGD) and sync.defer_nonfinite
    before = _flat(model)
    xb, yb = torch.full((8, 6), float("nan")), torch.zeros(8, dtype=torch.int64)

    def host_read(*_):
        raise AssertionError("the non-finite flag was read on the host")

    # On a GPU, any of these would make the host wait for the step.
    for name in ("__bool__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    no_autocast = torch.autocast("cpu", enabled=False)
    daskdl.training.engine.train_step(model, opt, xb, yb, sync, no_autocast, False, CLASSES)
    monkeypatch.undo()

    assert sync.bad_ranks == [] and bool(sync.pending_bad)
    torch.testing.assert_close(_flat(model), before, rtol=0, atol=0)  # the fused step skipped it
