"""Ahead-of-time compile of the Triton kernels for sm_90 and sm_80 without a GPU (tests/aot_compile.py).

The compile runs in a subprocess: conftest.py sets TRITON_INTERPRET=1 on machines without CUDA, and
triton picks interpreter or compiler when kernels are decorated, so this process's kernels cannot
be compiled. --quick compiles the launch plans marked quick (every kernel file, the production
defaults); .ci/run compiles the full set.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("aot_compile.py")


def _nvidia_backend():
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


pytestmark = pytest.mark.skipif(not _nvidia_backend(), reason="triton has no NVIDIA backend here")


def _run(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTBICOT_AOT_CACHE")}
    out = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), *args, "--json", str(out)], env=env,
                          capture_output=True, text=True, timeout=900, check=False)
    print(proc.stdout[-6000:])
    rows = json.loads(out.read_text())["rows"] if out.exists() else []
    return proc, rows


def test_quick_set_compiles_within_limits(tmp_path):
    proc, rows = _run(tmp_path, "--quick")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    kernels = {r["kernel"] for r in rows}
    for name in ("decode_attention._prefix_kernel", "decode_attention._suffix_merge_kernel",
                 "cfg_sample._cfg_sample_block_kernel", "cfg_sample._cfg_sample_tiled_kernel",
                 "token_logprobs._fwd_kernel", "grpo_loss._fwd_kernel"):
        assert name in kernels, f"{name} missing from the quick set"
    assert {r["target"] for r in rows} == {"sm_90", "sm_80"}  # the prefix kernel on both
    for r in rows:
        assert r["status"] == "ok", r
        assert r["shared"] <= r["shared_limit"], r
        assert r["regs"] is not None and 0 < r["regs"] <= 255, r
    # issue 14: the prefix kernel (fp32 and bf16, head dim 128) fits an A100 block and never spills
    prefix = [r for r in rows if r["kernel"] == "decode_attention._prefix_kernel"]
    assert {"fp32", "bf16"} <= {v for r in prefix for v in r["variant"].split()}
    for r in prefix:
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["stack"] == 0, r


def test_shared_memory_limit_is_enforced(tmp_path):
    """The same check with a limit below what the suffix kernel needs must fail the run."""
    proc, rows = _run(tmp_path, "--quick", "--targets", "sm_90", "--only", "suffix_merge",
                      "--shared-limit-kb", "0.25")
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert rows and all(r["status"] == "shared memory over the limit" for r in rows), rows
