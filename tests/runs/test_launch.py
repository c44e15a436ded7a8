"""``daskdl.launch``: a training loop of the user's own on every rank, with averaged gradients,
shards, all-reduces, history, checkpoints and a lost worker survived."""

from __future__ import annotations

import os
import signal
import sys
import time

import cloudpickle
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import poll_for

import daskdl
from daskdl import Dataset
from daskdl.checkpoint import files as checkpoint

# The loops below run on the workers, which cannot import this test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _net(d: int, k: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(d, 16), torch.nn.ReLU(), torch.nn.Linear(16, k))


def sgd_loop(ctx: daskdl.RankContext):
    cfg = ctx.config
    model = ctx.prepare(_net(cfg["d"], cfg["k"]))
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=0.9, weight_decay=1e-3)
    start = ctx.restore(model, opt)
    for epoch in range(start, cfg["epochs"]):
        losses = []
        for xb, yb in ctx.batches("train", cfg["batch"], epoch=epoch, shuffle=cfg["shuffle"]):
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            opt.zero_grad()  # set_to_none, as torch does by default
            losses.append(loss.detach())
        metrics = {"train_loss": ctx.mean(torch.stack(losses).mean())}
        if "val" in ctx.config.get("score", []):
            correct = total = 0
            with torch.no_grad():
                for xb, yb in ctx.batches("val", 64, full=False):
                    correct += int((model(xb).argmax(1) == yb).sum())
                    total += len(yb)
            metrics["val_accuracy"] = ctx.all_reduce(correct) / ctx.all_reduce(total)
        ctx.log(epoch=epoch, **metrics)
        ctx.checkpoint(epoch=epoch, model=model, optimizer=opt)
        time.sleep(cfg.get("pause", 0))
        if ctx.should_stop:
            break
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"state": state, "started_at": start, "world_size": ctx.world_size}


def _params(state: dict) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in state.values()])


def test_two_ranks_batch_b_equal_one_rank_batch_2b(client):
    B, steps, d, k = 8, 6, 12, 4
    rng = np.random.default_rng(1)
    X = rng.normal(size=(2 * B * steps, d)).astype(np.float32)
    y = rng.integers(0, k, len(X))
    half = B * steps
    # One rank with batch 2B must see, at step s, rank 0's and rank 1's step-s batches.
    order = np.concatenate(
        [np.r_[s * B : (s + 1) * B, half + s * B : half + (s + 1) * B] for s in range(steps)]
    )
    cfg = {"d": d, "k": k, "lr": 0.1, "epochs": 2, "shuffle": False}
    two = daskdl.launch(
        client, sgd_loop, {"train": Dataset.from_numpy(X, y, chunks=half, n_classes=k)},
        config={**cfg, "batch": B}, workers=2, bucket_mb=0.001, progress=False,
    )  # fmt: skip
    one = daskdl.launch(
        client, sgd_loop,
        {"train": Dataset.from_numpy(X[order], y[order], chunks=2 * half, n_classes=k)},
        config={**cfg, "batch": 2 * B}, workers=1, progress=False,
    )  # fmt: skip
    assert two.result["world_size"] == 2 and one.result["world_size"] == 1
    a, b = _params(two.result["state"]), _params(one.result["state"])
    assert not torch.equal(a, _params(_net(d, k).state_dict()))  # it trained
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(two.history["train_loss"], one.history["train_loss"], rtol=1e-5)
    assert list(two.history.columns) == ["epoch", "step", "train_loss"]
    assert list(two.history["epoch"]) == [1, 2] and list(two.history["step"]) == [6, 12]


