"""Pipeline parallelism: stages on their own ranks train as one rank training the whole model
on the same batches."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import kill_mid_epoch, poll_for
from distributed import get_worker

import daskdl
from daskdl import Dataset, Pipeline, events, models
from daskdl.parallel.pipeline import PipelineError, cut, order, parameter_costs

STEPS, BATCH = 3, 24


def _layers():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(),
        torch.nn.Linear(32, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3),
    )  # fmt: skip


def _batches(replica: int):
    """The same seeded batches wherever they are made: replica r's are stream r."""
    g = torch.Generator().manual_seed(100 + replica)
    for _ in range(STEPS):
        x = torch.randn(BATCH, 8, generator=g)
        yield x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def _pipelined(ctx):
    pipe = Pipeline(**ctx.config["pipe"])
    stage = ctx.pipeline(_layers(), pipe)
    opt = torch.optim.SGD(stage.parameters(), lr=0.1, momentum=0.9)
    losses, alive = [], 0
    for xb, yb in _batches(stage.replica):
        opt.zero_grad()
        fed = (xb, yb) if stage.is_first else (None, None)
        loss = stage.train_step(*fed, F.cross_entropy)
        alive = max(alive, stage.stats["alive"])
        opt.step()
        if loss is not None:
            losses.append(float(loss))
    result = {
        "stage": stage.index, "replica": stage.replica, "layers": stage.layer_ids,
        "state": {k: v.clone() for k, v in stage.module.state_dict().items()},
        "losses": losses, "alive": alive, "stats": dict(stage.stats),
    }  # fmt: skip
    torch.save(result, f"{ctx.config['out']}/rank-{ctx.rank}.pt")  # every rank's, for the test


def _whole(replicas: int) -> tuple[dict, list]:
    """One rank, the whole model, every replica's batch as one."""
    model = _layers()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for batches in zip(*(_batches(r) for r in range(replicas))):
        xb = torch.cat([x for x, _ in batches])
        yb = torch.cat([y for _, y in batches])
        opt.zero_grad()
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model.state_dict(), losses


def _zeros(n=8) -> dict:
    return {"train": Dataset.from_numpy(np.zeros((n, 8), np.float32), np.zeros(n, np.int64))}


def _check_equal(results, replicas):
    whole, losses = _whole(replicas)
    layers = list(whole)
    for r in results:
        for key, value in r["state"].items():
            index, name = key.split(".", 1)
            torch.testing.assert_close(
                value, whole[f"{r['layers'][int(index)]}.{name}"], rtol=1e-5, atol=1e-6
            )
    # Every layer with parameters is held by one stage of each replica.
    held = [r["layers"][int(k.split(".")[0])] for r in results for k in r["state"]]
    assert sorted(set(held)) == sorted({int(k.split(".")[0]) for k in layers})


def _run(client, tmp_path, workers, **pipe) -> list[dict]:
    config = {"pipe": pipe, "out": str(tmp_path)}
    daskdl.launch(client, _pipelined, _zeros(), config, workers=workers, progress=False)
    return [torch.load(tmp_path / f"rank-{r}.pt", weights_only=True) for r in range(workers)]


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("stages", [2, 3])
def test_a_pipeline_trains_as_one_rank_with_the_whole_model(
    three_workers, tmp_path, stages, schedule
):
    results = _run(three_workers, tmp_path, stages, stages=stages, microbatches=4,
                   schedule=schedule)  # fmt: skip
    _check_equal(results, replicas=1)
    _, losses = _whole(1)
    np.testing.assert_allclose(results[-1]["losses"], losses, rtol=1e-5)
    # 1F1B keeps at most `stages` microbatches of activations alive on a stage; GPipe all.
    alive = [r["alive"] for r in results]
    assert alive == ([4] * stages if schedule == "gpipe" else [stages - s for s in range(stages)])


