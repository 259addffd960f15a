"""VQ decoding: image tokens -> pixels, equal to transformers' ``JanusVQVAE.decode`` (DESIGN.md §6).

``vq_decode`` re-runs the HF decoder's forward with the HF module's own convolution weights, but
channels-last (cuDNN/oneDNN's fast layout) and with three fused ops from ``fastbicot._C``:

* codebook lookup + l2-normalisation + ``post_quant_conv`` as one gather from a [K, C] table that is
  built once per model and rebuilt when the weights change (keyed on data_ptr and ``_version``);
* GroupNorm + SiLU in one op (fp32 statistics) for every norm->swish pair (and plain GroupNorm in
  the attention blocks, which have no swish);
* clamp/scale/round to the uint8 NHWC image that reward models take.

Each op also has a pure-torch version below: it is the fallback when the extension is missing (or
lacks CUDA kernels) and the reference the tests compare against. On CPU the GroupNorm(+SiLU) and
uint8 ops run on torch's kernels even with the extension loaded (``_ExtCpuOps``): ATen picks AVX2 /
AVX-512 code at run time, the extension is built for baseline x86-64, and torch's ops measured 3-5x
faster (numbers at ``_ExtCpuOps``).
"""

import warnings
import weakref

import torch
import torch.nn.functional as F

from fastbicot import _ext

__all__ = ["vq_decode"]

if _ext._C is None and not _ext._error.startswith("disabled"):
    warnings.warn(
        f"fastbicot._C is not available ({_ext._error}); fastbicot.vq_decode uses the slower pure-torch "
        "path. Rebuild with a C++ compiler: pip install -e . (see docs/vq_decode.md).",
        RuntimeWarning,
        stacklevel=2,
    )


# ---- pure-torch ops: fallback path and test reference ------------------------------------------


def build_table_torch(embedding, conv_weight, conv_bias):
    """[K, C] = post_quant_conv(normalize(embedding)), in fp32, cast to the conv's dtype."""
    normed = F.normalize(embedding.float(), p=2, dim=-1)
    bias = None if conv_bias is None else conv_bias.float()
    return F.linear(normed, conv_weight.flatten(1).float(), bias).to(conv_weight.dtype)


def embed_torch(table, tokens):
    """tokens [B, h, w] -> [B, C, h, w] channels-last rows of the table."""
    return table[tokens].permute(0, 3, 1, 2)


# Size rule (CPU): below 1024 pixels per image ATen's channels-last GroupNorm switches to a kernel
# that walks each group with stride C (GroupNormKernel.cpp, feature_map_threshold), slow when a group
# holds few channels; there the norm runs on an NCHW copy and the result is copied back. Measured
# (1 thread, fp32, GroupNorm(32) + SiLU, both copies included), channels-last vs via NCHW: batch 16,
# 64 channels (2 per group) at 8x8 0.72 vs 0.40 ms, at 16x16 3.26 vs 1.59 ms; 4 per group even
# (16x16: 3.73 vs 3.65 ms); 8-16 per group the copies lose 2x (Janus VQ-16's 24x24 x 512 level,
# batch 1: 0.52 vs 1.29 ms); from 32x32 on channels-last is as fast as NCHW (32 channels, batch 16:
# 0.89 vs 0.80 ms before copies). On the tiny preset's decoder (batch 16) this rule takes the decode
# from 85 to 76 ms.
_GN_NCHW_BELOW_PIXELS = 1024
_GN_NCHW_MAX_GROUP_CHANNELS = 2


def _group_norm_via_nchw(x, groups):
    return (
        x.is_cpu
        and x.shape[2] * x.shape[3] < _GN_NCHW_BELOW_PIXELS
        and x.shape[1] // groups <= _GN_NCHW_MAX_GROUP_CHANNELS
    )


def group_norm_silu_torch(x, weight, bias, groups, eps, silu):
    src = x.float()
    if _group_norm_via_nchw(x, groups):
        src = src.contiguous()
    y = F.group_norm(src, groups, weight.float(), bias.float(), eps)
    if silu:
        y = F.silu(y, inplace=True)  # y is group_norm's own new tensor: one pass instead of two
    return y.to(x.dtype).contiguous(memory_format=torch.channels_last)


