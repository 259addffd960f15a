"""Policy adapters. JanusPolicy wraps transformers' JanusForConditionalGeneration; Policy is the Protocol
the rollout and the trainer rely on."""

from .janus import PRESETS, DecoderLayer, JanusPolicy, preset_config
from .protocol import Policy
from .tokenizer import build_byte_tokenizer

__all__ = ["PRESETS", "DecoderLayer", "JanusPolicy", "Policy", "build_byte_tokenizer", "preset_config"]
