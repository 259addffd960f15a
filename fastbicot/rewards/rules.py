"""Detector rules: presence, counting and spatial scores computed from open-vocabulary detections.

The rules are pure functions over one image's detections, a list of ``Detection(label, score, box)``
with ``box = (x1, y1, x2, y2)`` in normalised image coordinates (y down) and ``label`` the queried
phrase the box was grounded to (matched case-insensitively, whitespace-collapsed). ``DetectorReward``
runs any detector (e.g. GroundingDINO from ``fastbicot.rewards.learned``) and applies the rules the
prompt metadata asks for (T2I-CompBench / T2I-R1 fields ``task_type``, ``nouns``, ``attr_nouns``,
``spatial_info``, ``numeracy_info``):

* presence: fraction of the required phrases detected with score >= ``threshold``.
* counting: per object, n_hat = detections of that class left after per-class NMS (IoU >
  ``iou_threshold`` suppresses) with score >= ``threshold``; credit 1 if n_hat == n, else
  max(0, 1 - |n_hat - n| / n) (``partial=True``) or 0 (``partial=False``); n == 0 scores 1 only
  for n_hat == 0. The score is the mean credit over objects.
* spatial: 0 if obj1 or obj2 is not detected; otherwise
  ``presence_credit + (1 - presence_credit) * spatial_score(box1, box2, locality)`` with the
  highest-scoring box of each object (both orders of the two best boxes when obj1 == obj2).

Two rule sets (``DetectorReward(rules=...)``):

* ``"t2i_r1"`` (default): the T2I-R1 seed's GroundingDINO scoring (``src/t2i-r1/src/utils/reward_gdino.py``
  of CaraJ7/T2I-R1), see ``t2i_r1_score``. Two seed bugs are fixed by default and can be switched off
  (``fix_above``, ``fix_proximity``), as can the fix of its NMS on centre-format boxes (``fix_nms``).
* ``"fastbicot"``: the continuous rules above (``rule_score``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

from ..layout import iou  # one IoU for detections and layout plans
from .base import Reward, RewardError, _short, require_field
from .spatial import _check_box, normalize_relation, spatial_score


class Detection(NamedTuple):
    """One detected box. ``label``/``score``: its best phrase and that phrase's score; ``phrase_scores``:
    (phrase, score) for every queried phrase, in query order (empty when the detector gives only the
    best phrase, which then stands for all of them)."""

    label: str
    score: float
    box: tuple[float, float, float, float]
    phrase_scores: tuple[tuple[str, float], ...] = ()


ATTRIBUTE_TASKS = ("color", "shape", "texture")
# task_type values of the T2I-CompBench / T2I-R1 data (the seed's 7,223 prompts use exactly these)
KNOWN_TASK_TYPES = ("color", "shape", "texture", "spatial", "numeracy", "complex", "non", "object")
RULE_SETS = ("t2i_r1", "fastbicot")


def _key(text: str) -> str:
    return " ".join(str(text).lower().split())


def _finite(value, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{what} is not finite: {value!r}")
    return v


def _as_detections(dets, normalize: bool = True) -> list[Detection]:
    """Validated detections; labels lower-cased and whitespace-collapsed unless ``normalize=False``.
    A non-finite confidence or box coordinate is a ValueError (never a silent miss)."""
    if isinstance(dets, (str, bytes, Mapping)) or not isinstance(dets, Sequence):
        raise ValueError(f"detections must be a list of (label, score, box), got {type(dets).__name__}")  # noqa: TRY004
    out = []
    for d in dets:
        try:
            label, score, box, *rest = d
        except (TypeError, ValueError):
            raise ValueError(f"a detection must be (label, score, box), got {d!r}") from None
        if not isinstance(label, str) or len(rest) > 1:
            raise ValueError(f"a detection must be (label: str, score, box[, phrase_scores]), got {d!r}")
        score = _finite(score, f"confidence of detection {label!r}")
        phrases = []
        for item in (rest[0] if rest else ()) or ():
            try:
                p, ps = item
            except (TypeError, ValueError):
                raise ValueError(f"phrase_scores of detection {label!r} must be (phrase, score) pairs, "
                                 f"got {item!r}") from None
            if not isinstance(p, str):
                raise ValueError(f"phrase_scores of detection {label!r}: phrase must be a str, got {p!r}")  # noqa: TRY004
            phrases.append((_key(p) if normalize else p, _finite(ps, f"score of phrase {p!r} of a detection")))
        out.append(Detection(_key(label) if normalize else label, score,
                             _check_box(box, f"box of detection {label!r}"), tuple(phrases)))
    return out


# ----------------------------------------------------------------------------- metadata validation


def _err(reward: str, prompt, message: str) -> RewardError:
    return RewardError(f"reward {reward!r}, prompt {_short(prompt)}: {message}")


def check_prompt(prompt, reward: str) -> str:
    if not isinstance(prompt, str):
        raise RewardError(f"reward {reward!r}: prompts must be str, got {type(prompt).__name__} {_short(prompt)}")
    return prompt


def check_task_type(metadata: Mapping, reward: str, prompt) -> str | None:
    """``metadata["task_type"]``: None (absent) or one of KNOWN_TASK_TYPES; anything else is a RewardError."""
    task = metadata.get("task_type")
    if task is None:
        return None
    if not isinstance(task, str) or task not in KNOWN_TASK_TYPES:
        raise _err(reward, prompt, f"metadata field 'task_type' must be one of {list(KNOWN_TASK_TYPES)}, "
                                   f"got {task!r}")
    return task


def check_phrases(metadata: Mapping, field: str, reward: str, prompt, *, required: bool = False) -> list | None:
    """``metadata[field]`` as a list of str (None when absent and not ``required``); a str, a non-list or a
    non-str entry is a RewardError naming reward, prompt and field."""
    value = metadata.get(field)
    if value is None:
        return require_field(metadata, field, reward, prompt) if required else None
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise _err(reward, prompt, f"metadata field {field!r} must be a list of str, got {type(value).__name__} "
                                   f"{value!r}")
    for v in value:
        if not isinstance(v, str):
            raise _err(reward, prompt, f"metadata field {field!r} must be a list of str, has {v!r}")
    return list(value)


def check_spatial_info(metadata: Mapping, reward: str, prompt, *, required: bool = False) -> Mapping | None:
    value = metadata.get("spatial_info")
    if value is None:
        return require_field(metadata, "spatial_info", reward, prompt) if required else None
    if not isinstance(value, Mapping) or not all(isinstance(value.get(k), str) for k in ("obj1", "obj2", "locality")):
        raise _err(reward, prompt, "metadata field 'spatial_info' must be {'obj1': str, 'obj2': str, "
                                   f"'locality': str}}, got {value!r}")
    try:
        normalize_relation(value["locality"])
    except ValueError as e:
        raise _err(reward, prompt, str(e)) from None
    return value


def check_numeracy_info(metadata: Mapping, reward: str, prompt, *, required: bool = False) -> list | None:
    value = metadata.get("numeracy_info")
    if value is None:
        return require_field(metadata, "numeracy_info", reward, prompt) if required else None
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence) or not value:
        raise _err(reward, prompt, f"metadata field 'numeracy_info' must be a non-empty list of "
                                   f"{{'obj_name': str, 'num': int}}, got {value!r}")
    for item in value:
        num = item.get("num") if isinstance(item, Mapping) else None
        if (not isinstance(item, Mapping) or not isinstance(item.get("obj_name"), str) or isinstance(num, bool)
                or not isinstance(num, int) or num < 0):
            raise _err(reward, prompt, "numeracy_info items must be {'obj_name': str, 'num': non-negative int}, "
                                       f"got {item!r}")
    return list(value)


def check_metadata(metadata, reward: str, prompt, fields=("task_type", "nouns", "attr_nouns", "spatial_info",
                                                          "numeracy_info")) -> None:
    """Type-check the present ``fields`` of one prompt's metadata (absent fields are left to the rules)."""
    check_prompt(prompt, reward)
    if not isinstance(metadata, Mapping):
        raise RewardError(f"reward {reward!r}: metadata for prompt {_short(prompt)} must be a dict, "
                          f"got {type(metadata).__name__}")
    for f in fields:
        if f == "task_type":
            check_task_type(metadata, reward, prompt)
        elif f in ("nouns", "attr_nouns"):
            check_phrases(metadata, f, reward, prompt)
        elif f == "spatial_info":
            check_spatial_info(metadata, reward, prompt)
        elif f == "numeracy_info":
            check_numeracy_info(metadata, reward, prompt)
        else:
            raise ValueError(f"unknown metadata field {f!r}")