@pytest.mark.parametrize(
    "stages,schedule", [(2, "1f1b"), (3, "1f1b"), (2, "gpipe")], ids=["2-1f1b", "3-1f1b", "2-gpipe"]
)
def test_an_interleaved_pipeline_trains_as_one_rank_with_the_whole_model(
    three_workers, tmp_path, stages, schedule
):
    m = 2 * stages
    results = _run(three_workers, tmp_path, stages, stages=stages, microbatches=m,
                   schedule=schedule, chunks=2)  # fmt: skip
    _check_equal(results, replicas=1)
    np.testing.assert_allclose(results[-1]["losses"], _whole(1)[1], rtol=1e-5)
    # Each stage holds two runs of layers, the model's pieces s and s + stages.
    assert [r["layers"][0] for r in results] == list(range(stages))
    # Interleaved 1F1B's warm-up bounds the pieces' activations alive (GPipe: all).
    alive = [min(2 * (stages - s - 1) + stages + 1, 2 * m) for s in range(stages)]
    assert [r["alive"] for r in results] == (alive if schedule == "1f1b" else [2 * m] * stages)


@pytest.mark.integration
def test_two_replicas_of_two_stages_average_each_stages_gradients(tmp_path):
    with daskdl.local_cluster(n_workers=4, threads_per_worker=1) as client:
        results = _run(client, tmp_path, 4, stages=2, microbatches=3)
        assert [(r["stage"], r["replica"]) for r in results] == [(0, 0), (1, 0), (0, 1), (1, 1)]
        _check_equal(results, replicas=2)
        _check_equal(_run(client, tmp_path, 4, stages=2, microbatches=4, chunks=2), replicas=2)


def test_every_layer_lands_in_one_non_empty_stage():
    for n in range(3, 12):
        for stages in range(1, n + 1):
            costs = [float((7 * i) % 5) for i in range(n)]
            bounds = cut(costs, stages)
            assert bounds[0] == 0 and bounds[-1] == n and len(bounds) == stages + 1
            assert all(a < b for a, b in zip(bounds, bounds[1:]))  # none empty
    # Balanced by parameters: two equal halves of a model whose halves cost the same.
    model = torch.nn.Sequential(*(torch.nn.Linear(16, 16) for _ in range(4)))
    assert cut(parameter_costs(list(model)), 2) == [0, 2, 4]
    with pytest.raises(PipelineError, match="needs at least 3 layers, and the model has 2"):
        cut([1.0, 1.0], 3)


def test_the_schedules_orders():
    def passes(*args):
        return [(op, m) for op, chunk, m in order(*args)]

    assert passes("gpipe", 2, 0, 2) == [("F", 0), ("F", 1), ("B", 0), ("B", 1)]
    assert passes("1f1b", 3, 0, 4) == [
        ("F", 0), ("F", 1), ("F", 2), ("B", 0), ("F", 3), ("B", 1), ("B", 2), ("B", 3)
    ]  # fmt: skip
    assert passes("1f1b", 3, 2, 2) == [("F", 0), ("B", 0), ("F", 1), ("B", 1)]
    # Interleaved: two microbatches through chunk 0, two through chunk 1, ...
    assert order("1f1b", 2, 1, 2, 2) == [
        ("F", 0, 0), ("F", 0, 1), ("F", 1, 0), ("B", 1, 0), ("F", 1, 1), ("B", 1, 1),
        ("B", 0, 0), ("B", 0, 1),
    ]  # fmt: skip
    with pytest.raises(ValueError, match="use a multiple of 2 microbatches, not 3"):
        order("1f1b", 2, 0, 3, 2)


