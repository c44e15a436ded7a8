"""Sharded optimizer state (ZeRO-1): the unsharded run's parameters and optimizer state, from
half the state per rank."""

from __future__ import annotations

import contextlib
import copy
import functools
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import kill_mid_epoch, poll_for

import daskdl
from daskdl import Dataset, events
from daskdl.parallel.sharding import ShardedOptimizer


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
            torch.equal(again.optimizer.state[again.units[0].shard][k], v)
            for k, v in opt.optimizer.state[opt.units[0].shard].items()
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
    [unit] = opt.units
    mine = opt.optimizer.state[unit.shard]["exp_avg"]
    return ctx.all_reduce(float(torch.equal(mine, flat[unit.owned])))


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


def _blobs(n=512, d=8, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)).astype(np.float32)
    return Dataset.from_numpy(X, (X[:, 0] > 0).astype(np.int64) + (X[:, 1] > 0), chunks=n // 4)


@pytest.mark.parametrize(
    "shard, backend", [("optimizer", "dask"), ("full", "dask"), ("full", "torch")]
)
def test_fit_with_sharded_state_trains_as_unsharded_data_parallelism(client, shard, backend):
    data = _blobs()
    opts = dict(
        epochs=2, optimizer="adamw", lr=1e-2, progress=False, backend=backend,
        bucket_mb=0.01,  # shard="full": a unit per layer of the mlp
    )  # fmt: skip
    mlp = ("mlp", {"hidden": 64})
    plain = daskdl.fit(client, mlp, data, val=data, **opts)
    sharded = daskdl.fit(client, mlp, data, val=data, shard=shard, **opts)
    assert plain.history["train_loss"].iloc[-1] < plain.history["train_loss"].iloc[0]
    for name, value in plain.model.state_dict().items():
        torch.testing.assert_close(sharded.model.state_dict()[name], value, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        sharded.history["val_accuracy"], plain.history["val_accuracy"], rtol=1e-6
    )
    assert sharded.info["config"]["shard"] == shard


def _state_bytes(ctx):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(128, 128) for _ in range(6)))
    out = {}
    for shard in ("optimizer", "full"):
        model_, opt = ctx.prepare(copy.deepcopy(model), _adamw, shard=shard)
        xb = torch.randn(16, 128)
        opt.zero_grad()
        model_(xb).square().mean().backward()
        opt.step()
        out[shard] = opt.state_bytes()
    return out


def test_sharded_state_per_rank_is_what_zero_says(client):
    """ZeRO's bytes per rank for P ranks, AdamW (K = 8 bytes of state per parameter):
    optimizer (4 + 4 + K / P) x params, full (4 + 4 + K) / P x params."""
    run = daskdl.launch(client, _state_bytes, _zeros(), workers=2, progress=False)
    n = 6 * (128 * 128 + 128)
    assert run.result["optimizer"] == pytest.approx((8 + 8 / 2) * n, rel=0.15)
    assert run.result["full"] == pytest.approx(16 * n / 2, rel=0.15)


def _prepared(ctx):
    mode = ctx.config["shard"]
    if mode:
        model, opt = ctx.prepare(_model(), _adamw, shard=mode)
    else:
        model, opt = ctx.prepare(_model(), _adamw)
    for epoch in range(2):
        for xb, yb in ctx.batches("train", 16, epoch):
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    if ctx.config.get("poison"):
        opt.zero_grad()
        (model(xb).sum() * float("nan")).backward()
        opt.step()
    whole = opt.gathered() if mode else contextlib.nullcontext()
    with whole:
        return {k: v.clone() for k, v in model.state_dict().items()}


