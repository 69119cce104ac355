"""Type and range checks of user-supplied values, shared by the configs (TrainConfig, model configs) and the
data and generation arguments: bad input fails up front with the field's name and what was expected,
before anything is built or written."""
from __future__ import annotations

import math
import types
import typing
from typing import Any, Union


def matches_type(value: Any, annotation: Any) -> bool:
    """isinstance against a type hint (`int | None`, `list[int]`, `float`, ...). bool is not an int, and an int
    is a float (as in Python's numeric tower)."""
    if annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return any(matches_type(value, arg) for arg in typing.get_args(annotation))
    if annotation in (int, float):
        return isinstance(value, int if annotation is int else (int, float)) and not isinstance(value, bool)
    if origin in (list, tuple):
        (item, *_) = typing.get_args(annotation) or (Any,)
        return isinstance(value, origin) and all(matches_type(v, item) for v in value)
    return isinstance(value, origin or annotation)


def type_name(annotation: Any) -> str:
    """How an error message names a type hint: "int or None", "list[int]", "float"."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "None"
    return str(annotation) if typing.get_origin(annotation) else getattr(annotation, "__name__", str(annotation))


def type_errors(cls: type, values: dict[str, Any]) -> list[str]:
    """'field: expected int, got '64' (str)' for every entry of `values` that is a field of the dataclass
    `cls` and does not match its annotation. Keys that are not fields are ignored."""
    hints = typing.get_type_hints(cls)
    return [f"{name}: expected {type_name(hints[name])}, got {value!r} ({type(value).__name__})"
            for name, value in values.items() if name in hints and not matches_type(value, hints[name])]


def check_fields(obj: Any, owner: str | None = None) -> None:
    """TypeError naming every field of the dataclass instance `obj` whose value does not match its annotation."""
    values = {name: getattr(obj, name) for name in typing.get_type_hints(type(obj))}
    problems = type_errors(type(obj), values)
    if problems:
        raise TypeError(f"{owner or type(obj).__name__}: " + "; ".join(problems))


def check_number(value: Any, name: str, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, integer: bool = False,
                 or_none: bool = False) -> None:
    """TypeError unless `value` is a real number (an int when `integer`; never a bool), ValueError unless it is
    finite and within [low, high] (open ends where asked). `or_none`: None is fine too."""
    if or_none and value is None:
        return
    kind = ("None or " if or_none else "") + ("an int" if integer else "a number")
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise TypeError(f"{name} must be {kind}, got {value!r} ({type(value).__name__})")
    if high is None:
        bounds = "" if low is None else (" > " if low_open else " >= ") + _show(low)
    else:
        bounds = " in " + ("(" if low_open else "[") + ("-inf" if low is None else _show(low)) + f", {_show(high)}" \
            + (")" if high_open else "]")
    bad = (isinstance(value, float) and not math.isfinite(value)) \
        or (low is not None and (value <= low if low_open else value < low)) \
        or (high is not None and (value >= high if high_open else value > high))
    if bad:
        finite = "" if integer else " and finite"
        raise ValueError(f"{name} must be{' None or' if or_none else ''}{bounds}{finite}, got {value!r}")


def _show(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)
