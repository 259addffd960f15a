"""Programmatic rewards on decoded toy images: colour presence, counting, spatial relations.

Pixels are classified to the nearest palette colour (``codebook.PALETTE``); pixels nearest to the
background, or farther than ``max_distance`` from every colour, are background. Objects are the
4-connected components of each colour with at least ``min_area_frac`` of the image's pixels (so a
stray pixel of another decoder does not count; the toy decoder's squares never fall below it).
Everything is measured in normalised coordinates, so the rewards work at any image size.

Each reward reads T2I-CompBench metadata fields and fails with a ``RewardError`` naming the reward,
the prompt and the field when one is missing or names no toy colour:

* ``toy_color``  (``attr_nouns``): recall x precision of colours. recall = fraction of the asked
  colours present; precision = fraction of object pixels that have an asked colour.
* ``toy_count``  (``numeracy_info``): mean over items of min(n_hat, n) / max(n_hat, n), n_hat the number
  of objects of the item's colour (1 when right; one stray square too many for "a red square" gives
  1/2, not 0, so an imperfect policy still sees a gradient of credit).
* ``toy_spatial`` (``spatial_info``): ``spatial_score`` (fastbicot.rewards) of the largest object
  of each colour (the two largest, in the better order, when both colours agree); 0 when one is
  missing. Prompts without ``spatial_info`` (and not of task_type "spatial") score ``no_relation``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from fastbicot.rewards import Reward, RewardEnsemble, RewardError, require_field, spatial_score

from .codebook import CLASS_NAMES, PALETTE
from .vocab import COLORS

MIN_AREA_FRAC = 1 / 128  # half a token of an 8 x 8 token image
MAX_DISTANCE = 80.0  # RGB distance beyond which a pixel matches no palette colour


class Component(NamedTuple):
    color: str
    area: int  # pixels
    box: tuple[float, float, float, float]  # normalised (x1, y1, x2, y2), y down, x2/y2 exclusive


def classify_pixels(images, max_distance: float = MAX_DISTANCE) -> np.ndarray:
    """uint8 [N, H, W, 3] -> int64 [N, H, W] palette index (0 = background / no match)."""
    x = np.asarray(images, dtype=np.float32)
    pal = np.asarray(PALETTE, dtype=np.float32)
    d2 = ((x[..., None, :] - pal) ** 2).sum(-1)  # [N, H, W, K]
    cls = d2.argmin(-1)
    cls[np.take_along_axis(d2, cls[..., None], -1)[..., 0] > max_distance**2] = 0
    return cls


def label_components(classes: np.ndarray) -> np.ndarray:
    """4-connected components of equal non-zero class: int64 [N, H, W] labels, -1 for background.

    Labels are the smallest flat pixel index of the component (min-label propagation with pointer
    jumping, vectorised over the batch; no scipy needed).
    """
    n, h, w = classes.shape
    fg = classes > 0
    lab = np.where(fg, np.arange(h * w).reshape(1, h, w), h * w).astype(np.int64)
    flat_base = (np.arange(n) * (h * w + 1))[:, None, None]
    while True:
        new = lab.copy()
        for axis in (1, 2):
            for shift in (1, -1):
                nb = np.roll(lab, shift, axis)
                same = np.roll(classes, shift, axis) == classes
                edge = np.zeros_like(same)  # np.roll wraps around: mask the wrapped row/column
                if axis == 1:
                    edge[:, 0 if shift == 1 else h - 1, :] = True
                else:
                    edge[:, :, 0 if shift == 1 else w - 1] = True
                new = np.where(fg & same & ~edge, np.minimum(new, nb), new)
        # pointer jumping: every pixel takes its label's label (labels are pixel indices)
        table = np.concatenate([new.reshape(n, h * w), np.full((n, 1), h * w)], axis=1).reshape(-1)
        new = np.where(fg, table[flat_base + np.minimum(new, h * w)], new)
        if np.array_equal(new, lab):
            break
        lab = new
    return np.where(fg, lab, -1)


def find_objects(images, min_area_frac: float = MIN_AREA_FRAC, max_distance: float = MAX_DISTANCE):
    """Per image, the list of ``Component``s (colour objects) of a uint8 [N, H, W, 3] batch."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [N, H, W, 3], got shape {images.shape}")
    classes = classify_pixels(images, max_distance)
    labels = label_components(classes)
    _, h, w = classes.shape
    min_area = max(1, round(min_area_frac * h * w))
    out = []
    for cls, lab in zip(classes, labels):
        comps = []
        ids, first, counts = np.unique(lab.reshape(-1), return_index=True, return_counts=True)
        for lid, idx, cnt in zip(ids, first, counts):
            if lid < 0 or cnt < min_area:
                continue
            ys, xs = np.nonzero(lab == lid)
            box = (xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h)
            comps.append(Component(CLASS_NAMES[cls.reshape(-1)[idx]], int(cnt), tuple(float(v) for v in box)))
        out.append(comps)
    return out


def phrase_color(phrase, reward: str, prompt: str, field: str) -> str:
    """The toy colour a phrase like "red square" names; RewardError naming reward/prompt/field if none."""
    words = str(phrase).lower().split() if isinstance(phrase, str) else []
    found = [w for w in words if w in COLORS]
    if len(set(found)) != 1:
        raise RewardError(
            f"reward {reward!r}, prompt {prompt!r}: field {field!r} entry {phrase!r} must name exactly one "
            f"toy colour (one of {list(COLORS)})"
        )
    return found[0]


