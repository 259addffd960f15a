"""spatial_score and the detector rules on hand-made boxes."""

import random

import pytest
import torch

from fastbicot.rewards import (
    RELATIONS,
    Detection,
    DetectorReward,
    RewardError,
    counting_score,
    detection_queries,
    nms,
    presence_score,
    rule_score,
    spatial_rule_score,
    spatial_score,
)

# Hand-made scenes: box A relative to box B (both 0.2 x 0.2).
B = (0.4, 0.4, 0.6, 0.6)
LEFT, RIGHT = (0.1, 0.4, 0.3, 0.6), (0.7, 0.4, 0.9, 0.6)
UP, DOWN = (0.4, 0.1, 0.6, 0.3), (0.4, 0.7, 0.6, 0.9)
FAR_LEFT = (0.0, 0.45, 0.05, 0.5)
SIDE = {"x": (-1, 1), "y": (-1, 1)}
DIRECTIONAL = {
    "left of": LEFT,
    "on the left of": LEFT,
    "right of": RIGHT,
    "on the right of": RIGHT,
    "above": UP,
    "on top of": UP,
    "on the top of": UP,
    "below": DOWN,
    "on the bottom of": DOWN,
}
OPPOSITE = {LEFT: RIGHT, RIGHT: LEFT, UP: DOWN, DOWN: UP}
CANONICAL = {
    "left of": "right of",
    "on the left of": "on the right of",
    "above": "below",
    "on top of": "below",
    "on the top of": "on the bottom of",
}


def test_every_relation_is_scored():
    assert set(RELATIONS) == set(DIRECTIONAL) | {"next to", "near", "on side of"}


@pytest.mark.parametrize("relation", sorted(DIRECTIONAL))
def test_directional_true_false(relation):
    good = DIRECTIONAL[relation]
    assert spatial_score(good, B, relation) == 1.0
    assert spatial_score(OPPOSITE[good], B, relation) == 0.0
    assert spatial_score(B, B, relation) == 0.0  # level centres: no progress either way
    # the wrong axis: e.g. A straight above B is not "left of" B
    for other in OPPOSITE:
        if other not in (good, OPPOSITE[good]):
            assert spatial_score(other, B, relation) == 0.0


@pytest.mark.parametrize("relation", ["next to", "near", "on side of"])
def test_proximity_true_false(relation):
    for touching in (
        LEFT,
        RIGHT,
        UP,
        DOWN,
        B,
        (0.6, 0.6, 0.8, 0.8),
    ):  # gap 0.1 < one box size, touching, same
        assert spatial_score(touching, B, relation) >= 0.5 - 1e-9
    assert spatial_score((0.55, 0.4, 0.75, 0.6), B, relation) == 1.0  # overlapping
    assert spatial_score((0.6, 0.4, 0.8, 0.6), B, relation) == 1.0  # edge to edge
    assert spatial_score((0.9, 0.4, 0.99, 0.6), B, relation) == 0.0  # far apart
    # closed form: gap 0.1 in x with mean width 0.2 -> 1 - 0.5
    assert spatial_score(RIGHT, B, relation) == pytest.approx(0.5)


def test_closed_form_partial_credit():
    # A shifted left by half a box width: tx = -0.5, ty = 0 -> clamp(0.5) * clamp(1.5) = 0.5
    assert spatial_score((0.3, 0.4, 0.5, 0.6), B, "left of") == pytest.approx(0.5)
    # far above, slightly left: a = 0.5, p = 2.0 -> 0.5 * clamp(1 + 0.5 - 2) = 0
    assert spatial_score((0.3, 0.0, 0.5, 0.2), B, "left of") == 0.0
    assert spatial_score((0.3, 0.0, 0.5, 0.2), B, "above") == 1.0
    # diagonal: a = 1.5, p = 1.0 -> 1 * 1
    assert spatial_score((0.1, 0.2, 0.3, 0.4), B, "left of") == 1.0
    # very different sizes: a small object just left of a large one counts
    assert spatial_score(FAR_LEFT, (0.1, 0.0, 1.0, 1.0), "left of") == 1.0


def _rand_box(rng):
    x1, y1 = rng.random(), rng.random()
    return (x1, y1, x1 + rng.random() * 0.5, y1 + rng.random() * 0.5)


