"""A search space written as data (a YAML file for ``daskdl tune --space``), turned into the
``space(trial)`` function :func:`daskdl.tune` takes.

Each key is a :func:`daskdl.fit` option (or ``model``, or ``standardize``); its value is

- ``{choices: [a, b, ...]}``: one of them (Optuna's ``suggest_categorical``);
- ``{low: x, high: y}``, with ``log: true`` or ``step: s`` optional: a number between them
  (``suggest_int`` where ``low`` and ``high`` are both integers, else ``suggest_float``);
- anything else: that value, in every trial.

``model`` options that depend on the model go under ``<model name>.<option>``:
``mlp.hidden: {choices: [64, 256]}`` is sampled only in trials whose model is ``mlp``.

>>> space = from_dict({"model": {"choices": ["mlp"]}, "mlp.hidden": 64, "lr": 0.1})
>>> space(__import__("optuna").trial.FixedTrial({"model": "mlp"}))
{'model': ('mlp', {'hidden': 64}), 'lr': 0.1}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from numbers import Integral, Real
from pathlib import Path

import yaml


def load(path: str | Path) -> Callable:
    """The space in the YAML file ``path``."""
    with open(path) as f:
        spec = yaml.safe_load(f)
    if not isinstance(spec, Mapping):
        raise ValueError(
            f"{path} must be a YAML mapping of options to choices, ranges or values, such as "
            "'lr: {low: 0.001, high: 0.3, log: true}'."
        )
    return from_dict(spec, str(path))


def from_dict(spec: Mapping, where: str = "the search space") -> Callable:
    """``space(trial)`` for the mapping ``spec`` (see the module's description)."""
    for name, value in spec.items():
        _check(name, value, where)

    def space(trial) -> dict:
        params = {}
        for name, value in spec.items():
            if "." not in name:
                params[name] = _sample(trial, name, value)
        model = params.get("model")
        if isinstance(model, str):
            options = {
                name.split(".", 1)[1]: _sample(trial, name, value)
                for name, value in spec.items()
                if name.startswith(f"{model}.")
            }
            if options:
                params["model"] = (model, options)
        return params

    return space


def _check(name: str, value, where: str) -> None:
    if not isinstance(value, Mapping):
        return
    if "choices" in value:
        if not isinstance(value["choices"], list) or not value["choices"]:
            raise ValueError(f"{where}: {name}'s choices must be a non-empty list.")
    elif {"low", "high"} <= set(value):
        low, high = value["low"], value["high"]
        if not all(isinstance(v, Real) and not isinstance(v, bool) for v in (low, high)):
            raise ValueError(f"{where}: {name}'s low and high must be numbers.")
        if low >= high:
            raise ValueError(f"{where}: {name} has low={low} >= high={high}.")
        if value.get("log") and low <= 0:
            raise ValueError(f"{where}: {name} has log: true, so low must be above 0.")
    else:
        raise ValueError(
            f"{where}: {name} is a mapping without 'choices' or 'low' and 'high': give "
            f"{name}: {{choices: [...]}} or {name}: {{low: ..., high: ...}}."
        )


def _sample(trial, name: str, value):
    if not isinstance(value, Mapping):
        return value
    if "choices" in value:
        return trial.suggest_categorical(name, value["choices"])
    low, high, log = value["low"], value["high"], bool(value.get("log", False))
    step = value.get("step")
    if isinstance(low, Integral) and isinstance(high, Integral):
        return trial.suggest_int(name, low, high, step=step or 1, log=log)
    return trial.suggest_float(name, low, high, step=step, log=log)
