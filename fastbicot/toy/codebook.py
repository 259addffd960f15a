"""A VQ decoder whose codes are flat colour patches, set by construction.

The toy images go through the same ``fastbicot.vq_decode`` path (transformers' JanusVQVAE decoder
architecture) as Janus-Pro's, but with weights chosen so that code k decodes to a flat patch of its
colour ``PALETTE[CODE_CLASS[k]]``, whatever its neighbours are (below, k is the colour class):

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

GRID = 8  # image tokens per side

# Colour classes: 0 the background, 1.. the object colours in COLORS order.
PALETTE = (BACKGROUND,) + tuple(COLORS.values())  # class -> uint8 RGB
CLASS_NAMES = ("background",) + tuple(COLORS)

# Image codes: one code per object colour, then one background code per token position. All 64
# background codes decode to the same black patch; they differ only in which position a correct image
# uses them at (``render_tokens``). This faint "positional texture" lets a 2-layer policy tell where it
# is in the image from its previous token instead of counting tokens since <begin_of_image> (which a
# model this small learns slowly): it is what makes the world learnable in minutes. A policy that
# puts a background code at the "wrong" position still paints black there.
COLOR_CODES = {name: i for i, name in enumerate(COLORS)}  # "red" -> 0, ...
BACKGROUND_CODE0 = len(COLORS)  # background code of token position p is BACKGROUND_CODE0 + p
NUM_CODES = len(COLORS) + GRID * GRID
CODE_CLASS = tuple(range(1, len(COLORS) + 1)) + (0,) * (GRID * GRID)  # code -> colour class


def background_code(position: int) -> int:
    """The background code a correct image uses at token ``position`` (0..63, row-major)."""
    if not 0 <= position < GRID * GRID:
        raise ValueError(f"token position must be in [0, {GRID * GRID}), got {position}")
    return BACKGROUND_CODE0 + position


NUM_GROUPS = 32  # transformers' JanusVQVAE GroupNorms always use 32 groups


def check_vq_shapes(vq_config) -> None:
    """The construction needs 2 channels per norm group and room for one group per code."""
    mult = list(vq_config.channel_multiplier)
    if any(m != mult[0] for m in mult):
        raise ValueError(f"toy codebook needs a constant channel_multiplier, got {mult}")
    channels = vq_config.base_channels * mult[0]
    if channels != 2 * NUM_GROUPS:
        raise ValueError(f"toy codebook needs {2 * NUM_GROUPS} decoder channels, got {channels}")
    if vq_config.num_embeddings != NUM_CODES or vq_config.embed_dim < len(PALETTE):
        raise ValueError(
            f"toy codebook needs num_embeddings == {NUM_CODES} and embed_dim >= {len(PALETTE)}, got "
            f"{vq_config.num_embeddings} and {vq_config.embed_dim}"
        )
    if vq_config.latent_channels < len(PALETTE):
        raise ValueError(f"toy codebook needs latent_channels >= {len(PALETTE)}, got {vq_config.latent_channels}")


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
    """Overwrite ``vqmodel``'s codebook and decoder: code k decodes to a flat ``PALETTE[CODE_CLASS[k]]`` patch."""
    check_vq_shapes(vqmodel.config)
    k_codes = len(PALETTE)  # below, "code" means colour class: codes of one class share their vector
    emb = vqmodel.quantize.embedding.weight
    # code -> unit vector e_class (the l2-normalisation of the lookup keeps it unchanged)
    emb.copy_(torch.eye(len(PALETTE), emb.shape[1], dtype=emb.dtype)[list(CODE_CLASS)])
    # post_quant_conv (1x1): e_class -> one-hot class in the first latent channels
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


def generation_embedding_table(dim: int) -> torch.Tensor:
    """[NUM_CODES, dim] input embeddings of the image codes for the policy (``generation_embeddings``).

    A pretrained Janus embeds image tokens informatively; the toy builds that by construction: the
    first ``len(PALETTE)`` dims are 2 x one-hot(colour class), the next 8 encode a background code's
    position as (sin, cos) of its row and column at two frequencies (zero for colour codes), so the
    policy reads "background at row r, column c" off its previous token without learning a 64-entry
    lookup first. Remaining dims are zero.
    """
    import math

    need = len(PALETTE) + 8
    if dim < need:
        raise ValueError(f"the toy generation embedding needs >= {need} dims, got {dim}")
    table = torch.zeros(NUM_CODES, dim)
    for code, cls in enumerate(CODE_CLASS):
        table[code, cls] = 2.0
        if code >= BACKGROUND_CODE0:
            r, c = divmod(code - BACKGROUND_CODE0, GRID)
            a, b = 2 * math.pi * r / GRID, 2 * math.pi * c / GRID
            table[code, len(PALETTE) :] = torch.tensor(
                [math.sin(a), math.cos(a), math.sin(2 * a), math.cos(2 * a),
                 math.sin(b), math.cos(b), math.sin(2 * b), math.cos(2 * b)])
    return table