def test_a_launch_loop_shards_through_ctx_prepare(client):
    data = {"train": _blobs()}
    runs = {
        mode: daskdl.launch(client, _prepared, data, {"shard": mode}, progress=False).result
        for mode in (None, "optimizer", "full")
    }
    for mode in ("optimizer", "full"):
        for name, value in runs[None].items():
            torch.testing.assert_close(runs[mode][name], value, rtol=1e-5, atol=1e-6)
    # The ranks agree in optimizer.step(): a NaN gradient on them raises on every rank.
    with pytest.raises(daskdl.RunError, match="Non-finite loss or gradient"):
        daskdl.launch(client, _prepared, data, {"shard": "full", "poison": True}, progress=False)


def test_ctx_prepare_with_shard_needs_an_optimizer_factory(client):
    def bare(ctx):
        ctx.prepare(_model(), shard="optimizer")

    with pytest.raises(daskdl.RunError, match="pass optimizer=, a function of them"):
        daskdl.launch(client, bare, _zeros(), progress=False)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(shard="full", compile=True), "leave compile off"),
        (dict(shard="optimizer", sync_every=4), "choose one"),
        (dict(shard="zero"), "shard"),
    ],
)
def test_sharding_options_that_cannot_go_together(options, match):
    with pytest.raises(ValueError, match=match):
        daskdl.TrainConfig(**options)


def test_a_sharded_run_that_loses_a_worker_regroups_from_its_checkpoint(
    three_workers, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="daskdl.runs.launching")
    train, test = daskdl.datasets.train_test("digits")
    run = daskdl.fit(
        three_workers, ("mlp", {"hidden": 64}), train, val=test, epochs=5, batch_size=16,
        optimizer="adamw", lr=3e-3, shard="full", out=tmp_path / "run", block=False,
        progress=False,
    )  # fmt: skip
    victim = kill_mid_epoch(three_workers, run)
    run.wait(timeout=180)
    assert run.status == "finished" and run.lost == [victim]
    # Every epoch once: those after the last checkpoint again from it, none twice.
    assert list(run.history["epoch"]) == list(range(1, 6))
    change = next(e for e in events.replay(three_workers, run.run_id) if e["kind"] == "membership")
    assert change["world_size"] == 2 and change["step_in_epoch"] == 0
    assert run.history["val_accuracy"].iloc[-1] >= 0.9
    assert f"regroups from {tmp_path / 'run'}" in caplog.text


def _too_big(input_shape, n_outputs):
    """45M parameters: 0.72 GB of weights, gradients and AdamW's moments."""
    width = 3000  # layers of 36 MB, above glibc's mmap threshold on the ranks
    layers = [torch.nn.Linear(input_shape[0], width), torch.nn.ReLU()]
    for _ in range(5):
        layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, n_outputs))