def to_uint8_image_torch(x):
    """[B, C, H, W] in [-1, 1] -> uint8 [B, H, W, C], computed in fp32, rounded half to even."""
    return ((x.float() + 1) / 2 * 255).clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


class _TorchOps:
    name = "torch"
    build_table = staticmethod(build_table_torch)
    embed = staticmethod(embed_torch)
    group_norm_silu = staticmethod(group_norm_silu_torch)
    to_uint8_image = staticmethod(to_uint8_image_torch)


class _ExtOps:
    name = "ext"

    @staticmethod
    def build_table(embedding, conv_weight, conv_bias):
        return _ext._C.vq_build_table(embedding, conv_weight, conv_bias)

    @staticmethod
    def embed(table, tokens):
        return _ext._C.vq_embed(table, tokens)

    @staticmethod
    def group_norm_silu(x, weight, bias, groups, eps, silu):
        return _ext._C.group_norm_silu(x, weight, bias, groups, eps, silu)

    @staticmethod
    def to_uint8_image(x):
        return _ext._C.to_uint8_image(x)


class _ExtCpuOps(_ExtOps):
    """The extension's table and gather with torch's GroupNorm(+SiLU) and uint8 conversion: on CPU
    the extension's versions of those two lose to ATen's vectorised kernels at every size measured
    (1 thread, fp32): GroupNorm(32) + SiLU over channels-last, extension vs torch, batch 16 x 64
    channels at 8x8 0.79 vs 0.43 ms (torch via NCHW, copies included), batch 16 x 32 at 32x32 4.4
    vs 1.2 ms, batch 1 x 128 at 384x384 205 vs 39 ms; uint8 image, batch 16 at 32x32 0.32 vs 0.11
    ms, batch 1 at 384x384 2.9 vs 0.73 ms. Whole decodes, real config, batch 1, 1 thread (2 shared
    cores, noisy): bench/vq_decode.py 12.9 s with the extension's GroupNorm, 10.3 s with torch's
    (HF 12.7 s); alternating in one process, CPU time 9.8 vs 8.6 s (HF 9.3 s)."""

    group_norm_silu = staticmethod(group_norm_silu_torch)
    to_uint8_image = staticmethod(to_uint8_image_torch)


_warned_no_cuda_kernels = False


def _select_ops(device, use_extension):
    global _warned_no_cuda_kernels
    if use_extension is False:
        return _TorchOps
    if _ext.available(device):
        return _ExtCpuOps if device.type == "cpu" else _ExtOps
    if use_extension:
        raise RuntimeError(
            f"vq_decode(use_extension=True): fastbicot._C cannot run on {device}: {_ext.status()}"
        )
    if _ext._C is not None and device.type == "cuda" and not _warned_no_cuda_kernels:
        _warned_no_cuda_kernels = True
        warnings.warn("fastbicot._C was built without CUDA kernels; vq_decode on CUDA uses the torch path.")
    return _TorchOps


# ---- the decoder ------------------------------------------------------------------------------

# vqmodel -> (weights key, table). Weak keys: a cached table never keeps a model alive.
_TABLES = weakref.WeakKeyDictionary()


def _codebook_table(vqmodel, ops):
    emb = vqmodel.quantize.embedding.weight
    conv = vqmodel.post_quant_conv
    # data_ptr catches replaced storage, _version catches in-place updates (optimizer, load_state_dict).
    key = (ops.name,) + tuple(
        (t.data_ptr(), t._version, t.dtype, t.device) for t in (emb, conv.weight, conv.bias) if t is not None
    )
    cached = _TABLES.get(vqmodel)
    if cached is None or cached[0] != key:
        cached = (key, ops.build_table(emb.detach(), conv.weight.detach(), conv.bias))
        _TABLES[vqmodel] = cached
    return cached[1]


def _norm(ops, x, norm, silu):
    return ops.group_norm_silu(x, norm.weight, norm.bias, norm.num_groups, norm.eps, silu)


def _resblock(ops, block, x):
    # JanusVQVAEResnetBlock: norm1 -> swish -> conv1 -> norm2 -> swish -> dropout -> conv2 (+ shortcut)
    h = block.conv1(_norm(ops, x, block.norm1, silu=True))
    h = block.conv2(block.dropout(_norm(ops, h, block.norm2, silu=True)))
    if block.in_channels != block.out_channels:
        x = block.conv_shortcut(x) if block.use_conv_shortcut else block.nin_shortcut(x)
    return x + h


