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

import difflib
from collections.abc import Callable, Mapping
from numbers import Integral, Real
from pathlib import Path

import yaml


def load(path: str | Path) -> Callable:
    """The space in the YAML file ``path``; its mistakes are named with their line."""
    text = Path(path).read_text()
    try:
        spec = yaml.safe_load(text)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(
            f"{where}: not valid YAML ({problem}). Write one option per line, such as "
            "'lr: {low: 0.001, high: 0.3, log: true}'."
        ) from None
    if not isinstance(spec, Mapping):
        raise ValueError(
            f"{path} must be a YAML mapping of options to choices, ranges or values, such as "
            "'lr: {low: 0.001, high: 0.3, log: true}'."
        )
    lines = {}
    if isinstance(node, yaml.MappingNode):
        lines = {k.value: k.start_mark.line + 1 for k, _ in node.value}
    return from_dict(spec, str(path), lines)


def from_dict(
    spec: Mapping, where: str = "the search space", lines: Mapping[str, int] | None = None
) -> Callable:
    """``space(trial)`` for the mapping ``spec`` (see the module's description); ``lines``:
    each key's line in the file ``where``, for the errors."""
    for name, value in spec.items():
        line = (lines or {}).get(name)
        _check(name, value, f"{where}:{line}" if line else where)

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


def _check(name, value, where: str) -> None:
    if not isinstance(name, str):
        raise ValueError(f"{where}: {name!r} is no option name; keys are fit options.")
    _check_name(name, where)
    if not isinstance(value, Mapping):
        _check_number(name, value, where)
        return
    if "choices" in value:
        if not isinstance(value["choices"], list) or not value["choices"]:
            raise ValueError(f"{where}: {name}'s choices must be a non-empty list.")
        for choice in value["choices"]:
            _check_number(name, choice, where)
    elif {"low", "high"} <= set(value):
        unknown = sorted(set(value) - {"low", "high", "log", "step"})
        if unknown:
            raise ValueError(
                f"{where}: {name} has {unknown[0]!r}; a range takes low, high, and log or step."
            )
        low, high = value["low"], value["high"]
        for v in (low, high, value.get("step", 1)):
            _check_number(name, v, where)
        if not all(isinstance(v, Real) and not isinstance(v, bool) for v in (low, high)):
            raise ValueError(f"{where}: {name}'s low and high must be numbers.")
        if low >= high:
            raise ValueError(f"{where}: {name} has low={low} >= high={high}.")
        if value.get("log") and low <= 0:
            raise ValueError(f"{where}: {name} has log: true, so low must be above 0.")
        step = value.get("step")
        if step is not None and (isinstance(step, bool) or not isinstance(step, Real) or step <= 0):
            raise ValueError(
                f"{where}: {name} has step: {step!r}; a step is a number above 0 (or leave it "
                "out for any value in the range)."
            )
    else:
        raise ValueError(
            f"{where}: {name} is a mapping without 'choices' or 'low' and 'high': give "
            f"{name}: {{choices: [...]}} or {name}: {{low: ..., high: ...}}."
        )


def _check_name(name: str, where: str) -> None:
    """A key is a fit option, ``model``, ``standardize``, or ``<model>.<option>``."""
    from daskdl.config import options as config
    from daskdl.tuning.parts import FIT_ARGUMENTS, TUNE_OWN

    if "." in name:
        return  # a model's own option: checked when the model is built
    if name in TUNE_OWN:
        raise ValueError(
            f"{where}: {name} is tune's own setting, not a trial's: give it on the command "
            f"line (--{name.replace('_', '-')}) or to tune()."
        )
    known = {f.name for f in config.fields()} | set(FIT_ARGUMENTS)
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{where}: {name} is no fit option.{hint}")


def _check_number(name: str, value, where: str) -> None:
    """YAML 1.1 reads 1e-3 (no dot) as text: name it, where a number was meant."""
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return
        raise ValueError(
            f"{where}: {name}: {value!r} is read as text by YAML (1.1 needs a dot in an "
            f"exponent): write {number!r}, such as 1.0e-3."
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
