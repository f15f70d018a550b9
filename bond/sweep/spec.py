"""The sweep spec: its file format, its points and their names, folders and configs.

A spec is what `sweep_config(...)` returns (the fields are in bond/sweep/__init__.py's docstring);
`plan_sweep` turns it into every point and its validated config before anything runs.
"""

from __future__ import annotations

import ast
import dataclasses
import itertools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from bond.config_base import load_config, set_field

MODES = ("auto", "processes", "population")
AXIS_KINDS = ("product", "zip")
ROOT = Path(__file__).resolve().parents[2]


def product(fields: Mapping[str, Sequence[Any]]) -> dict:
    """An axis of every combination of the fields' values (the first field varies slowest)."""
    return {"product": {field: tuple(values) for field, values in fields.items()}}


def zipped(fields: Mapping[str, Sequence[Any]]) -> dict:
    """An axis whose i-th point takes every field's i-th value (the value lists have equal lengths)."""
    return {"zip": {field: tuple(values) for field, values in fields.items()}}


def sweep_config(
    base: str,
    axes: Sequence[dict] = (),
    seeds: Sequence[int] = (0,),
    metric: str = "eval/reward",
    mode: str = "auto",
    overrides: Sequence[str] = (),
    population_size: int = 0,
) -> ml_collections.ConfigDict:
    """A sweep spec (see the module docstring for the fields)."""
    spec = ml_collections.ConfigDict()
    spec.base = base
    spec.axes = tuple(axes)
    spec.seeds = tuple(seeds)
    spec.metric = metric
    spec.mode = mode
    spec.overrides = tuple(overrides)
    spec.population_size = population_size
    return spec


def with_base_args(base: str, arg: str | None) -> str:
    """`base` with the sweep file's argument appended to its variants: ("c.py:kl", "quick") → "c.py:kl,quick"."""
    if not arg:
        return base
    path, _, variants = base.partition(":")
    return f"{path}:{','.join(v for v in (variants, arg) if v)}"


def load_sweep(spec: str) -> ml_collections.ConfigDict:
    """The sweep spec of a file spec `configs/sweeps/name.py[:arg]`."""
    return load_config(resolve_config_spec(spec))


def resolve_config_spec(spec: str) -> str:
    """`path[:arg]` with the path made absolute: relative to the working directory if the file is
    there, else to the repository root."""
    path, sep, arg = spec.partition(":")
    for candidate in (Path(path), ROOT / path):
        if candidate.is_file():
            return f"{candidate.resolve()}{sep}{arg}"
    raise FileNotFoundError(f"no config file {path!r} (looked in {Path.cwd()} and {ROOT}); fix the sweep's `base`.")


@dataclasses.dataclass(frozen=True)
class Point:
    """One point of a sweep: the value of every swept field, in axis order (seed last)."""

    values: tuple[tuple[str, Any], ...]

    @property
    def name(self) -> str:
        """'field=value,...': the point's folder name, stable across runs of the same spec."""
        return ",".join(f"{field}={format_value(value)}" for field, value in self.values)

    def value(self, field: str) -> Any:
        return dict(self.values)[field]


