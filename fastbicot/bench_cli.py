"""What the benchmark scripts in bench/ share: incremental JSON results and name-list flags.

A bench run rewrites its ``--json`` file after every measurement (``"complete": false`` until the
end), so a failure mid-run keeps what was measured; the write is atomic, so a crash leaves the
previous complete snapshot, never a truncated file.
"""

from __future__ import annotations

import argparse
import json
import os


def write_json(path, payload) -> None:
    """Atomically (re)write ``payload`` as JSON to ``path``; ``path=None`` writes nothing."""
    if path is None:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


def name_list(choices, what: str = "name"):
    """argparse ``type=``: comma-separated names from ``choices``, none unknown or repeated."""
    choices = list(choices)

    def convert(text):
        names = [m.strip() for m in text.split(",") if m.strip()]
        unknown = [m for m in names if m not in choices]
        if not names or unknown:
            raise argparse.ArgumentTypeError(f"unknown {what}(s) {unknown or [text]}; choose from {choices}")
        if len(set(names)) != len(names):
            raise argparse.ArgumentTypeError(f"repeated {what} in {text!r}")
        return names

    return convert