def _simulate(schedule, stages, microbatches, chunks):
    """Run every stage's order with a forward of 1/chunks and a backward of 2/chunks time
    units, each pass once its inputs exist: the step's time (an error on a deadlock)."""
    pieces = stages * chunks
    orders = [order(schedule, stages, s, microbatches, chunks) for s in range(stages)]
    done: dict = {}
    clock, at = [0.0] * stages, [0] * stages
    while any(at[s] < len(orders[s]) for s in range(stages)):
        moved = False
        for s in range(stages):
            while at[s] < len(orders[s]):
                op, c, m = orders[s][at[s]]
                g = c * stages + s
                if op == "F":
                    needs = [("F", g - 1, m)] if g else []
                else:
                    needs = [("F", g, m)] + ([("B", g + 1, m)] if g < pieces - 1 else [])
                if not all(n in done for n in needs):
                    break
                start = max([clock[s], *(done[n] for n in needs)])
                clock[s] = done[op, g, m] = start + (1 if op == "F" else 2) / chunks
                at[s], moved = at[s] + 1, True
        assert moved, f"deadlock: stages stuck at passes {at}"
    assert len(done) == 2 * pieces * microbatches  # every pass once
    return max(clock)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("stages,microbatches", [(2, 8), (3, 6), (4, 8)])
def test_interleaving_shrinks_the_bubble_by_the_chunks(schedule, stages, microbatches):
    work = 3 * microbatches  # a stage's busy time
    for chunks in (1, 2, 4):
        bubble = _simulate(schedule, stages, microbatches, chunks) - work
        assert bubble == pytest.approx(3 * (stages - 1) / chunks)


def _mismatched(ctx):
    layers = [torch.nn.Linear(8, 16), torch.nn.Linear(32, 3)]  # 16 out, 32 in: no fit
    stage = ctx.pipeline(layers, Pipeline(stages=2, microbatches=2))
    xb, yb = next(_batches(0))
    stage.train_step(xb, yb, F.cross_entropy) if stage.is_first else stage.train_step(
        loss_fn=F.cross_entropy
    )


def test_a_shape_mismatch_between_stages_is_an_error_naming_the_stage(client):
    with pytest.raises(daskdl.RunError) as e:
        daskdl.launch(client, _mismatched, _zeros(), progress=False)
    message = str(e.value)
    assert "stage 1 (layers 1-1) of replica 0" in message
    assert "shape (12, 16)" in message and "expects (batch, ..., 32)" in message


STALL = 60  # seconds: far longer than the timeout plus a launch on a loaded machine


def _stalled(ctx):
    stage = ctx.pipeline(_layers(), Pipeline(stages=2, microbatches=2))
    if not stage.is_first:
        time.sleep(STALL)  # a stage that stopped answering
        return
    xb, yb = next(_batches(0))
    stage.train_step(xb, yb, F.cross_entropy)


def test_a_stage_that_stops_answering_is_an_error_naming_it_within_the_timeout(fresh_client):
    t0 = time.monotonic()
    with pytest.raises(daskdl.RunError) as e:
        daskdl.launch(fresh_client, _stalled, _zeros(), comm_timeout=2, progress=False)
    # Within the 2 s timeout and the launch's own time, not after the stage came back.
    assert time.monotonic() - t0 < STALL / 2
    message = str(e.value)
    assert "stage 0 (layers 0-" in message and "waited 2s for the targets" not in message
    assert "of microbatch 0 of step 1 from rank 1" in message


