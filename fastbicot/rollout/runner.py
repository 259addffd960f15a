"""ModelRunner: what the decode loops run on, for one policy (nano-vllm's ModelRunner).

It owns the policy's Trunk (RoPE tables, built once; its fused CPU weights rebuilt per rollout) and
the KV caches: their allocation, the rows' layout (kv_cache.layout_rows) and the prefill.

Rows of one decode step live in cache slots [0, rows): conditional rows first, then (with CFG) the
unconditional row of slot i at slot n + i. Every row's first decode input is the last token of
its context (BOI): prefill covers ``context[:-1]``, split into a shared prefix per group (the
longest common prefix of the group's rows) and the row's own remainder.
"""

from __future__ import annotations

import torch

from .attention import attention_backend, uses_decode_kernel
from .kv_cache import KVCache, common_prefix_len, layout_rows
from .trunk import Trunk


def default_flatten(policy, flatten=None) -> bool:
    """Flatten prefixes into rows (KVCache.flatten) unless the grouped decode kernel is in use."""
    return (not uses_decode_kernel(policy.device)) if flatten is None else bool(flatten)


def new_cache(policy, num_prefixes, prefix_capacity, num_rows, suffix_capacity) -> KVCache:
    return KVCache(policy.num_layers, policy.num_kv_heads, policy.head_dim, num_prefixes=num_prefixes,
                   prefix_capacity=prefix_capacity, num_rows=num_rows, suffix_capacity=suffix_capacity,
                   dtype=policy.dtype, device=policy.device)


def rows_cache(policy, seqs, groups, decode_tokens, *, flat) -> tuple:
    """(KVCache, groups) for the rows ``seqs`` that then decode ``decode_tokens`` tokens each: prefill
    it with ``prefill_rows(trunk, cache, seqs, range(len(seqs)), groups)``. The blocks hold the rows'
    shared prefixes; a row's suffix holds 1 + decode_tokens slots (the context's last token, then what
    is drawn) after its remainder (grouped layout, ``layout_rows(split=True)``) or after its whole
    context (``flat``: KVCache.flatten copies the prefix in front)."""
    lay = layout_rows(seqs, groups, split=not flat)
    need = lay.max_context if flat else lay.max_remainder
    cache = new_cache(policy, lay.num_prefixes, lay.prefix_capacity, len(seqs), need + 1 + decode_tokens)
    return cache, lay.groups


PREFILL_TOKENS = 8192  # padded tokens (+ the prefix keys they attend to) per prefill batch


def _batches(sizes, budget=None):
    """Batches of indices into ``sizes`` = [(tokens, prefix keys)], longest first, each of at most
    ``budget`` (default PREFILL_TOKENS) padded query + key positions: rows x (longest tokens + longest
    prefix). A row over the budget goes alone. Bounds the prefill's transient activations (one layer of
    the batch) whatever the number of rows."""
    budget = PREFILL_TOKENS if budget is None else budget
    out, cur, top = [], [], (0, 0)
    for i in sorted(range(len(sizes)), key=lambda i: -sum(sizes[i])):
        t = (max(top[0], sizes[i][0]), max(top[1], sizes[i][1]))
        if cur and (len(cur) + 1) * sum(t) > budget:
            out.append(cur)
            cur, t = [], sizes[i]
        cur.append(i)
        top = t
    if cur:
        out.append(cur)
    return out


