"""Teacher-forced per-token log-probs of both heads over training rows (trainer/batch.py).

One trunk forward per kind of row (CoT rows, image rows, unconditional rows; each kind padded to
its own longest row, so short CoT rows do not pay for 576 image positions), then the hidden states
of the trained positions go through ``fastbicot.kernels.token_logprobs``: the text head for CoT
tokens, the image head (its hidden part, then the fused last Linear) for image tokens. No [N, V]
logits tensor is ever built. With CFG log-probs the image head's last-Linear input is combined,
``z_u + w (z_c - z_u)`` -- equal to CFG on the logits because that layer is linear.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import token_logprobs
from .batch import IMAGE, TEXT


@dataclass
class Forward:
    """Per-token results of one forward over some samples, in the batch's token order."""

    logprobs: torch.Tensor  # float32 [T] (differentiable when grad is enabled)
    entropy_text: torch.Tensor | None = None  # float32 [#text tokens], detached
    entropy_image: torch.Tensor | None = None


def embed_rows(policy, rows):
    """-> (inputs_embeds [B, L, H], attention_mask [B, L], position_ids [B, L]) of right-padded rows."""
    dev = policy.device
    L = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), L), policy.pad_token_id, dtype=torch.long)
    is_image = torch.zeros(len(rows), L, dtype=torch.bool)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r.ids)] = torch.tensor(r.ids, dtype=torch.long)
        is_image[i, r.n_text : len(r.ids)] = True
        mask[i, : len(r.ids)] = 1
    ids, is_image, mask = ids.to(dev), is_image.to(dev), mask.to(dev)
    emb = policy.embed_text(torch.where(is_image, policy.pad_token_id, ids))
    if bool(is_image.any()):
        emb = emb.clone()
        emb[is_image] = policy.embed_image(ids[is_image]).to(emb.dtype)
    positions = torch.arange(L, device=dev).expand(len(rows), L)
    return emb, mask, positions


def trunk_hidden(policy, emb, mask, positions):
    """Rows are right-padded, so under causal attention a real token never sees a pad (pads come
    after it): no padding mask is needed, and without one SDPA takes its fused causal kernel (no
    [B, heads, L, L] mask or score tensor). The pads' own outputs are never read."""
    del mask
    return policy.trunk(emb, position_ids=positions)[0]


def _gather(hidden, rows, head):
    """Hidden states [n, H] at the targets of ``rows`` for ``head``, and their targets [n]."""
    r_idx, p_idx, tgt = [], [], []
    for i, r in enumerate(rows):
        for pos, tok, h in r.targets:
            if h == head:
                r_idx.append(i)
                p_idx.append(pos)
                tgt.append(tok)
    dev = hidden.device
    return hidden[torch.tensor(r_idx, device=dev), torch.tensor(p_idx, device=dev)], torch.tensor(tgt, device=dev)


@torch.no_grad()
def head_entropy(h: torch.Tensor, weight: torch.Tensor, bias=None, chunk_elems: int = 1 << 24) -> torch.Tensor:
    """Entropy of softmax(h @ W.T + b) per row (float32 [n]), in row chunks of <= chunk_elems logits."""
    out = []
    rows = max(1, chunk_elems // weight.shape[0])
    for i in range(0, h.shape[0], rows):
        z = torch.nn.functional.linear(h[i:i + rows].float(), weight.float(), None if bias is None else bias.float())
        logp = torch.log_softmax(z, -1)
        out.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(out) if out else h.new_zeros(0, dtype=torch.float32)


def sample_logprobs(policy, samples, *, loss, guidance_scale: float = 1.0, embeds_from=None,
                    entropy: bool = False) -> Forward:
    """Per-token log-probs of ``samples`` (TrainSamples) under ``policy``.

    ``embeds_from``: a policy whose text embeddings feed the trunk instead of ``policy``'s own (the
    seed feeds its reference model the policy's embeddings). Runs under the caller's grad mode.
    """
    rows, owner = [], []  # every row, and (sample position, kind)
    for k, s in enumerate(samples):
        for r in s.rows:
            rows.append(r)
            owner.append(k)
    by_kind: dict = {}
    for r, k in zip(rows, owner):
        by_kind.setdefault(r.kind, []).append((k, r))
    # each sample's tokens: text targets then image targets (batch.py's order)
    image_z = [None] * len(samples)
    text_h = [None] * len(samples)
    text_tgt = [None] * len(samples)
    image_tgt = [None] * len(samples)
    src = embeds_from if embeds_from is not None else policy
    for items in by_kind.values():
        krows = [r for _, r in items]
        emb, mask, pos = embed_rows(src, krows)
        hidden = trunk_hidden(policy, emb.detach() if src is not policy else emb, mask, pos)
        for (k, r), i in zip(items, range(len(krows))):
            h_row = hidden[i : i + 1]
            for head in (TEXT, IMAGE):
                if not any(t[2] == head for t in r.targets):
                    continue
                h, tgt = _gather(h_row, [r], head)
                if head == TEXT:
                    text_h[k], text_tgt[k] = h, tgt
                else:
                    image_z[k], image_tgt[k] = policy.image_head_hidden(h), tgt
    if loss.cfg_logprobs != "none":
        urows = [s.uncond for s in samples]
        emb, mask, pos = embed_rows(src, urows)
        hidden = trunk_hidden(policy, emb.detach() if src is not policy else emb, mask, pos)
        w = float(guidance_scale)
        for k, r in enumerate(urows):
            h, _ = _gather(hidden[k : k + 1], [r], IMAGE)
            z_u = policy.image_head_hidden(h)
            if not loss.cfg_uncond_grad:
                z_u = z_u.detach()
            image_z[k] = z_u + w * (image_z[k] - z_u)
    temperature = float(guidance_scale) if loss.cfg_logprobs == "cfg_scaled" else 1.0
    head_t, head_i = policy.lm_head, policy.image_head_linear
    ht = [h for h in text_h if h is not None]
    zi = [z for z in image_z if z is not None]
    lp_t = token_logprobs(torch.cat(ht), head_t.weight, torch.cat([t for t in text_tgt if t is not None]),
                          bias=head_t.bias) if ht else None
    lp_i = token_logprobs(torch.cat(zi), head_i.weight, torch.cat([t for t in image_tgt if t is not None]),
                          bias=head_i.bias, temperature=temperature) if zi else None
    # back to the sample-major order: [s0 text, s0 image, s1 text, ...]
    parts, ti, ii = [], 0, 0
    for k in range(len(samples)):
        if text_h[k] is not None:
            n = text_h[k].shape[0]
            parts.append(lp_t[ti : ti + n])
            ti += n
        if image_z[k] is not None:
            n = image_z[k].shape[0]
            parts.append(lp_i[ii : ii + n])
            ii += n
    out = Forward(torch.cat(parts))
    if entropy:
        if ht:
            out.entropy_text = head_entropy(torch.cat(ht).detach(), head_t.weight, head_t.bias)
        if zi:
            out.entropy_image = head_entropy(torch.cat(zi).detach() / temperature, head_i.weight,
                                             None if head_i.bias is None else head_i.bias / temperature)
    return out
