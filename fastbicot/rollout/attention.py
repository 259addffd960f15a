"""Attention for the rollout: varlen prefill (SDPA / flash-attn) and grouped decode attention.

Decode attention is the kernel module's public functions on every device
(``fastbicot.kernels.decode_attention``): Triton on CUDA, the module's torch path on CPU, so the
rollout has one torch decode attention. The CPU image loop and the CPU CoT on flattened rows
bypass it: their whole step is rollout.cpu_decode's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastbicot.kernels.decode_attention import grouped_decode_attention, suffix_attention

try:  # flash-attn for prefill when installed (CUDA, fp16/bf16 only)
    from flash_attn import flash_attn_func as _flash_attn_func
except ImportError:  # pragma: no cover
    _flash_attn_func = None


def uses_decode_kernel(device: torch.device) -> bool:
    """True where the grouped kernel (Triton) reads each shared prefix once: CUDA."""
    return device.type == "cuda"


def attention_backend(device: torch.device, flatten: bool = False) -> str:
    """Name of the decode-attention implementation used on ``device`` (reported by the bench)."""
    kind = "triton" if uses_decode_kernel(device) else "torch"
    return f"{kind}-suffix" if flatten else f"{kind}-grouped"


class DecodeAttention:
    """One decode step's attention for rows [0, n) of ``cache``. ``flat=True``: the rows' prefixes
    were copied into their suffixes (KVCache.flatten), so only suffixes are read."""

    def __init__(self, cache, n: int, *, flat: bool = False):
        self.cache, self.n, self.flat = cache, n, flat

    def __call__(self, q: torch.Tensor, layer: int, scale: float) -> torch.Tensor:
        c, n = self.cache, self.n
        if self.flat:
            out, _ = suffix_attention(q, c.suffix_k[layer, :n], c.suffix_v[layer, :n], c.suffix_len[:n], scale=scale)
            return out.to(q.dtype)
        return grouped_decode_attention(q, c.prefix_k[layer], c.prefix_v[layer], c.prefix_len, c.group_ids[:n],
                                        c.suffix_k[layer, :n], c.suffix_v[layer, :n], c.suffix_len[:n], scale=scale)


def prefill_attention(q, k, v, *, scale, attn_mask=None):
    """Causal attention over right-padded rows [B,H,L,D] (real tokens never see the padding).

    With ``attn_mask`` (bool [B,1,Lq,Lk]) the caller handles causality and prefixes.
    """
    if attn_mask is None and _flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        out = _flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale,
                               causal=True)
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None, scale=scale)
