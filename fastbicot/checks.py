"""Argument validation for fastbicot's public entry points ("nothing silent").

Every public function checks its scalar arguments at the boundary with these helpers, so a bad value
fails at once with a message naming the argument, instead of slipping through a ``x < 1``-style test
(NaN compares false with everything) or turning into a raw error several layers down.

API (all raise :class:`ArgumentError` and return the normalised value)::

    check_float(name, value, *, low=None, high=None, low_open=False, high_open=False,
                allow_inf=False, optional=False) -> float | None
    check_int(name, value, *, low=None, high=None, allow_integral_float=False,
              optional=False) -> int | None
    check_bool(name, value, *, optional=False) -> bool | None
    check_str(name, value, *, choices=None, allow_empty=False, optional=False) -> str | None
    check_regular_file(name, path) -> pathlib.Path
    check_writable_file(name, path) -> pathlib.Path
    arg_type(check, **kwargs) -> callable      # argparse ``type=`` adapter for the checks above

Rules:

* ``bool`` is never a number: ``check_int("n", True)`` and ``check_float("x", False)`` fail.
* ``check_float`` accepts any real number (int, float, numpy scalar; not bool), requires it to be
  finite unless ``allow_inf=True`` (NaN is always rejected) and inside ``[low, high]``; ``low_open`` /
  ``high_open`` make the bounds strict. Returns a Python ``float``.
* ``check_int`` accepts integers (int, numpy integer; not bool). ``2.7`` and ``2.0`` are rejected
  unless ``allow_integral_float=True``, which accepts floats with an exact integer value. Returns a
  Python ``int``.
* ``optional=True`` lets ``None`` through (returned as ``None``).
* ``check_regular_file`` checks existence and that ``path`` is a regular file (never opens it, so a
  FIFO or device cannot block the caller).
* ``check_writable_file`` checks, before any work is done, that ``path`` can be written later: not a
  directory, parent directory creatable (it is created) and writable (a temporary file is created
  and removed there, which also catches read-only file systems).
* ``arg_type(check_int, low=1)`` turns a check into an argparse ``type=``: argparse then reports
  ``argument --batch: must be >= 1, got 0`` and exits with status 2 at parse time.

:class:`ArgumentError` subclasses both ``ValueError`` and ``TypeError``, so callers may catch either;
its message always starts with the argument's name.

This module imports only the standard library. The Triton kernels in ``fastbicot/kernels/`` must
stay self-contained and carry their own inline copies of these checks.
"""

from __future__ import annotations

import argparse
import math
import numbers
import os
import stat
import tempfile
from pathlib import Path

__all__ = [
    "ArgumentError",
    "arg_type",
    "check_bool",
    "check_float",
    "check_int",
    "check_regular_file",
    "check_str",
    "check_writable_file",
]


class ArgumentError(ValueError, TypeError):
    """A public argument has the wrong type or value. The message names the argument."""


def _describe(value) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"


def _is_bool(value) -> bool:
    if isinstance(value, bool):
        return True
    # numpy.bool_ is not a subclass of bool; detect it without importing numpy.
    return type(value).__name__ in ("bool_", "bool") and type(value).__module__ == "numpy"


def _range_text(low, high, low_open, high_open) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high}")
    return " and ".join(parts)


def _check_range(name, value, low, high, low_open, high_open, original):
    bad = False
    if low is not None and (value <= low if low_open else value < low):
        bad = True
    if high is not None and (value >= high if high_open else value > high):
        bad = True
    if bad:
        raise ArgumentError(
            f"{name} must be {_range_text(low, high, low_open, high_open)}, got {_describe(original)}"
        )


def check_float(name: str, value, *, low=None, high=None, low_open: bool = False, high_open: bool = False,
                allow_inf: bool = False, optional: bool = False):
    """Return ``float(value)`` after checking it is a real, finite number inside the given bounds."""
    if value is None and optional:
        return None
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise ArgumentError(f"{name} must be a real number, got {_describe(value)}")
    try:
        result = float(value)
    except (OverflowError, ValueError) as exc:  # e.g. an int too large for a float
        raise ArgumentError(f"{name} must be a finite number, got {_describe(value)}") from exc
    if math.isnan(result):
        raise ArgumentError(f"{name} must not be NaN" if allow_inf else f"{name} must be a finite number, got NaN")
    if math.isinf(result) and not allow_inf:
        raise ArgumentError(f"{name} must be a finite number, got {result}")
    _check_range(name, result, low, high, low_open, high_open, value)
    return result


