"""One source of options: every TrainConfig field reaches fit, the command line, the
dashboard and the docs (docs/options.md), with the same default everywhere."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from pathlib import Path

import pytest

import daskdl
from daskdl.cli import main as cli
from daskdl.config import options as config
from daskdl.config.options import TrainConfig

OPTIONS_PAGE = Path(__file__).resolve().parents[2] / "docs" / "options.md"


def _train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    cli._train_parser(parser.add_subparsers())
    return parser._subparsers._group_actions[0].choices["train"]


def test_every_option_has_a_flag_with_its_default_and_choices():
    actions = {a.dest: a for a in _train_parser()._actions}
    for f in config.fields():
        action = actions.get(f.name)
        assert action is not None, f"no flag for {f.name}"
        assert action.option_strings[0] == "--" + f.name.replace("_", "-")
        assert action.default == f.default, f.name
        if f.metadata["choices"] is not None:
            assert set(action.choices) == {c for c in f.metadata["choices"] if c is not None}
        assert f.metadata["help"].split(" (")[0] in action.help


def test_flags_parse_to_the_options_fit_takes():
    args = _train_parser().parse_args(
        ["--epochs", "3", "--lr", "0.1", "--no-shuffle", "--outer-optimizer", "nesterov",
         "--channels-last", "--torch-threads", "2", "--max-failures", "0"]
    )  # fmt: skip
    options = cli.config_options(args)
    assert TrainConfig(**options) == TrainConfig(
        epochs=3, lr=0.1, shuffle=False, outer_optimizer="nesterov", channels_last=True,
        torch_threads=2, max_failures=0,
    )  # fmt: skip
    assert cli.config_options(_train_parser().parse_args([])) == TrainConfig.defaults()
    piped = _train_parser().parse_args(
        ["--pipeline-stages", "2", "--microbatches", "8", "--pipeline-split", "3"]
    )
    assert TrainConfig(**cli.config_options(piped)).pipeline() == daskdl.Pipeline(
        stages=2, microbatches=8, split=(3,)
    )
    interleaved = _train_parser().parse_args(
        ["--pipeline-stages", "2", "--microbatches", "4", "--pipeline-chunks", "2"]
    )
    assert TrainConfig(**cli.config_options(interleaved)).pipeline() == daskdl.Pipeline(
        stages=2, microbatches=4, chunks=2
    )
    sharded = _train_parser().parse_args(["--shard", "full"])
    assert TrainConfig(**cli.config_options(sharded)).shard == "full"


def test_fit_takes_the_options_only_through_the_config():
    """No option is restated in fit's signature (where its default could drift); each is
    documented in fit's docstring from its one definition."""
    parameters = set(inspect.signature(daskdl.fit).parameters)
    assert not parameters & {f.name for f in config.fields()}
    assert "options" in parameters
    for f in config.fields():
        assert f"    {f.name} : " in daskdl.fit.__doc__


def test_the_dashboard_form_has_every_option_with_its_default(client):
    pytest.importorskip("panel")
    from daskdl.webapp.app import Launcher
    from daskdl.webapp.store import DashboardStore

    launcher = Launcher(client, store=DashboardStore())
    assert set(launcher.options) == {f.name for f in config.fields()}
    for f in config.fields():
        value = launcher.options[f.name].value
        assert (None if value == "" else value) == f.default, f.name  # empty text: None
    assert set(launcher.model.options) == set(daskdl.models.REGISTRY)
    assert set(daskdl.datasets.REGISTRY) <= set(launcher.dataset.options)


def test_the_documented_option_table_is_the_configs():
    assert config.options_table() in OPTIONS_PAGE.read_text()


def test_a_misspelt_option_names_the_nearest_one(client, no_rank_may_start):
    train = daskdl.datasets.digits()
    with pytest.raises(ValueError, match=r"Unknown training option\(s\) 'learning_rate'"):
        daskdl.fit(client, "mlp", train, learning_rate=0.1)
    with pytest.raises(ValueError, match=r"'epoch' \(did you mean 'epochs'\?\)"):
        daskdl.fit(client, "mlp", train, epoch=3)


def test_a_config_with_overrides(client):
    base = TrainConfig(epochs=1, batch_size=16, lr=0.02)
    train, val = daskdl.datasets.digits().split(0.2, seed=0)
    run = daskdl.fit(client, "mlp", train, val=val, config=base, lr=0.05, progress=False)
    assert run.info["config"]["lr"] == 0.05
    assert run.info["config"]["batch_size"] == 16 and run.info["config"]["epochs"] == 1
    assert dataclasses.asdict(base)["lr"] == 0.02  # the caller's config is left as it was
    with pytest.raises(TypeError, match="config must be a daskdl.TrainConfig or a dict"):
        daskdl.fit(client, "mlp", train, config="fast")