def test_symmetry_scale_invariance_and_range(seed):
    rng = random.Random(seed)
    for _ in range(300):
        a, b = _rand_box(rng), _rand_box(rng)
        for rel in RELATIONS:
            s = spatial_score(a, b, rel)
            assert 0.0 <= s <= 1.0
            assert spatial_score([384 * v for v in a], [384 * v for v in b], rel) == pytest.approx(
                s, abs=1e-9
            )
        assert spatial_score(a, b, "left of") == spatial_score(b, a, "right of")
        assert spatial_score(a, b, "on the left of") == spatial_score(b, a, "on the right of")
        assert spatial_score(a, b, "above") == spatial_score(b, a, "below")
        assert spatial_score(a, b, "on the top of") == spatial_score(b, a, "on the bottom of")
        assert spatial_score(a, b, "left of") * spatial_score(a, b, "right of") == 0.0
        for rel in ("next to", "near", "on side of"):
            assert spatial_score(a, b, rel) == spatial_score(b, a, rel)


def test_relation_spelling_and_errors():
    assert spatial_score(LEFT, B, "  Left   OF ") == 1.0
    with pytest.raises(ValueError, match="unknown spatial relation 'behind'.*known relations"):
        spatial_score(LEFT, B, "behind")
    with pytest.raises(ValueError, match="box1 must satisfy x1 <= x2"):
        spatial_score((0.5, 0.0, 0.1, 0.2), B, "above")
    with pytest.raises(ValueError, match="box2 must be 4 numbers"):
        spatial_score(LEFT, (0.1, 0.2), "above")
    with pytest.raises(ValueError, match="non-finite"):
        spatial_score(LEFT, (0.1, 0.2, float("nan"), 0.3), "above")
    assert spatial_score((0.2, 0.2, 0.2, 0.2), (0.5, 0.2, 0.5, 0.2), "left of") == 1.0  # zero-size boxes