def _attnblock(ops, block, x):
    # JanusVQVAEAttnBlock: single-head attention over the H*W positions (GroupNorm without swish).
    h = _norm(ops, x, block.norm, silu=False)
    b, c, hh, ww = x.shape

    def seq(t):  # channels-last [B, C, H, W] is already [B, H*W, C] in memory
        return t.permute(0, 2, 3, 1).reshape(b, 1, hh * ww, c)

    out = F.scaled_dot_product_attention(seq(block.q(h)), seq(block.k(h)), seq(block.v(h)))
    return x + block.proj_out(out.reshape(b, hh, ww, c).permute(0, 3, 1, 2))


def _decode(vqmodel, tokens, ops):
    dec = vqmodel.decoder
    x = dec.conv_in(ops.embed(_codebook_table(vqmodel, ops), tokens))
    x = _resblock(ops, dec.mid.block_1, x)
    x = _attnblock(ops, dec.mid.attn_1, x)
    x = _resblock(ops, dec.mid.block_2, x)
    for i_level in range(dec.num_resolutions):
        up = dec.up[i_level]
        for i_block in range(dec.num_res_blocks + 1):
            x = _resblock(ops, up.block[i_block], x)
            if len(up.attn) > 0:
                x = _attnblock(ops, up.attn[i_block], x)
        if i_level != dec.num_resolutions - 1:
            x = up.upsample.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    return dec.conv_out(_norm(ops, x, dec.norm_out, silu=True))


def _check_tokens(vqmodel, image_tokens, device):
    if not isinstance(image_tokens, torch.Tensor):
        raise TypeError(f"image_tokens must be a torch.Tensor, got {type(image_tokens).__name__}")
    if image_tokens.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"image_tokens must be int64 or int32, got {image_tokens.dtype}")
    image_tokens = image_tokens.to(device)
    h, w = vqmodel.quantize.quant_state_dims
    if image_tokens.dim() == 2:
        if image_tokens.shape[1] != h * w:
            raise ValueError(
                f"image_tokens must be [batch, {h * w}] (a {h}x{w} latent grid) or [batch, h, w], "
                f"got shape {tuple(image_tokens.shape)}"
            )
        image_tokens = image_tokens.view(-1, h, w)
    elif image_tokens.dim() != 3:
        raise ValueError(
            f"image_tokens must be [batch, h*w] or [batch, h, w], got shape {tuple(image_tokens.shape)}"
        )
    if image_tokens.numel() == 0:
        raise ValueError(f"image_tokens is empty: shape {tuple(image_tokens.shape)}")
    k = vqmodel.quantize.num_embeddings
    lo, hi = torch.aminmax(image_tokens)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= k:
        raise ValueError(f"image token ids must lie in [0, {k}) (the codebook size); got min {lo}, max {hi}")
    return image_tokens


@torch.no_grad()
def vq_decode(vqmodel, image_tokens, output="float", *, use_extension=None):
    """Decode VQ image tokens with a transformers ``JanusVQVAE``.

    image_tokens: int64/int32 [B, h*w] (h = w = the model's latent grid, as HF's ``decode`` takes) or
    [B, h, w] for any grid. output="float" returns [B, 3, H, W] equal to ``vqmodel.decode`` (up to
    float rounding); output="uint8" returns the uint8 [B, H, W, 3] image
    ``round(clamp((x + 1) / 2 * 255, 0, 255))``. Runs in the model's dtype and on its device (tokens
    are moved there); no gradients. use_extension: None picks ``fastbicot._C`` when it can run on
    the device, False forces the pure-torch path, True requires the extension.
    """
    if not all(hasattr(vqmodel, name) for name in ("quantize", "post_quant_conv", "decoder")):
        raise TypeError(f"vqmodel must be a transformers JanusVQVAE, got {type(vqmodel).__name__}")
    if output not in ("float", "uint8"):
        raise ValueError(f"output must be 'float' or 'uint8', got {output!r}")
    device = vqmodel.post_quant_conv.weight.device
    tokens = _check_tokens(vqmodel, image_tokens, device)
    ops = _select_ops(device, use_extension)
    pixels = _decode(vqmodel, tokens, ops)
    if output == "uint8":
        return ops.to_uint8_image(pixels)
    return pixels.contiguous()
