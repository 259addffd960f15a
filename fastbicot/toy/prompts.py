"""Toy prompts about colours, counts and positions, as T2I-CompBench JSONL records.

Every record has the fields the real data uses (``prompt``, ``task_type``, ``nouns``,
``attr_nouns``, ``spatial_info`` for spatial prompts) and, for every task type, ``numeracy_info``:
in the toy world a prompt says exactly which squares must appear, so each record carries the full
list of (coloured object, count). ``fastbicot.data.load_prompts`` reads the files ``write_prompts``
writes.

task_type "color":    "a red square", "a red square and an orange square"
task_type "numeracy": "three blue squares", "one red square and two green squares"
task_type "spatial":  "a red square on the left of a green square" (left of / right of / above / below)
"""

from __future__ import annotations

import json
import os
import random

from .vocab import COLORS, COUNT_WORDS, RELATION_PHRASES

TASK_TYPES = ("color", "numeracy", "spatial")
MAX_COUNT = 4  # at most 4 squares of one colour (the grid has 9 slots)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(color: str) -> str:
    return f"{color} square"


def _color_record(colors) -> dict:
    text = " and ".join(f"{_article(c)} {_phrase(c)}" for c in colors)
    return {
        "prompt": text,
        "task_type": "color",
        "nouns": ["square"],
        "attr_nouns": [_phrase(c) for c in colors],
        "numeracy_info": [{"obj_name": _phrase(c), "num": 1} for c in colors],
    }


def _numeracy_record(items) -> dict:
    parts = [f"{COUNT_WORDS[n]} {_phrase(c)}{'s' if n != 1 else ''}" for c, n in items]
    return {
        "prompt": " and ".join(parts),
        "task_type": "numeracy",
        "nouns": ["square"],
        "attr_nouns": [_phrase(c) for c, _ in items],
        "numeracy_info": [{"obj_name": _phrase(c), "num": n} for c, n in items],
    }


def _spatial_record(c1: str, c2: str, relation: str) -> dict:
    return {
        "prompt": f"{_article(c1)} {_phrase(c1)} {relation} {_article(c2)} {_phrase(c2)}",
        "task_type": "spatial",
        "nouns": ["square"],
        "attr_nouns": [_phrase(c1), _phrase(c2)],
        "spatial_info": {"obj1": _phrase(c1), "obj2": _phrase(c2), "locality": RELATION_PHRASES[relation]},
        "numeracy_info": [{"obj_name": _phrase(c1), "num": 1}, {"obj_name": _phrase(c2), "num": 1}],
    }


def make_prompt(rng: random.Random, task_type: str) -> dict:
    """One random toy prompt record of ``task_type``."""
    colors = list(COLORS)
    if task_type == "color":
        return _color_record(rng.sample(colors, rng.choice((1, 2))))
    if task_type == "numeracy":
        if rng.random() < 0.5:
            return _numeracy_record([(rng.choice(colors), rng.randint(1, MAX_COUNT))])
        c1, c2 = rng.sample(colors, 2)
        return _numeracy_record([(c1, rng.randint(1, 2)), (c2, rng.randint(1, 2))])
    if task_type == "spatial":
        c1, c2 = rng.sample(colors, 2)
        return _spatial_record(c1, c2, rng.choice(list(RELATION_PHRASES)))
    raise ValueError(f"unknown toy task_type {task_type!r}; expected one of {TASK_TYPES}")


def make_prompts(n: int, seed: int = 0, task_types=TASK_TYPES) -> list[dict]:
    """``n`` random prompt records, task types in turn (so every type is equally frequent)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    task_types = tuple(task_types)
    if not task_types or any(t not in TASK_TYPES for t in task_types):
        raise ValueError(f"task_types must be a non-empty subset of {TASK_TYPES}, got {task_types}")
    rng = random.Random(seed)
    return [make_prompt(rng, task_types[i % len(task_types)]) for i in range(n)]


def write_prompts(path, n: int, seed: int = 0, task_types=TASK_TYPES) -> str:
    """Write ``make_prompts(n, seed)`` as JSONL (one record per line); returns the path."""
    path = os.fspath(path)
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(rec) + "\n" for rec in make_prompts(n, seed, task_types))
    return path
