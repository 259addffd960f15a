"""Teacher-forced per-token log-probs of both heads over training rows (trainer/batch.py).

One trunk forward per call over every row (CoT rows, image rows, unconditional rows), **packed**:
the rows are laid end to end as one sequence with no padding, and a prefix that several rows share
(the CoT prompt of a prompt group, the start of the image context, a system prompt) is stored and
computed once. Each decoder layer runs its position-wise parts (norms, projections, MLP) on exactly
the packed tokens; attention is the only step that needs the row structure, and the layout below
gives it: every packed token attends to its row's earlier tokens, shared ones included, and to
nothing else, so each row's hidden states equal those of a forward over that row alone.

The hidden states of the trained positions then go through ``fastbicot.kernels.token_logprobs``:
the text head for CoT tokens, the image head (its hidden part, then the fused last Linear) for
image tokens. No [N, V] logits tensor is ever built. With CFG log-probs the image head's
last-Linear input is combined, ``z_u + w (z_c - z_u)`` -- equal to CFG on the logits because that
layer is linear.

How the layout reaches attention: the decoder layers are transformers' own modules (so gradient
checkpointing, FSDP2's per-layer hooks and LoRA wrappers work unchanged); the language model's
attention implementation is switched once to ``fastbicot+<base>`` (registered below), which runs
the packed attention when a layout is passed and is exactly ``<base>`` (sdpa, eager, ...) otherwise.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from ..kernels import token_logprobs
from .batch import IMAGE, TEXT, _shared, row_key


@dataclass
class Forward:
    """Per-token results of one forward over some samples, in the batch's token order."""

    logprobs: torch.Tensor  # float32 [T] (differentiable when grad is enabled)
    entropy_text: torch.Tensor | None = None  # float32 [#text tokens], detached
    entropy_image: torch.Tensor | None = None


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
    """Indices grouped so that, padded to its longest member, a group wastes at most ``max_waste`` of
    its positions: sort by length, cut where the longest would exceed (1 + max_waste) x the shortest.
    (Here: the attention batches of the packed layout; ``inf`` gives one batch.)"""
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


# ---------------------------------------------------------------------------- packing with shared prefixes

@dataclass
class _Node:
    src: int  # a row holding the node's tokens
    start: int  # positions [start, end) of that row
    end: int
    parent: int  # node index, -1 for a root
    packed: int = 0  # first packed index


class PackedRows:
    """Rows as one sequence. The rows form a prefix tree (a radix tree over their tokens, each row
    keeping at least its last token to itself); every tree node is one packed span, in depth-first
    order, so a shared prefix appears once (``batch.packed_size`` tokens in all). ``index[r][p]`` is
    the packed position of row r's position p; ``positions`` are the rows' own positions (RoPE sees
    what a per-row forward sees)."""

    def __init__(self, rows, max_waste: float = 0.25):
        keys = [row_key(r) for r in rows]
        order = sorted(range(len(rows)), key=keys.__getitem__)
        # adjacent common prefixes in sorted order, capped so that each row keeps >= 1 own token
        lcp = [_shared(keys[a], keys[b]) for a, b in itertools.pairwise(order)]
        nodes: list = []
        leaf = [0] * len(rows)

        def build(lo, hi, depth, parent):  # rows order[lo..hi] share their first ``depth`` tokens
            while True:
                if lo == hi:
                    r = order[lo]
                    nodes.append(_Node(r, depth, len(keys[r]), parent))
                    leaf[r] = len(nodes) - 1
                    return
                common = min(lcp[lo:hi])
                if common > depth:
                    nodes.append(_Node(order[lo], depth, common, parent))
                    parent, depth = len(nodes) - 1, common
                cuts = [k for k in range(lo, hi) if lcp[k] == depth]  # branch points (>= 1 exists)
                starts = [lo] + [k + 1 for k in cuts]
                ends = cuts + [hi]
                for s, e in zip(starts[:-1], ends[:-1]):
                    build(s, e, depth, parent)
                lo, hi = starts[-1], ends[-1]  # the last run in the loop: no deep recursion on long chains

        if rows:
            build(0, len(rows) - 1, 0, -1)
        ids, image, pos, at = [], [], [], 0
        for n in nodes:
            n.packed = at
            r = rows[n.src]
            ids += r.ids[n.start:n.end]
            image += [p >= r.n_text for p in range(n.start, n.end)]
            pos += range(n.start, n.end)
            at += n.end - n.start
        self.num_tokens = at
        self.ids = torch.tensor(ids, dtype=torch.long)
        self.is_image = torch.tensor(image, dtype=torch.bool)
        self.positions = torch.tensor(pos, dtype=torch.long)
        self.index = []  # per row: packed index of each of its positions
        for r in range(len(rows)):
            spans, n = [], leaf[r]
            while n >= 0:
                spans.append(nodes[n])
                n = nodes[n].parent
            self.index.append([i for s in reversed(spans) for i in range(s.packed, s.packed + s.end - s.start)])
        self.nodes = nodes
        self.layout = AttentionLayout(nodes, self.index, max_waste)

    def to(self, device) -> PackedRows:
        self.ids, self.is_image, self.positions = (t.to(device) for t in (self.ids, self.is_image, self.positions))
        self.layout.to(device)
        return self


