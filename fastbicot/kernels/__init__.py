"""fastbicot.kernels: Triton kernels with pure-torch references (DESIGN.md §4).

Each module in this package is self-contained (imports only torch and triton). Its public entry
point dispatches: Triton for CUDA tensors, a fast torch path for CPU tensors, and the Triton kernel
on CPU tensors when FASTBICOT_FORCE_TRITON=1 (run with TRITON_INTERPRET=1). Next to it sit the
float64 ``*_reference`` implementations the tests compare against, and decode_attention also exposes
its two halves (``prefix_attention``, ``suffix_attention``), their ``merge_attention`` and
``group_layout``.
"""

from .cfg_sample import cfg_probs_reference, cfg_sample, cfg_sample_reference
from .decode_attention import (
    group_layout,
    grouped_decode_attention,
    grouped_decode_attention_reference,
    merge_attention,
    prefix_attention,
    suffix_attention,
)
from .grpo_loss import grpo_loss, grpo_loss_reference
from .token_logprobs import token_logprobs, token_logprobs_reference

__all__ = [
    "cfg_probs_reference",
    "cfg_sample",
    "cfg_sample_reference",
    "group_layout",
    "grouped_decode_attention",
    "grouped_decode_attention_reference",
    "grpo_loss",
    "grpo_loss_reference",
    "merge_attention",
    "prefix_attention",
    "suffix_attention",
    "token_logprobs",
    "token_logprobs_reference",
]
