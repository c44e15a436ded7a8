"""A parameter that takes no part in the forward pass is left alone, on every rank, as plain
PyTorch leaves a parameter whose gradient is None: no weight decay, no momentum."""

from __future__ import annotations

import sys

import cloudpickle
import numpy as np
import pytest
import torch
from torch import nn

import daskdl
from daskdl import Dataset
from daskdl.rank.loader import epoch_order

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests


class WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)
        self.unused = nn.Parameter(torch.ones(5))  # never in forward
        self.head_b = nn.Linear(6, 3)  # used by no rank either

    def forward(self, x):
        return self.fc(x)


OPTS = dict(lr=0.1, momentum=0.9, weight_decay=0.05, schedule="constant", seed=4, epochs=2)


def _plain_pytorch(X, y, batch):
    """The same training in a plain loop: same initial weights, batches and optimizer."""
    torch.manual_seed(OPTS["seed"])
    model = WithUnused()
    opt = torch.optim.SGD(
        model.parameters(),
        lr=OPTS["lr"],
        momentum=OPTS["momentum"],
        weight_decay=OPTS["weight_decay"],
    )
    steps = len(X) // batch
    for epoch in range(OPTS["epochs"]):
        order = epoch_order(len(X), steps, batch, OPTS["seed"], epoch, 0, True)
        for s in range(steps):
            idx = order[s * batch : (s + 1) * batch]
            opt.zero_grad()
            nn.functional.cross_entropy(
                model(torch.from_numpy(X[idx])), torch.from_numpy(y[idx])
            ).backward()
            opt.step()
    return model


def _data(n=96, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 6)).astype(np.float32)
    return X, rng.integers(0, 3, n)


@pytest.mark.parametrize("sync", [{}, {"sync_every": 2}], ids=["per-step", "local-sgd"])
def test_one_rank_equals_plain_pytorch_after_two_epochs_with_weight_decay(client, sync):
    X, y = _data()
    run = daskdl.fit(
        client,
        WithUnused,
        Dataset.from_numpy(X, y, chunks=48, n_classes=3),
        batch_size=16,
        workers=1,
        progress=False,
        **OPTS,
        **sync,
    )
    plain = _plain_pytorch(X, y, 16)
    trained = run.model
    torch.testing.assert_close(trained.unused, torch.ones(5), rtol=0, atol=0)
    for name, p in plain.state_dict().items():
        torch.testing.assert_close(trained.state_dict()[name], p, rtol=1e-5, atol=1e-6)
    assert not torch.equal(trained.fc.weight, _initial().fc.weight)  # it trained


def _initial():
    torch.manual_seed(OPTS["seed"])
    return WithUnused()


@pytest.mark.parametrize("bucket_mb", [25, 0.0001], ids=["one-bucket", "buckets"])
def test_two_ranks_leave_unused_parameters_alone_and_agree_with_one(client, bucket_mb):
    """2 ranks with batch B are one rank with batch 2B, unused parameters included."""
    B, steps = 8, 6
    X, y = _data(2 * B * steps)
    half = B * steps
    order = np.concatenate(
        [np.r_[s * B : (s + 1) * B, half + s * B : half + (s + 1) * B] for s in range(steps)]
    )
    opts = {**OPTS, "shuffle": False}
    two = daskdl.fit(
        client,
        WithUnused,
        Dataset.from_numpy(X, y, chunks=half, n_classes=3),
        batch_size=B,
        workers=2,
        bucket_mb=bucket_mb,
        progress=False,
        **opts,
    )
    one = daskdl.fit(
        client,
        WithUnused,
        Dataset.from_numpy(X[order], y[order], chunks=2 * half, n_classes=3),
        batch_size=2 * B,
        workers=1,
        progress=False,
        **opts,
    )
    initial = _initial()
    for model in (two.model, one.model):
        torch.testing.assert_close(model.unused, initial.unused, rtol=0, atol=0)
        torch.testing.assert_close(model.head_b.weight, initial.head_b.weight, rtol=0, atol=0)
    torch.testing.assert_close(two.model.fc.weight, one.model.fc.weight, rtol=1e-5, atol=1e-7)