def check_unit(value, name: str, *, low: float = 0.0, high: float = 1.0) -> float:
    """A finite number in [low, high] (constructor argument checks: NaN is rejected)."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")  # noqa: TRY004
    v = _finite(value, name)
    if not low <= v <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value!r}")
    return v


def nms(detections, iou_threshold: float = 0.5, threshold: float = 0.0) -> list[Detection]:
    """Greedy per-class non-maximum suppression of the detections with score >= threshold.

    A box is dropped when its IoU with a higher-scoring kept box of the same label exceeds
    ``iou_threshold``. Returns the kept detections, highest score first.
    """
    dets = sorted((d for d in _as_detections(detections) if d.score >= threshold), key=lambda d: -d.score)
    kept: list[Detection] = []
    for d in dets:
        if all(k.label != d.label or iou(k.box, d.box) <= iou_threshold for k in kept):
            kept.append(d)
    return kept


def presence_score(detections, phrases: Sequence[str], threshold: float = 0.35) -> float:
    """Fraction of ``phrases`` with at least one detection scoring >= threshold."""
    wanted = [_key(p) for p in phrases]
    if not wanted:
        raise ValueError("presence needs at least one phrase")
    found = {d.label for d in _as_detections(detections) if d.score >= threshold}
    return sum(p in found for p in wanted) / len(wanted)


def count_credit(n_hat: int, n: int, partial: bool = True) -> float:
    if n_hat == n:
        return 1.0
    if not partial or n == 0:
        return 0.0
    return max(0.0, 1.0 - abs(n_hat - n) / n)


def counting_score(
    detections, numeracy_info, threshold: float = 0.35, iou_threshold: float = 0.5, partial: bool = True
) -> float:
    """Mean over ``numeracy_info`` [{obj_name, num}] of the count credit (module docstring)."""
    if not numeracy_info:
        raise ValueError("counting needs a non-empty numeracy_info list")
    kept = nms(detections, iou_threshold, threshold)
    credits = []
    for item in numeracy_info:
        if not isinstance(item, Mapping) or "obj_name" not in item or "num" not in item:
            raise ValueError(f"numeracy_info items must be {{'obj_name': str, 'num': int}}, got {item!r}")
        num = item["num"]
        if isinstance(num, bool) or not isinstance(num, int) or num < 0:
            raise ValueError(f"numeracy_info num must be a non-negative int, got {num!r}")
        name = _key(item["obj_name"])
        credits.append(count_credit(sum(d.label == name for d in kept), num, partial))
    return sum(credits) / len(credits)


def spatial_rule_score(
    detections,
    spatial_info: Mapping,
    threshold: float = 0.35,
    presence_credit: float = 0.5,
    iou_threshold: float = 0.5,
) -> float:
    """0 if an object is missing, else presence_credit + (1 - presence_credit) * spatial_score."""
    try:
        obj1, obj2, locality = (spatial_info[k] for k in ("obj1", "obj2", "locality"))
    except (KeyError, TypeError):
        raise ValueError(f"spatial_info must have obj1, obj2 and locality, got {spatial_info!r}") from None
    locality = normalize_relation(locality)
    kept = nms(detections, iou_threshold, threshold)  # highest score first
    boxes1 = [d.box for d in kept if d.label == _key(obj1)]
    boxes2 = [d.box for d in kept if d.label == _key(obj2)]
    if _key(obj1) == _key(obj2):  # "a cat left of a cat": the two best boxes, either order
        if len(boxes1) < 2:
            return 0.0
        rel = max(
            spatial_score(boxes1[0], boxes1[1], locality), spatial_score(boxes1[1], boxes1[0], locality)
        )
    else:
        if not boxes1 or not boxes2:
            return 0.0
        rel = spatial_score(boxes1[0], boxes2[0], locality)
    return presence_credit + (1.0 - presence_credit) * rel


def _presence_phrases(metadata: Mapping, attributes: bool, reward: str, prompt: str) -> list[str]:
    if attributes and (metadata.get("task_type") in ATTRIBUTE_TASKS or metadata.get("attr_nouns")):
        return require_field(metadata, "attr_nouns", reward, prompt)
    return require_field(metadata, "nouns", reward, prompt)


def detection_queries(metadata: Mapping, attributes: bool = False) -> list[str]:
    """The phrases a detector must look for to score this prompt (deduplicated, in order)."""
    phrases = list(metadata.get("attr_nouns") or []) if attributes else []
    phrases += list(metadata.get("nouns") or [])
    phrases += [
        item.get("obj_name", "") for item in metadata.get("numeracy_info") or [] if isinstance(item, Mapping)
    ]
    spatial = metadata.get("spatial_info")
    if isinstance(spatial, Mapping):
        phrases += [spatial.get("obj1", ""), spatial.get("obj2", "")]
    out, seen = [], set()
    for p in phrases:
        k = _key(p)
        if k and k not in seen:
            seen.add(k)
            out.append(k)
    return out


def rule_plan(
    metadata: Mapping, *, reward: str = "detector_rules", prompt: str = "", attributes: bool = False
) -> list[tuple[str, object]]:
    """The rules the prompt's ``task_type`` asks for, as (rule, metadata value) pairs.

    spatial -> spatial rule (needs ``spatial_info``); numeracy -> counting (needs ``numeracy_info``);
    complex -> presence (``nouns``) plus counting / spatial where those fields are given;
    anything else (color, shape, texture, object, non, missing) -> presence over ``nouns`` (over
    ``attr_nouns`` with ``attributes=True``). A missing field, a field of the wrong type or an unknown
    ``task_type`` is a RewardError naming reward and prompt, raised before any detector runs.
    """
    check_metadata(metadata, reward, prompt)
    task = metadata.get("task_type")
    if task == "spatial":
        plan = [("spatial", require_field(metadata, "spatial_info", reward, prompt))]
    elif task == "numeracy":
        plan = [("counting", require_field(metadata, "numeracy_info", reward, prompt))]
    else:
        plan = [("presence", _presence_phrases(metadata, attributes, reward, prompt))]
        if task == "complex":
            plan += [
                (rule, metadata[f])
                for rule, f in (("counting", "numeracy_info"), ("spatial", "spatial_info"))
                if metadata.get(f)
            ]
    for rule, value in plan:
        if rule == "spatial":
            try:
                normalize_relation(value.get("locality") if isinstance(value, Mapping) else None)
            except ValueError as e:
                raise RewardError(f"reward {reward!r}, prompt {_short(prompt)}: {e}") from None
    return plan


def rule_score(
    detections,
    metadata: Mapping,
    *,
    reward: str = "detector_rules",
    prompt: str = "",
    threshold: float = 0.35,
    iou_threshold: float = 0.5,
    presence_credit: float = 0.5,
    partial: bool = True,
    attributes: bool = False,
) -> float:
    """Mean score of the rules ``rule_plan(metadata)`` selects, over one image's detections."""
    plan = rule_plan(metadata, reward=reward, prompt=prompt, attributes=attributes)
    try:
        parts = []
        for rule, value in plan:
            if rule == "presence":
                parts.append(presence_score(detections, value, threshold))
            elif rule == "counting":
                parts.append(counting_score(detections, value, threshold, iou_threshold, partial))
            else:
                parts.append(spatial_rule_score(detections, value, threshold, presence_credit, iou_threshold))
        return sum(parts) / len(parts)
    except ValueError as e:
        raise RewardError(f"reward {reward!r}, prompt {_short(prompt)}: {e}") from None


