"""The toy world in GoT-R1's dialect: plans whose objects carry boxes, and GoT-R1's four rewards as
programmatic stand-ins, so the GoT-R1 path (layout tokens added and embeddings resized, strict plan
parsing, boxes rendered on a blank canvas, R_RI on the decoded patches, the product ensemble) runs end
to end on a CPU.

A plan lists the squares as GoT layout spans, coordinates in GoT's 0-1000 units on the token grid
(one token = 125 units, so every box of the 8 x 8-token image is expressible with the nine
coordinate words ``0, 125, ..., 1000``)::

    <|obj_start|> red square <|obj_end|> <|box_start|> ( 0 , 375 ) , ( 250 , 625 ) <|box_end|> ...

(the word-level tokenizer decodes with spaces; ``fastbicot.layout.parse_layout`` allows them). The
layout markers are added with ``fastbicot.models.added_tokens.add_text_tokens`` -- in a config by
``model.add_tokens`` -- which grows the toy's text embedding and head (the toy tokenizer fills its
vocabulary, unlike Janus-Pro's).

Rewards (``toy_got_rewards``; total ``R_PI * (R_sem + R_spa) * R_RI`` in [0, 2]):

* ``sem``  the plan's objects against the prompt: mean of the toy colour and count scores computed
           on the planned objects (each planned object one unit of area);
* ``spa``  the plan's boxes rendered filled, in each object's colour, on a blank (black, the toy's
           background) canvas of the image's size; ``toy_spatial`` judges that canvas (1 for prompts
           without a relation);
* ``ri``   IoU of each planned box with the decoded square of the same colour (``LayoutIoUReward`` over
           ``ToyDetector``: the toy's connected components as detections);
* ``pi``   the mean of the three toy rewards (colour, count, position) on the generated image.

Malformed plans score 0 in sem, spa and ri (so 0 in total), with the reason logged.
"""

from __future__ import annotations

import json
import os
import random

import numpy as np
import torch

from fastbicot.layout import COORD_MAX, LayoutObject, format_layout
from fastbicot.rewards import Detection, Reward, RewardEnsemble, require_field
from fastbicot.rewards.layout import LayoutIoUReward, LayoutJudgeReward, LayoutPlanReward, SumReward

from .codebook import GRID
from .layout import render_tokens
from .policy import PIXELS_PER_TOKEN, build_policy
from .prompts import _color_record, _spatial_record
from .rewards import Component, ToyColorReward, ToyCountReward, ToySpatialReward, find_objects
from .sft import MISTAKE_KINDS, MISTAKE_LEVELS, _mistake, correct_layout
from .vocab import BACKGROUND, COLORS, RELATION_PHRASES

UNIT = COORD_MAX // GRID  # 125 layout units per token
COORD_WORDS = tuple(str(UNIT * i) for i in range(GRID + 1))
GOT_WORDS = ("(", ")") + COORD_WORDS
UNKNOWN_RGB = (128, 128, 128)  # canvas colour of an object that names no toy colour (background to the judges)


def build_got_policy(seed: int = 0, dtype=torch.float32, device="cpu", *, pixels_per_token: int = PIXELS_PER_TOKEN,
                     attn_implementation: str = "sdpa", layout_tokens: bool = False):
    """The toy policy with the GoT plan words (parentheses, coordinates). ``layout_tokens=True`` also adds
    the four layout markers (a config does it with ``model.add_tokens``)."""
    policy = build_policy(seed, dtype, device, pixels_per_token=pixels_per_token,
                          attn_implementation=attn_implementation, extra_words=GOT_WORDS)
    if layout_tokens:
        from fastbicot.layout import LAYOUT_TOKENS
        from fastbicot.models.added_tokens import add_text_tokens

        add_text_tokens(policy, LAYOUT_TOKENS)
    return policy


def layout_objects(objects) -> list[LayoutObject]:
    """ToyObjects -> LayoutObjects named "<colour> square" with their slot's box in 0-1000 units."""
    return [LayoutObject(f"{o.color} square", tuple(round(v * COORD_MAX) for v in o.box())) for o in objects]


def got_plan_text(objects) -> str:
    """The GoT plan of a toy layout, spaced as the toy tokenizer decodes it."""
    return format_layout(layout_objects(objects), space=True)


def name_color(name: str) -> str | None:
    """The toy colour an object name names (exactly one colour word), else None."""
    found = {w for w in str(name).lower().split() if w in COLORS}
    return found.pop() if len(found) == 1 else None


def got_sft_example(record: dict, rng: random.Random, error_rate: float = 0.3) -> dict:
    """As ``toy.sft.sft_example`` with the plan in GoT's layout form: a correct layout, and at rate
    ``error_rate`` one mistake in the plan and the image ("plan") or in the image only ("image")."""
    layout = correct_layout(record, rng)
    plan_layout = image_layout = layout
    mistake = None
    if rng.random() < error_rate:
        kinds = MISTAKE_KINDS if record.get("spatial_info") else MISTAKE_KINDS[:2]
        kind, level = rng.choice(kinds), rng.choice(MISTAKE_LEVELS)
        image_layout = _mistake(layout, record, kind, rng)
        if level == "plan":
            plan_layout = image_layout
        mistake = f"{kind}:{level}"
    meta = {k: v for k, v in record.items() if k != "prompt"}
    return {"prompt": record["prompt"], "cot": got_plan_text(plan_layout), "image_tokens": render_tokens(image_layout),
            "metadata": meta, "mistake": mistake}


