"""Model problems are found before any rank task is submitted, by a dry run on the client, with
an error that names the problem, what was seen and the fix; and the cluster trains the next run.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch import nn

import daskdl
from daskdl import Dataset
from daskdl.models import preflight
from daskdl.objective.task import Objective

X = np.random.default_rng(0).normal(size=(200, 4)).astype(np.float32)
y = np.arange(200) % 3
good = Dataset.from_numpy(X, y, chunks=50)


class _Tuple(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x), x


class _Dict(_Tuple):
    def forward(self, x):
        return {"logits": self.fc(x)}


class _Trailing(_Tuple):
    def forward(self, x):
        return self.fc(x).unsqueeze(-1)


class _Integers(_Tuple):
    def forward(self, x):
        return self.fc(x).argmax(1)


class _Mixes(_Tuple):
    def forward(self, x):
        return self.fc(x).reshape(1, -1)


class _Broken(_Tuple):
    def forward(self, x):
        return self.fc(x[:, :2])


class _Frozen(_Tuple):
    def __init__(self):
        super().__init__()
        self.fc.requires_grad_(False)


def _wrong_signature(width, depth, extra):
    return nn.Linear(4, 3)


def _raises(input_shape, n_classes):
    raise RuntimeError("out of ideas")


def _returns_a_tensor(input_shape, n_classes):
    return torch.zeros(3)


def _unpicklable_factory():
    lock = threading.Lock()
    return lambda: (lock, _Tuple())[1]


@pytest.mark.parametrize(
    "model, message",
    [
        (_wrong_signature, r"_wrong_signature\(width, depth, extra\) cannot be called.*f\(\)"),
        (_raises, r"Building the model _raises .* failed: RuntimeError: out of ideas"),
        (_returns_a_tensor, "returned Tensor, not nn.Module"),
        (lambda: _Tuple(), r"returned a tuple .* needs one tensor of logits shaped \(batch, 3\)"),
        (lambda: _Dict(), "returned a dict"),
        (lambda: _Trailing(), r"shape \(8, 3, 1\).*squeeze the extra dimensions"),
        (lambda: _Integers(), "returned torch.int64 values.*logits must be floats"),
        (lambda: _Mixes(), r"shape \(1, 24\).*keep the batch first"),
        (lambda: _Broken(), r"failed on a batch of shape \(8, 4\).*samples of shape \(4,\)"),
        (lambda: _Frozen(), "has no trainable parameter"),
        (lambda: nn.Linear(4, 2), r"gives 2 outputs per sample, but the labels have 3 classes"),
        (lambda: nn.Linear(4, 3).double(), r"'weight' is torch.float64.*float32"),
        (lambda: nn.Linear(4, 3).half(), r"'weight' is torch.float16"),
        (_unpicklable_factory(), "cannot be sent to the workers.*lock"),
    ],
    ids=[
        "signature",
        "factory-raises",
        "not-a-module",
        "tuple",
        "dict",
        "trailing-dim",
        "integer-output",
        "batch-mixed",
        "forward-fails",
        "frozen",
        "too-few-logits",
        "float64",
        "float16",
        "unpicklable",
    ],
)
def test_model_problems_fail_before_any_rank_starts(client, no_rank_may_start, model, message):
    with pytest.raises((ValueError, TypeError), match=message):
        daskdl.fit(client, model, good, epochs=1, batch_size=16, progress=False)


def test_a_model_instance_is_refused_with_the_fix(client, no_rank_may_start):
    with pytest.raises(TypeError, match="not a model instance.*lambda: MyNet"):
        daskdl.fit(client, nn.Linear(4, 3), good, epochs=1, progress=False)


def test_factory_forms():
    """f(), f(input_shape, n_classes), a class, and factories with options that have
    defaults are all accepted; the call is chosen from the signature."""
    assert daskdl.models.factory_takes_shape(lambda: None) is False
    assert daskdl.models.factory_takes_shape(lambda shape, n: None) is True
    assert daskdl.models.factory_takes_shape(lambda shape, n, width=3: None) is True
    assert daskdl.models.factory_takes_shape(lambda width=3: None) is False
    assert daskdl.models.factory_takes_shape(_Tuple) is False
    with pytest.raises(TypeError, match=r"f\(\) or f\(input_shape, n_classes\)"):
        daskdl.models.factory_takes_shape(lambda a: None)


def test_more_logits_than_classes_train(client):
    """A head wider than the labels need is not an error (the labels may not use every class)."""
    run = daskdl.fit(client, lambda: nn.Linear(4, 5), good, epochs=1, batch_size=16, progress=False)
    assert run.status == "finished"


def test_the_dry_run_leaves_the_callers_random_state_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    preflight.dry_run("mlp", X[:8], y[:8], Objective("classification", 3))
    assert torch.equal(torch.random.get_rng_state(), before)


def test_the_cluster_trains_after_each_model_problem(client):
    with pytest.raises(ValueError, match="no trainable parameter"):
        daskdl.fit(client, lambda: _Frozen(), good, epochs=1, progress=False)
    run = daskdl.fit(client, "mlp", good, epochs=1, batch_size=16, progress=False)
    assert run.status == "finished"
    assert not any(client.processing().values())