def check_int(name: str, value, *, low=None, high=None, allow_integral_float: bool = False,
              optional: bool = False):
    """Return ``int(value)`` after checking it is an integer (not a bool) inside ``[low, high]``."""
    if value is None and optional:
        return None
    if _is_bool(value):
        raise ArgumentError(f"{name} must be an integer, got {_describe(value)}")
    if isinstance(value, numbers.Integral):
        result = int(value)
    elif allow_integral_float and isinstance(value, numbers.Real):
        as_float = float(value)
        if not math.isfinite(as_float) or not as_float.is_integer():
            raise ArgumentError(f"{name} must be an integer, got {_describe(value)}")
        result = int(as_float)
    else:
        raise ArgumentError(f"{name} must be an integer, got {_describe(value)}")
    _check_range(name, result, low, high, False, False, value)
    return result


def check_bool(name: str, value, *, optional: bool = False):
    """Return ``bool(value)`` after checking it is a bool (``0``/``1``/``"yes"`` are rejected)."""
    if value is None and optional:
        return None
    if not _is_bool(value):
        raise ArgumentError(f"{name} must be True or False, got {_describe(value)}")
    return bool(value)


def check_str(name: str, value, *, choices=None, allow_empty: bool = False, optional: bool = False):
    """Return ``value`` after checking it is a ``str`` (non-empty unless allowed, one of ``choices``)."""
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise ArgumentError(f"{name} must be a string, got {_describe(value)}")
    if choices is not None:
        choices = tuple(choices)
        if value not in choices:
            raise ArgumentError(f"{name} must be one of {list(choices)}, got {value!r}")
        return value
    if not allow_empty and not value.strip():
        raise ArgumentError(f"{name} must be a non-empty string, got {value!r}")
    return value


def check_regular_file(name: str, path) -> Path:
    """Return ``Path(path)`` after checking (with ``os.stat``, never ``open``) that it is a regular file.

    A FIFO, socket, device or directory is rejected with a message naming ``name`` and the path, so a
    caller never blocks reading from a pipe that nobody writes to.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise ArgumentError(f"{name} must be a path (str or os.PathLike), got {_describe(path)}")
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{name}: no such file: {str(p)!r}") from exc
    except OSError as exc:
        raise ArgumentError(f"{name}: cannot stat {str(p)!r}: {exc}") from exc
    if stat.S_ISDIR(st.st_mode):
        raise ArgumentError(f"{name}: {str(p)!r} is a directory, expected a regular file")
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "a device" if (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode))
                else "not a regular file")
        raise ArgumentError(f"{name}: {str(p)!r} is {kind}, expected a regular file")
    return p


def check_writable_file(name: str, path) -> Path:
    """Return ``Path(path)`` after checking it can be written (creates missing parent directories)."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ArgumentError(f"{name} must be a non-empty path, got {_describe(path)}")
    p = Path(path)
    if p.is_dir():
        raise ArgumentError(f"{name}: {str(p)!r} is a directory, expected a file path")
    if p.exists() and not p.is_file():
        raise ArgumentError(f"{name}: {str(p)!r} exists and is not a regular file")
    parent = p.parent if str(p.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ArgumentError(f"{name}: cannot create the directory {str(parent)!r}: {exc.strerror or exc}") from exc
    if p.exists() and not os.access(p, os.W_OK):
        raise ArgumentError(f"{name}: {str(p)!r} is not writable")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise ArgumentError(f"{name}: cannot write in {str(parent)!r}: {exc.strerror or exc}") from exc
    return p


def arg_type(check, **kwargs):
    """An argparse ``type=`` converter running ``check`` (check_int / check_float / check_str / ...)."""

    def convert(text):
        value = text
        if check is check_int:
            try:
                value = int(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        elif check is check_float:
            try:
                value = float(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        try:
            return check("value", value, **kwargs)
        except ArgumentError as exc:
            message = str(exc)
            for prefix in ("value: ", "value "):
                message = message.removeprefix(prefix)
            raise argparse.ArgumentTypeError(message) from None

    convert.__name__ = check.__name__.removeprefix("check_")  # argparse names the type in some messages
    return convert