class AttentionLayout:
    """The attention of packed rows as a few dense SDPA calls. Every tree node is a *segment*: its
    tokens (queries) attend to all A tokens of its ancestors and causally to its own. Segments with
    the same A are batched by their own length (``length_buckets``), their own tokens right-padded:
    keys [A ancestors | S own], and a causal mask aligned to the lower right (query i sees keys
    0 .. A + i) is exactly "every ancestor, own tokens up to i" -- no mask tensor (``causal_lower_right``;
    ``is_causal`` for roots), a padded query's output is dropped and no real query sees a pad."""

    def __init__(self, nodes, index, max_waste):
        by_depth = {}
        for i, n in enumerate(nodes):
            by_depth.setdefault(n.start, []).append(i)  # n.start == the number of ancestor tokens
        own_len = [n.end - n.start for n in nodes]
        self.batches = []
        # every batch's query rows and key/value rows, concatenated: gathered by one index_select per
        # tensor (its backward is one zero-fill and one index_add over the packed tokens, not one per
        # batch); the batches' outputs, concatenated, go back to packed order by one index_select
        q_all, kv_all, keep, valid_dest = [], [], [], []
        for A, members in sorted(by_depth.items()):
            for sub in length_buckets([own_len[i] for i in members], max_waste):
                bucket = [members[k] for k in sub]
                S = max(own_len[i] for i in bucket)
                for i in bucket:
                    n = nodes[i]
                    own = list(range(n.packed, n.packed + own_len[i]))
                    q = own + [own[0]] * (S - len(own))
                    keep += range(len(q_all), len(q_all) + len(own))
                    valid_dest += own
                    q_all += q
                    # the ancestors' packed positions: the first A of any row through this node
                    kv_all += index[n.src][:A] + q if A else q
                self.batches.append({"rows": len(bucket), "S": S, "keys": A + S,
                                     "causal": (S, A) if A else None})  # lower-right causal over [A | S]
        self.q_all = torch.tensor(q_all, dtype=torch.long)
        self.kv_all = torch.tensor(kv_all, dtype=torch.long)
        dest = torch.tensor(valid_dest, dtype=torch.long)
        self.out_index = torch.empty_like(dest)
        self.out_index[dest] = torch.tensor(keep, dtype=torch.long)
        self.q_sizes = [b["rows"] * b["S"] for b in self.batches]  # the split of the gathered rows
        self.kv_sizes = [b["rows"] * b["keys"] for b in self.batches]

    def to(self, device):
        self.q_all, self.kv_all, self.out_index = (t.to(device) for t in (self.q_all, self.kv_all, self.out_index))
        return self

    @staticmethod
    def _mask(b, q):
        """CUDA: a CausalBias (flash / efficient kernels align the causal mask to the lower right without
        a mask tensor). CPU: that mask as one additive [S, A + S] tensor in q's dtype, built once and
        shared by every row of the batch and every layer (SDPA would otherwise build and convert it in
        each call)."""
        S, A = b["causal"]
        if q.device.type != "cpu":
            return causal_lower_right(S, A + S)
        key = ("additive", q.dtype)
        if key not in b:
            allowed = torch.ones(S, A + S, dtype=torch.bool, device=q.device).tril(diagonal=A)
            b[key] = torch.zeros(S, A + S, dtype=q.dtype, device=q.device).masked_fill_(~allowed, float("-inf"))
        return b[key]

    def attend(self, query, key, value, scale, dropout=0.0):
        """query [1, h, T, d], key/value [1, h_kv, T, d] -> [1, T, h, d] (transformers' layout)."""
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, heads, d]
        heads, d = q.shape[1], q.shape[2]
        gqa = k.shape[1] != heads
        qs = q.index_select(0, self.q_all).split(self.q_sizes)
        ks = k.index_select(0, self.kv_all).split(self.kv_sizes)
        vs = v.index_select(0, self.kv_all).split(self.kv_sizes)
        out = []
        for b, qb, kb, vb in zip(self.batches, qs, ks, vs):
            n = b["rows"]
            qb = qb.view(n, b["S"], heads, d).transpose(1, 2)  # [n, h, S, d]
            kb, vb = (t.view(n, b["keys"], *t.shape[1:]).transpose(1, 2) for t in (kb, vb))
            mask = None if b["causal"] is None else self._mask(b, qb)
            o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, is_causal=mask is None, scale=scale,
                                               dropout_p=dropout, enable_gqa=gqa)
            out.append(o.transpose(1, 2).reshape(-1, heads, d))
        return torch.cat(out).index_select(0, self.out_index)[None], None