def _iou_ref(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_nms_per_class(seed):
    dets = [
        ("cat", 0.9, (0.0, 0.0, 0.4, 0.4)),
        ("cat", 0.8, (0.02, 0.0, 0.42, 0.4)),  # duplicate
        ("Dog", 0.7, (0.0, 0.0, 0.4, 0.4)),  # same box, other class: kept
        ("cat", 0.6, (0.5, 0.5, 0.9, 0.9)),
        ("cat", 0.2, (0.9, 0.9, 1.0, 1.0)),
    ]
    kept = nms(dets, iou_threshold=0.5, threshold=0.3)
    assert [(d.label, d.score) for d in kept] == [("cat", 0.9), ("dog", 0.7), ("cat", 0.6)]
    # randomized: no two kept same-class boxes overlap more than the threshold; every dropped box does
    rng = random.Random(seed)
    dets = [Detection(rng.choice("ab"), rng.random(), _rand_box(rng)) for _ in range(40)]
    kept = nms(dets, 0.3)
    for i, k in enumerate(kept):
        assert all(_iou_ref(k.box, o.box) <= 0.3 for o in kept[:i] if o.label == k.label)
    for d in dets:
        if d not in kept:
            assert any(
                k.label == d.label and k.score >= d.score and _iou_ref(k.box, d.box) > 0.3 for k in kept
            )


def test_presence():
    dets = [("cat", 0.9, LEFT), ("sofa", 0.2, B), ("lamp", 0.5, UP)]
    assert presence_score(dets, ["cat", "sofa"], threshold=0.35) == 0.5
    assert presence_score(dets, ["Cat", "sofa", "lamp"], threshold=0.1) == 1.0
    assert presence_score([], ["cat"]) == 0.0
    with pytest.raises(ValueError, match="at least one phrase"):
        presence_score(dets, [])


def _row(i, label, score=0.9):
    x = 0.1 * i
    return (label, score, (x, 0.0, x + 0.08, 0.1))


def test_counting_exact_and_partial():
    info = [{"obj_name": "apple", "num": 4}]
    four = [_row(i, "apple") for i in range(4)]
    assert counting_score(four, info) == 1.0
    assert counting_score(four[:3], info) == 0.75  # 1 - 1/4
    assert counting_score(four[:3], info, partial=False) == 0.0
    assert counting_score(four + [_row(i, "apple") for i in range(4, 10)], info) == 0.0  # 10: 1 - 6/4 -> 0
    dup = four + [("apple", 0.8, (0.01, 0.0, 0.09, 0.1))]  # duplicate of the first box, removed by NMS
    assert counting_score(dup, info) == 1.0
    assert counting_score(four + [_row(5, "apple", 0.1)], info) == 1.0  # below threshold
    two_kinds = [{"obj_name": "cat", "num": 2}, {"obj_name": "dog", "num": 3}]
    assert counting_score([_row(0, "cat"), _row(1, "cat"), _row(2, "dog")], two_kinds) == pytest.approx(
        (1 + 1 / 3) / 2
    )
    assert counting_score([], [{"obj_name": "ghost", "num": 0}]) == 1.0
    assert counting_score([_row(0, "ghost")], [{"obj_name": "ghost", "num": 0}]) == 0.0
    with pytest.raises(ValueError, match="non-negative int"):
        counting_score(four, [{"obj_name": "apple", "num": "2"}])


def test_spatial_rule_presence_credit():
    info = {"obj1": "cat", "obj2": "sofa", "locality": "left of"}
    assert spatial_rule_score([("cat", 0.9, LEFT), ("sofa", 0.9, B)], info) == 1.0
    assert spatial_rule_score([("cat", 0.9, RIGHT), ("sofa", 0.9, B)], info) == 0.5
    assert spatial_rule_score([("cat", 0.9, RIGHT), ("sofa", 0.9, B)], info, presence_credit=0.2) == 0.2
    assert spatial_rule_score([("cat", 0.9, LEFT)], info) == 0.0
    assert spatial_rule_score([("cat", 0.9, LEFT), ("sofa", 0.1, B)], info) == 0.0  # below threshold
    # the best-scoring box decides
    assert spatial_rule_score([("cat", 0.5, RIGHT), ("cat", 0.9, LEFT), ("sofa", 0.9, B)], info) == 1.0
    same = {"obj1": "cat", "obj2": "cat", "locality": "above"}
    assert spatial_rule_score([("cat", 0.9, DOWN), ("cat", 0.8, B)], same) == 1.0
    assert spatial_rule_score([("cat", 0.9, DOWN)], same) == 0.0


# one record per task type of the T2I-CompBench / T2I-R1 data
RECORDS = [
    {
        "prompt": "a green bench and a red car",
        "task_type": "color",
        "nouns": ["bench", "car"],
        "attr_nouns": ["green bench", "red car"],
    },
    {
        "prompt": "a round clock and a square picture frame",
        "task_type": "shape",
        "nouns": ["clock", "picture frame"],
        "attr_nouns": ["round clock", "square picture frame"],
    },
    {
        "prompt": "a wooden chair and a glass vase",
        "task_type": "texture",
        "nouns": ["chair", "vase"],
        "attr_nouns": ["wooden chair", "glass vase"],
    },
    {
        "prompt": "a bird above a tree",
        "task_type": "spatial",
        "nouns": ["bird", "tree"],
        "spatial_info": {"obj1": "bird", "obj2": "tree", "locality": "above"},
    },
    {
        "prompt": "a vase on side of a clock",
        "task_type": "spatial",
        "nouns": ["vase", "clock"],
        "spatial_info": {"obj1": "vase", "obj2": "clock", "locality": "on side of"},
    },
    {
        "prompt": "two cats and three dogs",
        "task_type": "numeracy",
        "nouns": ["cat", "dog"],
        "numeracy_info": [{"obj_name": "cat", "num": 2}, {"obj_name": "dog", "num": 3}],
    },
    {
        "prompt": "a man is reading a newspaper while his dog sleeps",
        "task_type": "non",
        "nouns": ["man", "newspaper", "dog"],
    },
    {
        "prompt": "three yellow ducks swim below a stone bridge",
        "task_type": "complex",
        "nouns": ["duck", "bridge"],
        "numeracy_info": [{"obj_name": "duck", "num": 3}],
        "spatial_info": {"obj1": "duck", "obj2": "bridge", "locality": "below"},
    },
    {"prompt": "a photo of a giraffe", "task_type": "object", "nouns": ["giraffe"]},
]


def _perfect_scene(meta):
    """Detections that satisfy every rule of ``meta``: counted objects in a row at the bottom, the
    spatial pair placed by the relation, other nouns once each in a row at the top."""
    dets, counts = [], {i["obj_name"]: i["num"] for i in meta.get("numeracy_info", [])}
    sp = meta.get("spatial_info")
    if sp:
        a, b = {"x": (LEFT, B), "y": (UP, B), "near": ((0.6, 0.4, 0.8, 0.6), B)}[RELATIONS[sp["locality"]][0]]
        if RELATIONS[sp["locality"]][1] == 1:
            a = OPPOSITE[a]
        dets += [(sp["obj2"], 0.9, b)]
        for k in range(counts.pop(sp["obj1"], 1)):  # counted obj1: thin disjoint strips inside box a
            dets.append((sp["obj1"], 0.9, (a[0], a[1] + 0.03 * k, a[2], a[1] + 0.03 * k + 0.02)))
    col = 0
    for name, num in counts.items():
        for _ in range(num):
            dets.append((name, 0.9, (0.1 * col, 0.9, 0.1 * col + 0.05, 0.95)))
            col += 1
    have = {d[0] for d in dets}
    for i, noun in enumerate(meta["nouns"] + meta.get("attr_nouns", [])):
        if noun not in have:
            dets.append((noun, 0.9, (0.1 * i, 0.0, 0.1 * i + 0.05, 0.05)))
    return dets


@pytest.mark.parametrize("meta", RECORDS, ids=[r["task_type"] + str(i) for i, r in enumerate(RECORDS)])
def test_rule_score_per_task_type(meta):
    prompt = meta["prompt"]
    scene = _perfect_scene(meta)
    for attributes in (False, True):
        assert rule_score(scene, meta, prompt=prompt, attributes=attributes) == 1.0
        assert rule_score([], meta, prompt=prompt, attributes=attributes) == 0.0
    # drop one queried object entirely: the score must fall
    victim = meta["nouns"][0]
    assert rule_score([d for d in scene if d[0] != victim], meta, prompt=prompt) < 1.0
    queries = detection_queries(meta)
    assert len(queries) == len(set(queries)) and set(meta["nouns"]) <= set(queries)


def test_missing_metadata_is_a_clear_error():
    with pytest.raises(
        RewardError, match=r"reward 'det' needs metadata field 'spatial_info' for prompt 'a cat left'"
    ):
        rule_score([], {"task_type": "spatial", "nouns": ["cat"]}, reward="det", prompt="a cat left")
    with pytest.raises(RewardError, match="'numeracy_info'"):
        rule_score([], {"task_type": "numeracy", "nouns": ["cat"]}, prompt="two cats")
    with pytest.raises(RewardError, match="'nouns'"):
        rule_score([], {"task_type": "object"}, prompt="a cat")
    with pytest.raises(RewardError, match="'attr_nouns'"):
        rule_score([], {"task_type": "color", "nouns": ["cat"]}, prompt="a red cat", attributes=True)
    with pytest.raises(RewardError, match=r"prompt 'x'.*unknown spatial relation 'behind'"):
        rule_score(
            [],
            {"task_type": "spatial", "spatial_info": {"obj1": "a", "obj2": "b", "locality": "behind"}},
            prompt="x",
        )


def test_detector_reward_end_to_end():
    calls = []

    def detector(images, queries):
        calls.append((images.shape, queries))
        return [_perfect_scene(m) if i % 2 == 0 else [] for i, m in enumerate(RECORDS)]

    reward = DetectorReward(detector, name="gdino_rules")
    images = torch.zeros(len(RECORDS), 8, 8, 3, dtype=torch.uint8)
    out = reward(images, [r["prompt"] for r in RECORDS], RECORDS)
    assert out.tolist() == [1.0 if i % 2 == 0 else 0.0 for i in range(len(RECORDS))]
    assert calls[0][1] == [detection_queries(m) for m in RECORDS]
    with pytest.raises(RewardError, match="'gdino_rules' needs metadata field 'numeracy_info'.*'two cats'"):
        reward(images[:1], ["two cats"], [{"task_type": "numeracy", "nouns": ["cat"]}])
    with pytest.raises(RewardError, match=r"detector returned 9 results for 1 images"):
        reward(images[:1], ["a"], [RECORDS[0]])
