import json
import os

import pytest

from fastbicot.data import PromptFileError, load_prompts

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
