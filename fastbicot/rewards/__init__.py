"""Rewards: the Reward protocol and ensemble, rule-based detector rewards, a remote judge client.

Model-backed rewards (GroundingDINO, GIT VQA, HPS, ORM, Qwen2.5-VL judge, CLIP/PickScore) live in
``fastbicot.rewards.learned`` and load transformers only when first used; their names are also
reachable here (``fastbicot.rewards.<Name>``), imported lazily.
"""

import importlib

from .base import (
    FunctionReward,
    Reward,
    RewardEnsemble,
    RewardError,
    RewardOutput,
    check_images,
    group_normalize,
    require_field,
)
from .presets import t2i_r1_rewards
from .remote import RemoteJudgeReward
from .rules import (
    Detection,
    DetectorReward,
    counting_score,
    detection_queries,
    nms,
    presence_score,
    rule_plan,
    rule_score,
    spatial_rule_score,
    t2i_r1_score,
)
from .spatial import RELATIONS, spatial_score

__all__ = [
    "RELATIONS",
    "Detection",
    "DetectorReward",
    "FunctionReward",
    "RemoteJudgeReward",
    "Reward",
    "RewardEnsemble",
    "RewardError",
    "RewardOutput",
    "check_images",
    "counting_score",
    "detection_queries",
    "group_normalize",
    "nms",
    "presence_score",
    "require_field",
    "rule_plan",
    "rule_score",
    "spatial_rule_score",
    "spatial_score",
    "t2i_r1_rewards",
    "t2i_r1_score",
]


def __getattr__(name):
    if name.startswith("_"):
        raise AttributeError(name)
    try:
        learned = importlib.import_module(".learned", __name__)
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.learned":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    if not hasattr(learned, name):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(learned, name)