@pytest.mark.integration
def test_a_model_too_big_for_one_worker_fails_early_and_trains_sharded_or_pipelined():
    """A worker starts at about 0.46 GB (Python, torch, Dask); Dask restarts it at 95% of
    its 1.15 GB limit, which leaves 0.63 GB: not the 0.72 GB the whole state needs, but room
    for a quarter of it (or a stage of two of the five large layers), the unit being
    gathered, and the weights rank 0 gathers at the end."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(64, 64)).astype(np.float32)
    data = Dataset.from_numpy(X, (X[:, 0] > 0).astype(np.int64), chunks=16)
    opts = dict(epochs=1, batch_size=8, optimizer="adamw", lr=1e-4, max_failures=0, progress=False)
    with daskdl.local_cluster(n_workers=4, threads_per_worker=1, memory_limit="1.15GB") as c:
        one = c.scheduler_info()["workers"]
        with pytest.raises(
            daskdl.models.preflight.ModelCheckError, match=r"needs 0\.72 GB per rank"
        ) as e:
            daskdl.fit(c, _too_big, data, workers=1, **opts)
        assert "shard='full'" in str(e.value) and "1.15 GB memory limit" in str(e.value)
        for layout in (dict(shard="full"), dict(pipeline=daskdl.Pipeline(stages=4))):
            run = daskdl.fit(c, _too_big, data, **layout, **opts)
            assert run.status == "finished" and np.isfinite(run.history["train_loss"]).all()
            assert c.scheduler_info()["workers"].keys() == one.keys()  # none was restarted
            assert sum(v.numel() for v in run.model.state_dict().values()) == 45_216_002


class _Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.layer(self.layer(x))  # the same module twice


def _tied(ctx):
    torch.manual_seed(0)
    model, opt = ctx.prepare(_Tied(), _adamw, shard=ctx.config["shard"])
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 8, generator=torch.Generator().manual_seed(ctx.rank))).sum().backward()
        opt.step()
    whole = opt.gathered() if ctx.config["shard"] else contextlib.nullcontext()
    with whole:
        return {k: v.clone() for k, v in model.state_dict().items()}


def test_shard_full_gathers_and_reduces_a_module_called_twice_once_per_call(client):
    # Units of at most 100 bytes: the twice-called layer is one of its own.
    runs = [
        daskdl.launch(client, _tied, _zeros(), {"shard": shard}, bucket_mb=1e-4,
                      progress=False).result
        for shard in (None, "full")
    ]  # fmt: skip
    for name, value in runs[0].items():
        torch.testing.assert_close(runs[1][name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("out", [False, True])
def test_a_worker_that_joins_a_sharded_run_gets_a_rank_only_from_a_checkpoint(
    fresh_client, tmp_path, out
):
    """Without out= the run has nowhere to regroup from but its start: it goes on without the
    newcomer rather than train again from epoch 1."""
    train, test = daskdl.datasets.train_test("digits")
    run = daskdl.fit(
        fresh_client, ("mlp", {"hidden": 64}), train, val=test, epochs=12, batch_size=16,
        optimizer="adamw", lr=3e-3, shard="optimizer", block=False, progress=False,
        out=tmp_path / "run" if out else None,
    )  # fmt: skip
    poll_for(lambda: len(run.history) >= 1, timeout=60)
    fresh_client.cluster.scale(3)
    run.wait(timeout=180)
    # 12 epochs of about 0.7 s: a new worker process takes 3-4 s to join.
    assert run.status == "finished" and list(run.history["epoch"]) == list(range(1, 13))
    changes = [e for e in events.replay(fresh_client, run.run_id) if e["kind"] == "membership"]
    if out:
        [change] = changes
        assert change["world_size"] == 3 and change["step_in_epoch"] == 0
    else:
        assert changes == [] and len(run.workers) == 2


class _TiedLayers(torch.nn.Module):
    """An input and an output layer sharing one weight, as language models tie them."""

    def __init__(self, d=6, k=3):
        super().__init__()
        self.inp = torch.nn.Linear(d, d, bias=False)
        self.out = torch.nn.Linear(d, d, bias=False)
        self.out.weight = self.inp.weight
        self.head = torch.nn.Linear(d, k)

    def forward(self, x):
        return self.head(torch.relu(self.out(torch.relu(self.inp(x)))))


def _tied_model() -> torch.nn.Module:
    return _TiedLayers()


def test_tied_weights_with_full_sharding_are_refused_before_any_rank(client, no_rank_may_start):
    X = np.random.default_rng(0).normal(size=(200, 6)).astype(np.float32)
    data = Dataset.from_numpy(X, np.arange(200) % 3, chunks=50)
    with pytest.raises(ValueError, match=r"ties parameters between modules \(inp.weight = out"):
        daskdl.fit(client, _tied_model, data, shard="full", epochs=1, progress=False)


def test_tied_weights_train_with_the_optimizer_sharded(client):
    X = np.random.default_rng(0).normal(size=(200, 6)).astype(np.float32)
    data = Dataset.from_numpy(X, np.arange(200) % 3, chunks=50)
    run = daskdl.fit(client, _tied_model, data, shard="optimizer", epochs=1, progress=False)
    assert run.status == "finished"
