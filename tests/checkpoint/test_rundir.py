"""A run's folder belongs to one run: another run is refused there (the first one's files stay
as they were), ``overwrite=True`` replaces it only once it has a checkpoint, and ``resume=``
checks that the checkpoint fits what is asked before any rank starts."""

from __future__ import annotations

import json
import subprocess
import sys

import cloudpickle
import numpy as np
import pytest
from torch import nn

import daskdl
from daskdl import Dataset
from daskdl.checkpoint import files as checkpoint

# Every test here starts processes (clusters, the CLI, a build): the slow tier.
pytestmark = pytest.mark.integration

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests

X = np.random.default_rng(0).normal(size=(200, 4)).astype(np.float32)
y = np.arange(200) % 3
data = Dataset.from_numpy(X, y, chunks=50)
QUICK = dict(batch_size=16, progress=False)


def _files(folder):
    """Every file under ``folder`` with its bytes."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def first_run(client, tmp_path):
    out = tmp_path / "r"
    daskdl.fit(client, "mlp", data, epochs=3, out=out, **QUICK)
    return out


def test_another_run_is_refused_and_the_first_one_stays_intact(
    client, first_run, no_rank_may_start
):
    before = _files(first_run)
    assert {p.name for p in checkpoint.list_checkpoints(first_run / "checkpoints")} == {
        "epoch-0001",
        "epoch-0002",
        "epoch-0003",
    }
    with pytest.raises(FileExistsError) as e:
        daskdl.fit(client, "mlp", data, epochs=1, out=first_run, seed=1, **QUICK)
    message = str(e.value)
    assert "already holds another run (config.json, metrics.csv, checkpoints" in message
    assert f"resume='{first_run}'" in message and "overwrite=True" in message
    assert _files(first_run) == before


def test_resuming_an_older_checkpoint_into_the_same_folder_is_refused(client, first_run):
    older = first_run / "checkpoints" / "epoch-0001"
    with pytest.raises(FileExistsError, match="is not the newest checkpoint.*epoch-0003 is"):
        daskdl.fit(client, "mlp", data, epochs=4, out=first_run, resume=older, **QUICK)
    # Into a folder of its own it is a new branch, and fine.
    run = daskdl.fit(
        client, "mlp", data, epochs=2, out=first_run.parent / "b", resume=older, **QUICK
    )
    assert list(run.history["epoch"]) == [1, 2]


def test_resume_true_continues_the_run_in_out(client, first_run):
    run = daskdl.fit(client, "mlp", data, epochs=4, out=first_run, resume=True, **QUICK)
    assert list(run.history["epoch"]) == [1, 2, 3, 4]
    assert json.loads((first_run / "config.json").read_text())["start_epoch"] == 3


def test_overwrite_replaces_the_run_once_the_new_one_has_a_checkpoint(client, first_run):
    old_id = json.loads((first_run / "config.json").read_text())["run"]
    run = daskdl.fit(client, "mlp", data, epochs=1, out=first_run, overwrite=True, **QUICK)
    assert run.status == "finished"
    names = [p.name for p in checkpoint.list_checkpoints(first_run / "checkpoints")]
    assert names == ["epoch-0001"]  # the first run's epochs 2 and 3 are gone with it
    config = json.loads((first_run / "config.json").read_text())
    assert config["run"] == run.run_id != old_id
    assert len((first_run / "metrics.csv").read_text().splitlines()) == 2
    assert sorted(p.name for p in first_run.parent.iterdir()) == ["r"]  # no staging left
    assert checkpoint.read_manifest(first_run / "checkpoints" / "epoch-0001")["run"] == run.run_id


class _FailsOnWorkers(nn.Module):
    """Trains on the client's dry run, then fails in every rank's first step."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        from distributed import get_worker

        try:
            get_worker()
        except ValueError:  # not on a worker: the dry run
            return self.fc(x)
        raise RuntimeError("a rank's step failed")


def test_a_replacing_run_that_fails_first_leaves_the_earlier_run(client, first_run):
    before = _files(first_run)
    with pytest.raises(daskdl.RunError, match="a rank's step failed"):
        daskdl.fit(client, _FailsOnWorkers, data, epochs=1, out=first_run, overwrite=True, **QUICK)
    assert _files(first_run) == before
    assert sorted(p.name for p in first_run.parent.iterdir()) == ["r"]


def _another_mlp(input_shape, n_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 7), nn.ReLU(), nn.Linear(7, n_classes))


@pytest.mark.parametrize(
    "model, train, kwargs, message",
    [
        (
            _another_mlp,
            data,
            {},
            r"it has 5\.bias, 5\.weight, which the model lacks; tensor shapes differ \(checkpoint "
            r"vs model\): 1\.weight \(128, 4\) vs \(7, 4\)",
        ),
        (
            "mlp",
            Dataset.from_numpy(X, np.arange(200) % 4, chunks=50),
            {},
            r"5\.bias \(3,\) vs \(4,\); it has 3 classes, the data 4",
        ),
        (
            "mlp",
            Dataset.from_numpy(np.hstack([X, X]), y, chunks=50),
            {},
            r"samples were \(4,\), now \(8,\)",
        ),
        ("mlp", data, {"optimizer": "adamw"}, "optimizer was 'sgd', now 'adamw'"),
    ],
    ids=["model", "classes", "input-shape", "optimizer"],
)
def test_resume_checks_the_checkpoint_fits_before_any_rank(
    client, first_run, no_rank_may_start, model, train, kwargs, message
):
    with pytest.raises(ValueError, match=message) as e:
        daskdl.fit(
            client, model, train, epochs=5, out=first_run, resume=first_run, **kwargs, **QUICK
        )
    assert "does not fit this run (mlp before)" in str(e.value)


def test_the_cli_refuses_a_second_run_in_out_in_one_line(tmp_path):
    out = tmp_path / "cli"
    (out / "checkpoints" / "epoch-0001").mkdir(parents=True)
    (out / "config.json").write_text("{}")
    done = subprocess.run(
        [sys.executable, "-m", "daskdl", "train", "--out", str(out), "--workers", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("daskdl: error: out=") and "--overwrite" in lines[-1]
    assert "Traceback" not in done.stderr
