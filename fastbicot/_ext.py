"""Loads the compiled extension ``fastbicot._C`` and says which paths VQ decoding and the CPU
image-decode step take.

``python -m fastbicot._ext`` prints the status. FASTBICOT_DISABLE_EXT=1 makes the package behave as
if the extension had not been built (every op then runs its pure-torch path).
"""

import os

import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)

_C = None
_error = None

if os.environ.get("FASTBICOT_DISABLE_EXT") == "1":
    _error = "disabled by FASTBICOT_DISABLE_EXT=1"
else:
    try:
        from fastbicot import _C
    except ImportError as exc:  # not built (no compiler / FASTBICOT_NO_EXT=1) or built for another torch
        _error = f"{type(exc).__name__}: {exc}"


def available(device="cpu") -> bool:
    """True when the extension's kernels can run on ``device`` (CPU always, CUDA only if compiled in)."""
    if _C is None:
        return False
    kind = device.type if hasattr(device, "type") else str(device).split(":")[0]
    return kind == "cpu" or (kind == "cuda" and _C.has_cuda())


def status() -> dict:
    """Which path runs: {'extension': bool, 'cpu': bool, 'cuda': bool, 'file': path or None, 'error': str or None}."""
    return {
        "extension": _C is not None,
        "cpu": available("cpu"),
        "cuda": available("cuda"),
        "file": getattr(_C, "__file__", None),
        "error": _error,
    }


if __name__ == "__main__":
    s = status()
    if s["extension"]:
        print(
            f"fastbicot._C loaded from {s['file']}: CPU kernels yes, CUDA kernels {'yes' if s['cuda'] else 'no'}"
        )
    else:
        print(
            f"fastbicot._C not loaded ({s['error']}): vq_decode and the CPU decode step use their "
            "pure-torch paths"
        )
