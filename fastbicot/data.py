"""Prompt data: JSONL in the T2I-CompBench / T2I-R1 format, or plain text (one prompt per line).

Every malformed line is reported with the file, the line number and the problem, so a bad record
in a 6 000-line file costs a minute, not a crashed training run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field


@dataclass
class PromptRecord:
    """One prompt and its metadata (every JSONL field except ``prompt``, as given)."""

    prompt: str
    metadata: dict = field(default_factory=dict)


class PromptFileError(ValueError):
    """A prompt file that cannot be read; the message names the file and the line."""


def _is_str_list(x) -> bool:
    return isinstance(x, list) and all(isinstance(s, str) for s in x)


def _check_spatial(x) -> str | None:
    if not isinstance(x, dict):
        return "must be an object with obj1, obj2 and locality"
    for key in ("obj1", "obj2", "locality"):
        if not isinstance(x.get(key), str) or not x[key].strip():
            return f"needs a non-empty string {key!r}"
    return None


def _check_numeracy(x) -> str | None:
    if not isinstance(x, list):
        return "must be a list of {obj_name, num} objects"
    for i, item in enumerate(x):
        if not isinstance(item, dict) or not isinstance(item.get("obj_name"), str):
            return f"item {i} needs a string 'obj_name'"
        num = item.get("num")
        if isinstance(num, bool) or not isinstance(num, int) or num < 0:
            return f"item {i} needs a non-negative integer 'num', got {num!r}"
    return None


# field -> checker returning an error string or None. Unknown fields pass through untouched.
_FIELD_CHECKS = {
    "task_type": lambda x: None if isinstance(x, str) else "must be a string",
    "nouns": lambda x: None if _is_str_list(x) else "must be a list of strings",
    "attr_nouns": lambda x: None if _is_str_list(x) else "must be a list of strings",
    "spatial_info": _check_spatial,
    "numeracy_info": _check_numeracy,
}


def _parse_jsonl_line(line: str, where: str) -> PromptRecord:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise PromptFileError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise PromptFileError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "prompt" not in obj:
        raise PromptFileError(f"{where}: missing field 'prompt'")
    prompt = obj.pop("prompt")
    if not isinstance(prompt, str):
        raise PromptFileError(f"{where}: field 'prompt' must be a string, got {type(prompt).__name__}")
    prompt = prompt.strip()
    if not prompt:
        raise PromptFileError(f"{where}: field 'prompt' is empty")
    for name, check in _FIELD_CHECKS.items():
        if name in obj:
            problem = check(obj[name])
            if problem:
                raise PromptFileError(f"{where}: field {name!r} {problem}")
    return PromptRecord(prompt, obj)


def load_prompts(path, fmt: str | None = None) -> list[PromptRecord]:
    """Read prompts from ``path``.

    ``fmt`` is "jsonl" or "text"; by default ``.jsonl``/``.json`` files are JSONL and anything
    else is plain text. Whitespace is stripped, blank lines are skipped, any Unicode is fine.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"prompt file not found: {path!r}")
    if os.path.isdir(path):
        raise PromptFileError(f"{path!r} is a directory, expected a prompt file (.jsonl or .txt)")
    if fmt is None:
        fmt = "jsonl" if path.endswith((".jsonl", ".json")) else "text"
    if fmt not in ("jsonl", "text"):
        raise ValueError(f"fmt must be 'jsonl' or 'text', got {fmt!r}")
    records = []
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: tolerate a BOM from Windows editors
            for lineno, raw in enumerate(f, start=1):
                line = raw.strip()
                if not line:
                    continue
                if fmt == "jsonl":
                    records.append(_parse_jsonl_line(line, f"{path}:{lineno}"))
                else:
                    records.append(PromptRecord(line))
    except UnicodeDecodeError as e:
        raise PromptFileError(f"{path}: not valid UTF-8 text ({e.reason} at byte {e.start})") from None
    if not records:
        raise PromptFileError(f"{path}: no prompts found (the file is empty or blank)")
    return records
