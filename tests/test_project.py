"""The README's set-up is what CI runs."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _setup_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_readme_setup_is_two_commands_and_ci_runs_the_test_one():
    install_and_train, install_and_test = _setup_commands()
    assert "daskdl train --dataset digits" in install_and_train
    assert "pytest" in install_and_test
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert install_and_test in ci
    assert any(line.startswith(".venv/bin/ruff check") for line in ci)


def test_environment_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = {re.split(r"[<>=\[ ]", d)[0] for d in env["dependencies"] if isinstance(d, str)}
    conda = {"torch" if d == "pytorch" else d for d in conda}
    wanted = project["dependencies"] + [
        d
        for deps in project["optional-dependencies"].values()
        for d in deps
        if not d.startswith("dask-cuda")
    ]
    names = {re.split(r"[<>=\[ ]", d)[0] for d in wanted}
    assert names - conda == set(), f"missing from environment.yml: {names - conda}"
    assert set(project["optional-dependencies"]) == {
        "cuda",
        "app",
        "tune",
        "tensorboard",
        "mlflow",
        "dev",
    }


def _run_readme_example(section: str, checks: str, tmp_path) -> None:
    """Run the first Python block of the README's ``section`` as a script, then ``checks``."""
    import subprocess
    import sys

    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.+?)\n```", readme.split(section, 1)[1], re.S).group(1)
    script = tmp_path / "example.py"
    script.write_text(
        'if __name__ == "__main__":\n'
        + "\n".join("    " + line for line in (code + checks + "\nprint('ok')").splitlines())
        + "\n"
    )
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")


def test_readme_python_example_runs_as_written(tmp_path):
    checks = (
        "\nassert run.history['val_accuracy'].iloc[-1] >= 0.97, run.history"
        "\nassert abs(run.evaluate(test)['accuracy'] - run.history['val_accuracy'].iloc[-1])"
        " < 1e-9"
    )
    _run_readme_example("## In Python", checks, tmp_path)


def test_readme_regression_example_runs_as_written(tmp_path):
    checks = (
        "\nscores = run.evaluate(test)"
        "\nassert scores['r2'] >= 0.9 and scores['rmse'] > 0.5, scores"
        "\nassert list(run.history.columns[:6]) == "
        "['epoch', 'step', 'train_loss', 'val_loss', 'val_mae', 'val_rmse'], run.history"
    )
    _run_readme_example("## Targets, losses and metrics", checks, tmp_path)


def test_readme_launch_example_runs_as_written(tmp_path):
    checks = (
        "\nassert run.status == 'finished' and list(run.history['epoch']) == [1, 2, 3, 4, 5]"
        "\nassert run.history['val_accuracy'].iloc[-1] > 0.9, run.history"
        "\nassert set(run.result) == {'1.weight', '1.bias'}"
    )
    _run_readme_example("## Your own training loop: `daskdl.launch`", checks, tmp_path)


def test_readme_streaming_example_runs_as_written(tmp_path):
    checks = (
        "\nassert run.info['streamed'] == ['train', 'val'], run.info"
        "\nassert run.history['val_accuracy'].iloc[-1] >= 0.95, run.history"
    )
    _run_readme_example("## Data larger than memory: streaming", checks, tmp_path)


def test_readme_prediction_example_runs_as_written(tmp_path):
    checks = (
        "\nassert accuracy > 0.9, accuracy"
        "\nassert bool((again == labels).all().compute()) and proba.shape[1] == 10"
        "\nassert abs(float(proba.sum(axis=1).mean().compute()) - 1) < 1e-5"
    )
    _run_readme_example("## Prediction: `run.predict` and `daskdl.predict`", checks, tmp_path)


def test_readme_model_parallel_example_runs_as_written(tmp_path):
    checks = (
        "\nassert piped.history['val_accuracy'].iloc[-1] >= 0.9, piped.history"
        "\nassert sharded.history['val_accuracy'].iloc[-1] >= 0.9, sharded.history"
        "\nassert piped.info['config']['pipeline_stages'] == 2"
        "\nassert sharded.info['config']['shard'] == 'full'"
    )
    _run_readme_example("## Models bigger than a worker: pipelines and sharding", checks, tmp_path)


def test_readme_tuning_example_runs_as_written(tmp_path):
    checks = (
        "\nassert study.best.value >= 0.9, study.trials"
        "\nassert len(study.trials) == 6 and study.best.checkpoint.exists()"
    )
    _run_readme_example("## Tuning and model selection: `daskdl.tune`", checks, tmp_path)
