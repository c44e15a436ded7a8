"""The pieces of the rank loop, without a cluster."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from daskdl import models
from daskdl.checkpoint import files as checkpoint
from daskdl.config.options import TrainConfig
from daskdl.data.preprocess import augment_images
from daskdl.parallel.layouts import layout_of
from daskdl.rank.loader import ShardLoader, epoch_order
from daskdl.training.engine import lr_at, make_optimizer


def test_epoch_order_is_seeded_reshuffled_and_wraps():
    a = epoch_order(10, steps=3, batch=4, seed=0, epoch=0, rank=0, shuffle=True)
    assert len(a) == 12
    assert set(a[:10]) == set(range(10))  # a whole permutation before any repeat
    np.testing.assert_array_equal(a, epoch_order(10, 3, 4, 0, 0, 0, True))
    assert not np.array_equal(a, epoch_order(10, 3, 4, 0, 1, 0, True))  # a new epoch
    assert not np.array_equal(a, epoch_order(10, 3, 4, 0, 0, 1, True))  # another rank
    np.testing.assert_array_equal(epoch_order(5, 2, 4, 0, 0, 0, False), [0, 1, 2, 3, 4, 0, 1, 2])


def test_shard_loader_batches_are_the_rows_of_the_epoch_order():
    X = np.arange(10 * 2 * 3, dtype=np.float64).reshape(10, 2, 3)  # float32 on the way out
    y = np.arange(10, dtype=np.int32) * 7
    loader = ShardLoader([X[:4], X[4:]], [y[:4], y[4:]], batch_size=4, steps=3, seed=5, rank=1)
    order = epoch_order(10, 3, 4, seed=5, epoch=2, rank=1, shuffle=True)
    batches = list(loader.epoch(2))
    assert len(batches) == 3
    for s, (xb, yb) in enumerate(batches):
        rows = order[s * 4 : (s + 1) * 4]
        assert (xb.dtype, yb.dtype, xb.is_contiguous()) == (torch.float32, torch.int64, True)
        np.testing.assert_array_equal(xb.numpy(), X[rows].astype(np.float32))
        np.testing.assert_array_equal(yb.numpy(), y[rows])
    # A regrouped run picks the epoch up part-way: the same batches from there on.
    for (xa, ya), (xb, yb) in zip(batches[1:], loader.epoch(2, start=1), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # Batches are copies: changing one leaves the shard as it was.
    batches[0][0].fill_(-1)
    np.testing.assert_array_equal(next(iter(loader.epoch(2)))[0].numpy(), X[order[:4]])


@pytest.mark.parametrize("schedule", ["constant", "cosine", "onecycle"])
def test_schedules(schedule):
    cfg = TrainConfig(epochs=10, lr=0.1, schedule=schedule, warmup_epochs=1)
    lrs = [lr_at(s, 100, cfg, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.01)  # warm-up starts at lr / warmup steps
    assert lrs[9] == pytest.approx(0.1)
    assert max(lrs) == pytest.approx(0.1)
    if schedule == "constant":
        assert lrs[-1] == pytest.approx(0.1)
    else:
        assert lrs[-1] < 0.005 and all(b <= a + 1e-12 for a, b in zip(lrs[10:], lrs[11:]))


def test_onecycle_without_warmup_rises_then_falls():
    cfg = TrainConfig(epochs=10, lr=0.1, schedule="onecycle")
    lrs = [lr_at(s, 100, cfg, 10) for s in range(100)]
    peak = int(np.argmax(lrs))
    assert lrs[0] < 0.02 and 25 <= peak <= 35 and lrs[-1] < 0.005


def test_augmentation_crops_and_flips_on_the_device():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6) + 1
    gen = torch.Generator().manual_seed(0)
    outs = [augment_images(x, gen, pad=2) for _ in range(20)]
    assert all(o.shape == x.shape for o in outs)
    # Some crops are shifted (zeros from the padding come in), some images are flipped.
    assert any((o == 0).any() for o in outs)
    flips = [augment_images(x, gen, pad=0)[0] for _ in range(20)]
    assert any(torch.equal(f, x[0].flip(2)) for f in flips)
    assert any(torch.equal(f, x[0]) for f in flips)
    # Every output pixel is a padding zero or a pixel of the same channel of the same image.
    for o in outs:
        for i in range(2):
            for c in range(3):
                assert set(o[i, c].unique().tolist()) <= set(x[i, c].unique().tolist()) | {0.0}


def test_loading_a_resumed_state_leaves_it_as_it_was():
    # The state is one task input, which Dask may send to a peer's worker after this rank has
    # started: stepping the optimizer must not change it.
    cfg = TrainConfig(lr=0.1, momentum=0.9)
    torch.manual_seed(0)
    saved = models.mlp((6,), 3)
    saved_opt = make_optimizer(saved.parameters(), cfg)
    F.cross_entropy(saved(torch.randn(8, 6)), torch.zeros(8, dtype=torch.int64)).backward()
    saved_opt.step()
    resume = {
        "model": checkpoint.model_tensors(saved),
        "optimizer": checkpoint.optimizer_state(*checkpoint.optimizer_tensors(saved_opt)),
    }
    before = copy.deepcopy(resume)

    model = models.mlp((6,), 3)
    opt = make_optimizer(model.parameters(), cfg)
    layout_of(model, opt).load(resume)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(8, 6)), torch.zeros(8, dtype=torch.int64)).backward()
        opt.step()

    for name, value in before["model"].items():
        np.testing.assert_array_equal(resume["model"][name], value)
    for i, state in before["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(resume["optimizer"]["state"][i][name], value), (i, name)
