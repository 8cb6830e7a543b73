"""The search space: a YAML mapping from the recipe's dotted config keys to what a trial may pick.

    optim.lr:           {float: [0.01, 0.5], log: true}   # a float, drawn on a log scale
    optim.momentum:     {float: [0.8, 0.95], when: {optim.name: sgd}}   # only where optim.name is sgd
    train.batch_size:   {int: [64, 512], step: 64}          # 64, 128, ..., 512
    optim.name:         {choice: [sgd, adamw]}              # categorical

Everything is checked before any trial runs, against the config's own rules (cvrecipe.config):
the key must be a field, each end of a range and each choice must be a value the field accepts,
and a range must not be empty. Each value is also tried in the base recipe on its own (so a rule
across fields that it breaks whatever the other parameters are is caught too); combinations that
only some trials draw are caught when the trial builds its config, and recorded as its error.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cvrecipe.config import _SCIENTIFIC, ConfigError, _field_of, _show, check_value, from_dict

KINDS = ("float", "int", "choice")
MODIFIERS = ("log", "step", "when")


@dataclass
class Param:
    """One dimension of the search space."""
    key: str  # dotted config key, e.g. optim.lr
    kind: str  # float | int | choice
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: list = field(default_factory=list)
    when: dict[str, list] = field(default_factory=dict)  # {other key: values of it under which this one applies}

    def describe(self) -> str:
        if self.kind == "choice":
            text = "one of " + ", ".join(_show(c) for c in self.choices)
        else:
            text = f"{self.kind} in [{_show(self.low)}, {_show(self.high)}]" + (" log" if self.log else "") + \
                   (f" step {_show(self.step)}" if self.step is not None else "")
        if self.when:
            text += " when " + ", ".join(f"{k} in {_show(v)}" for k, v in self.when.items())
        return text

    def grid_values(self) -> list:
        """Every value of the dimension, for the grid sampler (a float needs a step)."""
        if self.kind == "choice":
            return list(self.choices)
        if self.step is None:
            raise ConfigError(f"space: {self.key}: the grid sampler needs a step (or a choice list) for a float range")
        count = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
        values = [self.low + i * self.step for i in range(count)]
        return [int(v) for v in values] if self.kind == "int" else [round(v, 12) for v in values]


@dataclass
class Space:
    params: list[Param]
    source: str = "space"  # the file it came from, for messages

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.params]

    def to_dict(self) -> dict:
        return {"source": self.source, "params": [dataclasses.asdict(p) for p in self.params]}

    @classmethod
    def from_stored(cls, data: dict) -> "Space":
        return cls([Param(**p) for p in data["params"]], data.get("source", "space"))

    def suggest(self, trial) -> dict[str, Any]:
        """Draw the trial's values (an optuna Trial): a conditional entry only where its condition holds.
        Entries are drawn in file order, so a condition must name an entry above it."""
        values: dict[str, Any] = {}
        for p in self.params:
            if any(values.get(k) not in allowed for k, allowed in p.when.items()):
                continue
            if p.kind == "float":
                values[p.key] = trial.suggest_float(p.key, p.low, p.high, log=p.log, step=p.step)
            elif p.kind == "int":
                values[p.key] = trial.suggest_int(p.key, p.low, p.high, log=p.log, step=p.step or 1)
            else:
                values[p.key] = trial.suggest_categorical(p.key, p.choices)
        return values

    def grid(self) -> dict[str, list]:
        if any(p.when for p in self.params):
            keys = ", ".join(p.key for p in self.params if p.when)
            raise ConfigError(f"space: the grid sampler takes no conditional entries ({keys}); use tpe or random")
        return {p.key: p.grid_values() for p in self.params}


def load_space(path: str | Path, base: dict) -> Space:
    """Read and check the space in `path` against the base recipe `base` (a raw recipe dict with the
    command line's overrides applied). Raises ConfigError naming the file, the key and the problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"search space {path} not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"search space {path} is not valid YAML: {err}") from err
    return parse_space(raw, base, str(path))


def parse_space(raw: Any, base: dict, source: str = "space") -> Space:
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{source}: expected a mapping of dotted config keys to ranges, got {_show(raw)}")
    params: list[Param] = []
    for key, spec in raw.items():
        try:
            params.append(_parse_param(str(key), spec, params))
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
    for p in params:
        for value in _probe_values(p):
            try:
                build_config(base, {p.key: value})
            except ConfigError as err:
                raise ConfigError(f"{source}: {p.key}={_show(value)} is refused by the recipe: {err}") from None
    return Space(params, source)


def _number(value: Any) -> Any:
    """YAML 1.1 reads 1e-3 or 1.0e6 (no dot, or no exponent sign) as a string; in a space it means a number."""
    return float(value) if isinstance(value, str) and _SCIENTIFIC.fullmatch(value) else value


def _parse_param(key: str, spec: Any, earlier: list[Param]) -> Param:
    hint, meta = _field_of(key)  # unknown key: ConfigError naming it and what the section holds
    if dataclasses.is_dataclass(hint):
        raise ConfigError(f"{key} is a section, not a setting; name one of its keys")
    if not isinstance(spec, dict):
        raise ConfigError(f"{key}: expected a mapping such as {{float: [lo, hi]}}, {{int: [lo, hi]}} or "
                          f"{{choice: [a, b]}}, got {_show(spec)}")
    kinds = [k for k in KINDS if k in spec]
    unknown = [k for k in spec if k not in KINDS + MODIFIERS]
    if unknown or len(kinds) != 1:
        raise ConfigError(f"{key}: expected exactly one of {', '.join(KINDS)} plus any of {', '.join(MODIFIERS)}, "
                          f"got {', '.join(map(str, spec)) or 'nothing'}")
    kind = kinds[0]
    spec = {**spec, kind: [_number(v) for v in spec[kind]] if isinstance(spec[kind], list) else spec[kind]}
    when = _parse_when(key, spec.get("when"), earlier)
    if kind == "choice":
        choices = spec["choice"]
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{key}: choice expects a non-empty list, got {_show(choices)}")
        if any(k in spec for k in ("log", "step")):
            raise ConfigError(f"{key}: log and step apply to float and int ranges, not to a choice")
        return Param(key, kind, choices=[check_value(key, c, hint, meta) for c in choices], when=when)
    return _parse_range(key, kind, spec, hint, meta, when)


def _parse_range(key: str, kind: str, spec: dict, hint: Any, meta: dict, when: dict) -> Param:
    bounds = spec[kind]
    number = (int,) if kind == "int" else (int, float)
    if not (isinstance(bounds, list) and len(bounds) == 2
            and all(isinstance(b, number) and not isinstance(b, bool) for b in bounds)):
        raise ConfigError(f"{key}: {kind} expects [low, high] ({'integers' if kind == 'int' else 'numbers'}), "
                          f"got {_show(bounds)}")
    low, high = (check_value(key, b, hint, meta) for b in bounds)  # each end a value the config accepts
    if kind == "int":
        low, high = bounds  # integers, also on a float field
    log, step = spec.get("log", False), spec.get("step")
    if not isinstance(log, bool):
        raise ConfigError(f"{key}: log expects true or false, got {_show(log)}")
    if step is not None and (isinstance(step, bool) or not isinstance(step, number) or step <= 0):
        raise ConfigError(f"{key}: step expects a positive {'integer' if kind == 'int' else 'number'}, "
                          f"got {_show(step)}")
    if not low < high:
        raise ConfigError(f"{key}: empty range [{_show(low)}, {_show(high)}] (low must be below high; "
                          f"to fix a value, override it instead)")
    if log and low <= 0:
        raise ConfigError(f"{key}: a log range needs low > 0, got {_show(low)}")
    if log and step is not None and step != 1:
        raise ConfigError(f"{key}: a range cannot be both log and stepped (step {_show(step)})")
    if step is not None and step > high - low:
        raise ConfigError(f"{key}: step {_show(step)} is wider than the range [{_show(low)}, {_show(high)}]")
    return Param(key, kind, low, high, log, None if (log and kind == "int") else step, when=when)


def _parse_when(key: str, when: Any, earlier: list[Param]) -> dict[str, list]:
    if when is None:
        return {}
    if not isinstance(when, dict) or not when:
        raise ConfigError(f"{key}: when expects a mapping {{other.key: value or [values]}}, got {_show(when)}")
    choices = {p.key: p.choices for p in earlier if p.kind == "choice"}
    out = {}
    for other, values in when.items():
        if other not in choices:
            raise ConfigError(f"{key}: when names {other}, which is not a choice entry above it in the space")
        values = values if isinstance(values, list) else [values]
        missing = [v for v in values if v not in choices[other]]
        if missing:
            raise ConfigError(f"{key}: when {other} is {_show(missing)}, which is not among its choices "
                              f"{_show(choices[other])}")
        out[other] = values
    return out


def _probe_values(p: Param) -> list:
    return list(p.choices) if p.kind == "choice" else [p.low, p.high]


def set_dotted(raw: dict, key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def build_config(base: dict, values: dict[str, Any], fixed: dict[str, Any] | None = None):
    """A checked Config: the base recipe with `values` (a trial's parameters) and `fixed` (settings
    the tuner sets, such as the run folder) put in; exactly the checks `cvrecipe run` makes."""
    raw = copy.deepcopy(base)
    for key, value in {**values, **(fixed or {})}.items():
        set_dotted(raw, key, value)
    return from_dict(raw)