def _blobs(n=512, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 8)).astype(np.float32)
    return Dataset.from_numpy(X, (X[:, 0] > 0).astype(np.int64) + (X[:, 1] > 0), chunks=n // 4)


FIT = dict(optimizer="adamw", lr=1e-2, progress=False, max_failures=0)
MLP = ("mlp", {"hidden": 64})


def test_fit_with_a_pipeline_trains_as_one_rank(client):
    data = _blobs()
    one = daskdl.fit(client, MLP, data, val=data, epochs=2, workers=1, **FIT)
    piped = daskdl.fit(
        client, MLP, data, val=data, epochs=2,
        pipeline=Pipeline(stages=2, microbatches=4, schedule="gpipe"), **FIT,
    )  # fmt: skip
    interleaved = daskdl.fit(
        client, MLP, data, val=data, epochs=2,
        pipeline=Pipeline(stages=2, microbatches=4, chunks=2), **FIT,
    )  # fmt: skip
    for run in (piped, interleaved):
        for name, value in one.model.state_dict().items():
            torch.testing.assert_close(run.model.state_dict()[name], value, rtol=1e-5, atol=1e-6)
        for column in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
            np.testing.assert_allclose(run.history[column], one.history[column], rtol=1e-5)
    assert piped.info["config"]["pipeline_stages"] == 2
    assert interleaved.info["config"]["pipeline_chunks"] == 2
    steps = [e for e in daskdl.events.replay(client, piped.run_id) if e["kind"] == "step"]
    assert {e["stage"] for e in steps} == {0, 1}
    last = steps[-1]
    assert 0 <= last["bubble"] < 1 and last["activation_bytes"] > 0 and last["forward_time"] > 0
    # The dashboard's table of ranks shows each stage's figures.
    from daskdl.webapp.store import RunState

    state = RunState(piped.run_id)
    for event in daskdl.events.replay(client, piped.run_id):
        state.ingest(0.0, event)
    table = state.worker_table()
    assert list(table["stage"]) == [0, 1] and (table["forward_ms"] > 0).all()
    assert table["activations_mb"].iloc[0] > 0 and table["bubble"].between(0, 1).all()
    # And plots each stage's figures over the steps; a run without stages has none.
    from daskdl.webapp.store import DashboardStore
    from daskdl.webapp.views import Stages

    for run, shown in ((piped, True), (one, False)):
        store = DashboardStore()
        store.ingest([(0.0, e) for e in daskdl.events.replay(client, run.run_id)])
        view = Stages(store=store)
        assert view.row.visible is shown
        points = view.points.data
        assert sorted(set(points["stage"])) == ([0, 1] if shown else [])
        assert len(points["step"]) == len([e for e in steps if shown])
        assert all(t > 0 for t in points["forward_ms"]) and all(
            0 <= b < 1 for b in points["bubble"]
        )


class _Seen(torch.nn.Module):
    """Passes its input on; in training, on a worker, appends a digest of each sample it sees
    to its process's file in ``folder``."""

    def __init__(self, folder):
        super().__init__()
        self.folder = str(folder)

    def forward(self, x):
        if self.training and _on_worker():
            with open(os.path.join(self.folder, f"{os.getpid()}.txt"), "a") as f:
                f.writelines(
                    hashlib.sha256(row.tobytes()).hexdigest()[:16] + "\n" for row in x.numpy()
                )
        return x


def _on_worker() -> bool:
    try:
        get_worker()
    except ValueError:  # the dry run, on the client
        return False
    return True


def _seen_mlp(folder, input_shape, n_outputs):
    os.makedirs(folder, exist_ok=True)
    return torch.nn.Sequential(_Seen(folder), *daskdl.models.mlp(input_shape, n_outputs, 64))


def _seen(folder) -> list[str]:
    """The digests of the samples the runs that recorded into ``folder`` trained on, in order
    (one first stage per replica: their files one after the other)."""
    return [line for path in sorted(folder.glob("*.txt")) for line in path.read_text().split()]


def test_a_pipelines_checkpoint_resumes_on_one_rank_and_a_ranks_on_four(client, tmp_path):
    data = _blobs()
    fit = dict(FIT, schedule="constant")  # the same learning rates, however many epochs
    model = {run: functools.partial(_seen_mlp, tmp_path / f"seen-{run}") for run in "wabc"}
    whole = daskdl.fit(client, model["w"], data, epochs=3, workers=1, **fit)
    daskdl.fit(client, model["a"], data, epochs=2, out=tmp_path / "a",
               pipeline=Pipeline(stages=2), **fit)  # fmt: skip
    # 2 stages -> 1 rank: where one rank would have been after 3 epochs.
    single = daskdl.fit(
        client, model["b"], data, epochs=3, workers=1, resume=tmp_path / "a",
        out=tmp_path / "b", **fit,
    )  # fmt: skip
    assert list(single.history["epoch"]) == [1, 2, 3]
    for name, value in whole.model.state_dict().items():
        torch.testing.assert_close(single.model.state_dict()[name], value, rtol=1e-5, atol=1e-6)
    # The same samples in the same order: none skipped or repeated across the change.
    seen = _seen(tmp_path / "seen-a") + _seen(tmp_path / "seen-b")
    assert len(seen) == 3 * 512 and seen == _seen(tmp_path / "seen-w")
    # 1 rank -> 2 replicas x 2 stages of 2 interleaved chunks.
    with daskdl.local_cluster(n_workers=4, threads_per_worker=1) as four:
        grid = daskdl.fit(
            four, model["c"], data, epochs=4, resume=tmp_path / "b", out=tmp_path / "c",
            pipeline=Pipeline(stages=2, chunks=2), **fit,
        )  # fmt: skip
    assert list(grid.history["epoch"]) == [1, 2, 3, 4] and grid.info["world_size"] == 4
    assert grid.history["train_loss"].iloc[-1] < whole.history["train_loss"].iloc[0]
    # Epoch 4, over the two replicas' first stages: every sample once.
    assert sorted(_seen(tmp_path / "seen-c")) == sorted(set(seen))


class _NotSequential(torch.nn.Module):
    def __init__(self, input_shape, n_outputs):
        super().__init__()
        self.a, self.b = torch.nn.Linear(input_shape[0], 16), torch.nn.Linear(16, n_outputs)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize(
    "model, pipe, match",
    [
        (_NotSequential, Pipeline(stages=2), "give an nn.Sequential or a list of modules"),
        (MLP, Pipeline(stages=7), "needs at least 7 layers, and the model has 6"),
        (MLP, Pipeline(stages=2, split=(9,)), "cuts past the model's 6 layers"),
        (MLP, Pipeline(stages=2, chunks=4), r"into 8 pieces \(stages x chunks\) needs at least 8"),
    ],
)
def test_a_model_a_pipeline_cannot_cut_fails_before_any_rank_starts(
    client, no_rank_may_start, model, pipe, match
):
    with pytest.raises(daskdl.models.preflight.ModelCheckError, match=match):
        daskdl.fit(client, model, _blobs(), epochs=1, pipeline=pipe, **FIT)


def test_a_pipeline_longer_than_the_cluster_is_refused_before_any_rank_starts(
    client, no_rank_may_start
):
    with pytest.raises(
        ValueError, match="A pipeline of 3 stages needs 3 workers, and the run has 2"
    ):
        daskdl.fit(client, MLP, _blobs(), epochs=1, pipeline=Pipeline(stages=3), **FIT)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(stages=3, split=(3,)), r"give the 2 increasing indices"),
        (dict(stages=2, microbatches=0), "microbatches"),
        (dict(stages=2, schedule="zigzag"), "schedule"),
        (dict(stages=2, microbatches=3, chunks=2), "a multiple of 2 microbatches"),
        (dict(stages=1, chunks=2), "use at least 2 stages"),
        (dict(stages=2, chunks=2, split=(2, 4)), r"pieces 1..3 \(2 stages x 2 chunks\)"),
    ],
)
def test_pipeline_settings_are_checked(options, match):
    with pytest.raises(ValueError, match=match):
        Pipeline(**options)
    with pytest.raises(ValueError, match="like '3,7'"):
        daskdl.TrainConfig(pipeline_stages=2, pipeline_split="3,x")
    with pytest.raises(ValueError, match="use one or the other"):
        daskdl.TrainConfig(pipeline_stages=2, shard="full")
    with pytest.raises(ValueError, match="set pipeline_stages to 2 or more as well"):
        daskdl.TrainConfig(pipeline_chunks=2)


