"""``daskdl bench`` and ``benchmarks/gpu.sh`` run end to end (small settings; the figures
themselves live in benchmarks/RESULTS.md, never in tests)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Every test here starts processes (clusters, the CLI, a build): the slow tier.
pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_daskdl_bench_summarises_the_benchmarks(tmp_path):
    results = tmp_path / "RESULTS.md"
    recorded = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    env = {**os.environ, "DASKDL_BENCH_RESULTS": str(results)}
    proc = subprocess.run(
        [sys.executable, "-m", "daskdl", "bench", "--only", "dataload", "--record"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    header, row = proc.stdout.strip().splitlines()[-2:]
    assert header.split() == ["benchmark", "ratio", "target", "met", "seconds"]
    name, ratio, sense, target, met, _ = row.split()
    assert (name, sense, target) == ("dataload", ">=", "0.9")
    assert float(ratio) > 0 and met in ("yes", "no")
    # --record appends the script's table (redirected here by DASKDL_BENCH_RESULTS).
    assert "## dataload:" in results.read_text()
    assert (ROOT / "benchmarks" / "RESULTS.md").read_text() == recorded


def test_daskdl_bench_without_a_checkout_says_where_it_looked(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "daskdl", "bench", "--benchmarks", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert f"daskdl: error: no benchmark scripts in {tmp_path}" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA gpu.sh runs the full benchmark")
def test_gpu_script_runs_its_cpu_fallback(tmp_path):
    results = tmp_path / "RESULTS.md"
    env = {**os.environ, "DASKDL_BENCH_RESULTS": str(results), "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--n", "256"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "No CUDA device" in proc.stdout
    assert re.search(r"^gpu ratio=[0-9.]+ target=0.95$", proc.stdout, re.MULTILINE)
    table = results.read_text()
    assert "CPU fallback (no CUDA)" in table and "| bf16, channels_last |" in table
    assert re.search(r"^gpu-predict ratio=[0-9.]+ target=0.95$", proc.stdout, re.MULTILINE)
    assert "## gpu-predict:" in table


def test_the_peers_benchmark_runs_with_the_peers_it_finds(tmp_path):
    import importlib.util

    results = tmp_path / "RESULTS.md"
    env = {**os.environ, "DASKDL_BENCH_RESULTS": str(results)}
    proc = subprocess.run(
        [sys.executable, "peers.py", "--n", "256", "--epochs", "2", "--rounds", "1"],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT / "benchmarks",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ray = importlib.util.find_spec("ray") is not None
    if not ray:
        assert "peers: Ray Train is not installed: skipped" in proc.stdout
    rows = [line.split(" | ")[0].strip("| ") for line in proc.stdout.splitlines() if "|" in line]
    assert {"daskdl", "DDP"} <= set(rows)
    last = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"peers ratio=(nan|[\d.]+) target=1\.0", last), last
    assert (last.endswith("nan target=1.0")) == (not ray)
    assert "## peers:" in results.read_text()
