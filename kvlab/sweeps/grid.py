"""A sweep's points: the cartesian product of parameter values, given on the command line or from Python.

`--sweep burst_size=8,16 --sweep max_tokens=32,64` and `{"burst_size": [8, 16], "max_tokens": [32, 64]}` both give
four points, the first axis slowest. A scalar in a Python grid is fixed for every point; a list of dicts is taken
as the points themselves.
"""
from __future__ import annotations

import itertools
import keyword
from typing import Any, Iterable, Mapping, Sequence

MAX_POINTS = 10_000  # a grid this large is a typo (a value list pasted twice), not an experiment plan
RESERVED = {"run_dir"}  # set by the sweep itself, one per run


class GridError(ValueError):
    """A grid that cannot be run: the message names the offending part and the fix."""


def check_name(name: Any) -> str:
    """A parameter name as papermill injects it (`name = value` in a cell): a Python identifier, and not one the
    sweep sets itself."""
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise GridError(f"parameter name {name!r} is not a Python identifier (letters, digits and _, not a keyword)")
    if name in RESERVED:
        raise GridError(f"{name!r} is set by kvlab for each run: leave it out of the grid and the parameters")
    return name


def _product(axes: Sequence[tuple[str, Sequence[Any]]]) -> list[dict[str, Any]]:
    keys = [k for k, _ in axes]
    if len(set(keys)) != len(keys):
        raise GridError(f"the grid names a parameter twice: {keys}")
    size = 1
    for key, values in axes:
        if not values:
            raise GridError(f"parameter {key!r} has no values: give at least one")
        size *= len(values)
        if size > MAX_POINTS:
            raise GridError(f"the grid has over {MAX_POINTS} points: split the sweep, or check the value lists")
    return [dict(zip(keys, combo)) for combo in itertools.product(*(v for _, v in axes))]


def parse_sweeps(specs: Iterable[str] = ()) -> list[dict[str, Any]]:
    """`["burst_size=8,16", "max_tokens=32,64"]` -> the cartesian product as one dict per run ([{}] if none).
    Values are read like `-p` values (YAML scalars)."""
    from kvlab.notebooks.runner import parse_value

    axes: list[tuple[str, list[Any]]] = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise GridError(f"--sweep wants KEY=v1,v2,...; got {spec!r}")
        axes.append((check_name(key.strip()), [parse_value(v.strip()) for v in values.split(",")]))
    return _product(axes)


def expand_grid(grid: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """The points of a Python grid: a mapping of name -> values (any list, tuple, range or array is an axis; a
    scalar, a string or a dict is fixed; wrap a value that is itself a list: {"models": [["a", "b"]]}), or a
    sequence of point dicts as given."""
    if grid is None:
        return [{}]
    if isinstance(grid, Mapping):
        axes = []
        for key, values in grid.items():
            check_name(key)
            if isinstance(values, (set, frozenset)):
                raise GridError(f"the values of {key!r} are a set, whose order changes from run to run: give a list")
            if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
                values = [values]  # one fixed value
            # A list, tuple, range, array or generator is an axis; numpy scalars become Python ones, which
            # papermill writes into the notebook as literals.
            axes.append((key, [v.item() if hasattr(v, "item") and hasattr(v, "dtype") else v for v in values]))
        return _product(axes)
    if isinstance(grid, (str, bytes)) or not isinstance(grid, Sequence):
        raise GridError(f"a grid is a mapping of name -> values or a list of dicts, not {type(grid).__name__}")
    points = []
    for i, point in enumerate(grid):
        if not isinstance(point, Mapping):
            raise GridError(f"point {i} of the grid is a {type(point).__name__}, not a dict of parameters")
        points.append({check_name(k): v for k, v in point.items()})
    if not points:
        raise GridError("the grid has no points: give at least one dict (an empty dict runs the defaults once)")
    if len(points) > MAX_POINTS:
        raise GridError(f"the grid has over {MAX_POINTS} points: split the sweep")
    return points


def point_label(point: Mapping[str, Any]) -> str:
    """`burst_size=8, max_tokens=32`: how progress lines and tables name a point."""
    return ", ".join(f"{k}={v}" for k, v in point.items())


__all__ = ["GridError", "MAX_POINTS", "check_name", "expand_grid", "parse_sweeps", "point_label"]
