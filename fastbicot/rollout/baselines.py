"""The baselines of bench/rollout_throughput.py: the T2I-R1 seed system's image loop and
transformers' own Janus generate.

t2i_r1_generate_images: eager HF LlamaModel forward with a DynamicCache, CFG by doubling every
row (conditional and unconditional rows interleaved), softmax + multinomial, as the seed's image
loop (``src/t2i-r1/src/open_r1/trainer/grpo_trainer.py:574-630`` of CaraJ7/T2I-R1):

* rows of different lengths are right-padded to the longest, with BOI after the padding; the
  conditional row's padding is masked out of attention (``grpo_trainer.py:563-576``);
* the unconditional row is BOS, then pad at every position up to the BOI (its own padding included),
  then BOI, and attends to all of it: its attention mask is all ones (``grpo_trainer.py:594-601``);
* positions are the HF default ``0 .. L-1`` for every row (no position ids are passed), so a padded
  conditional row's BOI sits after a gap, as in the seed.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def t2i_r1_generate_images(policy, input_ids, *, guidance_scale=5.0, temperature=1.0, generator=None):
    """-> LongTensor [B, num_image_tokens]. temperature=0 takes the argmax (for exactness tests)."""
    from transformers import DynamicCache

    from .engine import as_token_lists

    seqs = as_token_lists(input_ids)
    dev, pad = policy.device, policy.pad_token_id
    B, L = len(seqs), max(len(s) for s in seqs)
    tokens = torch.full((2 * B, L), pad, dtype=torch.long, device=dev)
    mask = torch.zeros((2 * B, L), dtype=torch.long, device=dev)
    for i, s in enumerate(seqs):
        cond, uncond = 2 * i, 2 * i + 1
        tokens[cond, : len(s) - 1] = torch.tensor(s[:-1], device=dev)
        tokens[cond, L - 1] = s[-1]
        mask[cond, : len(s) - 1] = 1
        mask[cond, L - 1] = 1
        # unconditional row: BOS, pad up to the BOI (the row's own padding included), BOI; no mask
        tokens[uncond, 0], tokens[uncond, L - 1] = s[0], s[-1]
        mask[uncond] = 1
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