# ----------------------------------------------------------------------------- the T2I-R1 seed's rules
#
# Restated from src/t2i-r1/src/utils/reward_gdino.py of CaraJ7/T2I-R1 @ 2d9d4d1 ("gdino:<line>" below).

T2I_R1_BOX_THRESHOLD = 0.3  # gdino:87, compared with ">" (gdino:159)
T2I_R1_NMS_IOU = 0.5  # gdino:325
T2I_R1_POSITION_IOU = 0.1  # determine_position's iou_threshold (gdino:192)
T2I_R1_DISTANCE = 150.0  # determine_position's distance_threshold (gdino:192), meant as pixels
# fix_proximity: the same 150 px expressed in normalised units of the seed's 384 x 384 images
T2I_R1_PROXIMITY = 150.0 / 384.0

_NEAR = ("next to", "on side of", "near")
_RIGHT = ("on the right of", "right of")
_LEFT = ("on the left of", "left of")
_BOTTOM = ("on the bottom of", "below")
_TOP = ("on the top of", "top of")
_TOP_FIXED = ("above", "on top of")  # not in the seed's lists: scored 0 there (gdino:246-247)


def phrase_hits(detections, threshold: float = T2I_R1_BOX_THRESHOLD) -> list[tuple[str, float, tuple]]:
    """The seed's (phrase, score, box) list: every box counts for every phrase scoring > ``threshold``,
    phrase by phrase in query order, boxes in detector order within a phrase (gdino:151-170). Labels
    are matched verbatim (no case folding), as the seed compares strings."""
    dets = _as_detections(detections, normalize=False)
    per_box = [d.phrase_scores or ((d.label, d.score),) for d in dets]
    hits = []
    for j in range(max((len(p) for p in per_box), default=0)):
        for d, ps in zip(dets, per_box):
            if j < len(ps) and ps[j][1] > threshold:
                hits.append((ps[j][0], ps[j][1], d.box))
    return hits