def format_value(value: Any) -> str:
    """A value as it appears in point names and `--config.<field>=` flags (floats: shortest repr)."""
    if isinstance(value, (tuple, list)):
        return "(" + ",".join(format_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return value if isinstance(value, str) else repr(value)


def parse_override(text: str) -> tuple[str, Any]:
    """'field=value' → (field, value): the value as a Python literal if it is one, else the string."""
    field, sep, raw = text.partition("=")
    if not sep or not field:
        raise ValueError(f"override {text!r} must look like 'field=value', e.g. 'steps=100' or 'anchor.eta=0.1'.")
    try:
        return field.strip(), ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return field.strip(), raw


def _axis_points(axis: Any, index: int) -> list[tuple[tuple[str, Any], ...]]:
    if not isinstance(axis, Mapping) or len(axis) != 1 or next(iter(axis)) not in AXIS_KINDS:
        raise ValueError(
            f"axes[{index}]={axis!r} must be product({{field: values}}) or zipped({{field: values}}) "
            f"(a dict with one key in {AXIS_KINDS})."
        )
    kind, fields = next(iter(axis.items()))
    if not fields:
        raise ValueError(f"axes[{index}] has no fields; give at least one field: values.")
    for field, values in fields.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
            raise ValueError(f"axes[{index}]: {field!r} needs a non-empty list of values, got {values!r}.")
    if kind == "zip":
        lengths = {field: len(values) for field, values in fields.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(
                f"axes[{index}] zips fields of different lengths {lengths}; give every field as many values."
            )
        length = len(next(iter(fields.values())))
        return [tuple((field, values[i]) for field, values in fields.items()) for i in range(length)]
    combos = itertools.product(*fields.values())
    return [tuple(zip(fields, combo)) for combo in combos]


def expand_points(spec: ml_collections.ConfigDict) -> list[Point]:
    """Every point of the sweep: the product of its axes, then of its seeds."""
    axes = [_axis_points(axis, i) for i, axis in enumerate(spec.axes)]
    fields = [field for axis in axes for field, _ in axis[0]]
    if spec.seeds:
        axes.append([(("seed", int(s)),) for s in spec.seeds])
        fields.append("seed")
    repeated = sorted({f for f in fields if fields.count(f) > 1})
    if repeated:
        raise ValueError(
            f"fields {repeated} are swept by more than one axis (or by an axis and `seeds`); sweep each field once."
        )
    points = [Point(tuple(itertools.chain(*parts))) for parts in itertools.product(*axes)]
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        raise ValueError("the sweep has repeated points (a value listed twice); list each value once.")
    for name in names:
        if os.sep in name:
            raise ValueError(f"point name {name!r} contains {os.sep!r}; swept values must not contain it.")
    return points


def _set_field(config: ml_collections.ConfigDict, field: str, value: Any, what: str) -> None:
    """`config_base.set_field`, its error prefixed with `what` (the override or point it came from)."""
    try:
        set_field(config, field, value)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None


def base_config(spec: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The base config with the sweep's overrides applied."""
    config = load_config(resolve_config_spec(spec.base))
    for text in spec.overrides:
        field, value = parse_override(text)
        _set_field(config, field, value, f"override {text!r}")
    return config


def point_config(
    spec: ml_collections.ConfigDict, point: Point, base: ml_collections.ConfigDict | None = None
) -> ml_collections.ConfigDict:
    """The config of one point: the base with overrides (`base_config(spec)`, or `base` if given),
    then the point's values."""
    config = ml_collections.ConfigDict((base if base is not None else base_config(spec)).to_dict())  # a copy
    for field, value in point.values:
        _set_field(config, field, value, f"point {point.name}")
    return config


def check_spec(spec: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first bad field of a sweep spec."""
    for field in ("base", "axes", "seeds", "metric", "mode", "overrides", "population_size"):
        if field not in spec:
            raise ValueError(f"the sweep spec has no {field!r}; build it with bond.sweep.sweep_config(...).")
    if spec.mode not in MODES:
        raise ValueError(f"mode={spec.mode!r} must be one of {MODES}.")
    if not isinstance(spec.population_size, int) or spec.population_size < 0:
        raise ValueError(f"population_size={spec.population_size!r} must be an integer >= 0 (0: one population).")
    if not spec.metric.startswith("eval/"):
        raise ValueError(f"metric={spec.metric!r} must be an evaluation metric, 'eval/<name>' (e.g. 'eval/reward').")
    for seed in spec.seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seeds={tuple(spec.seeds)!r} must be integers >= 0.")


def point_dir(workdir: str | Path, point: Point) -> Path:
    """The point's run folder: DIR/points/<name>."""
    return Path(workdir) / "points" / point.name


def is_finished(run_dir: str | Path) -> bool:
    """A point is finished when its run folder has summary.json (`train.run` writes it last)."""
    return (Path(run_dir) / "summary.json").is_file()


def plan_sweep(spec: ml_collections.ConfigDict) -> tuple[list[Point], list[ml_collections.ConfigDict]]:
    """Every point of `spec` and its validated config.

    Raises:
      ValueError (a bad spec field; `bond.validation.ConfigError` for a point's bad config value,
      naming the point) or FileNotFoundError (a missing config file), before anything runs.
    """
    from bond.validation import ConfigError, validate

    check_spec(spec)
    points = expand_points(spec)
    base = base_config(spec)
    configs = [point_config(spec, p, base) for p in points]
    for point, config in zip(points, configs):
        try:
            validate(config)
        except ConfigError as e:
            raise ConfigError(f"point {point.name}: {e}") from None
    return points, configs
