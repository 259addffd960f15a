"""Policy adapters. JanusPolicy wraps transformers' JanusForConditionalGeneration."""

from .janus import PRESETS, JanusPolicy, preset_config
from .tokenizer import build_byte_tokenizer

__all__ = ["PRESETS", "JanusPolicy", "build_byte_tokenizer", "preset_config"]
