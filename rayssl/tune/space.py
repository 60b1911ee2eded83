"""Search spaces: load tune_spaces/<method>.yaml, validate every value against the method's config, build Tune domains.

File format (one mapping; keys are `--set` paths, each value names one distribution):

    voco.n_xy:
      choice: [2, 3, 4, 5]        # any YAML values (numbers, strings, booleans, lists)
    voco.lambda_reg:
      uniform: [0.5, 1.5]         # float in [lo, hi]
    train.lr:
      loguniform: [1.0e-5, 1.0e-3]  # float, log-uniform in [lo, hi], lo > 0
    mlsscl.queue_length:
      randint: [32, 128]          # integer in [lo, hi], both ends included

Validation resolves the run configuration (`rayssl.config.resolve_config`) for every combination
of each parameter's extremes (each choice; lo and hi of a range), so a value the method's config
rejects -- alone or together with another sampled value -- fails before any Ray worker starts.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Any, Sequence

import yaml

from rayssl.config import resolve_config

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint")
# Beyond this many extreme combinations, parameters are checked one at a time (plus all-low / all-high).
MAX_COMBINATIONS = 256


@dataclass(frozen=True)
class Param:
    """One hyperparameter: its `--set` path and distribution."""

    path: str
    kind: str
    args: tuple[Any, ...]

    def domain(self) -> Any:
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.args))
        if self.kind == "uniform":
            return tune.uniform(*self.args)
        if self.kind == "loguniform":
            return tune.loguniform(*self.args)
        return tune.randint(self.args[0], self.args[1] + 1)  # Tune's upper bound is exclusive

    def extremes(self) -> list[Any]:
        """The values validation tries: every choice, or both ends of a range."""
        return list(self.args)

    def describe(self) -> str:
        if self.kind == "choice":
            return f"{self.path} in {list(self.args)}"
        return f"{self.path} ~ {self.kind}[{self.args[0]}, {self.args[1]}]"


@dataclass(frozen=True)
class SearchSpace:
    method: str
    params: tuple[Param, ...]
    source: str

    def param_space(self) -> dict[str, Any]:
        """Tune's param_space: one flat entry per `--set` path."""
        return {p.path: p.domain() for p in self.params}

    @property
    def paths(self) -> list[str]:
        return [p.path for p in self.params]

    def describe(self) -> str:
        return "; ".join(p.describe() for p in self.params)


def find_space_file(method: str, space: str | None = None) -> str:
    """`space` if given, else tune_spaces/<method>.yaml in the working directory or beside the rayssl package."""
    if space:
        if not os.path.exists(space):
            raise FileNotFoundError(f"--space {space}: no such file")
        return space
    import rayssl

    candidates = [os.path.join(os.getcwd(), "tune_spaces", f"{method}.yaml"),
                  os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(rayssl.__file__))), "tune_spaces",
                               f"{method}.yaml")]
    for path in candidates:
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"no search space for {method!r}: looked for {', '.join(dict.fromkeys(candidates))}; "
                            f"write one (see docs/evaluation.md) or pass --space FILE")


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: expected a number, got {value!r}")
    return value


def _parse_param(path: str, spec: Any, source: str) -> Param:
    where = f"{source}: {path}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ValueError(f"{where}: expected one distribution, e.g. {{choice: [...]}} or {{uniform: [lo, hi]}}; got {spec!r}")
    kind, args = next(iter(spec.items()))
    if kind not in DISTRIBUTIONS:
        raise ValueError(f"{where}: unknown distribution {kind!r}; use one of {', '.join(DISTRIBUTIONS)}")
    if not isinstance(args, list) or not args:
        raise ValueError(f"{where}: {kind} needs a non-empty list, got {args!r}")
    if kind == "choice":
        return Param(path, kind, tuple(tuple(a) if isinstance(a, list) else a for a in args))
    if len(args) != 2:
        raise ValueError(f"{where}: {kind} needs [lo, hi], got {args!r}")
    lo, hi = (_number(a, where) for a in args)
    if not lo < hi:
        raise ValueError(f"{where}: {kind} needs lo < hi, got [{lo}, {hi}]")
    if kind == "loguniform" and lo <= 0:
        raise ValueError(f"{where}: loguniform needs lo > 0, got {lo}")
    if kind == "randint":
        if not (float(lo).is_integer() and float(hi).is_integer()):
            raise ValueError(f"{where}: randint needs integers, got [{lo}, {hi}]")
        lo, hi = int(lo), int(hi)
    else:
        lo, hi = float(lo), float(hi)
    return Param(path, kind, (lo, hi))


def load_space(method: str, space: str | None = None) -> SearchSpace:
    """Parse the method's search space file (structure only; see `validate_space` for the values)."""
    source = find_space_file(method, space)
    with open(source) as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise ValueError(f"{source}: not valid YAML: {err}") from None
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{source}: expected a mapping of `--set` paths to distributions")
    params = tuple(_parse_param(str(path), spec, source) for path, spec in raw.items())
    return SearchSpace(method=method, params=params, source=source)


def yaml_value(value: Any) -> str:
    """A value as `--set` text that YAML reads back as the same value (1e-5 -> '1.0e-05', lists in flow style)."""
    if hasattr(value, "item") and callable(value.item):  # numpy scalars from Tune's samplers
        value = value.item()
    if isinstance(value, tuple):
        value = list(value)
    text = yaml.safe_dump(value, default_flow_style=True).strip()
    return text[:-3].strip() if text.endswith("...") else text


def format_override(path: str, value: Any) -> str:
    return f"{path}={yaml_value(value)}"


def _combinations(params: Sequence[Param]) -> list[list[tuple[str, Any]]]:
    extremes = [[(p.path, v) for v in p.extremes()] for p in params]
    total = 1
    for values in extremes:
        total *= len(values)
    if total <= MAX_COMBINATIONS:
        return [list(combo) for combo in itertools.product(*extremes)]
    combos = [[values[0] for values in extremes], [values[-1] for values in extremes]]
    for i, values in enumerate(extremes):
        for value in values:
            combos.append([value if j == i else extremes[j][0] for j in range(len(extremes))])
    return combos


def validate_space(space: SearchSpace, profile: str | None = None, overrides: Sequence[str] = (),
                   config_file: str | None = None) -> int:
    """Resolve the run config at the space's extremes; raise ValueError naming the file, values and field.

    Returns the number of configurations checked.
    """
    combos = _combinations(space.params)
    for combo in combos:
        sampled = [format_override(path, value) for path, value in combo]
        try:
            resolve_config(method=space.method, profile=profile, file=config_file, overrides=[*overrides, *sampled])
        except ValueError as err:
            raise ValueError(f"{space.source}: the sampled values {', '.join(sampled)} are not a valid "
                             f"{space.method} configuration:\n{err}") from None
    return len(combos)
