"""Attention for the rollout: varlen prefill (SDPA / flash-attn) and grouped decode attention.

Decode attention uses ``fastbicot.kernels.decode_attention.grouped_decode_attention`` on CUDA when
that module exists (Triton); otherwise DecodeAttention's torch path below, which computes the same
thing: one softmax over [the row's group prefix | the row's own suffix].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # the Triton kernel (another module of this project); optional at import time
    from fastbicot.kernels.decode_attention import grouped_decode_attention as _kernel_decode_attention
except ImportError:  # pragma: no cover - depends on what is installed
    _kernel_decode_attention = None

try:  # flash-attn for prefill when installed (CUDA, fp16/bf16 only)
    from flash_attn import flash_attn_func as _flash_attn_func
except ImportError:  # pragma: no cover
    _flash_attn_func = None


def uses_decode_kernel(device: torch.device) -> bool:
    return _kernel_decode_attention is not None and device.type == "cuda"


def attention_backend(device: torch.device, flatten: bool = False) -> str:
    """Name of the decode-attention implementation used on ``device`` (reported by the bench)."""
    if uses_decode_kernel(device):
        return "triton-grouped"
    return "torch-matmul-flat" if flatten else "torch-grouped"


class DecodeAttention:
    """One decode step's attention, with the per-step masks built once and shared by all layers.

    ``static=True`` keeps full-capacity shapes (needed inside a CUDA graph); otherwise the torch
    path slices the cache to the longest valid prefix/suffix of this step. ``flat=True``: the rows'
    prefixes were copied into their suffixes (KVCache.flatten), so only suffixes are read.
    """

    def __init__(self, cache, n: int, *, static: bool = False, flat: bool = False):
        self.cache, self.n = cache, n
        dev = cache.suffix_k.device
        self.use_kernel = uses_decode_kernel(dev)
        gid = cache.group_ids[:n]
        self.gid, self.plen, self.slen = gid, cache.prefix_len, cache.suffix_len[:n]
        if self.use_kernel:
            return
        lp, ls = cache.prefix_k.shape[3], cache.suffix_k.shape[3]
        if not static:  # shrink to what this step can see (host sync is fine off-graph)
            lp = max(int(cache.prefix_len.max()), 1)
            ls = int(self.slen.max())
        self.ls = ls
        g = self.gid_long = gid.long()
        # no prefix visible (a flattened cache, see KVCache.flatten): attend to the suffix alone
        self.lp = 0 if flat else lp
        if flat and not static and int(self.slen.min()) == ls:
            self.bias = None  # every row sees all ls tokens: no mask (SDPA's fastest path)
            return
        valid = torch.cat(
            [
                torch.arange(self.lp, device=dev)[None] < cache.prefix_len[g][:, None],
                torch.arange(ls, device=dev)[None] < self.slen[:, None],
            ],
            dim=1,
        )
        # additive mask in the compute dtype: 0 where visible, -inf elsewhere; [n, 1, 1, Lp+Ls]
        self.bias = torch.zeros(valid.shape, dtype=cache.suffix_k.dtype, device=dev)
        self.bias.masked_fill_(~valid, float("-inf"))
        self.bias = self.bias[:, None, None, :]

    def __call__(self, q: torch.Tensor, layer: int, scale: float) -> torch.Tensor:
        c, n = self.cache, self.n
        if self.use_kernel:
            return _kernel_decode_attention(
                q,
                c.prefix_k[layer],
                c.prefix_v[layer],
                self.plen,
                self.gid,
                c.suffix_k[layer, :n],
                c.suffix_v[layer, :n],
                self.slen,
                scale=scale,
            )
        if self.lp == 0:
            kv = c.suffix_kv[layer, :, :n, :, : self.ls]
            return F.scaled_dot_product_attention(
                q[:, :, None], kv[0], kv[1], attn_mask=self.bias, scale=scale
            )[:, :, 0]
        # [2, n, H, Lp + Ls, D]: K and V of each row's group prefix followed by its own suffix
        kv = torch.cat(
            [
                c.prefix_kv[layer, :, :, :, : self.lp].index_select(1, self.gid_long),
                c.suffix_kv[layer, :, :n, :, : self.ls],
            ],
            dim=3,
        )
        out = F.scaled_dot_product_attention(q[:, :, None], kv[0], kv[1], attn_mask=self.bias, scale=scale)
        return out[:, :, 0]


def prefill_attention(q, k, v, *, scale, attn_mask=None):
    """Causal attention over right-padded rows [B,H,L,D] (real tokens never see the padding).

    With ``attn_mask`` (bool [B,1,Lq,Lk]) the caller handles causality and prefixes.
    """
    if (
        attn_mask is None
        and _flash_attn_func is not None
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
    ):
        out = _flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale, causal=True
        )
        return out.transpose(1, 2)
    if attn_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
