"""Prompt data: JSONL in the T2I-CompBench / T2I-R1 format, or plain text (one prompt per line).

Every malformed line is reported with the file, the line number and the problem, so a bad record
in a 6 000-line file costs a minute, not a crashed training run.
"""

from __future__ import annotations

import json
import os
import stat
import unicodedata
from dataclasses import dataclass, field

from .checks import ArgumentError, check_str


@dataclass
class PromptRecord:
    """One prompt and its metadata (every JSONL field except ``prompt``, as given)."""

    prompt: str
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.prompt, str):
            raise ArgumentError(f"PromptRecord.prompt must be a str, got {type(self.prompt).__name__}")
        if not isinstance(self.metadata, dict):
            raise ArgumentError(f"PromptRecord.metadata must be a dict, got {type(self.metadata).__name__}")


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


class _StrictJSONError(ValueError):
    pass


def _reject_constant(name):
    raise _StrictJSONError(f"non-standard JSON constant {name} (NaN/Infinity are not JSON)")


def _no_duplicate_keys(pairs):
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise _StrictJSONError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def _parse_jsonl_line(line: str, where: str) -> PromptRecord:
    try:
        obj = json.loads(line, parse_constant=_reject_constant, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise PromptFileError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    except _StrictJSONError as e:
        raise PromptFileError(f"{where}: invalid JSON ({e})") from None
    except RecursionError:
        raise PromptFileError(f"{where}: invalid JSON (nested too deeply)") from None
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


_JSONL_EXTENSIONS = (".jsonl", ".json", ".ndjson", ".jsonlines")
_BOMS = (  # longest first: the UTF-32-LE BOM starts with the UTF-16-LE one
    (b"\xff\xfe\x00\x00", "utf-32-le"), (b"\x00\x00\xfe\xff", "utf-32-be"), (b"\xef\xbb\xbf", "utf-8"),
    (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be"),
)


def _control_problem(text: str) -> str | None:
    """The first control character (Unicode category Cc, tab allowed) in ``text``, described, or None."""
    for col, ch in enumerate(text, start=1):
        category = unicodedata.category(ch)
        if ch != "\t" and category == "Cc":
            name = "NUL" if ch == "\0" else f"control character U+{ord(ch):04X}"
            return f"{name} at column {col}"
        if category == "Cs":  # only reachable through a JSON \ud800-style escape
            return f"lone surrogate U+{ord(ch):04X} (not encodable text) at column {col}"
    return None


def _read_regular_file(path: str) -> bytes:
    """The file's bytes; never blocks on a FIFO or device (stat first, then a non-blocking open)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"prompt file not found: {path!r}") from None
    except OSError as e:
        raise PromptFileError(f"{path}: cannot stat the prompt file ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise PromptFileError(f"{path!r} is a directory, expected a prompt file (.jsonl or .txt)")
    kinds = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    for test, kind in kinds:
        if test(st.st_mode):
            raise PromptFileError(f"{path}: is {kind}, not a regular file; prompts are read from regular files "
                                  f"only (copy the stream to a file first)")
    if not stat.S_ISREG(st.st_mode):
        raise PromptFileError(f"{path}: not a regular file")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise PromptFileError(f"{path}: cannot open the prompt file ({e.strerror or e})") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # replaced between stat and open
            raise PromptFileError(f"{path}: not a regular file")
        return f.read()


def _decode(path: str, data: bytes) -> str:
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            try:
                return data[len(bom):].decode(encoding)
            except UnicodeDecodeError as e:
                line = data[len(bom):len(bom) + e.start].decode(encoding, "replace").count("\n") + 1
                raise PromptFileError(f"{path}:{line}: not valid {encoding.upper()} text after its byte-order "
                                      f"mark ({e.reason})") from None
    head = data[:4096]
    if len(head) >= 2 and head.count(0) * 4 >= len(head):
        # ASCII text saved as UTF-16 without a BOM: every other byte is NUL
        even, odd = head[0::2].count(0), head[1::2].count(0)
        if max(even, odd) * 2 >= len(head) // 2 and min(even, odd) * 8 < len(head) // 2:
            raise PromptFileError(f"{path}:1: looks like UTF-16 text without a byte-order mark (every other "
                                  f"byte is NUL); save the file as UTF-8")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise PromptFileError(f"{path}:{line}: not valid UTF-8 text ({e.reason} at byte {e.start})") from None


def _sniff_jsonl(lines: list[str]) -> bool:
    """True when the first non-blank line is a JSON object (JSONL; one without "prompt" is then an
    error naming the line, rather than a prompt that reads like JSON)."""
    for line in lines:
        if line.strip():
            try:
                obj = json.loads(line)
            except ValueError:
                return False
            return isinstance(obj, dict)
    return False


def load_prompts(path, fmt: str | None = None) -> list[PromptRecord]:
    """Read prompts from ``path``.

    ``fmt`` is "jsonl" or "text". By default the format is chosen from the extension, case-insensitively
    (``.jsonl``, ``.json``, ``.ndjson``, ``.jsonlines`` are JSONL) or, for any other name, sniffed: a
    file whose first non-blank line is a JSON object is JSONL (so it needs a "prompt" field), anything
    else plain text. Whitespace is stripped, blank lines are skipped, any Unicode is fine; UTF-8 (with or
    without a BOM) and UTF-16/32 with a BOM are read. Errors name the file and the line: invalid
    UTF-8, UTF-16 without a BOM, a NUL or other control character (tab excepted) in a prompt, a
    malformed JSONL record. A FIFO, socket or device is refused at once (never read, never blocks).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise ArgumentError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    fmt = check_str("fmt", fmt, choices=("jsonl", "text"), optional=True)
    path = os.fspath(path)
    if isinstance(path, bytes) or "\0" in path:
        raise ArgumentError(f"path must be a str path without NUL characters, got {path!r}")
    text = _decode(path, _read_regular_file(path))
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    sniffed = False
    if fmt is None:
        if path.lower().endswith(_JSONL_EXTENSIONS):
            fmt = "jsonl"
        else:
            sniffed = _sniff_jsonl(lines)
            fmt = "jsonl" if sniffed else "text"
    records = []
    for lineno, raw in enumerate(lines, start=1):
        where = f"{path}:{lineno}"
        line = raw.strip()
        if not line:
            continue
        if fmt == "jsonl":
            try:
                record = _parse_jsonl_line(line, where)
            except PromptFileError as e:
                if sniffed:
                    raise PromptFileError(f"{e} (read as JSONL because the first line is a JSON object; "
                                          f"pass fmt='text' for plain text)") from None
                raise
            problem = _control_problem(record.prompt)
            if problem:
                raise PromptFileError(f"{where}: field 'prompt' contains a {problem}")
        else:
            problem = _control_problem(line)
            if problem:
                raise PromptFileError(f"{where}: prompt text contains a {problem}")
            record = PromptRecord(line)
        records.append(record)
    if not records:
        raise PromptFileError(f"{path}: no prompts found (the file is empty or blank)")
    return records
