"""daskdl.tune: trials as runs sharing the cluster, Optuna's pruning through the runs' own
stop, and studies that outlive their driver."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from conftest import poll_for

import daskdl
from daskdl import events
from daskdl.tuning import parts as tuning

# Every test here starts processes (clusters, the CLI): the slow tier.
pytestmark = pytest.mark.integration


def _space(trial):
    return {
        "model": ("mlp", {"hidden": trial.suggest_categorical("hidden", [32, 128])}),
        "lr": trial.suggest_float("lr", 0.01, 0.3, log=True),
        "batch_size": trial.suggest_categorical("batch_size", [16, 32]),
        "standardize": trial.suggest_categorical("standardize", [True, False]),
    }


def test_tune_on_digits_finds_a_good_model_two_trials_at_a_time(client, tmp_path):
    train, test = daskdl.datasets.train_test("digits")
    study = daskdl.tune(
        client, _space, train, val=test, n_trials=8, epochs=6, pruner="asha",
        storage=tmp_path / "study.journal", out=tmp_path / "study",
    )  # fmt: skip
    trials = study.trials
    assert len(trials) == 8 and set(trials["state"]) <= {"complete", "pruned"}
    assert (trials["state"] == "complete").sum() >= 2
    best = study.best
    assert best.value >= 0.97 and set(best.params) == {"hidden", "lr", "batch_size", "standardize"}
    assert best.checkpoint == tmp_path / "study" / f"trial-{best.number:04d}"
    assert (best.checkpoint / "checkpoints" / "epoch-0006" / "manifest.json").exists()
    # The best run predicts: on the test set, which its run standardises as its trial did.
    assert best.run.evaluate(test)["accuracy"] == pytest.approx(best.value, abs=1e-6)
    # Two at a time, a worker each: trials start as others end.
    assert study.peak_concurrent == 2 and trials["run_id"].nunique() == 8
    pruned = trials[trials["state"] == "pruned"]
    assert (pruned["epochs"] < 6).all()
    assert 0 < study.utilization <= 1
    # The driver published every trial (the dashboard's source): as the study has them.
    published = {
        e["number"]: (e["state"], [v for _, v in e["curve"]])
        for _, e in client.get_events(events.STUDIES_TOPIC)
        if e["study"] == study.key and e["kind"] == "trial"
    }
    assert published == {
        t.number: (t.state, t.val_accuracy) for t in trials.itertuples(index=False)
    }


def test_a_pruned_two_rank_trial_stops_on_both_ranks_at_the_same_step(client):
    train, test = daskdl.datasets.train_test("digits")
    # A threshold no trial reaches: every trial is pruned after its first epoch.
    study = daskdl.tune(
        client, _space, train, val=test, n_trials=2, epochs=30, ranks_per_trial=2,
        pruner=optuna.pruners.ThresholdPruner(lower=2.0), sampler="random",
    )  # fmt: skip
    trials = study.trials
    assert list(trials["state"]) == ["pruned", "pruned"] and study.peak_concurrent == 1
    for run_id in trials["run_id"]:
        log = events.replay(client, run_id)
        assert log[-1]["kind"] == "end" and log[-1]["status"] == "stopped"
        steps = [e for e in log if e["kind"] == "step"]
        last = {rank: max(e["step"] for e in steps if e["rank"] == rank) for rank in (0, 1)}
        assert last[0] == last[1]
        # Pruned within one epoch of the decision: the second epoch at the latest.
        assert max(e["epoch"] for e in steps) <= 2
    with pytest.raises(ValueError, match="No trials are completed yet"):
        study.best


def test_bad_tuning_input_is_refused_with_the_fix(client):
    train, test = daskdl.datasets.train_test("digits")
    with pytest.raises(ValueError, match="scores the validation set: pass val="):
        daskdl.tune(client, _space, train, n_trials=1)
    with pytest.raises(ValueError, match="ranks_per_trial=3 on a cluster of 2 workers"):
        daskdl.tune(client, _space, train, val=test, ranks_per_trial=3)
    with pytest.raises(ValueError, match="pruner must be one of"):
        daskdl.tune(client, _space, train, val=test, pruner="sha")
    with pytest.raises(ValueError, match="sets 'learning_rate', which is no fit option"):
        daskdl.tune(client, lambda t: {"model": "mlp", "learning_rate": 0.1}, train, val=test)
    with pytest.raises(ValueError, match="the search space gave no model"):
        daskdl.tune(client, lambda t: {"lr": 0.1}, train, val=test, n_trials=1)


def _good(trial):
    return {"model": "mlp", "lr": trial.suggest_float("lr", 0.01, 0.1)}


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"max_concurrent": -1}, ValueError, "max_concurrent must be a positive integer, got -1"),
        ({"max_concurrent": 0}, ValueError, "max_concurrent must be a positive integer, got 0"),
        ({"n_trials": 0}, ValueError, "n_trials must be a positive integer, got 0"),
        ({"n_trials": -3}, ValueError, "n_trials must be a positive integer, got -3"),
        ({"n_trials": 2.5}, ValueError, r"n_trials must be an integer, got 2.5"),
        ({"n_trials": 2.0}, ValueError, r"n_trials must be an integer, got 2.0. Pass n_trials=2"),
        ({"ranks_per_trial": 1.5}, ValueError, "ranks_per_trial must be an integer"),
        ({"ranks_per_trial": True}, ValueError, "ranks_per_trial must be an integer"),
        ({"epochs": 0}, ValueError, "epochs must be a positive integer"),
        ({"direction": "maximise"}, ValueError, "direction must be 'maximize' or 'minimize'"),
        ({"metric": "val_custom"}, ValueError, "does not say whether higher or lower is better"),
        ({"storage": "{tmp}"}, ValueError, r"is a folder; give a file in it"),
        ({"storage": "{tmp}/file/study.log"}, ValueError, r"file is a file, not a folder"),
        ({"storage": "nosuchdb://x/y"}, ValueError, "is not a database URL this machine can"),
        ({"resume": True, "storage": None}, ValueError, r"resume=True needs the storage="),
        ({"resume": True, "storage": "{tmp}/s.log"}, ValueError, "holds no study named 'x'"),
        ({"resume": "yes"}, ValueError, "resume must be True or False"),
        (
            {"space": lambda t: {"model": "mlp", "epochs": 3}},
            ValueError,
            "sets 'epochs', which is tune",
        ),
        (
            {"space": lambda t: {"model": "mlp", "workers": 1}},
            ValueError,
            "sets 'workers', which is tune",
        ),
        ({"space": lambda t: {"model": "mlp", "lr": -1.0}}, ValueError, "lr must be"),
        ({"space": lambda t: ["mlp"]}, TypeError, "must return a dict of fit options, got list"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_a_refused_tune_call_leaves_nothing_in_storage(client, tmp_path, kwargs, error, message):
    """Every argument and the space's values are checked before the study exists: the
    corrected call then creates the study under the same name."""
    train, test = daskdl.datasets.train_test("digits")
    (tmp_path / "file").write_text("not a folder")
    kwargs = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in kwargs.items()}
    space = kwargs.pop("space", _good)
    storage = tmp_path / "study.log"
    args = {"storage": storage, "study_name": "x", "n_trials": 1, "epochs": 1, **kwargs}
    with pytest.raises(error, match=message):
        daskdl.tune(client, space, train, val=test, block=False, **args)
    if args["storage"] == storage and storage.exists():
        assert not optuna.get_all_study_names(tuning.make_storage(storage))


def test_the_direction_follows_the_metric_and_a_trial_that_cannot_start_keeps_its_error(
    client, tmp_path
):
    train, test = daskdl.datasets.train_test("digits")

    def space(trial):
        lr = trial.suggest_float("lr", 0.02, 0.2)
        # Trials after the first ask for a schedule that does not exist.
        return {"model": "mlp", "lr": lr, **({"schedule": "cosin"} if trial.number else {})}

    study = daskdl.tune(
        client, space, train, val=test, metric="val_loss", n_trials=2, epochs=2,
        pruner="none", max_concurrent=1, storage=tmp_path / "s.log", study_name="loss",
    )  # fmt: skip
    assert study.optuna.direction.name == "MINIMIZE"  # val_loss: lower is better
    trials = study.trials.set_index("number")
    assert trials.loc[1, "state"] == "fail" and "schedule" in trials.loc[1, "error"]
    assert study.best.value == trials.loc[0, "value"]


def test_two_studies_never_share_trial_folders_and_a_changed_space_is_named(client, tmp_path):
    train, test = daskdl.datasets.train_test("digits")
    common = dict(val=test, n_trials=1, epochs=1, pruner="none", out=tmp_path / "out")
    daskdl.tune(client, _good, train, storage=tmp_path / "a.log", study_name="a", **common)
    with pytest.raises(ValueError, match="holds the trials of another study \\('a'\\)"):
        daskdl.tune(client, _good, train, storage=tmp_path / "b.log", study_name="b", **common)
    assert not optuna.get_all_study_names(tuning.make_storage(tmp_path / "b.log"))

    def changed(trial):
        return {"model": "mlp", "lr": trial.suggest_float("lr", 0.001, 0.5)}

    with pytest.raises(ValueError, match="search space changed since study 'a'.*lr was"):
        daskdl.tune(
            client, changed, train, storage=tmp_path / "a.log", study_name="a", resume=True,
            **{**common, "n_trials": 2},
        )  # fmt: skip
    study = daskdl.tune(
        client, _good, train, storage=tmp_path / "a.log", study_name="a", resume=True,
        **{**common, "n_trials": 2},
    )  # fmt: skip
    assert len(study.trials) == 2


@pytest.mark.parametrize(
    "text, message",
    [
        ("model: mlp\nlr: {low: 1e-4, high: 0.1}\n", r"bad.yaml:2: lr: '1e-4' is read as text"),
        ("model: mlp\nlr: {low: 0.01, high: 0.1, step: 0}\n", r"bad.yaml:2: lr has step: 0"),
        (
            "model: mlp\nbatch_sise: 32\n",
            r"bad.yaml:2: batch_sise is no fit option. Did you mean 'batch_size'",
        ),
        ("model: mlp\nlr: [0.1\n", r"bad.yaml:3: not valid YAML"),
        ("model: mlp\nepochs: 4\n", r"bad.yaml:2: epochs is tune's own setting.*--epochs"),
    ],
)
def test_yaml_space_mistakes_are_one_line_naming_file_line_and_fix(tmp_path, text, message):
    (tmp_path / "bad.yaml").write_text(text)
    proc = subprocess.run(
        [sys.executable, "-m", "daskdl", "tune", "--space", "bad.yaml"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("daskdl: error:") and re.search(message, line), line


DRIVER = """
import daskdl

