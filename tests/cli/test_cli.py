"""The command line, as a user types it, against local clusters and a cluster started with
``dask scheduler`` / ``dask worker``."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from daskdl.checkpoint import files as checkpoint

# Every test here starts processes (clusters, the CLI, a build): the slow tier.
pytestmark = pytest.mark.integration

DASKDL = [sys.executable, "-m", "daskdl"]


def _run(*args, timeout=300):
    return subprocess.run([*DASKDL, *args], capture_output=True, text=True, timeout=timeout)


def _val_accuracy(stdout: str) -> float:
    last = stdout.strip().splitlines()[-1]
    match = re.search(r"val_accuracy=([0-9.]+)", last)
    assert match, f"no val_accuracy in the last line: {last!r}"
    return float(match.group(1))


def test_train_digits_reaches_097(tmp_path):
    out = tmp_path / "runs" / "digits"
    proc = _run(
        "train",
        "--dataset",
        "digits",
        "--model",
        "small_cnn",
        "--workers",
        "2",
        "--epochs",
        "15",
        "--out",
        str(out),
        "--loggers",
        "tensorboard",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _val_accuracy(proc.stdout) >= 0.97
    assert "345/345" in proc.stderr  # the progress bar reached the end
    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics["epoch"]) == list(range(1, 16))
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    path, _, _, manifest = checkpoint.load_latest(out)
    assert path.name == "epoch-0015" and manifest["epoch"] == 15
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(out / "tensorboard"))
    tb.Reload()
    assert [e.step for e in tb.Scalars("epoch/val_accuracy")] == list(metrics["step"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def dask_cluster(tmp_path):
    """A scheduler and two workers started with the `dask` command, as on a real cluster."""
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    dask = [sys.executable, "-m", "dask"]
    procs = [
        subprocess.Popen(
            [
                *dask,
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--dashboard-address",
                "127.0.0.1:0",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    for _ in range(2):
        procs.append(
            subprocess.Popen(
                [
                    *dask,
                    "worker",
                    address,
                    "--nthreads",
                    "1",
                    "--host",
                    "127.0.0.1",
                    "--no-dashboard",
                    "--local-directory",
                    str(tmp_path),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    try:
        from distributed import Client

        deadline = time.monotonic() + 60
        while True:
            try:
                with Client(address, timeout="5s") as c:
                    c.wait_for_workers(2, timeout=60)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield address
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


def test_train_on_a_dask_scheduler_cluster(dask_cluster, tmp_path):
    out = tmp_path / "run"
    args = f"train --scheduler {dask_cluster} --dataset digits --model mlp --out {out}".split()
    proc = _run(*args, "--epochs", "3", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _val_accuracy(proc.stdout) > 0.8
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    # And it continues from its checkpoint.
    proc = _run(*args, "--epochs", "4", "--resume", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(pd.read_csv(out / "metrics.csv")["epoch"]) == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["train", "--scheduler", "tcp://127.0.0.1:9", "--epochs", "1"],
            "could not reach the scheduler at tcp://127.0.0.1:9",
        ),
        (
            ["train", "--model", "resnet50", "--workers", "1", "--epochs", "1"],
            "Unknown model 'resnet50'",
        ),
        (["train", "--dataset", "mnist", "--epochs", "1"], "Unknown dataset 'mnist'"),
        (["train", "--dataset", "cifar10", "--epochs", "1"], "--dataset cifar10 needs --data-path"),
        (["train", "--resume", "--epochs", "1"], "--resume continues the run in --out"),
        (
            ["train", "--out", "/dev/null", "--workers", "1", "--epochs", "1"],
            "out='/dev/null' is a file, not a folder",
        ),
        (
            ["train", "--out", "/dev/null/run", "--workers", "1", "--epochs", "1"],
            "cannot write the run folder '/dev/null/run'",
        ),
        (
            ["verify", "/no/such/run", "--key", "/no/such/key"],
            "cannot read the key file /no/such/key",
        ),
        (
            ["words", "README.md", "--workers", "1", "--plot", "/dev/null/words.png"],
            "/dev/null/words.png: Not a directory. Check that the path is right",
        ),
    ],
)
def test_cli_errors_are_one_clear_line(args, message):
    proc = _run(*args, timeout=120)
    assert proc.returncode == 2
    assert f"daskdl: error: {message}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()[-1]) > len("daskdl: error: ") + 20


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--workers", "0"], "argument --workers: must be a positive integer, got 0"),
        (
            ["train", "--workers", "two"],
            "argument --workers: must be a positive integer, got 'two'",
        ),
        (["dashboard", "--port", "99999"], "argument --port: must be a port number 0-65535"),
    ],
)
def test_cli_refuses_impossible_numbers_before_starting_anything(args, message):
    proc = _run(*args, timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr


def test_dashboard_on_a_busy_port_says_so_before_announcing_an_address():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = _run("dashboard", "--port", str(port), timeout=60)
    assert proc.returncode == 2
    assert "http://" not in proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == (
        f"daskdl: error: cannot listen on 127.0.0.1:{port} (Address already in use): another "
        "program (a dashboard already running?) has it. Choose another with --port, or "
        "--port 0 for any free one."
    )


def test_train_on_cifar10_binary_files(tmp_path):
    from daskdl.datasets import synthetic_images, write_cifar10_binary

    images = synthetic_images(300, (3, 32, 32), n_classes=10, seed=0, chunks=100, noise=0.3)
    X, y = images.compute()
    pixels = np.clip((X - X.min()) / (X.max() - X.min()) * 255, 0, 255)
    for i, name in enumerate(["data_batch_1.bin", "data_batch_2.bin", "test_batch.bin"]):
        write_cifar10_binary(tmp_path / name, pixels[i * 100 : (i + 1) * 100], y[i * 100 :][:100])
    proc = _run(
        "train",
        "--dataset",
        "cifar10",
        "--data-path",
        str(tmp_path),
        "--model",
        "small_cnn",
        "--workers",
        "2",
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _val_accuracy(proc.stdout) > 0.2  # 10 classes: chance is 0.1


def test_a_scheduler_that_never_answers_is_an_error_within_seconds():
    """A server that accepts the connection and says nothing held Client() for good."""
    import socket
    import time

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        address = f"tcp://127.0.0.1:{silent.getsockname()[1]}"
        began = time.monotonic()
        proc = _run("train", "--scheduler", address, "--epochs", "1", "--no-progress", timeout=120)
    assert proc.returncode == 2 and time.monotonic() - began < 60
    assert f"could not reach the scheduler at {address} (no answer within 10 s)" in proc.stderr


def test_first_day_mistakes_are_named_in_flags(tmp_path):
    import numpy as np
    import pandas as pd

    n = np.arange(40)
    pd.DataFrame({"a": n * 1.0, "b": n % 3.0, "label": n % 2}).to_csv(tmp_path / "d.csv")
    data = ["--data", str(tmp_path / "d.csv")]
    cases = [
        (["--label", "lable"], r"label: \['lable'\] is not a column .*--label.*mean 'label'\?"),
        (["--label", "label", "--features", "a", "zz"], r"features: \['zz'\] is not a column"),
        (["--label", "label", "--batch-size", "0"], r"--batch-size must be a positive integer"),
        (["--label", "label", "--lr", "-1"], r"--lr must be a positive number"),
    ]
    for args, message in cases:
        proc = _run("train", *data, *args, "--epochs", "1", "--no-progress", timeout=120)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and re.search(message, last), last
        assert "daskdl: cluster" not in proc.stderr  # refused before a cluster was started