def _right_padded(seqs, pad, device) -> torch.Tensor:
    ids = torch.full((len(seqs), max(map(len, seqs))), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    return ids.to(device)


def prefill_rows(trunk: Trunk, cache: KVCache, seqs, slots, groups) -> list:
    """Fill the cache for rows ``slots`` whose contexts are ``seqs`` (token lists).

    Rows with the same ``groups`` entry (a prefix-block index) share the longest common prefix of
    their ``seq[:-1]``; the rest of each row goes to its suffix. Trunk.prefill writes each layer's
    K/V straight into the cache; blocks and remainders run in batches of at most PREFILL_TOKENS padded
    positions. Returns every row's last token, the input of its first decode step.
    """
    policy, dev = trunk.policy, cache.suffix_k.device
    by_group: dict = {}
    for s, g in zip(seqs, groups):
        by_group.setdefault(g, []).append(s[:-1])
    prefix = {g: ss[0][: common_prefix_len(ss)] for g, ss in by_group.items()}
    trunk.check_positions(max(len(s) for s in seqs))
    if max(len(p) for p in prefix.values()) > cache.prefix_capacity:
        raise ValueError(
            f"prompt prefix of {max(len(p) for p in prefix.values())} tokens exceeds the cache "
            f"capacity {cache.prefix_capacity}"
        )
    # 1. shared prefix blocks, right-padded causal batches
    gs = [g for g in prefix if prefix[g]]
    for g, pre in prefix.items():
        cache.prefix_len[g] = len(pre)
    for batch in _batches([(len(prefix[g]), 0) for g in gs]):
        bg = [gs[i] for i in batch]
        ids = _right_padded([prefix[g] for g in bg], policy.pad_token_id, dev)
        L = ids.shape[1]
        trunk.prefill(policy.embed_text(ids), torch.arange(L, device=dev).expand(len(bg), L),
                      kv_out=(cache.prefix_kv, torch.tensor(bg, device=dev)))
    # 2. per-row remainders, attending to their group's prefix
    rem = [s[len(prefix[g]) : -1] for s, g in zip(seqs, groups)]
    slot_t = torch.tensor(list(slots), device=dev)
    cache.group_ids[slot_t] = torch.tensor(list(groups), dtype=torch.int32, device=dev)
    cache.suffix_len[slot_t] = torch.tensor([len(r) for r in rem], dtype=torch.int32, device=dev)
    if max(len(r) for r in rem) + 1 > cache.suffix_capacity:
        raise ValueError("row context exceeds the cache's suffix capacity")
    todo = [i for i, r in enumerate(rem) if r]
    for batch in _batches([(len(rem[i]), len(prefix[groups[i]])) for i in todo]):
        bt = [todo[j] for j in batch]
        ids = _right_padded([rem[i] for i in bt], policy.pad_token_id, dev)
        L = ids.shape[1]
        gid = torch.tensor([groups[i] for i in bt], dtype=torch.int32, device=dev)
        start = cache.prefix_len[gid.long()].long()
        positions = start[:, None] + torch.arange(L, device=dev)[None]
        lp = max(max(len(prefix[groups[i]]) for i in bt), 1)  # the longest prefix these rows read
        rows = slot_t[torch.tensor(bt, device=dev)]
        trunk.prefill(policy.embed_text(ids), positions, kv_out=(cache.suffix_kv, rows), prefix=(cache, gid, lp))
    return [s[-1] for s in seqs]


class ModelRunner:
    """The trunk, its fused CPU weights and the KV caches of one policy's rollouts.

    ``flatten``: copy shared prefixes into the rows after prefill (KVCache.flatten; default: when the
    grouped decode kernel is not in use); ``self.flat`` may be changed between rollouts.
    """

    def __init__(self, policy, flatten=None):
        self.policy = policy
        self.flat = default_flatten(policy, flatten)
        self.trunk: Trunk | None = None

    def begin(self) -> Trunk:
        """The trunk for the next rollout: built on first use (and when the policy moved to another
        device or dtype), else its layers re-read (a LoRA wrapper injected since); on CPU its weights
        are re-fused (they change between training steps)."""
        policy, t = self.policy, self.trunk
        if t is None or t.cos.device != policy.device or t.cos.dtype != policy.dtype:
            t = self.trunk = Trunk(policy, policy.max_positions)
        else:
            t.refresh()
        if policy.device.type == "cpu":
            t.fuse_weights()
        return t

    def new_cache(self, num_prefixes, prefix_capacity, num_rows, suffix_capacity) -> KVCache:
        return new_cache(self.policy, num_prefixes, prefix_capacity, num_rows, suffix_capacity)

    def prefill(self, cache, seqs, slots: range, groups) -> list:
        """prefill_rows into ``slots``, then (``flat``) the rows' prefixes copied into them. Returns every
        row's last token, the input of its first decode step."""
        last = prefill_rows(self.trunk, cache, seqs, slots, groups)
        if self.flat:
            cache.flatten(slots.start, slots.stop)
        return last

    def prefilled_cache(self, seqs, groups, decode_tokens) -> tuple:
        """(a new cache holding the rows ``seqs`` in slots 0 .. len(seqs)-1, prefilled, with room for
        ``decode_tokens`` more tokens each; every row's last token). Rows with the same ``groups``
        entry may share a prefix block."""
        cache, groups = rows_cache(self.policy, seqs, groups, decode_tokens, flat=self.flat)
        return cache, self.prefill(cache, seqs, range(len(seqs)), groups)

    def decode_backend(self) -> str:
        """Which decode step the image loop runs (reported by the bench): on CPU over flattened rows
        with fused weights "cpp-decode-step" (fastbicot._C.decode_step_cpu) or "torch-matmul-flat"
        (FusedWeights.flat), else the attention backend's name."""
        if self.policy.device.type == "cpu" and self.flat:
            fused = self.begin().fused
            if fused is not None:
                return "cpp-decode-step" if fused.use_native else "torch-matmul-flat"
        return attention_backend(self.policy.device, self.flat)
