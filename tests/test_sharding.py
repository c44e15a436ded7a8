"""Sharded optimizer state (ZeRO-1): the unsharded run's parameters and optimizer state, from
half the state per rank."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import daskdl
from daskdl import Dataset
from daskdl.sharding import ShardedOptimizer


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))


def _zeros() -> dict:
    return {"train": Dataset.from_numpy(np.zeros((40, 8), np.float32), np.zeros(40, np.int64))}


def _train(ctx):
    model = _model()
    if ctx.config["shard"]:
        opt = ShardedOptimizer(model, _adamw, ctx.group)
    else:
        model = ctx.prepare(model)
        opt = _adamw(model.parameters())
    for epoch in range(3):
        for xb, yb in ctx.batches("train", 16, epoch):
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    state = opt.state_dict()  # every rank takes part: the sharded one gathers
    held = sum(
        v.numel() * 4 for s in (opt.optimizer if ctx.config["shard"] else opt).state.values()
        for v in s.values() if torch.is_tensor(v) and v.dim() > 0
    )  # fmt: skip
    if ctx.config["shard"]:  # loaded again: each rank's chunk of the gathered state
        again = ShardedOptimizer(_model(), _adamw, ctx.group)
        again.load_state_dict(state)
        same = all(
            torch.equal(again.optimizer.state[again.shard][k], v)
            for k, v in opt.optimizer.state[opt.shard].items()
        )
        assert same, "a loaded chunk differs from the one that was saved"
    return {"model": model.state_dict(), "optimizer": state, "state_bytes": held}


def _two_rank_runs(client) -> tuple[dict, dict]:
    """The plain and the sharded run's results, 2 ranks each."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(512, 8)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64) + (X[:, 1] > 0)
    data = {"train": Dataset.from_numpy(X, y, chunks=128)}
    runs = [
        daskdl.launch(client, _train, data, {"shard": shard}, workers=2, progress=False).result
        for shard in (False, True)
    ]
    return runs[0], runs[1]


def test_sharded_optimizer_state_trains_as_unsharded_with_half_the_state(client):
    plain, sharded = _two_rank_runs(client)
    start = _model().state_dict()
    assert all(not torch.allclose(plain["model"][k], v) for k, v in start.items())  # it trained
    for name, value in plain["model"].items():
        torch.testing.assert_close(sharded["model"][name], value, rtol=1e-5, atol=1e-6)
    for i, state in plain["optimizer"]["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(
                torch.as_tensor(sharded["optimizer"]["state"][i][key]), torch.as_tensor(value),
                rtol=1e-5, atol=1e-6,
            )  # fmt: skip
    # Adam's two moments for half the parameters: half the bytes (rank 0's chunk).
    ratio = sharded["state_bytes"] / plain["state_bytes"]
    assert 0.45 <= ratio <= 0.55, ratio
    # The gathered state is the plain optimizer's: it loads into one (2 ranks -> 1 rank).
    model = _model()
    single = _adamw(model.parameters())
    single.load_state_dict(sharded["optimizer"])
    assert torch.equal(
        single.state[model[0].weight]["exp_avg"], sharded["optimizer"]["state"][0]["exp_avg"]
    )


def _load_in_three(state, ctx):
    opt = ShardedOptimizer(_model(), _adamw, ctx.group)
    opt.load_state_dict(state)
    flat = torch.cat([state["state"][i]["exp_avg"].reshape(-1) for i in range(4)])
    return ctx.all_reduce(
        float(torch.equal(opt.optimizer.state[opt.shard]["exp_avg"], flat[opt.owned]))
    )


def test_a_two_rank_sharded_state_loads_on_three_ranks(three_workers):
    _, sharded = _two_rank_runs(three_workers)
    state = sharded["optimizer"]
    data = {
        "train": Dataset.from_numpy(
            np.zeros((30, 8), np.float32), np.zeros(30, np.int64), chunks=10
        )
    }
    run = daskdl.launch(
        three_workers, functools.partial(_load_in_three, state), data, progress=False
    )
    assert run.result == 3.0  # every rank's chunk is its slice of the whole


def _checkpointed(ctx):
    model = _model()
    sharded = ctx.world_size > 1
    opt = ShardedOptimizer(model, _adamw, ctx.group) if sharded else _adamw(model.parameters())
    start = ctx.restore(model, opt)
    for epoch in range(start, ctx.config["epochs"]):
        for xb, yb in ctx.batches("train", 16, epoch, shuffle=False):
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
        ctx.checkpoint(epoch, model, opt)
    return {"start": start, "model": model.state_dict(), "optimizer": opt.state_dict()}


def test_a_sharded_loops_checkpoint_resumes_sharded_or_on_one_rank(client, tmp_path):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(256, 8)).astype(np.float32)
    data = {"train": Dataset.from_numpy(X, (X[:, 0] > 0).astype(np.int64), chunks=64)}
    opts = dict(progress=False, max_failures=0)
    full = daskdl.launch(client, _checkpointed, data, {"epochs": 4}, workers=2, **opts).result
    daskdl.launch(client, _checkpointed, data, {"epochs": 2}, workers=2, out=tmp_path / "a", **opts)
    # The checkpoint on one rank with a plain optimizer: Adam's state for every parameter.
    single = daskdl.launch(
        client, _checkpointed, data, {"epochs": 3}, workers=1, out=tmp_path / "b",
        resume=tmp_path / "a", **opts,
    ).result  # fmt: skip
    assert single["start"] == 2 and len(single["optimizer"]["state"]) == 4
    assert int(single["optimizer"]["state"][0]["step"]) == 2 * 8 + 16  # 2 sharded epochs, 1 here
    # And sharded again: where the uninterrupted run ends.
    resumed = daskdl.launch(
        client, _checkpointed, data, {"epochs": 4}, workers=2, out=tmp_path / "a",
        resume=True, **opts,
    ).result  # fmt: skip
    assert resumed["start"] == 2
    for name, value in full["model"].items():
        torch.testing.assert_close(resumed["model"][name], value, rtol=1e-6, atol=1e-7)


def test_a_sharded_optimizer_cannot_be_followed(client):
    def follows(ctx):
        model = _model()
        ctx.follow(model, ShardedOptimizer(model, _adamw, ctx.group))

    with pytest.raises(daskdl.RunError, match="goes on from its last ctx.checkpoint"):
        daskdl.launch(client, follows, _zeros(), progress=False)


def test_a_sharded_optimizer_keeps_float32_cpu_parameters(client):
    def on_doubles(ctx):
        ShardedOptimizer(_model().double(), _adamw, ctx.group)

    with pytest.raises(daskdl.RunError, match="keeps float32 parameters on the CPU"):
        daskdl.launch(client, on_doubles, _zeros(), progress=False)
