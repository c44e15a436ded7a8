"""A tuning study as the dashboard knows it: :class:`StudyState` folds the events of one
study driver (published by :class:`daskdl.Study`, see :data:`daskdl.events.STUDIES_TOPIC`) into
its trials, the optimisation history, the learning curves and the parameters' importances.
Plain logic: nothing here imports Panel.
"""

from __future__ import annotations

import importlib.util
import logging
import time

import pandas as pd

logger = logging.getLogger(__name__)

STATE_COLORS = {"complete": "#1f77b4", "running": "#ff7f0e", "pruned": "#b0b0b0",
                "fail": "#d62728", "waiting": "#9467bd"}  # fmt: skip
# Importances need this many complete trials (Optuna's fANOVA fits a forest to them).
MIN_FOR_IMPORTANCE = 2


class StudyState:
    """One study driver as its events describe it. Plain logic: no Panel, no I/O."""

    def __init__(self, key: str):
        self.key = key
        self.spec: dict = {}
        self.trials: dict[int, dict] = {}  # number -> its latest trial event
        self.status = "running"
        self.started: float | None = None
        self.version = 0  # bumped by every event, so views redraw only what changed
        self._importances: tuple[tuple, dict] = ((), {})

    def ingest(self, timestamp: float, msg: dict) -> None:
        kind = msg.get("kind")
        if kind == "study":
            self.spec, self.started = dict(msg), timestamp
        elif kind == "trial":
            self.trials[msg["number"]] = msg
        elif kind == "end":
            self.status = msg.get("status", "finished")
        self.version += 1

    @property
    def name(self) -> str:
        return self.spec.get("name", self.key)

    @property
    def maximize(self) -> bool:
        return self.spec.get("direction", "maximize") == "maximize"

    def label(self) -> str:
        started = time.strftime("%H:%M:%S", time.localtime(self.started)) if self.started else "?"
        return f"{self.name} (started {started}, {len(self.trials)} trials)"

    def counts(self) -> dict[str, int]:
        return pd.Series([t["state"] for t in self.trials.values()]).value_counts().to_dict()

    def best(self) -> dict | None:
        done = [t for t in self.trials.values() if t["state"] == "complete"]
        if not done:
            return None
        pick = max if self.maximize else min
        return pick(done, key=lambda t: t["value"])

    def table(self) -> pd.DataFrame:
        """One row per trial: number, state, value, epochs reported, parameters, run id."""
        rows = [
            {"number": n, "state": t["state"], "value": _rounded(t["value"]),
             "epochs": len(t["curve"]),
             **{k: _short(v) for k, v in t["params"].items()}, "run": t.get("run")}
            for n, t in sorted(self.trials.items())
        ]  # fmt: skip
        return pd.DataFrame(rows, columns=None if rows else ["number", "state", "value", "run"])

    def history(self) -> dict:
        """The optimisation history: each complete trial's value and the best so far."""
        done = [(n, t) for n, t in sorted(self.trials.items()) if t["state"] == "complete"]
        best, running = [], None
        for _, t in done:
            better = running is None or (t["value"] > running) == self.maximize
            running = t["value"] if better else running
            best.append(running)
        return {
            "number": [n for n, _ in done], "value": [t["value"] for _, t in done],
            "best": best, "color": [STATE_COLORS["complete"]] * len(done),
            "state": ["complete"] * len(done),
        }  # fmt: skip

    def curves(self) -> dict:
        """Every trial's metric per epoch (the intermediate values), coloured by state."""
        trials = [(n, t) for n, t in sorted(self.trials.items()) if t["curve"]]
        return {
            "xs": [[e for e, _ in t["curve"]] for _, t in trials],
            "ys": [[v for _, v in t["curve"]] for _, t in trials],
            "color": [STATE_COLORS.get(t["state"], "#000000") for _, t in trials],
            "number": [n for n, _ in trials], "state": [t["state"] for _, t in trials],
        }  # fmt: skip

    def points(self) -> dict:
        """The same values as points (a trial pruned after one epoch is no line)."""
        lines = self.curves()
        pairs = [(n, c, x, y) for n, c, xs, ys in
                 zip(lines["number"], lines["color"], lines["xs"], lines["ys"])
                 for x, y in zip(xs, ys)]  # fmt: skip
        return {
            k: [p[i] for p in pairs] for i, k in enumerate(("number", "color", "epoch", "value"))
        }

    def importances(self) -> dict[str, float]:
        """Optuna's parameter importances (fANOVA) over the complete trials; empty with fewer
        than two, or without Optuna in this process. Computed again only when trials end."""
        done = tuple(sorted(n for n, t in self.trials.items() if t["state"] == "complete"))
        if done == self._importances[0]:
            return self._importances[1]
        result = {}
        if len(done) >= MIN_FOR_IMPORTANCE and importlib.util.find_spec("optuna"):
            result = self._fit_importances([self.trials[n] for n in done])
        self._importances = (done, result)
        return result

    def _fit_importances(self, done: list[dict]) -> dict[str, float]:
        import optuna

        study = optuna.create_study(direction="maximize" if self.maximize else "minimize")
        for t in done:
            study.add_trial(
                optuna.trial.create_trial(
                    params=t["params"],
                    distributions={
                        k: optuna.distributions.json_to_distribution(d)
                        for k, d in t["distributions"].items()
                    },
                    value=t["value"],
                )
            )
        try:
            return dict(optuna.importance.get_param_importances(study))
        except (ValueError, RuntimeError) as e:  # e.g. no parameter shared by every trial
            logger.info("study %s: no parameter importances yet: %s", self.key, e)
            return {}


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _short(value):
    """A parameter as a table cell: a (name, options) model as its name."""
    return value[0] if isinstance(value, list | tuple) and value else value