# ---------------------------------------------------------------------------- the attention switch

_PREFIX = "fastbicot+"


def _packed_attention_for(base: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import eager_attention_forward

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, fastbicot_layout=None,
                  **kwargs):
        if fastbicot_layout is None:  # any other caller: exactly the base implementation
            fn = ALL_ATTENTION_FUNCTIONS.get_interface(base, eager_attention_forward)
            return fn(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        return fastbicot_layout.attend(query, key, value, scaling, dropout)

    return attention


def use_packed_attention(language_model) -> None:
    """Switch ``language_model``'s attention implementation to ``fastbicot+<base>`` (idempotent):
    the packed attention when a layout is passed, ``<base>`` itself (and its mask) otherwise."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    config = language_model.config
    current = config._attn_implementation or "sdpa"
    if current.startswith(_PREFIX):
        return
    name = _PREFIX + current
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _packed_attention_for(current))
        if current in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[current])
    config._attn_implementation = name


def packed_hidden(policy, emb: torch.Tensor, packed: PackedRows) -> torch.Tensor:
    """The trunk over packed rows: emb [T, H] -> final hidden states [T, H]. The body of
    transformers' LlamaModel.forward with the packed layout passed to every layer's attention."""
    lm = policy.language_model
    use_packed_attention(lm)
    x, pos = emb[None], packed.positions[None]
    pe = lm.rotary_emb(x, position_ids=pos)
    for layer in lm.layers[: lm.config.num_hidden_layers]:
        x = layer(x, attention_mask=None, position_ids=pos, position_embeddings=pe, use_cache=False,
                  fastbicot_layout=packed.layout)
    return lm.norm(x)[0]


def embed_packed(policy, packed: PackedRows) -> torch.Tensor:
    """Text and image embeddings of the packed tokens -> [T, H]."""
    ids, is_image = packed.ids, packed.is_image
    emb = policy.embed_text(torch.where(is_image, policy.pad_token_id, ids))
    if bool(is_image.any()):
        emb = emb.clone()
        emb[is_image] = policy.embed_image(ids[is_image]).to(emb.dtype)
    return emb


# ---------------------------------------------------------------------------- log-probs of samples

class ForwardPlan:
    """What a forward over some rows needs besides the weights: the packed layout and, per (channel,
    head), the packed positions whose hidden states predict the targets, the targets and their
    destinations in the output. The same for the policy's and the reference's forward over one
    micro-batch, so built once (``sample_logprobs(reuse=)``)."""

    def __init__(self, rows, dests, channels, max_waste, device):
        self.packed = PackedRows(rows, max_waste).to(device)
        sel = {}
        for r, (row, d, ch) in enumerate(zip(rows, dests, channels)):
            idx = self.packed.index[r]
            for (pos, tok, head), where in zip(row.targets, d):
                t = sel.setdefault((ch, head), ([], [], []))
                t[0].append(idx[pos])
                t[1].append(tok)
                t[2].append(where)
        self.sel = {k: tuple(torch.tensor(x, device=device) for x in v) for k, v in sel.items()}


def _forward_heads(policy, src, plan: ForwardPlan):
    """One packed trunk forward -> per (channel, head): the hidden states of the targets (the image
    head's hidden part for image targets), the targets, their destinations."""
    emb = embed_packed(src, plan.packed)
    hidden = packed_hidden(policy, emb.detach() if src is not policy else emb, plan.packed)
    out = {}
    for (ch, head), (at, tgt, dst) in plan.sel.items():
        h = hidden.index_select(0, at)
        out[ch, head] = (policy.image_head_hidden(h) if head == IMAGE else h, tgt, dst)
    return out


def _rows_of(samples, cfg: bool) -> tuple:
    """The rows of ``samples`` (+ their unconditional rows for CFG log-probs) -> (rows, each row's
    target destinations in the output, channel: 0 conditional, 1 unconditional)."""
    rows, dests, channels, offset = [], [], [], 0
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
            channels.append(0)
        if cfg and s.uncond is not None:
            rows.append(s.uncond)
            dests.append([offset + s.num_text + j for j in range(s.num_image)])
            channels.append(1)
        offset += s.num_tokens
    return rows, dests, channels


def sample_logprobs(policy, samples, *, loss, guidance_scale: float = 1.0, embeds_from=None,
                    entropy: bool = False, max_waste: float = 0.25, reuse: dict | None = None) -> Forward:
    """Per-token log-probs of ``samples`` (TrainSamples) under ``policy``, in batch.py's token order
    (sample by sample: its text targets, then its image targets).

    ``embeds_from``: a policy whose text embeddings feed the trunk instead of ``policy``'s own (the
    seed feeds its reference model the policy's embeddings). Runs under the caller's grad mode.
    One trunk forward over all rows (the unconditional rows of CFG log-probs included).
    ``max_waste``: the padding bound of the attention batches (``length_buckets``).
    ``reuse``: a dict that lives as long as ``samples`` (MicroBatch.reuse): the ForwardPlan is kept
    there and reused by the next forward over the same samples.
    """
    cfg = loss.cfg_logprobs != "none"
    src = embeds_from if embeds_from is not None else policy
    key = ("plan", max_waste, cfg, str(policy.device))
    plan = None if reuse is None else reuse.get(key)
    if plan is None:
        plan = ForwardPlan(*_rows_of(samples, cfg), max_waste, policy.device)
        if reuse is not None:
            reuse[key] = plan
    res = _forward_heads(policy, src, plan)
    h_t, t_t, d_t = res.get((0, TEXT), (None, None, None))
    z_i, t_i, d_i = res.get((0, IMAGE), (None, None, None))
    if cfg and z_i is not None:  # combine the image head's inputs: CFG on its last (linear) layer
        u = res[1, IMAGE]
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