def t2i_r1_position(locality: str, box1, box2, *, fix_above: bool = True, fix_proximity: bool = True,
                    proximity_threshold: float = T2I_R1_PROXIMITY) -> float:
    """The seed's ``determine_position`` (gdino:192-248) for xyxy boxes.

    Directional: 1 if box 1 is on the asked side (centre offset), the asked axis dominates and
    IoU < 0.1; 0.1 / IoU if it dominates with IoU >= 0.1; else 0. Proximity: 1 if |dx| or |dy| is
    below the distance threshold, else threshold / max(|dx|, |dy|). ``fix_above``: "above" and
    "on top of" score like "on the top of" (the seed gives them 0). ``fix_proximity``: the threshold
    is ``proximity_threshold`` (normalised) instead of the seed's 150, which on normalised boxes is
    always met.
    """
    loc = normalize_relation(locality)
    ax1, ay1, ax2, ay2 = _check_box(box1, "box1")
    bx1, by1, bx2, by2 = _check_box(box2, "box2")
    dx = (bx1 + bx2) / 2 - (ax1 + ax2) / 2
    dy = (by1 + by2) / 2 - (ay1 + ay2) / 2
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    iou = inter / union if union != 0 else (math.nan if inter == 0 else math.inf)  # the seed divides tensors
    thr = T2I_R1_POSITION_IOU
    if loc in _NEAR:
        dist = proximity_threshold if fix_proximity else T2I_R1_DISTANCE
        if abs(dx) < dist or abs(dy) < dist:
            return 1.0
        return dist / max(abs(dx), abs(dy))
    if loc in _RIGHT:
        side, dominant = dx < 0, abs(dx) > abs(dy)
    elif loc in _LEFT:
        side, dominant = dx > 0, abs(dx) > abs(dy)
    elif loc in _BOTTOM:
        side, dominant = dy < 0, abs(dy) > abs(dx)
    elif loc in _TOP or (fix_above and loc in _TOP_FIXED):
        side, dominant = dy > 0, abs(dy) > abs(dx)
    else:
        return 0.0
    if side and dominant and iou < thr:
        return 1.0
    if side and dominant and iou >= thr:
        return thr / iou
    return 0.0


