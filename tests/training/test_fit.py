"""Training end to end on real LocalClusters with worker processes."""

from __future__ import annotations

import os
import shutil
import signal
import time
import warnings

import dask
import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
from conftest import Recording, kill_mid_epoch, poll_for, ranks_gone
from distributed import Client

import daskdl
from daskdl import Dataset, events
from daskdl.checkpoint import files as checkpoint
from daskdl.cluster import workers_info


def blobs(n=600, d=6, classes=3, seed=0):
    """Separable Gaussian blobs: any working trainer gets them nearly all right."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=4, size=(classes, d))
    y = rng.integers(0, classes, n)
    X = (centers[y] + rng.normal(size=(n, d))).astype(np.float32)
    return X, y


QUICK = dict(epochs=3, batch_size=16, lr=0.05, progress=False)


def test_digits_quickstart_api(client, digits_split):
    train, test = digits_split
    run = daskdl.fit(
        client,
        "small_cnn",
        train,
        val=test,
        epochs=8,
        batch_size=32,
        lr=0.05,
        seed=0,
        progress=False,
    )
    h = run.history
    assert list(h["epoch"]) == list(range(1, 9))
    for column in ["train_loss", "val_loss", "val_accuracy", "samples_per_s"]:
        assert h[column].notna().all()
    assert h["train_loss"].iloc[-1] < h["train_loss"].iloc[0] / 5
    assert h["val_accuracy"].iloc[-1] >= 0.95
    assert isinstance(run.model, torch.nn.Module)
    assert next(run.model.parameters()).device.type == "cpu"
    scores = run.evaluate(test)
    assert scores["accuracy"] == pytest.approx(h["val_accuracy"].iloc[-1], abs=1e-6)
    assert scores["loss"] == pytest.approx(h["val_loss"].iloc[-1], rel=1e-4)
    # Again at once: the weights stay on the workers, no key of the first call is reused.
    assert run.evaluate(test) == scores
    assert run.evaluate(train)["accuracy"] > 0.95
    assert run.status == "finished" and run.done


def _params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# bucket_mb=0.001 cuts the MLP's gradients into several buckets, reduced on the communication
# thread while backward still runs.
@pytest.mark.parametrize("bucket_mb", [25, 0.001])
def test_two_ranks_batch_b_equal_one_rank_batch_2b(client, bucket_mb):
    """The all-reduce averages correctly: 2 x B per step is the same SGD as 1 x 2B."""
    B, steps, d = 8, 6, 12
    rng = np.random.default_rng(1)
    X = rng.normal(size=(2 * B * steps, d)).astype(np.float32)
    y = rng.integers(0, 4, len(X))
    half = B * steps
    # One rank with batch 2B must see, at step s, rank 0's and rank 1's step-s batches.
    order = np.concatenate(
        [np.r_[s * B : (s + 1) * B, half + s * B : half + (s + 1) * B] for s in range(steps)]
    )
    opts = dict(
        epochs=2,
        lr=0.1,
        momentum=0.9,
        weight_decay=1e-3,
        schedule="cosine",
        shuffle=False,
        seed=7,
        progress=False,
    )
    two = daskdl.fit(
        client,
        "mlp",
        Dataset.from_numpy(X, y, chunks=half, n_classes=4),
        batch_size=B,
        workers=2,
        bucket_mb=bucket_mb,
        **opts,
    )
    one = daskdl.fit(
        client,
        "mlp",
        Dataset.from_numpy(X[order], y[order], chunks=2 * half, n_classes=4),
        batch_size=2 * B,
        workers=1,
        **opts,
    )
    a, b = _params(two.model), _params(one.model)
    assert not torch.equal(a, _params(daskdl.models.mlp((d,), 4)))  # it trained
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(two.history["train_loss"], one.history["train_loss"], rtol=1e-5)


@pytest.mark.parametrize("source", ["numpy", "dask", "dataframe", "xarray"])
def test_each_constructor_trains(client, source):
    X, y = blobs()
    if source == "numpy":
        ds = Dataset.from_numpy(X, y, chunks=150)
    elif source == "dask":
        ds = Dataset.from_dask(da.from_array(X, chunks=(150, -1)), da.from_array(y, chunks=150))
    elif source == "dataframe":
        cols = [f"f{i}" for i in range(X.shape[1])]
        pdf = pd.DataFrame(X, columns=cols).assign(label=y)
        ds = Dataset.from_dataframe(dd.from_pandas(pdf, npartitions=4), cols, "label")
    else:
        xds = xr.Dataset({"x": (("sample", "feature"), X), "label": (("sample",), y)}).chunk(
            {"sample": 150}
        )
        ds = Dataset.from_xarray(xds, sample_dim="sample", features=["x"], label="label")
    train, test = ds.split(0.25, seed=0)
    run = daskdl.fit(client, "mlp", train, val=test, **QUICK)
    assert run.history["val_accuracy"].iloc[-1] >= 0.9


def test_seeded_runs_repeat_wherever_the_data_lives(client):
    X, y = blobs(n=400)
    w0, w1 = sorted(workers_info(client))
    params = []
    for holder in (w0, w1):
        Xd, yd = client.persist(
            [da.from_array(X, chunks=(100, -1)), da.from_array(y, chunks=100)], workers=[holder]
        )
        run = daskdl.fit(client, "mlp", Dataset.from_dask(Xd, yd), seed=5, **QUICK)
        assert set(run.workers) == {w0, w1}
        params.append(_params(run.model))
    torch.testing.assert_close(params[0], params[1], rtol=0, atol=0)


def test_uneven_shards_do_not_hang(client):
    X, y = blobs(n=300)
    ds = Dataset.from_dask(
        da.from_array(X, chunks=((200, 60, 40), (6,))), da.from_array(y, chunks=((200, 60, 40),))
    )
    run = daskdl.fit(client, "mlp", ds, val=ds, comm_timeout=20, **QUICK)
    steps = run.history["step"].diff().dropna()
    assert (steps == steps.iloc[0]).all()
    assert run.history["val_accuracy"].iloc[-1] >= 0.9


def test_events_and_nonblocking_stop(client):
    X, y = blobs(n=2000)
    ds = Dataset.from_numpy(X, y, chunks=500)
    with dask.config.set({"daskdl.log-interval": "0.05s"}):
        run = daskdl.fit(
            client, "mlp", ds, val=ds, epochs=200, batch_size=8, progress=False, block=False
        )
    assert not run.done
    poll_for(lambda: len(run.history) >= 2, timeout=60)
    run.stop()
    assert run.done and run.status == "stopped"
    assert 2 <= len(run.history) < 200
    log = events.replay(client, run.run_id)
    kinds = [e["kind"] for e in log]
    assert kinds[0] == "start" and kinds[-1] == "end" and log[-1]["status"] == "stopped"
    steps = [e for e in log if e["kind"] == "step"]
    assert {e["rank"] for e in steps} == {0, 1}
    assert all(e["rss"] > 0 and e["samples_per_s"] > 0 and e["step_time"] > 0 for e in steps)
    assert [e["epoch"] for e in log if e["kind"] == "epoch"] == list(run.history["epoch"])


def _profiler_running(dask_worker) -> bool:
    return dask_worker.periodic_callbacks["profile"].is_running()


@pytest.mark.parametrize("pause", [True, False])
def test_dask_profiler_is_paused_while_ranks_train(client, pause):
    X, y = blobs(n=2000)
    ds = Dataset.from_numpy(X, y, chunks=500)
    with dask.config.set({"daskdl.pause-dask-profiler": pause}):
        run = daskdl.fit(client, "mlp", ds, epochs=200, batch_size=8, progress=False, block=False)
    try:
        poll_for(lambda: len(run.history) >= 1, timeout=60)
        assert set(client.run(_profiler_running).values()) == {not pause}
    finally:
        run.stop()
    # Running again once the ranks are gone.
    poll_for(lambda: all(client.run(_profiler_running).values()))


@pytest.mark.parametrize(
    "averaging", [{}, {"sync_every": 3, "outer_optimizer": "nesterov"}], ids=["grads", "diloco"]
)
def test_resume_ends_where_an_uninterrupted_run_ends(client, tmp_path, averaging):
    X, y = blobs(n=400)
    train, val = Dataset.from_numpy(X, y, chunks=100).split(0.25, seed=0)
    opts = dict(epochs=4, batch_size=16, lr=0.05, seed=3, progress=False, **averaging)
    with dask.config.set({"daskdl.keep-checkpoints": None}):
        full = daskdl.fit(client, "mlp", train, val=val, out=tmp_path / "full", **opts)
    ckpts = checkpoint.list_checkpoints(tmp_path / "full" / "checkpoints")
    assert [p.name for p in ckpts] == ["epoch-0001", "epoch-0002", "epoch-0003", "epoch-0004"]
    # A run that crashed after epoch 2: only its first two checkpoints exist.
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "full", crashed)
    for p in ckpts[2:]:
        shutil.rmtree(crashed / "checkpoints" / p.name)
    resumed = daskdl.fit(client, "mlp", train, val=val, out=crashed, resume=crashed, **opts)
    torch.testing.assert_close(_params(resumed.model), _params(full.model), rtol=0, atol=0)
    pd.testing.assert_frame_equal(
        resumed.history.drop(columns=["samples_per_s", "epoch_time"]),
        full.history.drop(columns=["samples_per_s", "epoch_time"]),
    )
    assert (crashed / "metrics.csv").exists()


def test_a_dead_peer_becomes_an_error_not_a_hang(fresh_client):
    X, y = blobs(n=2000)
    ds = Dataset.from_numpy(X, y, chunks=500)
    run = daskdl.fit(
        fresh_client,
        "mlp",
        ds,
        epochs=500,
        batch_size=8,
        comm_timeout=5,
        max_failures=0,  # no regrouping: a lost worker is an error at once
        progress=False,
        block=False,
    )
    poll_for(lambda: len(run.history) >= 1, timeout=60)
    victim = run.workers[1]
    pid = fresh_client.run(os.getpid, workers=[victim])[victim]
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(daskdl.RunError, match="rank 1|left the cluster|rank 0") as info:
        run.wait(timeout=60)
    assert run.status == "failed"
    assert victim in str(info.value) or "rank 1" in str(info.value)


def test_bf16_adamw_onecycle(client):
    X, y = blobs()
    train, val = Dataset.from_numpy(X, y, chunks=150).split(0.25, seed=0)
    run = daskdl.fit(
        client,
        "mlp",
        train,
        val=val,
        precision="bf16",
        optimizer="adamw",
        lr=0.01,
        schedule="onecycle",
        epochs=3,
        batch_size=16,
        progress=False,
    )
    assert run.history["val_accuracy"].iloc[-1] >= 0.9


def test_bf16_gradients_on_the_wire(client):
    X, y = blobs()
    train, val = Dataset.from_numpy(X, y, chunks=150).split(0.25, seed=0)
    run = daskdl.fit(client, "mlp", train, val=val, wire_dtype="bf16", **QUICK)
    assert run.history["val_accuracy"].iloc[-1] >= 0.9


def test_images_with_augmentation_and_batch_norm(client):
    data = daskdl.datasets.synthetic_images(256, (3, 16, 16), n_classes=4, seed=0, noise=0.5)
    train, val = data.split(0.25, seed=0)
    run = daskdl.fit(
        client,
        "vgg11",
        train,
        val=val,
        augment=True,
        epochs=3,
        batch_size=8,
        lr=0.05,
        progress=False,
    )
    assert run.history["val_accuracy"].iloc[-1] > 0.5  # 4 classes: chance is 0.25
    # Batch-norm statistics were averaged and travel with the model.
    bn = next(m for m in run.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert bn.num_batches_tracked > 0 and not torch.all(bn.running_mean == 0)


def test_local_cluster_listens_on_loopback_only(client):
    assert client.dashboard_link.startswith("http://127.0.0.1:")
    assert client.scheduler.address.startswith("tcp://127.0.0.1:")
    assert all(w.startswith("tcp://127.0.0.1:") for w in workers_info(client))


def test_partitions_never_pass_through_the_client(client, monkeypatch):
    from distributed import Client
    from distributed.utils_comm import unpack_remotedata

    gathered = []
    original = Client._gather

    async def spy(self, futures, *args, **kwargs):
        gathered.extend(f.key for f in unpack_remotedata(futures, byte_keys=True)[1])
        return await original(self, futures, *args, **kwargs)

    monkeypatch.setattr(Client, "_gather", spy)
    X, y = blobs(n=400)
    ds = Dataset.from_numpy(X, y, chunks=100)
    run = daskdl.fit(client, "mlp", ds, val=ds, **QUICK)
    assert run.status == "finished"
    names = {ds.X.name, ds.y.name}
    data_keys = [k for k in gathered if isinstance(k, tuple) and k[0] in names]
    assert gathered and not data_keys
    assert any(str(k).startswith("daskdl-rank-0") for k in gathered)  # the spy saw the result


def test_dropna_then_train(client):
    X, y = blobs(n=400)
    X[::7, 2] = np.nan
    ds = Dataset.from_numpy(X, y, chunks=100).dropna()
    train, val = ds.split(0.25, seed=0)
    run = daskdl.fit(client, "mlp", train, val=val, **QUICK)
    assert run.history["val_accuracy"].iloc[-1] >= 0.9


def test_validation_with_fewer_partitions_than_ranks(client):
    X, y = blobs(n=500)
    train = Dataset.from_numpy(X[:400], y[:400], chunks=100)
    val = Dataset.from_numpy(X[400:], y[400:], chunks=100)  # one partition, two ranks
    run = daskdl.fit(client, "mlp", train, val=val, comm_timeout=20, **QUICK)
    assert run.evaluate(val)["accuracy"] == pytest.approx(run.history["val_accuracy"].iloc[-1])


def test_torch_backend_matches_the_dask_backend(client):
    X, y = blobs(n=400)
    train, val = Dataset.from_numpy(X, y, chunks=100).split(0.25, seed=0)
    # The torch run also reduces several buckets on its communication thread.
    runs = {
        backend: daskdl.fit(
            client, "mlp", train, val=val, backend=backend, bucket_mb=mb, seed=2, **QUICK
        )
        for backend, mb in (("dask", 25), ("torch", 0.001))
    }
    torch.testing.assert_close(
        _params(runs["torch"].model), _params(runs["dask"].model), rtol=1e-5, atol=1e-6
    )
    assert runs["torch"].history["val_accuracy"].iloc[-1] >= 0.9
    # The published rendezvous address is gone with the run.
    variables = client.run_on_scheduler(
        lambda dask_scheduler: list(dask_scheduler.extensions["variables"].variables)
    )
    assert not any(name.startswith("daskdl-torch-") for name in variables)


class _Cube(torch.nn.Module):
    """x ** 3: a feature of 1e20 overflows float32 to infinity, and the loss becomes NaN."""

    def forward(self, x):
        return x * x * x


def _poisoned(n=400):
    X, y = blobs(n=n)
    X = X / np.abs(X).max()  # cubes stay small...
    X[250, 0] = 1e20  # ...except one sample's, in the third of four partitions
    return Dataset.from_numpy(X, y, chunks=100)


def _cube_mlp(input_shape, n_classes):
    return torch.nn.Sequential(_Cube(), daskdl.models.mlp(input_shape, n_classes))


# (1, 0.001): gradient buckets, each checked on its rank before it is reduced.
@pytest.mark.parametrize("sync_every, bucket_mb", [(1, 25), (1, 0.001), (2, 25)])
def test_a_nonfinite_step_is_skipped_on_every_rank(client, sync_every, bucket_mb):
    run = daskdl.fit(
        client,
        _cube_mlp,
        _poisoned(),
        epochs=3,
        batch_size=10,
        shuffle=False,
        on_nonfinite="skip",
        sync_every=sync_every,
        bucket_mb=bucket_mb,
        progress=False,
    )
    assert torch.isfinite(_params(run.model)).all()
    log = [e for e in events.replay(client, run.run_id) if e["kind"] == "nonfinite"]
    # Sample 250 (partition 2, offset 50) is in batch 6 or 16 of its rank's 20, depending on
    # where the shard plan put partition 2: the same batch every epoch, on one rank.
    assert [e["epoch"] for e in log] == [1, 2, 3]
    batch = log[0]["batch"]
    assert batch in (6, 16) and all(e["batch"] == batch for e in log)
    assert [e["step"] for e in log] == [batch, 20 + batch, 40 + batch]
    assert all(len(e["ranks"]) == 1 and e["rank"] == e["ranks"][0] for e in log)
    assert list(run.history["skipped_steps"]) == [1, 1, 1]
    assert np.isfinite(run.history["train_loss"]).all()


def test_a_nonfinite_step_raises_naming_rank_step_and_batch(client):
    with pytest.raises(
        daskdl.RunError,
        match=r"Non-finite loss or gradient on rank\(s\) \[\d\] at step (6|16) \(epoch 1, "
        r"batch \1 ",
    ):
        daskdl.fit(
            client, _cube_mlp, _poisoned(), epochs=2, batch_size=10, shuffle=False, progress=False
        )


def _skips_on_the_device_as_on_the_host(client, **opts) -> list[tuple]:
    """The run with a fused optimizer (which skips a non-finite step on the device, its flag
    read at each log) and without (the flag read every step) must skip and report the same
    steps; their ``nonfinite`` events as (epoch, batch, step, rank, ranks)."""
    runs = {
        fused: daskdl.fit(client, _cube_mlp, _poisoned(), on_nonfinite="skip", fused=fused, **opts)
        for fused in (True, False)
    }
    torch.testing.assert_close(_params(runs[True].model), _params(runs[False].model))
    logs = {
        fused: [
            (e["epoch"], e["batch"], e["step"], e["rank"], list(e["ranks"]))
            for e in events.replay(client, run.run_id)
            if e["kind"] == "nonfinite"
        ]
        for fused, run in runs.items()
    }
    assert logs[True] == logs[False]
    for run in runs.values():
        assert list(run.history["skipped_steps"]) == [1, 1, 1]
        assert np.isfinite(run.history["train_loss"]).all()
    return logs[True]


def test_one_fused_rank_skips_nonfinite_steps_on_the_device(client):
    # A lone rank decides alone whether to skip: on a GPU, reading its flag every step would
    # make the host wait for every step.
    opts = dict(epochs=3, batch_size=10, shuffle=False, workers=1, progress=False)
    # 40 batches per epoch on one rank; sample 250 is in batch 26.
    assert _skips_on_the_device_as_on_the_host(client, **opts) == [
        (1, 26, 26, 0, [0]),
        (2, 26, 66, 0, [0]),
        (3, 26, 106, 0, [0]),
    ]
    with pytest.raises(daskdl.RunError, match=r"rank\(s\) \[0\] at step 26 \(epoch 1, batch 26 "):
        daskdl.fit(client, _cube_mlp, _poisoned(), fused=True, **opts)


def test_local_sgd_ranks_with_a_fused_optimizer_skip_nonfinite_steps_on_the_device(client):
    # So do local SGD ranks between synchronisations: the skip is the seeing rank's own.
    opts = dict(epochs=3, batch_size=10, shuffle=False, sync_every=4, progress=False)
    log = _skips_on_the_device_as_on_the_host(client, **opts)
    (_, batch, _, rank, _), *_ = log
    assert batch in (6, 16)  # sample 250's batch of 20, as in the per-step test above
    assert log == [(e, batch, 20 * (e - 1) + batch, rank, [rank]) for e in (1, 2, 3)]
    with pytest.raises(daskdl.RunError, match=rf"rank\(s\) \[{rank}\] at step {batch} \("):
        daskdl.fit(client, _cube_mlp, _poisoned(), fused=True, **opts)


def test_fused_is_checked():
    with pytest.raises(ValueError, match="fused must be True, False or None"):
        daskdl.config.TrainConfig(fused="yes")


def test_persisted_train_and_a_val_set_standardised_like_it(fresh_client, digits_split):
    # Persisting the training set, then fitting with a validation set that shares its
    # statistics, must not resubmit shared keys with other tasks (Dask warns of deadlocks).
    train, test = daskdl.datasets.train_test("digits")
    train = train.persist(fresh_client)
    run = daskdl.fit(fresh_client, "mlp", train, val=test, epochs=1, progress=False)
    assert run.status == "finished"
    logs = "\n".join(msg for _, msg in fresh_client.get_scheduler_logs(n=1000))
    assert "Detected different `run_spec`" not in logs


_ORPHAN_CLIENT = """
import sys
from distributed import Client
import daskdl

