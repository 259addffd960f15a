"""BiCoT-GRPO training (DESIGN.md §2, §3, §8): TrainerConfig, Trainer, and the pieces it joins.

Dependencies point one way: the trainer imports rollout, rewards, kernels, models and data;
nothing imports the trainer.
"""

from .advantage import group_advantages
from .batch import TrainBatch, aggregation_weights, pack
from .config import (
    AdvantageConfig,
    CheckpointConfig,
    ConfigError,
    DataConfig,
    LogConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    RewardsConfig,
    RewardSpec,
    RolloutConfig,
    SamplingParams,
    SFTConfig,
    TrainerConfig,
)
from .sft import SFTTrainer, load_sft_examples, warm_start
from .trainer import Trainer, TrainingError, build_policy, save_policy

__all__ = [
    "AdvantageConfig",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "LogConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "RewardSpec",
    "RewardsConfig",
    "RolloutConfig",
    "SFTConfig",
    "SFTTrainer",
    "SamplingParams",
    "TrainBatch",
    "Trainer",
    "TrainerConfig",
    "TrainingError",
    "aggregation_weights",
    "build_policy",
    "group_advantages",
    "load_sft_examples",
    "pack",
    "save_policy",
    "warm_start",
]
