"""A VQ decoder whose codes are flat colour patches, set by construction.

The toy images go through the same ``fastbicot.vq_decode`` path (transformers' JanusVQVAE decoder
architecture) as Janus-Pro's, but with weights chosen so that code k decodes to a flat patch of
``PALETTE[k]``, whatever its neighbours are:

* every residual block's ``conv2`` and every attention block's ``proj_out`` are zero, so those
  blocks are exactly the identity (their norms and inner convs still run, and still cost time,
  like the real decoder's);
* ``conv_in``, the up-sampling convs and ``conv_out`` use only their centre tap, so no pixel sees
  its neighbours, and nearest-neighbour up-sampling turns one token into a flat square patch;
* the only norm that reaches the output, ``norm_out`` (GroupNorm, statistics over the whole
  image), sees for each of its 32 groups a channel pair (+s, -s) with s = +1 for the group of the
  pixel's code and -1 otherwise: every group's mean is exactly 0 and its variance exactly 1 at every
  pixel of every image, so the normalisation is the same fixed map for all images;
* ``conv_out`` reads silu(+-1) of each group and maps group k to colour k. Because
  silu(1) - silu(-1) = 1 exactly, pixel = bias + sum_g w_g silu(-1) + w_code = PALETTE[code].
"""

from __future__ import annotations

import torch

from .vocab import BACKGROUND, COLORS

# code -> uint8 RGB: code 0 the background, codes 1.. the object colours in COLORS order.
PALETTE = (BACKGROUND,) + tuple(COLORS.values())
CODE_NAMES = ("background",) + tuple(COLORS)
CODE_OF = {name: k for k, name in enumerate(CODE_NAMES)}
NUM_CODES = len(PALETTE)

NUM_GROUPS = 32  # transformers' JanusVQVAE GroupNorms always use 32 groups


def check_vq_shapes(vq_config) -> None:
    """The construction needs 2 channels per norm group and room for one group per code."""
    mult = list(vq_config.channel_multiplier)
    if any(m != mult[0] for m in mult):
        raise ValueError(f"toy codebook needs a constant channel_multiplier, got {mult}")
    channels = vq_config.base_channels * mult[0]
    if channels != 2 * NUM_GROUPS:
        raise ValueError(f"toy codebook needs {2 * NUM_GROUPS} decoder channels, got {channels}")
    if vq_config.num_embeddings != NUM_CODES or vq_config.embed_dim < NUM_CODES:
        raise ValueError(
            f"toy codebook needs num_embeddings == {NUM_CODES} and embed_dim >= {NUM_CODES}, got "
            f"{vq_config.num_embeddings} and {vq_config.embed_dim}"
        )
    if vq_config.latent_channels < NUM_CODES:
        raise ValueError(f"toy codebook needs latent_channels >= {NUM_CODES}, got {vq_config.latent_channels}")


def _centre_tap(conv, matrix, bias) -> None:
    """A 3x3 (or 1x1) conv that applies ``matrix`` [out, in] per pixel, neighbours ignored."""
    w = torch.zeros_like(conv.weight)
    k = conv.weight.shape[-1] // 2
    w[:, :, k, k] = matrix.to(w.dtype)
    conv.weight.copy_(w)
    conv.bias.copy_(bias.to(conv.bias.dtype))


def _identity_blocks(decoder) -> None:
    blocks = [decoder.mid.block_1, decoder.mid.block_2]
    attns = [decoder.mid.attn_1]
    for up in decoder.up:
        blocks += list(up.block)
        attns += list(up.attn)
        if hasattr(up, "upsample"):
            c = up.upsample.conv.weight.shape[0]
            _centre_tap(up.upsample.conv, torch.eye(c), torch.zeros(c))
    for b in blocks:
        if b.in_channels != b.out_channels:  # excluded by check_vq_shapes; keep the guard explicit
            raise ValueError("toy codebook needs residual blocks without a channel change")
        b.conv2.weight.zero_()
        b.conv2.bias.zero_()
    for a in attns:
        a.proj_out.weight.zero_()
        a.proj_out.bias.zero_()


@torch.no_grad()
def set_toy_codebook(vqmodel) -> None:
    """Overwrite ``vqmodel``'s codebook and decoder so code k decodes to a flat ``PALETTE[k]`` patch."""
    check_vq_shapes(vqmodel.config)
    k_codes = NUM_CODES
    emb = vqmodel.quantize.embedding.weight
    # code k -> unit vector e_k (the l2-normalisation of the lookup keeps it unchanged)
    emb.copy_(torch.eye(k_codes, emb.shape[1], dtype=emb.dtype))
    # post_quant_conv (1x1): e_k -> one-hot k in the first latent channels
    latent = vqmodel.post_quant_conv.weight.shape[0]
    _centre_tap(vqmodel.post_quant_conv, torch.eye(latent, emb.shape[1]), torch.zeros(latent))
    dec = vqmodel.decoder
    c = dec.conv_in.weight.shape[0]
    # conv_in: one-hot k -> channel pair of group g = (s_g, -s_g), s_g = +1 if g == k else -1
    m = torch.zeros(c, latent)
    bias = torch.zeros(c)
    for g in range(NUM_GROUPS):
        bias[2 * g], bias[2 * g + 1] = -1.0, 1.0
        if g < k_codes:
            m[2 * g, g], m[2 * g + 1, g] = 2.0, -2.0
    _centre_tap(dec.conv_in, m, bias)
    _identity_blocks(dec)
    dec.norm_out.weight.fill_(1.0)
    dec.norm_out.bias.zero_()
    # conv_out: silu(norm_out) of channel 2g is silu(+1) for the code's group and silu(-1) elsewhere
    target = torch.tensor(PALETTE, dtype=torch.float64) / 127.5 - 1.0  # [K, 3] in [-1, 1]
    w = torch.zeros(3, c, dtype=torch.float64)
    w[:, 0 : 2 * k_codes : 2] = target.T
    silu_m1 = float(torch.nn.functional.silu(torch.tensor(-1.0, dtype=torch.float64)))
    _centre_tap(dec.conv_out, w, -silu_m1 * target.sum(0))
