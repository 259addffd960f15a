"""Rollout engine (DESIGN.md §2, §3, §5): static KV cache with shared prefixes, semantic CoT,
CFG image decoding (CUDA graph on GPU); the baselines it is measured against in baselines.py."""

from .config import RolloutConfig, SamplingParams
from .engine import RolloutBatch, RolloutEngine, RolloutSample, decode_images, generate_images
from .kv_cache import KVCache
from .templates import cot_prompt, image_prompt

__all__ = [
    "KVCache",
    "RolloutBatch",
    "RolloutConfig",
    "RolloutEngine",
    "RolloutSample",
    "SamplingParams",
    "cot_prompt",
    "decode_images",
    "generate_images",
    "image_prompt",
]