def test_shards_all_reduce_and_signed_checkpoints(client, tmp_path, monkeypatch):
    from sklearn.datasets import load_digits

    monkeypatch.setenv("DASKDL_SIGNING_KEY", "a test secret of enough length, 32+ bytes")
    X, y = load_digits(return_X_y=True)
    X = (X / 16).astype(np.float32)
    train = Dataset.from_numpy(X[300:], y[300:], chunks=400)
    val = Dataset.from_numpy(X[:300], y[:300], chunks=100)
    cfg = {"d": 64, "k": 10, "lr": 0.05, "epochs": 3, "batch": 32, "shuffle": True}
    run = daskdl.launch(
        client, sgd_loop, {"train": train, "val": val}, config={**cfg, "score": ["val"]},
        out=tmp_path / "run", seed=3, progress=False,
    )  # fmt: skip
    assert run.status == "finished"
    model = _net(64, 10)
    model.load_state_dict(run.result["state"])
    with torch.no_grad():
        accuracy = float((model(torch.from_numpy(X[:300])).argmax(1).numpy() == y[:300]).mean())
    # Every validation sample scored once, on whichever rank holds it, summed over ranks.
    assert run.history["val_accuracy"].iloc[-1] == pytest.approx(accuracy, abs=1e-9)
    assert accuracy > 0.85
    path, tensors, _, manifest = checkpoint.load_latest(tmp_path / "run")
    assert path.name == "epoch-0003" and manifest["epoch"] == 3
    assert checkpoint.signature_status(path) == "signed"
    assert manifest["loop_config"]["lr"] == 0.05
    # resume= continues the loop from the checkpoint: restore() returns 3.
    more = daskdl.launch(
        client, sgd_loop, {"train": train}, config={**cfg, "epochs": 4}, out=tmp_path / "run",
        resume=True, seed=3, progress=False,
    )  # fmt: skip
    assert more.result["started_at"] == 3 and list(more.history["epoch"]) == [1, 2, 3, 4]
    assert (tmp_path / "run" / "metrics.csv").exists()