def space(trial):
    return {"model": ("mlp", {"hidden": 32}), "lr": trial.suggest_float("lr", 0.01, 0.3, log=True)}

if __name__ == "__main__":
    with daskdl.local_cluster(n_workers=2, threads_per_worker=1) as client:
        train, test = daskdl.datasets.train_test("digits")
        daskdl.tune(client, space, train, val=test, n_trials=6, epochs=8, pruner="asha",
                    storage=STORAGE, study_name="s", sampler="random")
"""


def _space_lr(trial):
    return {"model": ("mlp", {"hidden": 32}), "lr": trial.suggest_float("lr", 0.01, 0.3, log=True)}


def test_a_study_whose_driver_was_killed_goes_on_with_nothing_lost_or_run_twice(client, tmp_path):
    storage = str(tmp_path / "study.journal")
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.replace("STORAGE", repr(storage)))
    driver = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path)
    load = lambda: optuna.load_study(study_name="s", storage=tuning.make_storage(storage))  # noqa: E731
    TS = optuna.trial.TrialState
    try:

        def mid_study():
            if not Path(storage).exists():
                return False
            states = [t.state for t in load().get_trials(deepcopy=False)]
            return states.count(TS.COMPLETE) + states.count(TS.PRUNED) >= 2 and TS.RUNNING in states

        poll_for(mid_study, timeout=120, interval=0.2)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    before = {t.number: t for t in load().get_trials()}
    running = {n: t.params for n, t in before.items() if t.state == TS.RUNNING}
    assert running
    train, test = daskdl.datasets.train_test("digits")
    study = daskdl.tune(
        client, _space_lr, train, val=test, n_trials=6, epochs=8, pruner="asha",
        storage=storage, study_name="s", sampler="random", resume=True,
    )  # fmt: skip
    after = {t.number: t for t in study.optuna.get_trials()}
    # What ended before the driver died is as it was: values, rungs (ASHA's marks) and all.
    for n, t in before.items():
        if t.state in (TS.COMPLETE, TS.PRUNED):
            assert after[n].state == t.state and after[n].value == t.value
            assert after[n].intermediate_values == t.intermediate_values
            assert after[n].system_attrs == t.system_attrs
    # The trials cut off ran again, once each, with their parameters; six trials in all.
    again = {
        t.user_attrs["requeued_from"]: t for t in after.values() if "requeued_from" in t.user_attrs
    }
    assert set(again) == set(running) and all(after[n].state == TS.FAIL for n in running)
    assert all(
        again[n].params == p and again[n].state in (TS.COMPLETE, TS.PRUNED)
        for n, p in running.items()
    )
    counted = [t for n, t in after.items() if n not in running]
    assert len(counted) == 6 and all(t.state in (TS.COMPLETE, TS.PRUNED) for t in counted)


def test_a_worker_killed_mid_study_costs_its_trial_not_the_study(fresh_client):
    train, test = daskdl.datasets.train_test("digits")
    study = daskdl.tune(
        fresh_client, _space_lr, train, val=test, n_trials=4, epochs=12, pruner="none",
        sampler="random", block=False,
    )  # fmt: skip
    poll_for(lambda: any(len(t.run.history) >= 1 for t in study._running.values()), timeout=60)
    victim = next(t for t in study._running.values() if len(t.run.history) >= 1)
    worker = victim.run.workers[0]
    os.kill(fresh_client.run(os.getpid, workers=[worker])[worker], signal.SIGKILL)
    study.wait(timeout=240)
    trials = study.trials.set_index("number")
    assert len(trials) == 4
    assert trials.loc[victim.trial.number, "state"] == "fail"
    assert f"every worker is gone (rank 0 ({worker}))" in trials.loc[victim.trial.number, "error"]
    others = trials.drop(index=victim.trial.number)
    assert (others["state"] == "complete").all() and study.best.value > 0.9


SEARCH_YAML = """
model: {choices: [mlp]}
mlp.hidden: {choices: [32, 64]}
lr: {low: 0.02, high: 0.2, log: true}
batch_size: {choices: [16, 32]}
weight_decay: 0.0001
"""


def test_a_yaml_search_space_through_the_command_line(tmp_path):
    (tmp_path / "search.yaml").write_text(SEARCH_YAML)
    proc = subprocess.run(
        [sys.executable, "-m", "daskdl", "tune", "--space", "search.yaml", "--dataset",
         "digits", "--n-trials", "3", "--epochs", "3", "--workers", "2", "--pruner", "none",
         "--storage", "study.journal", "--study-name", "cli"],
        capture_output=True, text=True, timeout=240, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    best = proc.stdout.strip().splitlines()[-1]
    assert best.startswith("best trial=") and "val_accuracy=0.9" in best and "hidden=" in best
    study = optuna.load_study(
        study_name="cli", storage=tuning.make_storage(tmp_path / "study.journal")
    )
    trials = study.get_trials()
    assert len(trials) == 3 and all(t.state.name == "COMPLETE" for t in trials)
    assert all(set(t.params) == {"model", "mlp.hidden", "lr", "batch_size"} for t in trials)
    assert all(0.02 <= t.params["lr"] <= 0.2 for t in trials)
    # A malformed space is refused, naming the key and the fix.
    (tmp_path / "bad.yaml").write_text("lr: {low: 0.3, high: 0.1}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "daskdl", "tune", "--space", "bad.yaml"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2 and "lr has low=0.3 >= high=0.1" in proc.stderr


def test_a_space_given_as_a_dict_is_the_yaml_files_form(client):
    train, test = daskdl.datasets.train_test("digits")
    space = {"model": "mlp", "lr": {"low": 0.02, "high": 0.1, "log": True}}
    study = daskdl.tune(client, space, train, val=test, n_trials=1, epochs=1, pruner="none")
    assert set(study.trials["lr"].dropna()) and 0.02 <= study.best.params["lr"] <= 0.1
    with pytest.raises(ValueError, match="lerning_rate is no fit option"):
        daskdl.tune(client, {"model": "mlp", "lerning_rate": 0.1}, train, val=test)
