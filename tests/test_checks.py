"""fastbicot.checks: every bad scalar fails with an ArgumentError naming the argument."""

import math
import os
import random
import re
import stat

import numpy as np
import pytest

from fastbicot.checks import (
    ArgumentError,
    arg_type,
    check_bool,
    check_float,
    check_int,
    check_regular_file,
    check_str,
    check_writable_file,
)

BAD_FLOATS = [float("nan"), -float("nan"), float("inf"), -float("inf"), np.float32("nan"), np.float64("inf"),
              True, False, np.bool_(True), "1.0", None, [1.0], b"1", 1j, 10**400]


@pytest.mark.parametrize("value", BAD_FLOATS, ids=repr)
def test_check_float_rejects(value):
    with pytest.raises(ArgumentError, match=r"^my_arg "):
        check_float("my_arg", value)
    # also catchable as either builtin
    with pytest.raises(ValueError):
        check_float("my_arg", value)
    with pytest.raises(TypeError):
        check_float("my_arg", value)


def test_check_float_range(seed):
    rng = random.Random(seed)
    for _ in range(200):
        low, high = sorted(rng.uniform(-10, 10) for _ in range(2))
        x = rng.choice([rng.uniform(-20, 20), low, high, rng.randint(-20, 20)])
        for low_open in (False, True):
            for high_open in (False, True):
                ok = (x > low if low_open else x >= low) and (x < high if high_open else x <= high)
                if ok:
                    assert check_float("x", x, low=low, high=high, low_open=low_open, high_open=high_open) == x
                else:
                    with pytest.raises(ArgumentError, match=r"^x must be"):
                        check_float("x", x, low=low, high=high, low_open=low_open, high_open=high_open)


def test_check_float_accepts_and_normalises():
    assert check_float("a", 3) == 3.0 and type(check_float("a", 3)) is float
    assert type(check_float("a", np.float32(0.5))) is float
    assert check_float("a", float("inf"), allow_inf=True) == math.inf
    with pytest.raises(ArgumentError, match="NaN"):
        check_float("a", float("nan"), allow_inf=True)
    assert check_float("a", None, optional=True) is None
    with pytest.raises(ArgumentError, match=r"^temperature must be > 0"):
        check_float("temperature", 0.0, low=0.0, low_open=True)


BAD_INTS = [2.7, 2.0, float("nan"), float("inf"), True, False, np.bool_(False), "3", None, 3 + 0j, [3],
            np.float64(4.0)]


@pytest.mark.parametrize("value", BAD_INTS, ids=repr)
def test_check_int_rejects(value):
    with pytest.raises(ArgumentError, match=r"^count must be an integer"):
        check_int("count", value)


def test_check_int_accepts(seed):
    rng = random.Random(seed)
    for _ in range(100):
        v = rng.randint(-1000, 1000)
        for wrapped in (v, np.int64(v), np.int32(v)):
            out = check_int("n", wrapped)
            assert out == v and type(out) is int
        low = rng.randint(-1000, 1000)
        if v < low:
            with pytest.raises(ArgumentError, match=f"^n must be >= {low}"):
                check_int("n", v, low=low)
        else:
            assert check_int("n", v, low=low) == v
    assert check_int("n", 4.0, allow_integral_float=True) == 4
    for bad in (4.5, float("nan"), float("inf"), True):
        with pytest.raises(ArgumentError, match="^n must be an integer"):
            check_int("n", bad, allow_integral_float=True)
    assert check_int("n", None, optional=True) is None


@pytest.mark.parametrize("value", [0, 1, "yes", None, 1.0, np.int64(1)], ids=repr)
def test_check_bool_rejects(value):
    with pytest.raises(ArgumentError, match="^flag must be True or False"):
        check_bool("flag", value)


def test_check_bool_accepts():
    assert check_bool("flag", True) is True
    assert check_bool("flag", np.bool_(False)) is False


@pytest.mark.parametrize("value,kwargs", [
    (1, {}), (None, {}), (b"sum", {}), ("", {}), ("   ", {}), ("Sum", {"choices": ("sum", "product")}),
    ("", {"choices": ("sum",)}),
], ids=repr)
def test_check_str_rejects(value, kwargs):
    with pytest.raises(ArgumentError, match="^mode must be"):
        check_str("mode", value, **kwargs)


def test_check_str_accepts():
    assert check_str("mode", "sum", choices=["sum", "product"]) == "sum"
    assert check_str("mode", "", allow_empty=True) == ""
    assert check_str("mode", None, optional=True) is None


def test_check_regular_file(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("x")
    assert check_regular_file("path", f) == f
    assert check_regular_file("path", str(f)) == f
    with pytest.raises(FileNotFoundError, match="path: no such file"):
        check_regular_file("path", tmp_path / "missing")
    with pytest.raises(ArgumentError, match="is a directory"):
        check_regular_file("path", tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    with pytest.raises(ArgumentError, match="is a FIFO"):
        check_regular_file("path", fifo)
    with pytest.raises(ArgumentError, match="is a device"):
        check_regular_file("path", "/dev/null")
    with pytest.raises(ArgumentError, match="^path must be a path"):
        check_regular_file("path", 3)


def test_check_writable_file(tmp_path):
    target = tmp_path / "new" / "deeper" / "out.json"
    assert check_writable_file("--json", target) == target
    assert target.parent.is_dir() and not target.exists() and list(target.parent.iterdir()) == []
    with pytest.raises(ArgumentError, match="^--json: .* is a directory"):
        check_writable_file("--json", tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ArgumentError, match="^--json: cannot create the directory"):
        check_writable_file("--json", blocker / "out.json")
    with pytest.raises(ArgumentError, match="^--json: .* not a regular file"):
        check_writable_file("--json", "/dev/null")
    with pytest.raises(ArgumentError, match="^--json must be a non-empty path"):
        check_writable_file("--json", "")
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(ArgumentError, match="cannot write"):
            check_writable_file("--json", ro / "out.json")


@pytest.mark.parametrize("argv,match", [
    (["--n", "0"], "argument --n: must be >= 1, got 0"),
    (["--n", "2.7"], "argument --n: must be an integer, got '2.7'"),
    (["--n", "x"], "argument --n: must be an integer"),
    (["--x", "nan"], "argument --x: must be a finite number, got NaN"),
    (["--x", "inf"], "argument --x: must be a finite number, got inf"),
    (["--x", "-1"], "argument --x: must be > 0"),
    (["--mode", "c"], r"argument --mode: must be one of \['a', 'b'\]"),
])
def test_arg_type_reports_the_flag(argv, match, capsys):
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=arg_type(check_int, low=1), default=1)
    ap.add_argument("--x", type=arg_type(check_float, low=0.0, low_open=True), default=1.0)
    ap.add_argument("--mode", type=arg_type(check_str, choices=("a", "b")), default="a")
    with pytest.raises(SystemExit) as err:
        ap.parse_args(argv)
    assert err.value.code == 2
    assert re.search(match, capsys.readouterr().err)
    assert ap.parse_args(["--n", "3", "--x", "0.5", "--mode", "b"]).n == 3