@pytest.mark.integration
def test_a_replica_that_loses_a_stage_goes_on_from_the_survivors_last_step(caplog):
    caplog.set_level(logging.WARNING, logger="daskdl.runs.launching")
    train, test = daskdl.datasets.train_test("digits")
    with daskdl.local_cluster(n_workers=4, threads_per_worker=1) as four:
        run = daskdl.fit(
            four, MLP, train, val=test, epochs=4, batch_size=8, pipeline=Pipeline(stages=2),
            optimizer="adamw", lr=3e-3, max_failures=1, block=False, progress=False,
        )  # fmt: skip
        # Stage 1 of replica 1, mid-epoch; no out=: nothing on disk to go back to.
        victim = kill_mid_epoch(four, run, rank=3)
        run.wait(timeout=180)
        log = events.replay(four, run.run_id)
    assert run.status == "finished" and run.lost == [victim]
    assert list(run.history["epoch"]) == [1, 2, 3, 4]
    change, *rejoined = [e for e in log if e["kind"] == "membership"]
    assert change["world_size"] == 2 and list(change["lost"]) == [victim]
    # From the step the survivors had finished (replica 0 whole, stage 0 of replica 1 too),
    # not from the start of the epoch the kill landed in (2, or 3 if it was over), nor the run's.
    assert (change["epoch"], change["step_in_epoch"]) > (2, 0), change
    assert "no survivor holds" not in caplog.text
    # The step count goes on from where it was: each epoch adds its membership's steps (the
    # killed worker, restarted by its nanny, may join again at an epoch's end).
    steps = list(run.history["step"])
    per_epoch = {steps[0]} | {e["steps_per_epoch"] for e in (change, *rejoined)}
    assert all(b - a in per_epoch for a, b in zip(steps, steps[1:])), (steps, per_epoch)
    assert all(not e["lost"] for e in rejoined)
    assert run.history["val_accuracy"].iloc[-1] >= 0.9


