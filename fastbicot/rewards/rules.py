"""Detector rules: presence, counting and spatial scores computed from open-vocabulary detections.

The rules are pure functions over one image's detections, a list of ``Detection(label, score, box)``
with ``box = (x1, y1, x2, y2)`` in normalised image coordinates (y down) and ``label`` the queried
phrase the box was grounded to (matched case-insensitively, whitespace-collapsed). ``DetectorReward``
runs any detector (e.g. GroundingDINO from ``fastbicot.rewards.models``) and applies the rules the
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
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

from .base import Reward, RewardError, _short, require_field
from .spatial import _check_box, normalize_relation, spatial_score


class Detection(NamedTuple):
    label: str
    score: float
    box: tuple[float, float, float, float]


ATTRIBUTE_TASKS = ("color", "shape", "texture")


def _key(text: str) -> str:
    return " ".join(str(text).lower().split())


def _as_detections(dets) -> list[Detection]:
    out = []
    for d in dets:
        try:
            label, score, box = d
        except (TypeError, ValueError):
            raise ValueError(f"a detection must be (label, score, box), got {d!r}") from None
        out.append(Detection(_key(label), float(score), _check_box(box, f"box of detection {label!r}")))
    return out


def iou(a, b) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes (0 for two empty boxes)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


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
    ``attr_nouns`` with ``attributes=True``). A missing field is a RewardError naming reward and prompt,
    raised before any detector runs.
    """
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


class DetectorReward(Reward):
    """Rule-based reward over an open-vocabulary detector.

    ``detector(images uint8 [N, H, W, 3], queries: list of N phrase lists) -> N lists of
    (label, score, box)`` with normalised boxes and each label one of that image's queries
    (``detection_queries(metadata)``). Rule parameters: see ``rule_score``.
    """

    def __init__(
        self,
        detector: Callable,
        name: str = "detector_rules",
        *,
        threshold: float = 0.35,
        iou_threshold: float = 0.5,
        presence_credit: float = 0.5,
        partial: bool = True,
        attributes: bool = False,
        fallback: float | None = None,
        device="cpu",
    ):
        super().__init__(name, fallback=fallback, device=device)
        if not 0.0 <= presence_credit <= 1.0:
            raise ValueError(f"presence_credit must be in [0, 1], got {presence_credit}")
        self.detector = detector
        self.rule_kwargs = dict(
            threshold=threshold,
            iou_threshold=iou_threshold,
            presence_credit=presence_credit,
            partial=partial,
            attributes=attributes,
        )

    def to(self, device) -> DetectorReward:
        super().to(device)
        if hasattr(self.detector, "to") and not isinstance(self.detector, type):
            self.detector = self.detector.to(self.device) or self.detector
        return self

    def score(self, images, prompts, metadata, cots):
        attributes = self.rule_kwargs["attributes"]
        for m, p in zip(metadata, prompts):  # fail on bad metadata before paying for detection
            rule_plan(m, reward=self.name, prompt=p, attributes=attributes)
        queries = [detection_queries(m, attributes) for m in metadata]
        detections = self.detector(images, queries)
        if len(detections) != len(prompts):
            raise RewardError(
                f"reward {self.name!r}: detector returned {len(detections)} results for {len(prompts)} images"
            )
        return [
            rule_score(d, m, reward=self.name, prompt=p, **self.rule_kwargs)
            for d, m, p in zip(detections, metadata, prompts)
        ]