def got_prompts(n: int, seed: int = 0) -> list[dict]:
    """``n`` toy prompt records for the GoT variant: two "color" prompts of one square ("a red square"),
    then one "spatial" prompt of two ("a red square above a blue square"), in turn. One or two squares keep
    plans short (<= 35 tokens) and let a CPU-sized warm start paint them."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    rng, colors, out = random.Random(f"toy-got-prompts-{seed}"), list(COLORS), []
    for i in range(n):
        if i % 3 == 2:
            c1, c2 = rng.sample(colors, 2)
            out.append(_spatial_record(c1, c2, rng.choice(list(RELATION_PHRASES))))
        else:
            out.append(_color_record([rng.choice(colors)]))
    return out


def got_sft_examples(n: int, seed: int = 0, error_rate: float = 0.3, prompts=None) -> list[dict]:
    """``n`` SFT examples ``{prompt, cot (GoT plan), image_tokens, metadata, mistake}`` on ``got_prompts``
    (default)."""
    if not 0.0 <= error_rate <= 1.0:
        raise ValueError(f"error_rate must be in [0, 1], got {error_rate}")
    if prompts is None:
        prompts = got_prompts(n, seed)
    rng = random.Random(f"toy-got-sft-{seed}")
    return [got_sft_example(prompts[i % len(prompts)], rng, error_rate) for i in range(n)]


def write_got_data(directory, n_prompts: int = 400, n_sft: int = 1200, seed: int = 0) -> tuple[str, str]:
    """Write ``prompts.jsonl`` (``got_prompts(n_prompts, seed)``) and ``sft.jsonl``
    (``got_sft_examples(n_sft, seed + 1)``) into ``directory``; returns both paths."""
    os.makedirs(directory, exist_ok=True)
    paths = os.path.join(directory, "prompts.jsonl"), os.path.join(directory, "sft.jsonl")
    with open(paths[0], "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in got_prompts(n_prompts, seed))
    with open(paths[1], "w", encoding="utf-8") as f:
        f.writelines(json.dumps(ex) + "\n" for ex in got_sft_examples(n_sft, seed + 1))
    return paths


class ToyDetector:
    """A grounder for ``LayoutIoUReward``: the toy's colour components, labelled "<colour> square" with
    score 1 and normalised boxes; ``queries`` only decide nothing is looked for when empty."""

    def __call__(self, images, queries):
        objects = find_objects(images.cpu().numpy() if isinstance(images, torch.Tensor) else images)
        return [[Detection(f"{o.color} square", 1.0, o.box) for o in objs] if q else []
                for objs, q in zip(objects, queries)]


class ToyPlanSemanticReward(LayoutPlanReward):
    """R_sem stand-in: the mean of ``toy_color`` and ``toy_count`` computed on the planned objects."""

    name = "sem"

    def __init__(self, name=None, **kwargs):
        super().__init__(name, **kwargs)
        self.color, self.count = ToyColorReward(), ToyCountReward()

    def score_plans(self, images, prompts, metadata, cots, plans):
        out = []
        for prompt, meta, plan in zip(prompts, metadata, plans):
            colors, items = self.color.parse(meta, prompt), self.count.parse(meta, prompt)
            objs = [Component(name_color(o.name) or "?", 1, o.norm_box()) for o in plan]  # one unit of area each
            out.append((self.color.judge(objs, colors) + self.count.judge(objs, items)) / 2)
        return out


class ToyPromptImageReward(Reward):
    """R_PI stand-in: the mean of the three toy rewards on the generated image, in [0, 1]."""

    name = "pi"

    def __init__(self, name=None, **kwargs):
        super().__init__(name, **kwargs)
        self.rewards = [ToyColorReward(), ToyCountReward(), ToySpatialReward()]

    def score(self, images, prompts, metadata, cots):
        for m, p in zip(metadata, prompts):
            require_field(m, "attr_nouns", self.name, p)
        total = sum(r(images, prompts, metadata, cots).double() for r in self.rewards)
        return (total / len(self.rewards)).float()


def _canvas_color(obj, i):
    c = name_color(obj.name)
    return COLORS[c] if c is not None else UNKNOWN_RGB


def toy_got_rewards() -> RewardEnsemble:
    """``RewardEnsemble([pi, plan = sem + spa, ri], mode="product")``: GoT-R1's total on the toy world."""
    spa = LayoutJudgeReward(ToySpatialReward(name="spa"), "spa", image="canvas", fill=True, labels=False,
                            color=_canvas_color, background=BACKGROUND)
    plan = SumReward("plan", [ToyPlanSemanticReward(), spa])
    return RewardEnsemble([ToyPromptImageReward(), plan, LayoutIoUReward(ToyDetector())], mode="product")


def canvas_of(cot: str, size: int = GRID * PIXELS_PER_TOKEN) -> np.ndarray:
    """The blank-canvas rendering the ``spa`` stand-in judges (for figures and tests)."""
    from fastbicot.layout import parse_layout, render_layout

    return render_layout(parse_layout(cot), size, fill=True, color=_canvas_color, background=BACKGROUND)


__all__ = ["COORD_WORDS", "GOT_WORDS", "ToyDetector", "ToyPlanSemanticReward",
           "ToyPromptImageReward", "build_got_policy", "canvas_of", "got_plan_text", "got_prompts", "got_sft_example",
           "got_sft_examples", "layout_objects", "name_color", "toy_got_rewards", "write_got_data"]
