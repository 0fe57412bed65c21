"""Config validation, one way for every typed config of the engine.

Two jobs:

* value checks that a config dataclass calls in ``__post_init__`` (:func:`choice`,
  :func:`positive`, :func:`in_range`, :func:`numbers`, :func:`boolean`), each raising a
  :class:`ConfigError` whose message reads ``<owner>.<field>=<value> must be <what>``;
* :func:`build`: a config dataclass from a YAML / command-line tree, every key checked against
  the dataclass fields (recursively for fields that are dataclasses themselves) and every leaf
  coerced to its field's annotation by :func:`coerce` (``1e-3``, a string to YAML 1.1, is a
  float; an int is accepted for a float; infinities and NaN are refused).

:class:`ConfigError` is a ``ValueError`` (the model and loss configs raise it when built by hand)
and a :class:`~r2d2.engine.errors.UsageError` (a command exits 2 on it). This module imports
nothing from the engine but its errors, so the model, the losses, the run config and the eval
config can all use it without import cycles.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any

from r2d2.engine.errors import UsageError


class ConfigError(ValueError, UsageError):
    """A config value or key is wrong; the message names it and what is allowed (exit status 2)."""


class ConfigFileNotFound(FileNotFoundError, UsageError):
    """``--config`` (or a ``base:`` it names) does not exist (exit status 2)."""


# ---------------------------------------------------------------------------- value checks
def is_number(v: Any) -> bool:
    """An int or float, not a bool (YAML ``true`` is no number)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def choice(owner: str, name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{owner}.{name}={value!r} is not allowed; expected one of {allowed}")


def boolean(owner: str, obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if not isinstance(v, bool):
            raise ConfigError(f"{owner}.{n}={v!r} must be a bool")


def positive(
    owner: str, obj: Any, *names: str, allow_zero: bool = False, integer: bool = False
) -> None:
    """Each of ``obj``'s fields ``names`` is a number > 0 (>= 0 with ``allow_zero``; an int with
    ``integer``)."""
    kind = ("non-negative " if allow_zero else "positive ") + ("int" if integer else "number")
    for n in names:
        v = getattr(obj, n)
        ok = (is_int(v) if integer else is_number(v)) and (v >= 0 if allow_zero else v > 0)
        if not ok:
            raise ConfigError(f"{owner}.{n}={v!r} must be a {kind}")


def in_range(
    owner: str, obj: Any, *names: str, lo: float = 0.0, hi: float = 1.0, hi_open: bool = False
) -> None:
    """Each of ``obj``'s fields ``names`` is a number in ``[lo, hi]`` (``[lo, hi)`` with
    ``hi_open``)."""
    for n in names:
        v = getattr(obj, n)
        if not is_number(v) or not (lo <= v < hi if hi_open else lo <= v <= hi):
            raise ConfigError(
                f"{owner}.{n}={v!r} must be in [{lo:g}, {hi:g}{')' if hi_open else ']'}"
            )


def numbers(owner: str, name: str, value: Any, n: int, what: str) -> None:
    """``value`` is a list of ``n`` numbers (checked before any comparison, so
    ``--optim.betas=[a,b]`` is an error naming the field, not a TypeError)."""
    if (
        not isinstance(value, (list, tuple))
        or len(value) != n
        or not all(is_number(v) for v in value)
    ):
        raise ConfigError(f"{owner}.{name}={value!r} must be {what}")


# ---------------------------------------------------------------------------- typed building
_EXP_FLOAT = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)[eE][+-]?\d+$")
"""What YAML 1.2 reads as a float but PyYAML (YAML 1.1) leaves a string: ``1e-3``, ``2E5``."""


def _finite(owner: str, name: str, v: float) -> float:
    """Infinite or NaN hyper-parameters are refused: ``--optim.lr=inf`` would make every step
    non-finite (and its checkpoints worthless) instead of failing here."""
    if not math.isfinite(v):
        raise ConfigError(f"{owner}.{name}={v!r} is not a finite number")
    return v


def _list_item(owner: str, name: str, v: Any) -> Any:
    if isinstance(v, str) and _EXP_FLOAT.match(v):
        return _finite(owner, name, float(v))
    return _finite(owner, name, v) if isinstance(v, float) else v


def coerce(owner: str, name: str, tp: Any, value: Any) -> Any:
    """``value`` checked against the field annotation ``tp`` and converted where YAML is loose
    (ints for floats; ``1e-3``, also as a list element; a bool for a string field is lowered,
    so ``fused: true`` reads ``"true"``). A wrong type is a :class:`ConfigError` naming the field."""
    union = isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union
    options = typing.get_args(tp) if union else (tp,)
    if value is None and type(None) in options:
        return None
    for t in options:
        base = typing.get_origin(t) or t
        if base is float and is_number(value):
            return _finite(owner, name, float(value))
        if base is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return _finite(owner, name, float(value))
            except ConfigError:
                raise
            except ValueError:
                pass
        if base is int and is_int(value):
            return value
        if base is bool and isinstance(value, bool):
            return value
        if base is str and (isinstance(value, (str, bool)) or is_number(value)):
            return str(value).lower() if isinstance(value, bool) else str(value)
        if base is list and isinstance(value, (list, tuple)):
            return [_list_item(owner, name, v) for v in value]
        if base is dict and isinstance(value, dict):
            return value
    names = " or ".join(getattr(typing.get_origin(t) or t, "__name__", str(t)) for t in options)
    raise ConfigError(f"{owner}.{name}={value!r} has the wrong type; expected {names}")


def merge(dst: dict, src: dict) -> dict:
    """``src`` merged into ``dst`` (nested mappings key by key, anything else replaced)."""
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            merge(dst[k], v)
        else:
            dst[k] = v
    return dst


def _prefixed(prefix: str, err: Exception) -> str:
    """``vision.layers=-1 ...`` raised inside the ``model`` section -> ``model.vision.layers=-1 ...``."""
    msg = str(err)
    if not prefix or msg.startswith(f"{prefix}."):
        return msg
    parent, _, last = prefix.rpartition(".")
    if parent and msg.startswith(f"{last}."):  # a nested config names itself: vision.layers=...
        return f"{parent}.{msg}"
    return f"{prefix}.{msg}" if re.match(r"^[A-Za-z_][\w.]*=", msg) else f"{prefix}: {msg}"


def build(cls: type, values: Any, prefix: str = "") -> Any:
    """An instance of the config dataclass ``cls`` from the mapping ``values``.

    Keys must be fields of ``cls`` (an unknown key names the field path and the fields there);
    dataclass-typed fields are built recursively (an empty YAML section, None, counts as ``{}``);
    leaves go through :func:`coerce`. A class may define ``tree_base(values) -> dict``: the tree
    the given values are merged over (the model config's named preset). Errors from the class's
    own ``__post_init__`` become :class:`ConfigError` prefixed with the field path."""
    where = prefix or "config"
    if values is None:
        values = {}
    names = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(values, dict):
        raise ConfigError(
            f"{where} is a section ({cls.__name__}); give its fields, e.g. "
            f"--{prefix + '.' if prefix else ''}{names[0]}=..."
        )
    tree_base = getattr(cls, "tree_base", None)
    if tree_base is not None:
        try:
            values = merge(tree_base(values), values)
        except ValueError as e:
            raise ConfigError(_prefixed(prefix, e)) from None
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in values.items():
        path = f"{prefix}.{k}" if prefix else k
        if k not in names:
            raise ConfigError(f"{path} is not a {cls.__name__} field; fields: {sorted(names)}")
        if dataclasses.is_dataclass(hints[k]):
            kwargs[k] = build(hints[k], v, path)
        else:
            kwargs[k] = coerce(prefix or cls.__name__, k, hints[k], v)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # the class's own checks (ConfigError among them)
        raise ConfigError(_prefixed(prefix, e)) from None
