"""Synthetic (prompt, plan, image) triples for the SFT warm start, with deliberate mistakes.

A correct example places the prompt's squares in random free slots (for spatial prompts, slots
where ``spatial_score`` of the relation is 1), writes the plan that names them and renders the
image tokens from the plan. At rate ``error_rate`` an example carries one mistake, so the
warm-started policy is imperfect and RL has room to raise the reward:

* kind "color":    one square gets a colour the prompt does not ask for;
* kind "count":    one square too many or too few;
* kind "position": the two squares of a spatial prompt swap slots (the relation is violated);
* level "plan":    plan and image both show the mistake (a wrong plan, faithfully painted);
* level "image":   the plan is right, the image shows the mistake (a right plan, badly painted).
"""

from __future__ import annotations

import json
import os
import random

from fastbicot.rewards import spatial_score

from .layout import SLOTS, ToyObject, plan_text, render_tokens
from .prompts import make_prompts
from .vocab import COLORS

MISTAKE_KINDS = ("color", "count", "position")
MISTAKE_LEVELS = ("plan", "image")


def _color_of(phrase: str) -> str:
    return next(w for w in phrase.split() if w in COLORS)


def _check_record(record) -> None:
    """Toy records only: every square named by a toy colour, at most 9 squares (the slots)."""
    where = f"sft_examples: prompt {record.get('prompt')!r}" if isinstance(record, dict) else "sft_examples"
    if not isinstance(record, dict) or not record.get("numeracy_info") or not record.get("attr_nouns"):
        raise ValueError(f"{where}: needs a toy prompt record with attr_nouns and numeracy_info (make_prompts)")
    phrases = list(record["attr_nouns"]) + [it.get("obj_name", "") for it in record["numeracy_info"]]
    spatial = record.get("spatial_info")
    if spatial:
        phrases += [spatial.get("obj1", ""), spatial.get("obj2", "")]
    for ph in phrases:
        if not isinstance(ph, str) or sum(w in COLORS for w in ph.split()) != 1:
            raise ValueError(f"{where}: {ph!r} does not name exactly one toy colour ({list(COLORS)})")
    if sum(int(it["num"]) for it in record["numeracy_info"]) > len(SLOTS):
        raise ValueError(f"{where}: more than {len(SLOTS)} squares do not fit the slot grid")


def correct_layout(record: dict, rng: random.Random) -> list[ToyObject]:
    """A random layout that satisfies the prompt record (its numeracy_info and spatial_info)."""
    _check_record(record)
    spatial = record.get("spatial_info")
    if spatial:
        c1, c2 = _color_of(spatial["obj1"]), _color_of(spatial["obj2"])
        pairs = [(a, b) for a in SLOTS for b in SLOTS if a != b and spatial_score(
            ToyObject(c1, *a).box(), ToyObject(c2, *b).box(), spatial["locality"]) == 1.0]
        a, b = rng.choice(pairs)
        return [ToyObject(c1, *a), ToyObject(c2, *b)]
    items = [(_color_of(it["obj_name"]), int(it["num"])) for it in record["numeracy_info"]]
    slots = rng.sample(SLOTS, sum(n for _, n in items))
    out = []
    for color, n in items:  # plan order: the prompt's order, then slot order within a colour
        mine, slots = sorted(slots[:n]), slots[n:]
        out += [ToyObject(color, *s) for s in mine]
    return out


def _mistake(layout: list[ToyObject], record: dict, kind: str, rng: random.Random) -> list[ToyObject]:
    layout = list(layout)
    if kind == "color":
        asked = {_color_of(p) for p in record["attr_nouns"]}
        i = rng.randrange(len(layout))
        layout[i] = layout[i]._replace(color=rng.choice([c for c in COLORS if c not in asked]))
    elif kind == "count":
        free = [s for s in SLOTS if s not in {(o.row, o.col) for o in layout}]
        if len(layout) > 1 and (rng.random() < 0.5 or not free):
            del layout[rng.randrange(len(layout))]
        else:  # one more square of a colour already there
            layout.append(ToyObject(rng.choice(layout).color, *rng.choice(free)))
    elif kind == "position":
        a, b = layout
        layout = [a._replace(row=b.row, col=b.col), b._replace(row=a.row, col=a.col)]
    return layout


def sft_example(record: dict, rng: random.Random, error_rate: float = 0.3) -> dict:
    layout = correct_layout(record, rng)
    plan_layout = image_layout = layout
    mistake = None
    if rng.random() < error_rate:
        kinds = MISTAKE_KINDS if record.get("spatial_info") else MISTAKE_KINDS[:2]
        kind, level = rng.choice(kinds), rng.choice(MISTAKE_LEVELS)
        wrong = _mistake(layout, record, kind, rng)
        image_layout = wrong
        if level == "plan":
            plan_layout = wrong
        mistake = f"{kind}:{level}"
    meta = {k: v for k, v in record.items() if k != "prompt"}
    return {"prompt": record["prompt"], "cot": plan_text(plan_layout), "image_tokens": render_tokens(image_layout),
            "metadata": meta, "mistake": mistake}


def sft_examples(n: int, seed: int = 0, error_rate: float = 0.3, prompts=None) -> list[dict]:
    """``n`` examples ``{prompt, cot, image_tokens (64 ints), metadata, mistake}``.

    ``prompts``: records to draw from (cycled in order); default ``make_prompts(n, seed)``.
    ``mistake`` is None or "<kind>:<level>" (module docstring); rewards ignore it.
    """
    if not 0.0 <= error_rate <= 1.0:
        raise ValueError(f"error_rate must be in [0, 1], got {error_rate}")
    if prompts is None:
        prompts = make_prompts(n, seed)
    if n and not prompts:
        raise ValueError("prompts is empty")
    rng = random.Random(f"toy-sft-{seed}")
    return [sft_example(prompts[i % len(prompts)], rng, error_rate) for i in range(n)]


def write_sft_jsonl(path, n: int, seed: int = 0, error_rate: float = 0.3) -> str:
    """Write ``sft_examples(n, seed, error_rate)`` as JSONL; returns the path."""
    path = os.fspath(path)
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(ex) + "\n" for ex in sft_examples(n, seed, error_rate))
    return path
