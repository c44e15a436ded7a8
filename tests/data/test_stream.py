"""Streamed data sets: ranks compute their partitions on their own workers as they train."""

from __future__ import annotations

import os
import shutil

import dask
import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
from conftest import kill_mid_epoch, poll_for
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.datasets import load_digits

import daskdl
from daskdl import Dataset, events
from daskdl.checkpoint import files as checkpoint
from daskdl.data import streaming
from daskdl.rank.loader import StreamLoader, _Pool, epoch_order, stream_plan


class ListReader:
    """A PartitionReader over arrays already in memory, counting what it reads."""

    y_dtype = np.dtype(np.int64)

    def __init__(self, parts):
        self.parts, self.reads = parts, 0
        self.shard = streaming.Shard([], [len(y) for _, y in parts], (3,), ())

    def stream(self, order):
        for i in order:
            self.reads += 1
            yield self.parts[i]


def _loader(reader, shuffle=True, buffer=25, batch=16, steps=10):
    return StreamLoader(reader, batch, steps, 0, 0, shuffle, buffer, False, "cpu", False)


@pytest.fixture
def numbered():
    """Four partitions whose samples carry their own index, in features and target."""
    sizes, parts, first = [30, 50, 20, 60], [], 0
    for n in sizes:
        ids = np.arange(first, first + n)
        parts.append((np.repeat(ids[:, None], 3, axis=1).astype(np.float32), ids))
        first += n
    return sizes, parts


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("buffer", [0, 25, 1000])
def test_an_epoch_streams_every_sample_once_and_resumes_anywhere(numbered, shuffle, buffer):
    _, parts = numbered
    loader = _loader(ListReader(parts), shuffle, buffer)  # 10 x 16 = the 160 samples
    batches = [(xb, yb) for xb, yb in loader.epoch(1)]
    seen = torch.cat([yb for _, yb in batches]).numpy()
    assert sorted(seen) == list(range(160))
    assert all((xb[:, 0].long() == yb).all() for xb, yb in batches)  # rows stay whole
    if shuffle:
        assert list(seen) != sorted(seen)
        again = torch.cat([yb for _, yb in loader.epoch(2)]).numpy()
        assert list(again) != list(seen)  # reshuffled every epoch
    else:
        assert list(seen) == list(range(160))
    for start in (1, 4, 9):
        reader = ListReader(parts)
        resumed = [yb for _, yb in _loader(reader, shuffle, buffer).epoch(1, start)]
        assert len(resumed) == 10 - start
        assert all((a == b).all() for (_, a), b in zip(batches[start:], resumed))
        assert reader.reads <= 4  # only the partitions whose samples are still to come


def test_a_small_shard_wraps_around_and_the_pool_stays_bounded():
    plan = stream_plan([10, 10], steps=8, batch=4, buffer=6, seed=0, epoch=0, rank=0, shuffle=True)
    inserted = [p for ins, _ in plan for p in ins]
    assert sorted(inserted[:2]) == [0, 1] and len(inserted) >= 3  # a second pass for 32 > 20
    held = 0
    for ins, draws in plan:
        held += sum(10 for _ in ins)
        assert held <= 6 + 4 + 10 and len(draws) == 4 and draws.max() < held
        held -= 4


def test_the_issue_shape_draws_every_sample():
    # 600 samples, 19 steps of 32, a pool larger than the shard: the last batch takes the 24
    # samples the pass has left before 8 of the next pass (23 went undrawn before).
    plan = stream_plan([600], 19, 32, 4096, 0, 0, 0, True)
    seen = _drawn([600], plan, 32)
    assert set(seen) == set(range(600)) and len(seen) == 608


def _drawn(sizes, plan, batch):
    """The sample ids a plan draws, in order, replayed on a pool of ids."""
    offsets = np.cumsum([0, *sizes])
    pool = _Pool([np.empty(sum(sizes) + 4096 + batch, np.int64)])
    out = []
    for inserts, draws in plan:
        for p in inserts:
            pool.insert([np.arange(offsets[p], offsets[p + 1])])
        out.extend(pool.take(draws, batch)[0])
    return out


