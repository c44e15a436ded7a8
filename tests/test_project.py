"""The README's set-up is what CI runs; the examples of the README and the docs run as written;
the README stays a landing page."""

from __future__ import annotations

import inspect
import re
import tomllib
from pathlib import Path

import pytest
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
    renamed = {"pytorch": "torch", "python-build": "build", "mkdocstrings-python": "mkdocstrings"}
    conda = {renamed.get(d, d) for d in conda}
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


def _run_example(page: str, checks: str, tmp_path, section: str = "") -> None:
    """Run the first Python block of ``page`` (``README.md`` or a page of ``docs/``), after
    ``section`` if given, as a script, then ``checks``."""
    import subprocess
    import sys

    text = (ROOT / page).read_text()
    after = text.split(section, 1)[1] if section else text
    code = re.search(r"```python\n(.+?)\n```", after, re.S).group(1)
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


@pytest.mark.integration
def test_readme_python_example_runs_as_written(tmp_path):
    checks = (
        "\nassert run.history['val_accuracy'].iloc[-1] >= 0.97, run.history"
        "\nassert abs(run.evaluate(test)['accuracy'] - run.history['val_accuracy'].iloc[-1])"
        " < 1e-9"
    )
    _run_example("README.md", checks, tmp_path, "## In Python")


@pytest.mark.integration
def test_the_regression_example_runs_as_written(tmp_path):
    checks = (
        "\nscores = run.evaluate(test)"
        "\nassert scores['r2'] >= 0.9 and scores['rmse'] > 0.5, scores"
        "\nassert list(run.history.columns[:6]) == "
        "['epoch', 'step', 'train_loss', 'val_loss', 'val_mae', 'val_rmse'], run.history"
    )
    _run_example("docs/targets.md", checks, tmp_path)


@pytest.mark.integration
def test_the_launch_example_runs_as_written(tmp_path):
    checks = (
        "\nassert run.status == 'finished' and list(run.history['epoch']) == [1, 2, 3, 4, 5]"
        "\nassert run.history['val_accuracy'].iloc[-1] > 0.9, run.history"
        "\nassert set(run.result) == {'1.weight', '1.bias'}"
    )
    _run_example("docs/custom-loops.md", checks, tmp_path)


@pytest.mark.integration
def test_the_streaming_example_runs_as_written(tmp_path):
    checks = (
        "\nassert run.info['streamed'] == ['train', 'val'], run.info"
        "\nassert run.history['val_accuracy'].iloc[-1] >= 0.95, run.history"
    )
    _run_example("docs/streaming.md", checks, tmp_path)


@pytest.mark.integration
def test_the_prediction_example_runs_as_written(tmp_path):
    checks = (
        "\nassert accuracy > 0.9, accuracy"
        "\nassert bool((again == labels).all().compute()) and proba.shape[1] == 10"
        "\nassert abs(float(proba.sum(axis=1).mean().compute()) - 1) < 1e-5"
    )
    _run_example("docs/prediction.md", checks, tmp_path)


@pytest.mark.integration
def test_the_model_parallel_example_runs_as_written(tmp_path):
    checks = (
        "\nassert piped.history['val_accuracy'].iloc[-1] >= 0.9, piped.history"
        "\nassert sharded.history['val_accuracy'].iloc[-1] >= 0.9, sharded.history"
        "\nassert piped.info['config']['pipeline_stages'] == 2"
        "\nassert sharded.info['config']['shard'] == 'full'"
    )
    _run_example("docs/model-parallelism.md", checks, tmp_path)


@pytest.mark.integration
def test_the_tuning_example_runs_as_written(tmp_path):
    checks = (
        "\nassert study.best.value >= 0.9, study.trials"
        "\nassert len(study.trials) == 6 and study.best.checkpoint.exists()"
    )
    _run_example("docs/tuning.md", checks, tmp_path)


def test_the_readme_is_a_landing_page_whose_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    links = re.findall(r"\]\((docs/[\w-]+\.md)\)", readme)
    assert links and all((ROOT / link).exists() for link in links), links


def test_the_pre_commit_hooks_are_ci_s_checks():
    import subprocess
    import sys

    config = ROOT / ".pre-commit-config.yaml"
    bin_dir = Path(sys.executable).parent
    check = subprocess.run(
        [bin_dir / "pre-commit", "validate-config", config], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    hooks = yaml.safe_load(config.read_text())["repos"][0]["hooks"]
    entries = {h["entry"].split()[0] for h in hooks}
    ci = (ROOT / ".ci" / "run").read_text()
    assert entries == {"ruff", "mypy", "lint-imports"}
    assert all(f".venv/bin/{e}" in ci for e in entries)


def _unannotated(func, name: str) -> list[str]:
    sig = inspect.signature(func)
    gaps = [
        f"{name}({p.name})"
        for p in sig.parameters.values()
        if p.name not in ("self", "cls") and p.annotation is inspect.Parameter.empty
    ]
    if sig.return_annotation is inspect.Signature.empty and not name.endswith("__init__"):
        gaps.append(f"{name} -> ?")
    return gaps


def test_the_public_api_is_fully_annotated():
    """Every function, method and property of ``daskdl.__all__`` (and the trackers) says the
    types it takes and returns (mypy checks them in CI)."""
    import daskdl
    from daskdl.runs import trackers

    public = [(n, getattr(daskdl, n)) for n in daskdl.__all__]
    public += [
        (f"trackers.{n}", getattr(trackers, n)) for n in ("TensorBoardTracker", "MLflowTracker")
    ]
    gaps = []
    for name, obj in public:
        if inspect.isclass(obj) and not issubclass(obj, BaseException):
            for attr, member in vars(obj).items():
                if attr.startswith("_") and attr != "__init__":
                    continue
                if isinstance(member, property):
                    gaps += [g for g in _unannotated(member.fget, f"{name}.{attr}") if "->" in g]
                    continue
                if isinstance(member, staticmethod | classmethod):
                    member = member.__func__
                if inspect.isfunction(member):
                    gaps += _unannotated(member, f"{name}.{attr}")
        elif inspect.isfunction(obj):
            gaps += _unannotated(obj, name)
    assert not gaps, gaps
