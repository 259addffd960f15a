"""Settings: small dataclasses validated field by field from their type annotations.

Every config section of fastbicot (``SamplingParams``, ``RolloutConfig``, the trainer's sections)
is a ``@dataclass`` that inherits ``Settings``. ``__post_init__`` checks each field against its
annotation -- ``float`` must be a finite real number (NaN/inf are errors, bool is not a number),
``int`` an integer (2.7 and True are errors), ``str`` a string, ``list[str]`` a list of strings,
``X | None`` either -- and then calls the section's own ``check()`` for ranges and relations.
Every message names the field by its dotted path (``rollout.cot.top_k``), so a bad value in a
500-line YAML file costs one glance.

``Settings.from_dict`` builds a section from plain data (YAML), nested sections included; an
unknown key is an error that lists the known ones.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Union


class ConfigError(ValueError):
    """A bad setting; the message starts with the setting's dotted path."""


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _is_optional(tp) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def coerce(value, tp, path: str):
    """``value`` checked (and, for numbers and sequences, normalised) against annotation ``tp``."""
    optional, tp = _is_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{path}: must be {_type_name(tp)}, got None")
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and issubclass(tp, Settings):
        if isinstance(value, tp):
            value._validate(path)
            return value
        if isinstance(value, dict):
            return tp.from_dict(value, path)
        raise ConfigError(f"{path}: must be a mapping of {tp.__name__} settings, got {type(value).__name__}")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and math.isfinite(value) and value.is_integer():
                return int(value)  # 8.0 from a YAML file means 8; 2.7 does not
            raise ConfigError(f"{path}: must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{path}: must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: must be a string, got {type(value).__name__} {value!r}")
        return value
    if origin in (list, tuple):
        (item,) = typing.get_args(tp)[:1] or (Any,)
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: must be a list, got {type(value).__name__} {value!r}")
        return [coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: must be a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is Any:
        return value
    raise TypeError(f"{path}: unsupported settings annotation {tp!r}")  # a bug in a Settings class


class Settings:
    """Mixin for ``@dataclass`` settings sections. Subclasses may define ``check(self, path)``."""

    def __post_init__(self):
        self._validate(getattr(self, "_path", type(self).__name__))

    def _validate(self, path: str) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = coerce(getattr(self, f.name), hints[f.name], f"{path}.{f.name}" if path else f.name)
            object.__setattr__(self, f.name, value)
        self.check(path)

    def check(self, path: str) -> None:
        """Ranges and relations between fields; raise ConfigError naming ``{path}.{field}``."""

    def fail(self, path: str, field: str, message: str):
        raise ConfigError(f"{path}.{field}: {message}" if path else f"{field}: {message}")

    @classmethod
    def from_dict(cls, data: dict, path: str = ""):
        if not isinstance(data, dict):
            raise ConfigError(f"{path or cls.__name__}: must be a mapping, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            where = f"{path}." if path else ""
            raise ConfigError(f"{where}{unknown[0]}: unknown setting; {path or cls.__name__} has {names}")
        hints = typing.get_type_hints(cls)
        data = {f.name: _with_field_defaults(f, hints[f.name], data[f.name])
                for f in dataclasses.fields(cls) if f.name in data}
        kwargs = {k: coerce(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
        obj = cls.__new__(cls)
        obj._path = path
        obj.__init__(**kwargs)
        return obj

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = _plain(v)
        return out

    def replace(self, **changes):
        """A copy with ``changes`` applied and validated (nested sections take dicts)."""
        data = self.to_dict()
        for k, v in changes.items():
            if isinstance(v, dict) and isinstance(data.get(k), dict):
                data[k] = {**data[k], **v}
            elif isinstance(v, Settings):
                data[k] = v.to_dict()
            else:
                data[k] = v
        return type(self).from_dict(data, getattr(self, "_path", ""))


def _with_field_defaults(f, tp, value):
    """A partial mapping for a settings section keeps the defaults of the *field*, not only those of
    its class: ``rollout.cot`` defaults to top-k 50 (the seed's CoT sampling) while SamplingParams
    defaults to 0, so ``cot: {max_new_tokens: 24}`` must still sample with top-k 50. Only the values
    where the field's default differs from the class's are filled in (no other section changes)."""
    tp = _is_optional(tp)[1]
    if not (isinstance(value, dict) and isinstance(tp, type) and issubclass(tp, Settings)
            and f.default_factory is not dataclasses.MISSING):
        return value
    own, plain = f.default_factory().to_dict(), tp().to_dict()
    return {**{k: v for k, v in own.items() if v != plain[k]}, **value}


def _plain(v):
    """Settings (nested, in lists and dicts) -> plain data."""
    if isinstance(v, Settings):
        return v.to_dict()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def check_choice(obj: Settings, path: str, field: str, choices) -> None:
    value = getattr(obj, field)
    if value not in choices:
        obj.fail(path, field, f"must be one of {list(choices)}, got {value!r}")


def check_range(obj: Settings, path: str, field: str, *, low=None, high=None, low_open=False,
                high_open=False) -> None:
    value = getattr(obj, field)
    if value is None:
        return
    bad = (low is not None and (value <= low if low_open else value < low)) or (
        high is not None and (value >= high if high_open else value > high)
    )
    if bad:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
        obj.fail(path, field, f"must be {' and '.join(x for x in (lo, hi) if x)}, got {value!r}")