def _id_parts(sizes):
    first, parts = 0, []
    for n in sizes:
        ids = np.arange(first, first + n)
        parts.append((np.repeat(ids[:, None], 3, axis=1).astype(np.float32), ids))
        first += n
    return parts


@settings(max_examples=150, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 90), min_size=1, max_size=8).filter(lambda s: sum(s) > 0),
    batch=st.integers(1, 40),
    buffer=st.sampled_from([0, 1, 7, 32, 100, 4096]),
    extra_steps=st.integers(0, 6),  # a smaller shard than the largest: it wraps around
    shuffle=st.booleans(),
    seed=st.integers(0, 3),
)
@pytest.mark.integration
def test_a_streamed_epoch_draws_every_sample_as_often_as_in_memory(
    sizes, batch, buffer, extra_steps, shuffle, seed
):
    """Property: over an epoch of ``steps`` batches a streamed shard of n samples draws each
    sample k or k + 1 times, k = steps * batch // n, as :func:`epoch_order` does in memory
    (and exactly once where the shard is the largest, steps = ceil(n / batch))."""
    n = sum(sizes)
    steps = -(-n // batch) + extra_steps
    parts = _id_parts(sizes)
    reader = ListReader(parts)
    reader.shard = streaming.Shard([], sizes, (3,), ())
    loader = StreamLoader(reader, batch, steps, seed, 0, shuffle, buffer, False, "cpu", False)
    seen = np.concatenate([yb.numpy() for _, yb in loader.epoch(seed)])
    counts = np.bincount(seen, minlength=n)
    k = steps * batch // n
    assert len(seen) == steps * batch
    assert counts.min() >= max(k, 1) and counts.max() <= k + 1, (counts.min(), counts.max(), k)
    memory = np.bincount(epoch_order(n, steps, batch, seed, 0, 0, shuffle), minlength=n)
    assert sorted(counts) == sorted(memory)
    start = steps // 2  # a resumed epoch replays the same batches from the middle
    again = [yb.numpy() for _, yb in loader.epoch(seed, start)]
    assert np.array_equal(np.concatenate(again or [np.empty(0, int)]), seen[start * batch :])


def _digits_files(tmp_path):
    if (tmp_path / "digits.zarr").exists():
        return tmp_path / "digits.parquet", tmp_path / "digits.zarr"
    tmp_path.mkdir(parents=True, exist_ok=True)
    X, y = load_digits(return_X_y=True)
    frame = pd.DataFrame(X.astype(np.float32), columns=[f"p{i}" for i in range(64)])
    frame["label"] = y
    dd.from_pandas(frame, npartitions=8).to_parquet(tmp_path / "digits.parquet", write_index=False)
    images = xr.Dataset(
        {"image": (("sample", "c", "h", "w"), X.reshape(-1, 1, 8, 8).astype(np.float32)),
         "label": (("sample",), y)}
    ).chunk({"sample": 225})  # fmt: skip
    images.to_zarr(tmp_path / "digits.zarr")
    return tmp_path / "digits.parquet", tmp_path / "digits.zarr"


@pytest.mark.parametrize("fmt", ["parquet", "zarr"])
def test_a_streamed_run_trains_like_the_in_memory_run(client, tmp_path, fmt):
    path = dict(zip(["parquet", "zarr"], _digits_files(tmp_path)))[fmt]
    data = daskdl.data.sources.read(path, label="label")
    train, val = data.split(0.2, seed=0)
    train, val = train.standardize(), val.standardize(like=train)
    model = "mlp" if fmt == "parquet" else "small_cnn"
    opts = dict(epochs=6, batch_size=32, progress=False, seed=0)
    held = daskdl.fit(client, model, train, val=val, stream=False, **opts)
    streamed = daskdl.fit(client, model, train, val=val, stream=True, **opts)
    assert streamed.info["streamed"] == ["train", "val"] and held.info["streamed"] == []
    a, b = (r.history["val_accuracy"].iloc[-1] for r in (held, streamed))
    assert a >= 0.93 and b >= 0.93 and abs(a - b) <= 0.03, (a, b)
    # Every validation sample scored once, on whichever rank streams it.
    scores = streamed.evaluate(val)
    assert abs(scores["accuracy"] - b) < 1e-6


def test_partitions_read_the_shared_statistics_instead_of_recomputing_them(client, tmp_path):
    _, path = _digits_files(tmp_path)
    train = daskdl.data.sources.read(path, label="label").standardize()
    [source] = streaming.sources(client, [train])
    assert source.inputs  # the mean and std, persisted once
    for part in source.partitions:
        assert set(part.inputs) == set(source.inputs)
        # Its own chunk's read and scaling only: no pass over the other partitions.
        assert not [k for k in part.graph if "mean" in str(k) or "var" in str(k)]
    X0, _ = source.head(client, 225)
    np.testing.assert_allclose(X0, train.X[:225].compute(), rtol=1e-6, atol=1e-6)


def _linear(input_shape, n_outputs):
    n_inputs = int(np.prod(input_shape))
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(n_inputs, n_outputs))