def test_a_pipeline_that_loses_its_only_copy_of_a_stage_goes_on_from_disk(
    three_workers, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="daskdl.runs.launching")
    train, test = daskdl.datasets.train_test("digits")
    run = daskdl.fit(
        three_workers, MLP, train, val=test, epochs=4, batch_size=8, out=tmp_path / "run",
        pipeline=Pipeline(stages=2), optimizer="adamw", lr=3e-3, max_failures=1,
        block=False, progress=False,
    )  # fmt: skip
    victim = kill_mid_epoch(three_workers, run, rank=1)  # the one replica's last stage
    run.wait(timeout=180)
    assert run.status == "finished" and run.lost == [victim]
    assert list(run.history["epoch"]) == [1, 2, 3, 4]
    change = next(e for e in events.replay(three_workers, run.run_id) if e["kind"] == "membership")
    assert change["world_size"] == 2 and change["step_in_epoch"] == 0
    assert "no survivor holds stage(s) [1]" in caplog.text
    assert f"regroups from {tmp_path / 'run'}" in caplog.text
    assert run.history["val_accuracy"].iloc[-1] >= 0.9


def test_a_pipelined_run_stops_after_the_same_step_on_every_stage(client):
    data = _blobs()
    run = daskdl.fit(
        client, MLP, data, val=data, epochs=200, pipeline=Pipeline(stages=2), block=False, **FIT
    )
    poll_for(lambda: len(run.history) >= 1, timeout=120)
    run.stop()
    assert run.status == "stopped"
    done = len(run.history)
    assert 1 <= done < 200
    # Every stage stopped after the same step: the whole model was gathered and evaluates.
    assert set(run.model.state_dict()) == set(models.build(MLP, (8,), 3).state_dict())
    assert np.isfinite(run.evaluate(data)["loss"])
