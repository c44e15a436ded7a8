"""The wheel: ``python -m build`` makes one that installs in a fresh virtual environment, with
daskdl's defaults (``daskdl.yaml``) and the dashboard's app inside, and trains digits there."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

# Every test here starts processes (clusters, the CLI, a build): the slow tier.
pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(1200)
def test_the_wheel_installs_and_trains_digits_in_a_fresh_environment(tmp_path):
    import daskdl

    dist = tmp_path / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(ROOT)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    [wheel] = dist.glob("daskdl-*.whl")
    assert wheel.name.startswith(f"daskdl-{daskdl.__version__}-py3-none-any")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"daskdl/config/daskdl.yaml", "daskdl/webapp/script.py", "daskdl/webapp/app.py"} <= names
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/"))]

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run(
        [venv / "bin" / "pip", "install", "-q", "-c", ROOT / "constraints.txt", wheel],
        capture_output=True, text=True,
    )  # fmt: skip
    assert pip.returncode == 0, pip.stderr[-3000:]
    # Away from the checkout, so that the installed package is the one that runs.
    run = [venv / "bin" / "daskdl"]
    version = subprocess.run([*run, "--version"], capture_output=True, text=True, cwd=tmp_path)
    assert version.stdout.strip() == f"daskdl {daskdl.__version__}"
    where = subprocess.run(
        [venv / "bin" / "python", "-c", "import daskdl; print(daskdl.__file__)"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert where.stdout.strip().startswith(str(venv))
    train = subprocess.run(
        [*run, "train", "--dataset", "digits", "--model", "mlp", "--workers", "2", "--epochs", "3",
         "--no-progress"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    accuracy = float(re.search(r"val_accuracy=([0-9.]+)", train.stdout).group(1))
    assert accuracy > 0.8
