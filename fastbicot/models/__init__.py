"""Policy adapters. JanusPolicy wraps transformers' JanusForConditionalGeneration."""

from .janus import PRESETS, JanusPolicy, preset_config
from .tokenizer import build_byte_tokenizer

__all__ = ["JanusPolicy", "PRESETS", "preset_config", "build_byte_tokenizer"]
