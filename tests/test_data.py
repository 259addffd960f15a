import json
import os
import random
import re
import threading
import time

import pytest

from fastbicot.data import PromptFileError, PromptRecord, load_prompts

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "t2i_prompts_sample.jsonl")
SAMPLE_IN_REPO = os.path.join(os.path.dirname(__file__), "data", "t2i_prompts_sample.jsonl")


@pytest.mark.parametrize("path", [SAMPLE, SAMPLE_IN_REPO])
def test_sample_file_loads(path):
    if not os.path.exists(path):
        pytest.skip(f"{path} not present")
    with open(path, encoding="utf-8") as f:
        raw = [json.loads(line) for line in f if line.strip()]
    records = load_prompts(path)
    assert len(records) == len(raw) > 0
    for rec, obj in zip(records, raw):
        assert rec.prompt == obj["prompt"].strip()
        assert rec.metadata == {k: v for k, v in obj.items() if k != "prompt"}
    kinds = {r.metadata["task_type"] for r in records}
    assert {"color", "spatial", "numeracy", "complex"} <= kinds


def test_text_file_strips_and_skips_blank_lines(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("  a red cube  \n\n\t\n東京の夜景 🌃\nlast line without newline", encoding="utf-8")
    assert [r.prompt for r in load_prompts(p)] == ["a red cube", "東京の夜景 🌃", "last line without newline"]
    assert all(r.metadata == {} for r in load_prompts(p))


def test_jsonl_unicode_whitespace_and_unknown_fields(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('\n{"prompt": "  ein grüner Würfel ", "task_type": "color", "extra": [1, 2]}\n\n', encoding="utf-8")
    (rec,) = load_prompts(p)
    assert rec.prompt == "ein grüner Würfel" and rec.metadata == {"task_type": "color", "extra": [1, 2]}


BAD = [
    ('{"prompt": "ok"}\n{"prompt": "broken"\n', 2, "invalid JSON"),
    ('{"task_type": "color"}\n', 1, "missing field 'prompt'"),
    ('{"prompt": "   "}\n', 1, "field 'prompt' is empty"),
    ('{"prompt": 7}\n', 1, "'prompt' must be a string, got int"),
    ('["a list"]\n', 1, "expected a JSON object, got list"),
    ('{"prompt": "x", "nouns": "cat"}\n', 1, "field 'nouns' must be a list of strings"),
    ('{"prompt": "x", "task_type": 3}\n', 1, "field 'task_type' must be a string"),
    ('{"prompt": "x", "spatial_info": {"obj1": "a", "obj2": "b"}}\n', 1, "'spatial_info' needs a non-empty string 'locality'"),
    ('{"prompt": "x"}\n{"prompt": "y", "numeracy_info": [{"obj_name": "cat", "num": "two"}]}\n', 2,
     "'numeracy_info' item 0 needs a non-negative integer 'num'"),
    ('{"prompt": "x", "numeracy_info": {"obj_name": "cat"}}\n', 1, "'numeracy_info' must be a list"),
]


@pytest.mark.parametrize("content,line,message", BAD)
def test_bad_jsonl_names_file_line_and_problem(tmp_path, content, line, message):
    p = tmp_path / "bad.jsonl"
    p.write_text(content, encoding="utf-8")
    with pytest.raises(PromptFileError) as err:
        load_prompts(p)
    assert f"{p}:{line}:" in str(err.value)
    assert message in str(err.value)


def test_missing_empty_directory_and_binary(tmp_path):
    with pytest.raises(FileNotFoundError, match="prompt file not found"):
        load_prompts(tmp_path / "nope.jsonl")
    with pytest.raises(PromptFileError, match="is a directory"):
        load_prompts(tmp_path)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(PromptFileError, match="no prompts found"):
        load_prompts(empty)
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"ok\n\xff\xfe\x00bad")
    with pytest.raises(PromptFileError, match="not valid UTF-8"):
        load_prompts(binary)
    with pytest.raises(ValueError, match="fmt must be"):
        load_prompts(empty, fmt="csv")


# ---- issue 15: formats are sniffed, control characters and odd encodings named, no blocking ------

RECORDS = [
    {"prompt": "a red cube left of a blue ball", "task_type": "spatial",
     "spatial_info": {"obj1": "cube", "obj2": "ball", "locality": "left of"}},
    {"prompt": "drei grüne Äpfel 🍏", "numeracy_info": [{"obj_name": "apple", "num": 3}]},
    {"prompt": "東京の夜景\ttab inside", "nouns": ["city"]},
]


def _expected(records):
    return [PromptRecord(r["prompt"].strip(), {k: v for k, v in r.items() if k != "prompt"}) for r in records]


@pytest.mark.parametrize("name", ["PROMPTS.JSONL", "p.Jsonl", "p.ndjson", "p.NDJSON", "p.jsonlines", "p.txt",
                                  "p.TXT", "p", "p.data", "p.jsonl.bak", "p.csv"])
@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"], ids=["lf", "crlf", "cr"])
def test_jsonl_is_recognised_whatever_the_name(tmp_path, name, newline, seed):
    rng = random.Random(seed)
    records = [rng.choice(RECORDS) for _ in range(rng.randint(1, 6))]
    body = newline.join(json.dumps(r, ensure_ascii=rng.random() < 0.5) for r in records)
    p = tmp_path / name
    p.write_bytes((newline * rng.randint(0, 2) + body + newline).encode("utf-8"))
    assert load_prompts(p) == _expected(records)


@pytest.mark.parametrize("name", ["p.txt", "p", "p.prompts"])
def test_plain_text_is_not_mistaken_for_jsonl(tmp_path, name):
    lines = ["a cat", '"a quoted prompt"', "[1, 2] brackets", "{not json", "3", "null", "true"]
    p = tmp_path / name
    p.write_text("\n".join(lines), encoding="utf-8")
    assert [r.prompt for r in load_prompts(p)] == lines
    p.write_text('{"prompt": "a"}\nplain', encoding="utf-8")
    with pytest.raises(PromptFileError, match=rf"{p}:2: invalid JSON.*fmt='text'"):
        load_prompts(p)
    assert [r.prompt for r in load_prompts(p, fmt="text")] == ['{"prompt": "a"}', "plain"]
    p.write_text('{"text": "no prompt field"}\n', encoding="utf-8")
    with pytest.raises(PromptFileError, match=rf"{p}:1: missing field 'prompt'"):
        load_prompts(p)


CONTROL = ["\x00", "\x01", "\x07", "\x08", "\x0b", "\x0c", "\x1b", "\x1f", "\x7f", "\x85", "\x9f"]


@pytest.mark.parametrize("ch", CONTROL, ids=lambda c: f"U+{ord(c):04X}")
@pytest.mark.parametrize("fmt", ["text", "jsonl"])
def test_control_characters_are_named_with_file_and_line(tmp_path, ch, fmt, seed):
    rng = random.Random(seed)
    n = rng.randint(2, 6)
    bad = rng.randrange(n)
    prompts = [f"prompt {i}\twith tab" for i in range(n)]
    prompts[bad] = prompts[bad][:3] + ch + prompts[bad][3:]
    p = tmp_path / ("p.txt" if fmt == "text" else "p.jsonl")
    lines = prompts if fmt == "text" else [json.dumps({"prompt": x}) for x in prompts]
    p.write_text("\n".join(lines), encoding="utf-8", newline="")
    with pytest.raises(PromptFileError, match=rf"{p}:{bad + 1}: .*(NUL|control character U\+{ord(ch):04X})"):
        load_prompts(p)


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be"])
def test_utf16_without_bom_is_named(tmp_path, encoding):
    p = tmp_path / "p.txt"
    p.write_bytes("a red cube\nthree cats\n".encode(encoding))
    with pytest.raises(PromptFileError, match=rf"{p}:1: looks like UTF-16 .*without a byte-order mark"):
        load_prompts(p)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32", "utf-8-sig"])
@pytest.mark.parametrize("kind", ["text", "jsonl"])
def test_encodings_with_a_bom_are_read(tmp_path, encoding, kind):
    p = tmp_path / "p.txt"
    if kind == "text":
        p.write_text("a red cube\n東京 🌃\n", encoding=encoding)
        assert [r.prompt for r in load_prompts(p)] == ["a red cube", "東京 🌃"]
    else:
        p.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in RECORDS), encoding=encoding)
        assert load_prompts(p) == _expected(RECORDS)


