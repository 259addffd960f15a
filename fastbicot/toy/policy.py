"""build_policy: a tiny Janus-architecture policy for the toy world (random trunk, built codebook).

The model is a real transformers ``JanusForConditionalGeneration`` at toy scale, wrapped as
``fastbicot.models.JanusPolicy`` exactly as ``JanusPolicy.from_preset`` does, so every fastbicot
component (rollout engine, VQ decoding, trainer) runs on it unchanged. What differs from a random
preset: the word-level tokenizer of ``vocab.py``, the VQ decoder set by construction
(``codebook.py``), a fan-in-scaled generation head and aligner, and an informative image-token
embedding (``codebook.generation_embedding_table``; see ``_unit_scale_generation_modules``).
"""

from __future__ import annotations

import math

import torch

from .codebook import GRID, NUM_CODES, PALETTE, generation_embedding_table, set_toy_codebook
from .vocab import SPECIAL_IDS, build_tokenizer

# Each token decodes to a PIXELS_PER_TOKEN x PIXELS_PER_TOKEN patch (the VQ decoder up-samples by 2 per
# level). 2 -> 16 x 16 pixel images: the decoder's convolutions at 64 channels dominate the cost of a toy
# rollout, and 4x more pixels (32 x 32) would cost ~4x more decode time for no extra information.
PIXELS_PER_TOKEN = 2
IMAGE_SIZE = GRID * PIXELS_PER_TOKEN

# Trunk shapes: a rollout of 4 prompts x 8 images costs ~0.3 s of one CPU core (docs/toy.md); a 2-layer
# trunk learns the warm start in a few hundred steps thanks to the informative image-token embedding.
HIDDEN = 64
LAYERS = 2
HEADS = 2
INTERMEDIATE = 128
MAX_POSITIONS = 512
# VQ embed_dim: also the width of the policy's image-token input embedding (generation_embeddings):
# 8 colour classes + 8 position features (codebook.generation_embedding_table).
EMBED_DIM = 16


def toy_config(pixels_per_token: int = PIXELS_PER_TOKEN, attn_implementation: str = "sdpa", extra_words=()):
    """The transformers JanusConfig of the toy policy (text vocabulary = the toy tokenizer's)."""
    from transformers import JanusConfig

    levels = _levels(pixels_per_token)
    vocab_size = len(build_tokenizer(extra_words))
    ids = SPECIAL_IDS
    text = {
        "model_type": "llama", "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS, "intermediate_size": INTERMEDIATE, "vocab_size": vocab_size,
        "max_position_embeddings": MAX_POSITIONS, "rms_norm_eps": 1e-6, "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"], "pad_token_id": ids["pad"], "tie_word_embeddings": False,
    }
    # The (unused for generation) vision encoder's patch grid fixes num_image_tokens = GRID**2.
    vision = {
        "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": GRID * 16, "patch_size": 16,
        "num_image_tokens": GRID * GRID, "projection_dim": HIDDEN,
    }
    # 64 decoder channels = 32 GroupNorm groups x 2 channels (the codebook construction needs the pairs);
    # num_res_blocks=0 (one residual block per level) keeps the decoder cheap.
    vq = {
        "embed_dim": EMBED_DIM, "num_embeddings": NUM_CODES, "latent_channels": len(PALETTE), "base_channels": 64,
        "channel_multiplier": [1] * (levels + 1), "num_res_blocks": 0, "num_patches": GRID,
        "projection_dim": HIDDEN, "image_token_embed_dim": HIDDEN,
    }
    config = JanusConfig(text_config=text, vision_config=vision, vq_config=vq, image_token_id=ids["image"],
                         tie_word_embeddings=False)
    config._attn_implementation = attn_implementation
    config.text_config._attn_implementation = attn_implementation
    return config


def _levels(pixels_per_token) -> int:
    if isinstance(pixels_per_token, bool) or pixels_per_token not in (1, 2, 4, 8):
        raise ValueError(f"pixels_per_token must be 1, 2, 4 or 8, got {pixels_per_token!r}")
    return int(pixels_per_token).bit_length() - 1


@torch.no_grad()
def _unit_scale_generation_modules(model) -> None:
    # transformers initialises every Linear/Embedding with std 0.02: fine under a pretrained trunk,
    # but T2I-R1 freezes the generation embedding, aligner and head, and at std 0.02 a frozen random
    # head maps the trunk's unit-RMS hidden states to logits of ~0.01, which the trunk could only
    # overcome by growing huge activations. Fan-in scaling gives O(1) logits and O(1) embeddings,
    # so the toy trains with the default trainable set (and with everything trainable). The image-token
    # embedding is built informative (colour + position of background codes), as a pretrained one is.
    m = model.model
    for lin in [m.generation_head.proj_out, m.generation_head.vision_head, m.generation_aligner.fc1,
                *m.generation_aligner.hidden_layers]:
        lin.weight.normal_(0.0, 1.0 / math.sqrt(lin.weight.shape[1]))
        lin.bias.zero_()
    m.generation_embeddings.weight.copy_(generation_embedding_table(m.generation_embeddings.weight.shape[1]))


def build_policy(seed: int = 0, dtype=torch.float32, device="cpu", *,
                 pixels_per_token: int = PIXELS_PER_TOKEN, attn_implementation: str = "sdpa", extra_words=()):
    """The toy ``JanusPolicy``: tiny random trunk, word-level tokenizer, colour-patch codebook.

    Deterministic in ``seed``; ``dtype``/``device`` as ``JanusPolicy.from_preset``. Images are
    ``8 * pixels_per_token`` pixels square (1, 2, 4 or 8 pixels per token; default 2: 16 x 16).
    ``extra_words``: more words for the tokenizer (and text vocabulary), e.g. ``toy.got.GOT_WORDS``.
    """
    from transformers import JanusForConditionalGeneration

    from fastbicot.models import JanusPolicy
    from fastbicot.models.janus import _set_generation_ids

    config = toy_config(pixels_per_token, attn_implementation, extra_words)
    gen = torch.Generator().manual_seed(seed)
    old_dtype = torch.get_default_dtype()
    rng_state = torch.get_rng_state()
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    try:
        model = JanusForConditionalGeneration(config)  # fp32 on the CPU: a few MB
        _unit_scale_generation_modules(model)
        set_toy_codebook(model.model.vqmodel)
    finally:
        torch.set_rng_state(rng_state)  # building a policy does not disturb the caller's random stream
        torch.set_default_dtype(old_dtype)
    model.to(device=torch.device(device), dtype=dtype)
    model.eval()
    _set_generation_ids(model, SPECIAL_IDS)
    return JanusPolicy(model, build_tokenizer(extra_words))