class _ToyReward(Reward):
    def __init__(self, name=None, *, min_area_frac: float = MIN_AREA_FRAC, max_distance: float = MAX_DISTANCE,
                 fallback=None):
        super().__init__(name, fallback=fallback)
        if not 0.0 <= min_area_frac < 1.0:
            raise ValueError(f"min_area_frac must be in [0, 1), got {min_area_frac}")
        self.min_area_frac, self.max_distance = float(min_area_frac), float(max_distance)

    def score(self, images, prompts, metadata, cots):
        wants = [self.parse(m, p) for m, p in zip(metadata, prompts)]  # validate before any work
        objects = find_objects(images.cpu().numpy(), self.min_area_frac, self.max_distance)
        return np.array([self.judge(o, w) for o, w in zip(objects, wants)], dtype=np.float32)


def _list_field(metadata, field, reward, prompt) -> list:
    value = require_field(metadata, field, reward, prompt)
    if not isinstance(value, (list, tuple)) or not value:
        raise RewardError(f"reward {reward!r}, prompt {prompt!r}: field {field!r} must be a non-empty list, "
                          f"got {value!r}")
    return list(value)


class ToyColorReward(_ToyReward):
    """Recall x precision of the asked colours (``attr_nouns``)."""

    name = "toy_color"

    def parse(self, metadata, prompt):
        return {phrase_color(p, self.name, prompt, "attr_nouns")
                for p in _list_field(metadata, "attr_nouns", self.name, prompt)}

    @staticmethod
    def judge(objects, colors) -> float:
        present = {o.color for o in objects}
        total = sum(o.area for o in objects)
        if total == 0:
            return 0.0
        recall = len(colors & present) / len(colors)
        precision = sum(o.area for o in objects if o.color in colors) / total
        return recall * precision


class ToyCountReward(_ToyReward):
    """Mean exact-count credit over ``numeracy_info`` items, counting objects of the item's colour."""

    name = "toy_count"

    def parse(self, metadata, prompt):
        items = []
        for item in _list_field(metadata, "numeracy_info", self.name, prompt):
            num = item.get("num") if isinstance(item, dict) else None
            if not isinstance(item, dict) or isinstance(num, bool) or not isinstance(num, int) or num < 0:
                raise RewardError(f"reward {self.name!r}, prompt {prompt!r}: field 'numeracy_info' items must be "
                                  f"{{'obj_name': str, 'num': int >= 0}}, got {item!r}")
            items.append((phrase_color(item.get("obj_name"), self.name, prompt, "numeracy_info"), num))
        return items

    @staticmethod
    def judge(objects, items) -> float:
        credits = []
        for color, n in items:
            n_hat = sum(o.color == color for o in objects)
            credits.append(1.0 if n_hat == n else min(n_hat, n) / max(n_hat, n))
        return sum(credits) / len(credits)


class ToySpatialReward(_ToyReward):
    """``spatial_score`` of obj1 vs obj2 (``spatial_info``); ``no_relation`` for prompts without one."""

    name = "toy_spatial"

    def __init__(self, name=None, *, presence_credit: float = 0.0, no_relation: float = 1.0, **kwargs):
        super().__init__(name, **kwargs)
        if not 0.0 <= presence_credit <= 1.0 or not 0.0 <= no_relation <= 1.0:
            raise ValueError(f"presence_credit and no_relation must be in [0, 1], got {presence_credit}, "
                             f"{no_relation}")
        self.presence_credit, self.no_relation = float(presence_credit), float(no_relation)

    def parse(self, metadata, prompt):
        if metadata.get("spatial_info") is None and metadata.get("task_type") != "spatial":
            return None
        info = require_field(metadata, "spatial_info", self.name, prompt)
        if not isinstance(info, dict) or any(not isinstance(info.get(k), str) for k in ("obj1", "obj2", "locality")):
            raise RewardError(f"reward {self.name!r}, prompt {prompt!r}: field 'spatial_info' must have string "
                              f"obj1, obj2 and locality, got {info!r}")
        try:
            spatial_score((0, 0, 1, 1), (0, 0, 1, 1), info["locality"])
        except ValueError as e:
            raise RewardError(f"reward {self.name!r}, prompt {prompt!r}: field 'spatial_info': {e}") from None
        return (phrase_color(info["obj1"], self.name, prompt, "spatial_info"),
                phrase_color(info["obj2"], self.name, prompt, "spatial_info"), info["locality"])

    def judge(self, objects, want) -> float:
        if want is None:
            return self.no_relation
        c1, c2, locality = want
        by_size = sorted(objects, key=lambda o: -o.area)
        b1 = [o.box for o in by_size if o.color == c1]
        b2 = [o.box for o in by_size if o.color == c2]
        if c1 == c2:
            if len(b1) < 2:
                return 0.0
            rel = max(spatial_score(b1[0], b1[1], locality), spatial_score(b1[1], b1[0], locality))
        else:
            if not b1 or not b2:
                return 0.0
            rel = spatial_score(b1[0], b2[0], locality)
        return self.presence_credit + (1.0 - self.presence_credit) * rel


def toy_rewards(**kwargs) -> list[Reward]:
    """[toy_color, toy_count, toy_spatial]; ``kwargs`` (min_area_frac, max_distance) go to each."""
    return [ToyColorReward(**kwargs), ToyCountReward(**kwargs), ToySpatialReward(**kwargs)]


def toy_reward_ensemble(weights=None, normalize: str = "none", **kwargs) -> RewardEnsemble:
    """The three toy rewards summed (total in [0, 3] with unit weights)."""
    return RewardEnsemble(toy_rewards(**kwargs), weights, mode="sum", normalize=normalize)
