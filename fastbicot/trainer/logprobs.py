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


def length_buckets(lengths, max_waste: float = 0.25) -> list:
    """Row indices grouped so that, padded to its longest row, a group wastes at most ``max_waste`` of
    its positions: sort by length, cut where the longest would exceed (1 + max_waste) x the shortest.
    Fewer, fuller forwards than one per row kind when kinds have similar lengths (small models are
    bound by the number of ops), no 3x padding of short CoT rows behind 576 image tokens otherwise."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out, cur = [], []
    for i in order:
        if cur and lengths[i] > (1 + max_waste) * lengths[cur[0]]:
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out


def _targets(rows, dests, head):
    """(row, position, target, destination) index lists of ``head``'s targets in ``rows``."""
    r_i, p_i, tgt, dst = [], [], [], []
    for i, (r, d) in enumerate(zip(rows, dests)):
        for (pos, tok, h), where in zip(r.targets, d):
            if h == head:
                r_i.append(i)
                p_i.append(pos)
                tgt.append(tok)
                dst.append(where)
    return r_i, p_i, tgt, dst


def _forward_heads(policy, src, rows, dests, max_waste=0.25):
    """Trunk over ``rows`` (bucketed by length) -> text hidden, image-head hidden, their targets and
    destinations, each concatenated over the buckets."""
    out = {TEXT: ([], [], []), IMAGE: ([], [], [])}
    dev = policy.device
    for bucket in length_buckets([len(r.ids) for r in rows], max_waste):
        brows = [rows[i] for i in bucket]
        emb, mask, pos = embed_rows(src, brows)
        hidden = trunk_hidden(policy, emb.detach() if src is not policy else emb, mask, pos)
        for head in (TEXT, IMAGE):
            r_i, p_i, tgt, dst = _targets(brows, [dests[i] for i in bucket], head)
            if not r_i:
                continue
            h = hidden[torch.tensor(r_i, device=dev), torch.tensor(p_i, device=dev)]
            hs, ts, ds = out[head]
            hs.append(policy.image_head_hidden(h) if head == IMAGE else h)
            ts.append(torch.tensor(tgt, device=dev))
            ds.append(torch.tensor(dst, device=dev))
    return {k: tuple(torch.cat(x) if x else None for x in v) for k, v in out.items()}


def sample_logprobs(policy, samples, *, loss, guidance_scale: float = 1.0, embeds_from=None,
                    entropy: bool = False, max_waste: float = 0.25) -> Forward:
    """Per-token log-probs of ``samples`` (TrainSamples) under ``policy``, in batch.py's token order
    (sample by sample: its text targets, then its image targets).

    ``embeds_from``: a policy whose text embeddings feed the trunk instead of ``policy``'s own (the
    seed feeds its reference model the policy's embeddings). Runs under the caller's grad mode.
    ``max_waste``: length_buckets' padding bound (inf: one forward per row set, as FSDP needs every
    rank to run each layer the same number of times).
    """
    rows, dests, udests, offset = [], [], [], 0
    for s in samples:
        text_at, image_at = offset, offset + s.num_text  # a sample's text targets come first
        for r in s.rows:
            d = []
            for _, _, h in r.targets:
                if h == TEXT:
                    d.append(text_at)
                    text_at += 1
                else:
                    d.append(image_at)
                    image_at += 1
            rows.append(r)
            dests.append(d)
        if s.uncond is not None:
            udests.append([offset + s.num_text + j for j in range(s.num_image)])
        offset += s.num_tokens
    src = embeds_from if embeds_from is not None else policy
    res = _forward_heads(policy, src, rows, dests, max_waste)
    h_t, t_t, d_t = res[TEXT]
    z_i, t_i, d_i = res[IMAGE]
    if loss.cfg_logprobs != "none":  # combine the image head's inputs: CFG on its last (linear) layer
        u = _forward_heads(policy, src, [s.uncond for s in samples], udests, max_waste)[IMAGE]
        z_u = torch.empty_like(z_i)
        z_u[_position_of(d_i, u[2])] = u[0]
        if not loss.cfg_uncond_grad:
            z_u = z_u.detach()
        z_i = z_u + float(guidance_scale) * (z_i - z_u)
    temperature = float(guidance_scale) if loss.cfg_logprobs == "cfg_scaled" else 1.0
    head_t, head_i = policy.lm_head, policy.image_head_linear
    parts, where = [], []
    if h_t is not None:
        parts.append(token_logprobs(h_t, head_t.weight, t_t, bias=head_t.bias))
        where.append(d_t)
    if z_i is not None:
        parts.append(token_logprobs(z_i, head_i.weight, t_i, bias=head_i.bias, temperature=temperature))
        where.append(d_i)
    lp, dst = torch.cat(parts), torch.cat(where)
    out = Forward(torch.empty_like(lp).index_put((dst,), lp))
    if entropy:  # "grad": differentiable (the entropy bonus, trainer/entropy.py); else detached
        from .entropy import head_entropy_grad

        ent, keep = (head_entropy_grad, lambda x: x) if entropy == "grad" else (head_entropy, torch.Tensor.detach)
        if h_t is not None:
            out.entropy_text = ent(keep(h_t), head_t.weight, head_t.bias)
        if z_i is not None:
            out.entropy_image = ent(keep(z_i) / temperature, head_i.weight,
                                    None if head_i.bias is None else head_i.bias / temperature)
    return out


def _position_of(order: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """For each of ``keys`` its position in ``order`` (both hold the same distinct destinations)."""
    inv = torch.empty(int(order.max()) + 1, dtype=torch.long, device=order.device)
    inv[order] = torch.arange(order.numel(), device=order.device)
    return inv[keys]
