"""Model-backed rewards, each loaded from a local transformers checkpoint directory with
``from_pretrained(local_dir, device=..., dtype=...)`` (nothing is downloaded). See docs/rewards_models.md."""

from .clip_score import CLIPScoreReward, PickScoreReward
from .git_vqa import GitVQAReward
from .grounding_dino import GroundingDinoDetector, GroundingDinoReward
from .hps import HPSReward, convert_hps_checkpoint, open_clip_to_clip_model, open_clip_to_clip_state_dict
from .orm import ORMJudgeReward, ORMReward
from .vlm_judge import VLMJudgeReward

__all__ = [
    "CLIPScoreReward",
    "GitVQAReward",
    "GroundingDinoDetector",
    "GroundingDinoReward",
    "HPSReward",
    "ORMJudgeReward",
    "ORMReward",
    "PickScoreReward",
    "VLMJudgeReward",
    "convert_hps_checkpoint",
    "open_clip_to_clip_model",
    "open_clip_to_clip_state_dict",
]