def test_invalid_utf8_names_the_line(tmp_path):
    p = tmp_path / "p.txt"
    p.write_bytes(b"ok\nstill ok\nbad \xc3\x28 here\n")
    with pytest.raises(PromptFileError, match=rf"{p}:3: not valid UTF-8"):
        load_prompts(p)


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "prompts.jsonl"
    os.mkfifo(fifo)
    result = {}

    def run():
        try:
            load_prompts(fifo)
        except Exception as e:  # noqa: BLE001 -- the test inspects it
            result["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t0 = time.monotonic()
    t.start()
    t.join(5.0)
    assert not t.is_alive(), "load_prompts blocked on a FIFO"
    assert time.monotonic() - t0 < 5.0
    assert isinstance(result.get("error"), PromptFileError) and "FIFO" in str(result["error"])
    assert str(fifo) in str(result["error"])


@pytest.mark.parametrize("path", ["/dev/null", "/dev/zero"])
def test_devices_are_refused(path):
    with pytest.raises(PromptFileError, match="character device"):
        load_prompts(path)


@pytest.mark.parametrize("fmt", ["csv", "JSONL", "", 3, True], ids=repr)
def test_bad_fmt_is_named(tmp_path, fmt):
    p = tmp_path / "p.txt"
    p.write_text("a\n")
    with pytest.raises(ValueError, match="fmt"):
        load_prompts(p, fmt=fmt)


@pytest.mark.parametrize("path", [None, 3, ["p.txt"], b"\xff"], ids=repr)
def test_bad_path_type_is_named(path):
    with pytest.raises((ValueError, TypeError), match="path"):
        load_prompts(path)


@pytest.mark.parametrize("prompt,metadata", [(None, {}), (3, {}), (b"a", {}), ("a", None), ("a", [("k", 1)])],
                         ids=repr)
def test_prompt_record_checks_its_fields(prompt, metadata):
    with pytest.raises(ValueError, match="PromptRecord"):
        PromptRecord(prompt, metadata)


@pytest.mark.parametrize("line,message", [
    ('{"prompt": "a", "x": NaN}', "NaN"),
    ('{"prompt": "a", "x": -Infinity}', "-Infinity"),
    ('{"prompt": "a", "prompt": "b"}', "duplicate key 'prompt'"),
    ('{"prompt": "a", "meta": {"k": 1, "k": 2}}', "duplicate key 'k'"),
    ('{"prompt": "a\\ud800b"}', "lone surrogate U+D800"),
    ('{"prompt": "a", "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
])
def test_strict_json_records(tmp_path, line, message):
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "fine"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(PromptFileError, match=rf"{p}:2: .*{re.escape(message)}"):
        load_prompts(p)


def test_nul_in_path_is_named():
    with pytest.raises(ValueError, match="path"):
        load_prompts("a\0b.txt")
