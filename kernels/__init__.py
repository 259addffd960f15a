"""fastbicot.kernels: Triton kernels with pure-torch references (DESIGN.md §4).

Each module in this package is self-contained (imports only torch and triton) and exposes one
public function that dispatches: Triton for CUDA tensors, a fast torch path for CPU tensors, and
the Triton kernel on CPU tensors when FASTBICOT_FORCE_TRITON=1 (run with TRITON_INTERPRET=1).
"""

from .grpo_loss import grpo_loss, grpo_loss_reference
from .token_logprobs import token_logprobs, token_logprobs_reference
from .cfg_sample import cfg_probs_reference, cfg_sample, cfg_sample_reference
from .decode_attention import (
    group_layout,
    grouped_decode_attention,
    grouped_decode_attention_reference,
    merge_attention,
    prefix_attention,
    suffix_attention,
)