def t2i_r1_spatial_score(hits, spatial_info: Mapping, **position_options) -> float:
    """The seed's ``get_spatial_score`` (gdino:274-305): 0.2 per detected object; with both, plus
    ``t2i_r1_position`` / 2 on each object's most confident box (max 0.9). obj1 == obj2 scores 0 (the
    seed finds no box for obj2, raises, and its caller gives 0: gdino:257-268, 367-371)."""
    obj1, obj2, locality = spatial_info["obj1"], spatial_info["obj2"], spatial_info["locality"]
    labels = [h[0] for h in hits]
    score = 0.0
    for obj in (obj1, obj2):
        if obj in labels:
            score += 0.2
    if score != 0.4:
        return score
    if obj1 == obj2:
        return 0.0

    def best(obj):  # torch.argmax: the first maximum (gdino:265-270)
        cand = [(s, b) for label, s, b in hits if label == obj]
        return max(cand, key=lambda c: c[0])[1]

    return score + t2i_r1_position(locality, best(obj1), best(obj2), **position_options) / 2


def _cxcywh(box):
    x1, y1, x2, y2 = box
    return ((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1)


def seed_nms_count(boxes, scores, iou_threshold: float = T2I_R1_NMS_IOU) -> int:
    """Number of boxes torchvision.ops.nms keeps (greedy, highest score first, a box suppressed when
    inter / (area_i + area_j - inter) > iou_threshold), with its arithmetic on boxes that need not be
    well formed (the seed passes centre-format boxes): a zero denominator gives nan or inf."""
    order = sorted(range(len(boxes)), key=lambda i: -scores[i])
    area = [(b[2] - b[0]) * (b[3] - b[1]) for b in boxes]
    suppressed, kept = set(), 0
    for a, i in enumerate(order):
        if i in suppressed:
            continue
        kept += 1
        for j in order[a + 1:]:
            if j in suppressed:
                continue
            w = max(0.0, min(boxes[i][2], boxes[j][2]) - max(boxes[i][0], boxes[j][0]))
            h = max(0.0, min(boxes[i][3], boxes[j][3]) - max(boxes[i][1], boxes[j][1]))
            inter = w * h
            denom = area[i] + area[j] - inter
            ovr = inter / denom if denom != 0 else (math.nan if inter == 0 else math.inf)
            if ovr > iou_threshold:
                suppressed.add(j)
    return kept


def t2i_r1_counting_score(hits, numeracy_info, *, fix_nms: bool = True,
                          iou_threshold: float = T2I_R1_NMS_IOU) -> float:
    """The seed's ``get_numeracy_score`` (gdino:308-332): per object, 0 if no box has its name, else
    1 if NMS leaves exactly ``num`` boxes and 0.2 otherwise; weighted by 1 / len(numeracy_info).
    ``fix_nms=False`` runs NMS on the centre-format boxes read as corners, as the seed does."""
    weight = 1 / len(numeracy_info)
    score = 0.0
    for item in numeracy_info:
        expected, name = item["num"], item["obj_name"]
        found = [(s, b) for label, s, b in hits if label == name]
        if not found:
            continue
        boxes = [b if fix_nms else _cxcywh(b) for _, b in found]
        if seed_nms_count(boxes, [s for s, _ in found], iou_threshold) == expected:
            score += 1 * weight
        else:
            score += 0.2 * weight
    return score


def t2i_r1_object_score(hits, nouns: Sequence[str]) -> float:
    """The seed's ``get_object_score`` (gdino:334-340): the fraction of ``nouns`` with a box."""
    labels = {h[0] for h in hits}
    weight = 1 / len(nouns)
    score = 0
    for noun in nouns:
        if noun in labels:
            score += weight
    return score


def t2i_r1_queries(metadata: Mapping) -> list[str]:
    """The seed's detection phrases: ``nouns`` verbatim (grpo.py:63-82 builds the caption from them)."""
    return list(metadata.get("nouns") or [])


def t2i_r1_check(metadata: Mapping, *, reward: str = "detector_rules", prompt: str = "") -> str | None:
    """Validate what ``t2i_r1_score`` reads; returns the task type."""
    check_prompt(prompt, reward)
    task = check_task_type(metadata, reward, prompt)
    check_phrases(metadata, "nouns", reward, prompt, required=True)
    check_spatial_info(metadata, reward, prompt, required=task == "spatial")
    check_numeracy_info(metadata, reward, prompt, required=task == "numeracy")
    return task


def t2i_r1_score(
    detections,
    metadata: Mapping,
    *,
    reward: str = "detector_rules",
    prompt: str = "",
    threshold: float = T2I_R1_BOX_THRESHOLD,
    iou_threshold: float = T2I_R1_NMS_IOU,
    fix_above: bool = True,
    fix_proximity: bool = True,
    proximity_threshold: float = T2I_R1_PROXIMITY,
    fix_nms: bool = True,
) -> float:
    """The seed's GroundingDINO reward for one image (gdino:342-377).

    No nouns -> 1. ``task_type`` spatial -> ``t2i_r1_spatial_score`` (max 0.9), numeracy ->
    ``t2i_r1_counting_score``, anything else (color, shape, texture, non, object, complex) ->
    ``t2i_r1_object_score`` over ``nouns``. Boxes count for every phrase scoring > ``threshold``.
    With ``fix_above=fix_proximity=fix_nms=False`` this is the seed's scoring exactly.
    """
    task = t2i_r1_check(metadata, reward=reward, prompt=prompt)
    nouns = metadata["nouns"]
    if len(nouns) == 0:
        return 1.0
    try:
        hits = phrase_hits(detections, threshold)
    except ValueError as e:
        raise _err(reward, prompt, str(e)) from None
    if task == "spatial":
        return t2i_r1_spatial_score(hits, metadata["spatial_info"], fix_above=fix_above,
                                    fix_proximity=fix_proximity, proximity_threshold=proximity_threshold)
    if task == "numeracy":
        return t2i_r1_counting_score(hits, metadata["numeracy_info"], fix_nms=fix_nms, iou_threshold=iou_threshold)
    return t2i_r1_object_score(hits, nouns)


class DetectorReward(Reward):
    """Rule-based reward over an open-vocabulary detector.

    ``detector(images uint8 [N, H, W, 3], queries: list of N phrase lists) -> N lists of detections``,
    each ``(label, score, box[, phrase_scores])`` with normalised xyxy boxes (``Detection``), or None for
    an image the detector could not judge (non-finite outputs). Queries: ``nouns`` verbatim for
    ``rules="t2i_r1"`` (``t2i_r1_queries``), ``detection_queries(metadata, attributes)`` for
    ``rules="fastbicot"``.

    ``rules="t2i_r1"`` (default) scores with ``t2i_r1_score`` (options ``threshold`` default 0.3,
    ``iou_threshold`` 0.5, ``fix_above``, ``fix_proximity``, ``proximity_threshold``, ``fix_nms``);
    ``rules="fastbicot"`` with ``rule_score`` (``threshold`` default 0.35, ``iou_threshold``,
    ``presence_credit``, ``partial``, ``attributes``). A detection with a non-finite confidence, or a
    None result, is a RewardError naming the prompt, or ``fallback`` when one is set.
    """

    def __init__(
        self,
        detector: Callable,
        name: str = "detector_rules",
        *,
        rules: str = "t2i_r1",
        threshold: float | None = None,
        iou_threshold: float = 0.5,
        presence_credit: float = 0.5,
        partial: bool = True,
        attributes: bool = False,
        fix_above: bool = True,
        fix_proximity: bool = True,
        proximity_threshold: float = T2I_R1_PROXIMITY,
        fix_nms: bool = True,
        fallback: float | None = None,
        device="cpu",
    ):
        super().__init__(name, fallback=fallback, device=device)
        if rules not in RULE_SETS:
            raise ValueError(f"reward {self.name!r}: rules must be one of {list(RULE_SETS)}, got {rules!r}")
        if threshold is None:
            threshold = T2I_R1_BOX_THRESHOLD if rules == "t2i_r1" else 0.35
        threshold = check_unit(threshold, f"reward {self.name!r}: threshold")
        iou_threshold = check_unit(iou_threshold, f"reward {self.name!r}: iou_threshold")
        presence_credit = check_unit(presence_credit, f"reward {self.name!r}: presence_credit")
        proximity_threshold = check_unit(proximity_threshold, f"reward {self.name!r}: proximity_threshold",
                                         low=0.0, high=math.inf)
        if proximity_threshold <= 0:
            raise ValueError(f"reward {self.name!r}: proximity_threshold must be > 0, got {proximity_threshold}")
        self.detector = detector
        self.rules = rules
        if rules == "t2i_r1":
            self.rule_kwargs = {"threshold": threshold, "iou_threshold": iou_threshold,
                                "fix_above": bool(fix_above), "fix_proximity": bool(fix_proximity),
                                "proximity_threshold": proximity_threshold, "fix_nms": bool(fix_nms)}
        else:
            self.rule_kwargs = {"threshold": threshold, "iou_threshold": iou_threshold,
                                "presence_credit": presence_credit, "partial": bool(partial),
                                "attributes": bool(attributes)}

    def to(self, device) -> DetectorReward:
        super().to(device)
        if hasattr(self.detector, "to") and not isinstance(self.detector, type):
            self.detector = self.detector.to(self.device) or self.detector
        return self

    def check(self, metadata: Mapping, prompt) -> None:
        """Validate one prompt's metadata for this reward's rules (before any detector runs)."""
        if self.rules == "t2i_r1":
            t2i_r1_check(metadata, reward=self.name, prompt=prompt)
        else:
            check_metadata(metadata, self.name, prompt)
            rule_plan(metadata, reward=self.name, prompt=prompt, attributes=self.rule_kwargs["attributes"])

    def queries(self, metadata: Mapping) -> list[str]:
        if self.rules == "t2i_r1":
            return t2i_r1_queries(metadata)
        return detection_queries(metadata, self.rule_kwargs["attributes"])

    def score_one(self, detections, metadata: Mapping, prompt: str) -> float:
        if detections is None:
            return self._not_judged(prompt, "the detector's outputs are not finite")
        try:
            _as_detections(detections, normalize=False)
        except ValueError as e:
            return self._not_judged(prompt, str(e))
        if self.rules == "t2i_r1":
            return t2i_r1_score(detections, metadata, reward=self.name, prompt=prompt, **self.rule_kwargs)
        return rule_score(detections, metadata, reward=self.name, prompt=prompt, **self.rule_kwargs)

    def _not_judged(self, prompt, why: str) -> float:
        if self.fallback is None:
            raise _err(self.name, prompt, f"{why}; set fallback=<value> to substitute a fixed value")
        return math.nan  # Reward.check_scores substitutes the fallback and counts it

    def score(self, images, prompts, metadata, cots):
        for m, p in zip(metadata, prompts):  # fail on bad metadata before paying for detection
            self.check(m, p)
        detections = self.detector(images, [self.queries(m) for m in metadata])
        if len(detections) != len(prompts):
            raise RewardError(
                f"reward {self.name!r}: detector returned {len(detections)} results for {len(prompts)} images"
            )
        return [self.score_one(d, m, p) for d, m, p in zip(detections, metadata, prompts)]