def test_a_loop_that_loses_a_worker_finishes_on_the_survivor(fresh_client, tmp_path):
    X = np.random.default_rng(0).normal(size=(1600, 8)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    cfg = {"d": 8, "k": 2, "lr": 0.05, "epochs": 8, "batch": 32, "shuffle": True, "pause": 1.0}
    run = daskdl.launch(
        fresh_client, sgd_loop, {"train": Dataset.from_numpy(X, y, chunks=200)}, config=cfg,
        out=tmp_path / "run", block=False, progress=False, comm_timeout=20,
    )  # fmt: skip
    poll_for(lambda: list((tmp_path / "run" / "checkpoints").glob("epoch-0002")), timeout=120)
    victim = run.workers[1]
    pid = fresh_client.run(os.getpid, workers=[victim])[victim]
    os.kill(pid, signal.SIGKILL)
    run.wait(timeout=240)
    assert run.status == "finished" and run.lost == [victim]
    assert run.result["world_size"] == 1
    assert run.result["started_at"] >= 2  # from the last checkpoint, held in memory
    assert list(run.history["epoch"]) == list(range(1, 9))


def test_bad_launch_arguments(client, no_rank_may_start):
    train = daskdl.datasets.digits()
    with pytest.raises(TypeError, match="train_fn must be a function of a RankContext"):
        daskdl.launch(client, "loop", {"train": train})
    with pytest.raises(TypeError, match="data must be a dict of named daskdl.Dataset"):
        daskdl.launch(client, sgd_loop, [train])
    with pytest.raises(TypeError, match="config must be JSON-able"):
        daskdl.launch(client, sgd_loop, {"train": train}, config={"f": len})
    with pytest.raises(ValueError, match=r"\['lr'\] are options of fit's built-in loop"):
        daskdl.launch(client, sgd_loop, {"train": train}, lr=0.1)
    with pytest.raises(ValueError, match=r"'sed' \(did you mean 'seed'\?\)"):
        daskdl.launch(client, sgd_loop, {"train": train}, sed=1)


def nan_loop(ctx: daskdl.RankContext):
    model = ctx.prepare(_net(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step, (xb, yb) in enumerate(ctx.batches("train", 16)):
        loss = F.cross_entropy(model(xb), yb)
        if step == 2 and ctx.rank == ctx.world_size - 1:
            loss = loss * float("nan")  # one rank's bad batch
        loss.backward()
        opt.step()
        opt.zero_grad()
    ctx.log(epoch=0, train_loss=ctx.mean(loss.nan_to_num()))
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"state": state, "steps": ctx.steps_done}


@pytest.mark.parametrize("on_nonfinite", ["raise", "skip"])
def test_a_non_finite_step_is_caught_on_every_rank(client, on_nonfinite):
    X = np.random.default_rng(0).normal(size=(256, 4)).astype(np.float32)
    data = {"train": Dataset.from_numpy(X, (X[:, 0] > 0).astype(np.int64), chunks=64)}
    if on_nonfinite == "raise":
        with pytest.raises(daskdl.RunError, match=r"Non-finite loss or gradient at step 3"):
            daskdl.launch(client, nan_loop, data, on_nonfinite="raise", progress=False)
        return
    run = daskdl.launch(client, nan_loop, data, on_nonfinite="skip", progress=False)
    state = run.result["state"]
    assert all(torch.isfinite(v).all() for v in state.values())  # the NaN step was skipped
    assert run.result["steps"] == 8


def test_run_stop_reaches_every_rank_after_the_same_step(client):
    X = np.random.default_rng(0).normal(size=(800, 8)).astype(np.float32)
    cfg = {"d": 8, "k": 2, "lr": 0.05, "epochs": 50, "batch": 32, "shuffle": True, "pause": 0.5}
    run = daskdl.launch(
        client, sgd_loop, {"train": Dataset.from_numpy(X, (X[:, 0] > 0).astype(int), chunks=200)},
        config=cfg, block=False, progress=False,
    )  # fmt: skip
    poll_for(lambda: len(run.history) >= 2, timeout=60)
    run.stop()
    assert run.status == "stopped" and 2 <= len(run.history) < 50


def follow_loop(ctx: daskdl.RankContext):
    """Hands its live replica back on a regroup: the survivors go on mid-epoch."""
    cfg = ctx.config
    model = ctx.prepare(_net(cfg["d"], cfg["k"]))
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=0.9)
    ctx.follow(model, opt)
    start = ctx.restore(model, opt)
    for epoch in range(start, cfg["epochs"]):
        first = ctx.resume_step if epoch == start else 0
        for xb, yb in ctx.batches("train", cfg["batch"], epoch=epoch, start=first):
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            opt.zero_grad()
            time.sleep(cfg["pause"])
        ctx.log(epoch=epoch, train_loss=ctx.mean(loss))
    return {"resumed_at": [start, ctx.resume_step], "world_size": ctx.world_size}


def test_a_followed_loop_goes_on_mid_epoch_without_a_lost_worker(fresh_client):
    X = np.random.default_rng(0).normal(size=(1600, 8)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    cfg = {"d": 8, "k": 2, "lr": 0.05, "epochs": 4, "batch": 32, "pause": 0.1}
    run = daskdl.launch(
        fresh_client, follow_loop, {"train": Dataset.from_numpy(X, y, chunks=200)}, config=cfg,
        block=False, progress=False, comm_timeout=20,
    )  # fmt: skip
    poll_for(lambda: len(run.history) >= 1, timeout=120)
    time.sleep(1.0)  # epoch 2 is 25 steps of 0.1 s: about 10 of them in
    victim = run.workers[1]
    os.kill(fresh_client.run(os.getpid, workers=[victim])[victim], signal.SIGKILL)
    run.wait(timeout=240)
    assert run.status == "finished" and run.lost == [victim]
    epoch, step = run.result["resumed_at"]
    assert run.result["world_size"] == 1 and epoch >= 1
    assert 0 < step < 50  # part-way through the epoch (50 steps on one rank), not its start
    assert list(run.history["epoch"]) == [1, 2, 3, 4]
    assert run.history["train_loss"].iloc[-1] < 0.5


def local_sgd_loop(ctx: daskdl.RankContext):
    """Drives the run's averager step by step, as fit's loop does."""
    model = _net(8, 2).to(ctx.device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sync = ctx.averaging(model, opt)
    steps = ctx.steps_per_epoch("train", 32)
    spreads = []
    for epoch in range(2):
        for s, (xb, yb) in enumerate(ctx.batches("train", 32, epoch=epoch)):
            sync.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            sync.backward_done(ctx.stop_requested, loss.detach())
            opt.step()
            sync.step_done(epoch * steps + s, end_of_epoch=s == steps - 1)
            flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
            spreads.append(float((ctx.all_reduce(flat, "mean") - flat).abs().max()))
    return {"spreads": spreads, "steps": steps, "loss": ctx.mean(loss)}


def test_a_loop_drives_local_sgd_through_the_context(client):
    X = np.random.default_rng(0).normal(size=(512, 8)).astype(np.float32)
    data = {"train": Dataset.from_numpy(X, (X[:, 0] > 0).astype(np.int64), chunks=128)}
    run = daskdl.launch(client, local_sgd_loop, data, sync_every=4, workers=2, progress=False)
    spreads, steps = run.result["spreads"], run.result["steps"]
    assert steps == 8 and len(spreads) == 16
    # The replicas drift apart between synchronisations and agree right after each one.
    for s, spread in enumerate(spreads):
        if (s + 1) % 4 == 0:
            assert spread < 1e-6, s
        else:
            assert spread > 1e-6, s
    with pytest.raises(daskdl.RunError, match=r"use ctx.averaging\(model, optimizer\)"):
        daskdl.launch(client, sgd_loop, data, config={"d": 8, "k": 2}, sync_every=4)


def test_fits_loop_asks_its_context_only_what_any_loop_may():
    """fit is a train_fn like a user's: every use of its RankContext is public and documented."""
    import ast
    import inspect

    from daskdl import RankContext
    from daskdl.training import fitloop, replica, stages

    def is_ctx(node) -> bool:
        return (isinstance(node, ast.Name) and node.id == "ctx") or (
            isinstance(node, ast.Attribute) and node.attr == "ctx"
        )

    used = set()
    for module in (fitloop, replica, stages):  # the loop and its step runners
        tree = ast.parse(inspect.getsource(module))
        used |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and is_ctx(n.value)}
    members = {name for name in vars(RankContext) if not name.startswith("_")}
    documented = {name for name in used if f"``{name}``" in RankContext.__doc__}
    assert {"averaging", "batches", "restore", "follow", "log", "checkpoint"} <= used
    assert used <= members | documented, used - members - documented
    assert not any(name.startswith("_") for name in used)


def conventions_loop(ctx: daskdl.RankContext):
    """What torch.distributed and Fabric users write: all_reduce of a tensor is a tensor,
    log without an epoch is logged against the step."""
    one = torch.tensor([float(ctx.rank + 1)])
    zero_d = torch.tensor(2.0)
    ints = torch.tensor([ctx.rank, 1])
    got = {
        "one": ctx.all_reduce(one),
        "zero_d": ctx.all_reduce(zero_d, "mean"),
        "ints": ctx.all_reduce(ints),
        "int_mean": ctx.all_reduce(ints, "mean"),
        "array": ctx.all_reduce(np.array([1.0, 2.0])),
        "number": ctx.all_reduce(3),
        "numpy_number": ctx.all_reduce(np.float32(0.5)),
    }
    ctx.log(test_accuracy=ctx.all_reduce(one).item() / 10, step=7)
    ctx.log(epoch=0, train_loss=ctx.mean(one))
    ctx.log(final=1.5)
    return got


def test_all_reduce_returns_what_it_was_given_and_log_takes_no_epoch(client):
    data = Dataset.from_numpy(np.zeros((40, 2), np.float32), np.arange(40) % 2, chunks=10)
    run = daskdl.launch(client, conventions_loop, {"train": data}, progress=False)
    got = run.result
    assert torch.is_tensor(got["one"]) and got["one"].shape == (1,) and got["one"].item() == 3.0
    assert torch.is_tensor(got["zero_d"]) and got["zero_d"].shape == () and got["zero_d"] == 2.0
    assert got["ints"].dtype == torch.int64 and got["ints"].tolist() == [1, 2]
    assert got["int_mean"].is_floating_point() and got["int_mean"].tolist() == [0.5, 1.0]
    assert isinstance(got["array"], np.ndarray) and got["array"].tolist() == [2.0, 4.0]
    assert type(got["number"]) is float and got["number"] == 6.0
    assert type(got["numpy_number"]) is float and got["numpy_number"] == 1.0
    logs = run.logs
    assert logs["test_accuracy"].iloc[0] == pytest.approx(0.3) and logs["step"].iloc[0] == 7
    assert logs["final"].iloc[1] == 1.5 and len(logs) == 2
    assert run.history["train_loss"].tolist() == [1.5]  # the epoch row, apart
