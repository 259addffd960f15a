"""spatial_score: how well two boxes satisfy a T2I-CompBench / T2I-R1 spatial relation.

Boxes are (x1, y1, x2, y2) with y growing downward (image coordinates). Every offset is measured in
units of the two boxes' mean size along that axis, so the score does not depend on the image size
(normalised and pixel boxes give the same score) nor on how large the objects are.

With centres c1, c2 and sizes (w1, h1), (w2, h2):

    tx = (c1x - c2x) / ((w1 + w2) / 2)      ty = (c1y - c2y) / ((h1 + h2) / 2)

|tx| >= 1 exactly when the boxes do not overlap horizontally (likewise ty vertically).

Directional relations ("left of": a = -tx, p = |ty|; "right of": a = tx; "above": a = -ty,
p = |tx|; "below": a = ty):

    score = clamp(a, 0, 1) * clamp(1 + a - p, 0, 1)

The first factor is the progress along the asked direction: 0 when the centres are level or on the
wrong side, 1 once box 1 lies entirely on the asked side of box 2, linear in between (partly
overlapping boxes get partial credit). The second factor asks the asked axis to dominate: an object
far above and slightly left of another is "above" it, not "left of" it (full credit while the
perpendicular offset p exceeds the along offset a by at most one mean box size, 0 beyond two).

Proximity relations ("next to", "near", "on side of"): with the edge gaps in mean box sizes,
gx = max(0, |tx| - 1), gy = max(0, |ty| - 1):

    score = clamp(1 - max(gx, gy), 0, 1)

1 when the boxes touch or overlap, falling to 0 when they are a mean box size or more apart.

Symmetries (exact): left-of(a, b) == right-of(b, a), above(a, b) == below(b, a), and proximity
relations are symmetric in their arguments.
"""

from __future__ import annotations

import math

# accepted locality -> (kind, sign); kind "x"/"y" directional along that axis, "near" proximity.
# sign -1: box 1 must have the smaller coordinate (left / higher in the image).
RELATIONS = {
    "left of": ("x", -1),
    "on the left of": ("x", -1),
    "right of": ("x", 1),
    "on the right of": ("x", 1),
    "above": ("y", -1),
    "on top of": ("y", -1),
    "on the top of": ("y", -1),
    "top of": ("y", -1),  # in the T2I-R1 seed's relation list (reward_gdino.py:240)
    "below": ("y", 1),
    "on the bottom of": ("y", 1),
    "next to": ("near", 0),
    "near": ("near", 0),
    "on side of": ("near", 0),
}

_EPS = 1e-9  # floor for the mean box size, so zero-area boxes do not divide by zero


def normalize_relation(relation: str) -> str:
    """Lower-case, whitespace-collapsed relation; ValueError for a relation this module does not score."""
    if not isinstance(relation, str):
        raise ValueError(f"spatial relation must be a string, got {type(relation).__name__}")  # noqa: TRY004
    key = " ".join(relation.lower().split())
    if key not in RELATIONS:
        raise ValueError(f"unknown spatial relation {relation!r}; known relations: {sorted(RELATIONS)}")
    return key


def _check_box(box, which: str) -> tuple[float, float, float, float]:
    try:
        x1, y1, x2, y2 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"{which} must be 4 numbers (x1, y1, x2, y2), got {box!r}") from None
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise ValueError(f"{which} has a non-finite coordinate: {box!r}")
    if x2 < x1 or y2 < y1:
        raise ValueError(f"{which} must satisfy x1 <= x2 and y1 <= y2, got {box!r}")
    return x1, y1, x2, y2


def _clamp01(v: float) -> float:
    return min(1.0, max(0.0, v))


def spatial_score(box1, box2, relation: str) -> float:
    """Score in [0, 1] of "box1 <relation> box2" (see the module docstring for the formula)."""
    kind, sign = RELATIONS[normalize_relation(relation)]
    ax1, ay1, ax2, ay2 = _check_box(box1, "box1")
    bx1, by1, bx2, by2 = _check_box(box2, "box2")
    tx = ((ax1 + ax2) - (bx1 + bx2)) / max((ax2 - ax1) + (bx2 - bx1), _EPS)  # centre offsets in
    ty = ((ay1 + ay2) - (by1 + by2)) / max((ay2 - ay1) + (by2 - by1), _EPS)  # mean-size units
    if kind == "near":
        gap = max(abs(tx) - 1.0, abs(ty) - 1.0, 0.0)
        return _clamp01(1.0 - gap)
    along, perp = (tx, abs(ty)) if kind == "x" else (ty, abs(tx))
    a = sign * along
    return _clamp01(a) * _clamp01(1.0 + a - perp)
