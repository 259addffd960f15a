"""Static KV cache with shared prefix blocks.

Layout (one tensor each for K and V, allocated once, never resized during a rollout):

    prefix_k/v  [layers, P, heads, Lp, head_dim]   shared blocks: a group's prompt, the batch's
                                                    unconditional ``BOS pad ... pad``
    suffix_k/v  [layers, R, heads, Ls, head_dim]   per-row tokens after the row's prefix
    prefix_len  int32 [P]     valid length of every prefix block
    group_ids   int32 [R]     the prefix block each row reads
    suffix_len  int32 [R]     valid length of every row's suffix

A row's sequence is ``prefix[group_ids[r]][:prefix_len] + suffix[r][:suffix_len]`` and its next
position is ``prefix_len[group] + suffix_len[r]`` (rows are packed: no padding inside a row, so
every row sees the positions it would see alone). Decode attention reads each prefix block once
per group and merges it with the row's suffix (kernels/decode_attention.py). layout_rows decides
which rows share a prefix block.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch


class KVCache:
    def __init__(self, num_layers, num_heads, head_dim, *, num_prefixes, prefix_capacity, num_rows, suffix_capacity,
                 dtype, device):
        if min(num_prefixes, num_rows, suffix_capacity) < 1 or prefix_capacity < 0:
            raise ValueError("KVCache needs at least one prefix, one row and one suffix slot")
        shape_p = (num_layers, num_prefixes, num_heads, max(prefix_capacity, 1), head_dim)
        shape_s = (num_layers, num_rows, num_heads, suffix_capacity, head_dim)
        # K and V of a layer live side by side ([layers, 2, ...]) so one index op moves both;
        # prefix_k/v and suffix_k/v are views with the layout the decode kernel takes.
        self.prefix_kv = torch.zeros((shape_p[0], 2) + shape_p[1:], dtype=dtype, device=device)
        self.suffix_kv = torch.zeros((shape_s[0], 2) + shape_s[1:], dtype=dtype, device=device)
        self.prefix_k, self.prefix_v = self.prefix_kv[:, 0], self.prefix_kv[:, 1]
        self.suffix_k, self.suffix_v = self.suffix_kv[:, 0], self.suffix_kv[:, 1]
        self.prefix_len = torch.zeros(num_prefixes, dtype=torch.int32, device=device)
        self.group_ids = torch.zeros(num_rows, dtype=torch.int32, device=device)
        self.suffix_len = torch.zeros(num_rows, dtype=torch.int32, device=device)
        self.prefix_capacity = prefix_capacity
        self.suffix_capacity = suffix_capacity

    @property
    def num_rows(self) -> int:
        return self.suffix_k.shape[1]

    def positions(self, n: int) -> torch.Tensor:
        """Next position of rows [0, n): prefix length of the row's group + its suffix length."""
        return (self.prefix_len[self.group_ids[:n].long()] + self.suffix_len[:n]).long()

    def swap_rows(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Exchange rows a[i] <-> b[i] (used to compact active rows to the front)."""
        if a.numel() == 0:
            return
        src, dst = torch.cat([b, a]), torch.cat([a, b])
        self.suffix_kv[:, :, dst] = self.suffix_kv[:, :, src]
        for t in (self.group_ids, self.suffix_len):
            t[dst] = t[src]

    def flatten(self, start: int, end: int) -> None:
        """Copy the group prefix of rows [start, end) in front of their suffixes (prefix length 0).

        For the CPU decode step (rollout.cpu_decode): one contiguous KV per row costs no per-step
        gather there, while reading a prefix once per group only pays off on a GPU. The
        rows' sequences and positions are unchanged.
        """
        groups = self.group_ids[start:end].tolist()
        plen_all, slen_all = self.prefix_len.tolist(), self.suffix_len[start:end].tolist()
        by_shape: dict = {}  # rows with the same (group, suffix length) move as one block
        for r, g in enumerate(groups):
            by_shape.setdefault((g, slen_all[r]), []).append(start + r)
        width = max(plen_all[g] + slen_all[r] for r, g in enumerate(groups))
        if max(plen_all[g] for g in set(groups)) == 0:
            return
        if width > self.suffix_capacity:
            raise ValueError(f"flatten needs {width} suffix slots, the cache has {self.suffix_capacity}")
        kv = self.suffix_kv
        for (g, ls), rows in by_shape.items():
            lp = plen_all[g]
            if lp == 0:
                continue
            idx = torch.tensor(rows, device=kv.device) if len(rows) != rows[-1] - rows[0] + 1 else None
            sel = slice(rows[0], rows[-1] + 1) if idx is None else idx
            if ls:  # the suffix moves right by the prefix length (a copy first: the ranges overlap)
                kv[:, :, sel, :, lp:lp + ls] = kv[:, :, sel, :, :ls].clone()
            kv[:, :, sel, :, :lp] = self.prefix_kv[:, :, g:g + 1, :, :lp]
        self.suffix_len[start:end] += torch.tensor([plen_all[g] for g in groups], dtype=self.suffix_len.dtype,
                                                   device=self.suffix_len.device)
        self.prefix_len[sorted(set(groups))] = 0


def common_prefix_len(seqs) -> int:
    """The longest common prefix of token lists: that of the lexicographically smallest and largest
    (any prefix all share lies between them), so one pairwise scan instead of one per row."""
    seqs = [list(s) for s in seqs]
    return _lcp2(min(seqs), max(seqs))


@dataclass
class RowLayout:
    """Where the rows' contexts (``seq[:-1]``: a row's last token is its first decode input) sit in a
    KVCache: row r reads prefix block ``groups[r]`` (``prefix_lens[g]`` tokens: the longest common
    prefix of the block's rows) and keeps ``remainders[r]`` tokens of its own in its suffix."""

    groups: list
    prefix_lens: list
    remainders: list

    @property
    def num_prefixes(self) -> int:
        return len(self.prefix_lens)

    @property
    def prefix_capacity(self) -> int:
        return max(self.prefix_lens)

    @property
    def max_remainder(self) -> int:
        return max(self.remainders)

    @property
    def max_context(self) -> int:
        return max(self.prefix_lens[g] + r for g, r in zip(self.groups, self.remainders))


def _lcp2(a, b) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _greedy_runs(lens, lcps, limit):
    """Cut rows (sorted by context; ``lcps[j]``: common prefix of rows j and j + 1) into the fewest
    consecutive runs whose longest row exceeds the run's common prefix by at most ``limit`` tokens:
    [(start, end, common prefix)]."""
    out, start, lcp, top = [], 0, lens[0], lens[0]
    for j in range(1, len(lens)):
        l2, t2 = min(lcp, lcps[j - 1]), max(top, lens[j])
        if t2 - l2 <= limit:
            lcp, top = l2, t2
        else:
            out.append((start, j, lcp))
            start, lcp, top = j, lens[j], lens[j]
    out.append((start, len(lens), lcp))
    return out


def layout_rows(seqs, groups, *, split=False) -> RowLayout:
    """The prefix block of every row: rows with the same ``groups`` entry may share one (their longest
    common prefix, prefilled once); blocks are numbered 0 .. K-1 in the order of the entries' first rows.

    ``split=False``: one block per ``groups`` entry. ``split=True`` (the grouped layout, where prefixes
    stay in their blocks): an entry's rows are cut into several blocks when that makes the cache smaller.
    A static cache holds K blocks x Lp (the longest context) + rows x (S + what decoding appends), S the
    longest remainder: every row's suffix is sized by the one row that runs furthest past its block's
    common prefix (an unconditional ``BOS pad ... pad`` row longer than the shortest one of its block).
    For every candidate S the fewest blocks are found greedily over each entry's rows in lexicographic
    order of their contexts (the minimum when rows differ only in length, as the unconditional rows of
    ``uncond="all"`` do), and the S of least ``K * Lp + rows * S`` is kept (ties: fewer blocks).
    """
    ctx = [list(s[:-1]) for s in seqs]
    lens = [len(c) for c in ctx]
    members: dict = {}
    for r, g in enumerate(groups):
        members.setdefault(g, []).append(r)
    parts = []  # per entry: its rows (sorted by context when splitting) and their adjacent common prefixes
    for rows in members.values():
        if split:
            rows = sorted(rows, key=lambda r: ctx[r])
        lcps = [_lcp2(ctx[a], ctx[b]) for a, b in itertools.pairwise(rows)] if split else None
        parts.append((rows, lcps))
    if not split:
        cuts = [[(0, len(rows), common_prefix_len([ctx[r] for r in rows]))] for rows, _ in parts]
    else:
        cands = {0}
        for rows, lcps in parts:  # the remainder bound of every consecutive run
            for u in range(len(rows)):
                lcp = top = lens[rows[u]]
                for v in range(u + 1, len(rows)):
                    lcp, top = min(lcp, lcps[v - 1]), max(top, lens[rows[v]])
                    cands.add(top - lcp)
        Lp, n = max(lens), len(seqs)
        part_lens = [[lens[r] for r in rows] for rows, _ in parts]
        best = None
        for limit in sorted(cands):
            if best is not None and n * limit + len(parts) * Lp > best[0]:
                break  # every later candidate costs more than the best already found
            cuts_l = [_greedy_runs(pl, lcps, limit) if len(pl) > 1 else [(0, 1, pl[0])]
                      for pl, (_, lcps) in zip(part_lens, parts)]
            cost = sum(map(len, cuts_l)) * Lp + n * limit
            if best is None or cost <= best[0]:
                best = (cost, cuts_l)
        cuts = best[1]
    out_groups, prefix_lens, rem = [0] * len(seqs), [], [0] * len(seqs)
    for (rows, _), runs in zip(parts, cuts):
        for start, end, lcp in runs:
            for r in rows[start:end]:
                out_groups[r] = len(prefix_lens)
                rem[r] = lens[r] - lcp
            prefix_lens.append(lcp)
    return RowLayout(out_groups, prefix_lens, rem)