client = Client(sys.argv[1])
train, test = daskdl.datasets.train_test("digits")
run = daskdl.fit(client, "mlp", train, val=test, epochs=10_000, batch_size=8, block=False,
                 progress=False)
print(run.run_id, flush=True)
import time
time.sleep(600)
"""


def _wide_mlp(input_shape, n_classes):
    # 3.1M parameters: with momentum 25 MB of state, over Dask's large-graph warning (10 MB).
    features = int(np.prod(input_shape))
    return torch.nn.Sequential(
        torch.nn.Linear(features, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, n_classes)
    )


def test_a_resumed_run_sends_its_state_once_not_inside_every_ranks_task(client, tmp_path):
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(128, 3072)).astype(np.float32), rng.integers(0, 3, 128)
    data = Dataset.from_numpy(X, y, chunks=32)
    opts = dict(batch_size=16, progress=False)
    daskdl.fit(client, _wide_mlp, data, epochs=1, out=tmp_path, **opts)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = daskdl.fit(client, _wide_mlp, data, epochs=2, out=tmp_path, resume=tmp_path, **opts)
    assert run.history["epoch"].tolist() == [1, 2]
    assert not [str(w.message) for w in caught if "large graph" in str(w.message)]


def test_ranks_stop_when_their_client_dies(fresh_client, tmp_path):
    import signal
    import subprocess
    import sys

    script = tmp_path / "client.py"
    script.write_text(_ORPHAN_CLIENT)
    proc = subprocess.Popen(
        [sys.executable, str(script), fresh_client.scheduler.address],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        run_id = proc.stdout.readline().strip()
        poll_for(lambda: any(e["kind"] == "epoch" for e in events.replay(fresh_client, run_id)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        start = time.monotonic()

        poll_for(lambda: ranks_gone(fresh_client), timeout=60, interval=0.5)
        assert time.monotonic() - start < 30
    finally:
        proc.kill()
    # The cluster is clean (no mailbox left behind) and trains the next run.
    boxes = fresh_client.run(
        lambda dask_worker: len(daskdl.worker.extension.manager(dask_worker).runs)
    )
    assert not any(boxes.values())
    train, test = daskdl.datasets.train_test("digits")
    assert daskdl.fit(fresh_client, "mlp", train, epochs=1, progress=False).status == "finished"


def test_a_run_sees_every_worker_while_the_clients_cached_view_is_refreshed(client):
    # Runs look for lost workers every second. The client's scheduler_info() returns its cached
    # view, which the client's own refresh replaces with one holding no workers, and it did so
    # between fetch and read in this suite: a healthy run failed, "every worker is gone". Here
    # that refresh runs every 5 ms; the workers a run sees must never go missing.
    with dask.config.set({"distributed.client.scheduler-info-interval": "5ms"}):
        with Client(client.scheduler.address) as busy:
            expected = set(workers_info(client))
            seen = [set(workers_info(busy)) for _ in range(500)]
    assert len(expected) == 2 and all(s == expected for s in seen)


def _elastic_run(client, **options):
    train, test = daskdl.datasets.train_test("digits")
    return daskdl.fit(
        client,
        "small_cnn",
        train,
        val=test,
        epochs=8,
        batch_size=16,
        seed=0,
        progress=False,
        **options,
    )


def test_training_goes_on_when_a_worker_is_killed_mid_epoch(three_workers):
    undisturbed = _elastic_run(three_workers)
    tracker = Recording()
    run = _elastic_run(three_workers, block=False, loggers=[tracker])
    # Mid-epoch: after the first epoch, once rank 2 has reported steps of the second.
    victim = kill_mid_epoch(three_workers, run)
    run.wait(timeout=120)
    assert run.status == "finished" and run.lost == [victim]
    assert list(run.history["epoch"]) == list(range(1, 9))
    # The same tracker run goes on: its steps never go back, each epoch is logged once.
    steps = [s for s, _ in tracker.metrics]
    assert steps == sorted(steps) and tracker.status == "finished" and len(tracker.params) == 1
    epochs = [m["epoch/epoch"] for _, m in tracker.metrics if "epoch/epoch" in m]
    assert epochs == list(range(1, 9))
    assert victim not in run.workers
    log = events.replay(three_workers, run.run_id)
    # The loss; then (perhaps) the worker its nanny restarted, joining at an epoch's end.
    change, *rejoined = [e for e in log if e["kind"] == "membership"]
    assert list(change["lost"]) == [victim] and change["world_size"] == 2
    assert all(len(e["joined"]) == 1 and not e["lost"] for e in rejoined)
    assert change["epoch"] in (2, 3)  # the kill lands in epoch 2; it may be over by the abort
    # Within a point of the undisturbed run with the same seed.
    final = run.history["val_accuracy"].iloc[-1]
    assert abs(final - undisturbed.history["val_accuracy"].iloc[-1]) <= 0.01, (
        final,
        undisturbed.history,
    )


def test_training_goes_on_when_a_worker_is_retired(three_workers):
    run = _elastic_run(three_workers, comm_timeout=20, block=False)
    poll_for(lambda: len(run.history) >= 2, timeout=60)
    victim = run.workers[1]
    three_workers.retire_workers([victim], close_workers=True)
    run.wait(timeout=120)
    assert run.status == "finished" and run.lost == [victim]
    assert run.history["val_accuracy"].iloc[-1] >= 0.95


def test_more_failures_than_allowed_end_the_run_naming_the_workers(three_workers):
    run = _elastic_run(three_workers, max_failures=1, block=False)
    poll_for(lambda: len(run.history) >= 1, timeout=60)
    victims = run.workers[1:]
    pids = three_workers.run(os.getpid, workers=victims)
    for victim in victims:
        os.kill(pids[victim], signal.SIGKILL)
    with pytest.raises(daskdl.RunError, match=r"left the cluster.*max_failures=1") as info:
        run.wait(timeout=120)
    assert any(v in str(info.value) for v in victims)
    assert run.status == "failed"


def test_a_worker_that_joins_gets_a_rank_at_the_next_epoch(fresh_client):
    train, test = daskdl.datasets.train_test("digits")
    run = daskdl.fit(
        fresh_client,
        "small_cnn",
        train,
        val=test,
        epochs=10,
        batch_size=8,
        seed=0,
        progress=False,
        block=False,
    )
    poll_for(lambda: len(run.history) >= 1, timeout=60)
    fresh_client.cluster.scale(3)
    run.wait(timeout=180)
    assert run.status == "finished" and len(run.workers) == 3 and run.lost == []
    [change] = [e for e in events.replay(fresh_client, run.run_id) if e["kind"] == "membership"]
    assert len(change["joined"]) == 1 and change["world_size"] == 3
    assert change["step_in_epoch"] == 0  # at an epoch boundary
    assert list(run.history["epoch"]) == list(range(1, 11))
    assert run.history["val_accuracy"].iloc[-1] >= 0.95


def _housekeeping_intervals(dask_worker=None, dask_scheduler=None) -> tuple[float, float]:
    """A Dask server's event-loop tick and system monitor intervals, in ms."""
    dask_server = dask_worker or dask_scheduler
    return (
        dask_server.periodic_callbacks["tick"].callback_time,
        dask_server.periodic_callbacks["monitor"].callback_time,
    )


@pytest.mark.integration
@pytest.mark.parametrize("quiet, expected", [(True, (200, 2000)), (False, (20, 500))])
def test_local_cluster_quiets_dask_housekeeping(quiet, expected):
    with dask.config.set({"daskdl.quiet-housekeeping": quiet}):
        with daskdl.local_cluster(n_workers=1, threads_per_worker=1) as c:
            on_workers = c.run(_housekeeping_intervals)
            on_scheduler = c.run_on_scheduler(_housekeeping_intervals)
    assert list(on_workers.values()) == [expected]
    assert on_scheduler == expected