def _peak_rss(dask_worker=None) -> int:
    """This process's peak RSS since it started its program (``VmHWM``; ``ru_maxrss`` also
    counts the forked parent it was before ``exec``: this test process)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


@pytest.mark.integration
def test_a_streamed_rank_holds_a_few_partitions_of_data_three_times_its_memory(tmp_path):
    limit, part = 1_000_000_000, 1000  # bytes per worker; samples per partition (12 MB)
    n = 3 * limit // (3072 * 4)
    X = da.random.default_rng(0).standard_normal((n, 3072), chunks=(part, 3072), dtype=np.float32)
    X.to_zarr(str(tmp_path / "X.zarr"))
    (X[:, 0] > 0).astype(np.int64).to_zarr(str(tmp_path / "y.zarr"))
    data = Dataset.from_dask(*(da.from_zarr(str(tmp_path / f"{v}.zarr")) for v in "Xy"))
    with daskdl.local_cluster(n_workers=2, threads_per_worker=1, memory_limit=limit) as client:
        client.run(lambda: __import__("daskdl.rank.context"))  # torch loaded: the baseline
        before = client.run(_peak_rss)
        run = daskdl.fit(
            client, _linear, data, epochs=1, batch_size=512, lr=0.01, progress=False,
            prefetch=2, shuffle_buffer=2048,
        )  # fmt: skip
        after = client.run(_peak_rss)
        assert run.info["streamed"] == ["train"]  # decided by size: 3 GB against 2 x 1 GB
        assert run.history["train_loss"].notna().all()
        # The pool (buffer + batch + a partition), the partitions in flight, and room for
        # the model, the allocator's slack and Dask (measured: about 150 MB of it): far
        # below the shard (1.5 GB per rank).
        sample = 3072 * 4
        bound = (2048 + 512 + part) * sample + (2 + 2) * part * sample + 250 * 2**20
        grown = {w: after[w] - before[w] for w in after}
        assert all(g < bound for g in grown.values()), (grown, bound)
        assert all(a < limit for a in after.values())


def _digits_zarr_run(client, tmp_path, **options):
    _, path = _digits_files(tmp_path)
    train, val = daskdl.data.sources.read(path, label="label").split(0.2, seed=0)
    options = {"epochs": 6, "batch_size": 16, "seed": 0, "progress": False, **options}
    return daskdl.fit(client, "mlp", train, val=val, stream=True, **options)


def test_a_streamed_run_resumes_where_it_stopped(client, tmp_path):
    with dask.config.set({"daskdl.keep-checkpoints": None}):
        full = _digits_zarr_run(client, tmp_path / "a", out=tmp_path / "full", epochs=4)
    # A run that crashed after epoch 2: only its first two checkpoints exist.
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "full", crashed)
    for p in checkpoint.list_checkpoints(crashed / "checkpoints")[2:]:
        shutil.rmtree(p)
    resumed = _digits_zarr_run(client, tmp_path / "a", out=crashed, resume=crashed, epochs=4)
    assert resumed.info["start_epoch"] == 2
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert resumed.history["epoch"].tolist() == [1, 2, 3, 4]


def test_a_worker_killed_mid_stream_costs_only_its_partitions(three_workers, tmp_path):
    run = _digits_zarr_run(three_workers, tmp_path, epochs=5, block=False)
    victim = kill_mid_epoch(three_workers, run)
    run.wait(timeout=180)
    change = next(e for e in events.replay(three_workers, run.run_id) if e["kind"] == "membership")
    assert list(change["lost"]) == [victim] and change["world_size"] == 2
    assert run.history["epoch"].tolist() == [1, 2, 3, 4, 5]
    assert run.history["val_accuracy"].iloc[-1] >= 0.9


def test_a_streamed_shard_is_never_held_and_a_lost_file_names_its_partition(client, tmp_path):
    parquet, _ = _digits_files(tmp_path)
    data = daskdl.data.sources.read(parquet, label="label")

    def holds_the_shard(ctx):
        return ctx.shard("train")

    with pytest.raises(daskdl.RunError, match=r"'train' is streamed, so this rank never holds"):
        daskdl.launch(client, holds_the_shard, {"train": data}, stream=True, progress=False)
    run = daskdl.fit(
        client, "mlp", data, epochs=50, batch_size=16, stream=True, progress=False, block=False
    )
    poll_for(lambda: len(run.history) >= 1, timeout=60)
    os.remove(sorted(parquet.glob("*.parquet"))[3])
    with pytest.raises(daskdl.RunError, match=r"Could not compute partition \d+ of this rank's"):
        run.wait(timeout=120)


@pytest.mark.parametrize("option", [{"prefetch": -1}, {"shuffle_buffer": -5}, {"stream": "yes"}])
def test_streaming_options_are_checked_at_once(client, option, no_rank_may_start):
    train = daskdl.datasets.digits()
    with pytest.raises((ValueError, TypeError), match=next(iter(option))):
        daskdl.fit(client, "mlp", train, progress=False, **option)


def test_a_persisted_data_set_streams_as_it_trains_in_memory(client):
    X, y = load_digits(return_X_y=True)
    ds = Dataset.from_numpy(X.astype(np.float32), y, chunks=300).standardize().persist(client)
    streamed = daskdl.fit(client, "mlp", ds, epochs=2, seed=0, stream=True, progress=False)
    held = daskdl.fit(client, "mlp", ds, epochs=2, seed=0, stream=False, progress=False)
    assert streamed.info["streamed"] == ["train"] and held.info["streamed"] == []
    assert streamed.history["train_loss"].iloc[-1] < streamed.history["train_loss"].iloc[0]
    # Every sample once per epoch either way: the same number of steps.
    assert streamed.history["step"].tolist() == held.history["step"].tolist()


def test_a_partition_whose_file_changed_during_the_run_is_named(client, tmp_path):
    """A streamed partition is read by the count made when the run started."""
    path = tmp_path / "parts"
    path.mkdir()
    for i in range(2):
        frame = pd.DataFrame({"a": np.arange(50.0) + 50 * i, "label": np.arange(50) % 2})
        frame.to_parquet(path / f"part.{i}.parquet")
    ds = daskdl.data.sources.read(path, label="label")
    [source] = streaming.sources(client, [ds])
    source.sizes = [50, 50]  # as the run counted them
    pd.DataFrame({"a": np.arange(40.0), "label": np.arange(40) % 2}).to_parquet(
        path / "part.1.parquet"
    )  # rewritten while the run reads
    shard, inputs = source.for_shard([0, 1])
    reader = streaming.PartitionReader("train", shard, inputs, np.dtype(np.int64), 0)
    assert len(reader.read(0)[0]) == 50
    with pytest.raises(RuntimeError, match=r"Partition 1 .* has 40 samples now, 50 when the run"):
        reader.read(1)
