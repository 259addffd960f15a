"""The seed system's image loop (T2I-R1), kept as the baseline of bench/rollout_throughput.py.

Eager HF LlamaModel forward with a DynamicCache, CFG by doubling every row (conditional and
unconditional rows interleaved, the unconditional one with every token between the first and the
last replaced by pad), softmax + multinomial. Rows of different lengths are right-padded before
their BOI (with an attention mask), as the seed's batched prompt processing does.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def seed_generate_images(policy, input_ids, *, guidance_scale=5.0, temperature=1.0, generator=None):
    """-> LongTensor [B, num_image_tokens]. temperature=0 takes the argmax (for exactness tests)."""
    from transformers import DynamicCache

    from .generate import as_token_lists

    seqs = as_token_lists(input_ids)
    dev, pad = policy.device, policy.pad_token_id
    B, L = len(seqs), max(len(s) for s in seqs)
    tokens = torch.full((2 * B, L), pad, dtype=torch.long, device=dev)
    mask = torch.zeros((2 * B, L), dtype=torch.long, device=dev)
    for i, s in enumerate(seqs):
        body = torch.tensor(s[:-1], device=dev)
        for r in (2 * i, 2 * i + 1):
            tokens[r, : len(s) - 1] = body
            tokens[r, L - 1] = s[-1]
            mask[r, : len(s) - 1] = 1
            mask[r, L - 1] = 1
        tokens[2 * i + 1, 1 : len(s) - 1] = pad  # unconditional row
    lm = policy.language_model
    embeds = lm.embed_tokens(tokens)
    cache = DynamicCache()
    out = torch.zeros((B, policy.num_image_tokens), dtype=torch.long, device=dev)
    for i in range(policy.num_image_tokens):
        o = lm(inputs_embeds=embeds, attention_mask=mask, past_key_values=cache, use_cache=True)
        cache = o.past_key_values
        logits = policy.image_logits(o.last_hidden_state[:, -1, :])
        cond, uncond = logits[0::2], logits[1::2]
        logits = uncond + guidance_scale * (cond - uncond)
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, num_samples=1, generator=generator)[:, 0]
        out[:, i] = nxt
        embeds = policy.embed_image(torch.stack([nxt, nxt], dim=1).view(-1))[:, None]
        mask = torch.cat([mask, mask.new_ones(2 * B, 1)], dim=1)
    return out


@torch.no_grad()
def hf_generate_images(policy, ids, attention_mask=None, **kwargs):
    """transformers' own ``JanusForConditionalGeneration.generate(generation_mode="image")``.

    transformers 5.17's Janus generate calls ``_prepare_static_cache`` without its
    ``prefill_chunk_size`` argument and raises TypeError; there we hand it a DynamicCache, which
    skips that call (same tokens, HF's own loop).
    """
    model = policy.hf_model
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask
    try:
        return model.generate(ids, attention_mask=mask, generation_mode="image", **kwargs)
    except TypeError as e:
        if "prefill_chunk_size" not in str(e):
            raise
    from transformers import DynamicCache

    return model.generate(ids, attention_mask=mask, generation_mode="image", past_key_values=DynamicCache(), **kwargs)
