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
per group and merges it with the row's suffix (kernels/decode_attention.py).
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        num_layers,
        num_heads,
        head_dim,
        *,
        num_prefixes,
        prefix_capacity,
        num_rows,
        suffix_capacity,
        dtype,
        device,
    ):
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

        For the torch attention path on CPU: one contiguous KV per row costs no per-step gather or
        concatenation there, while reading a prefix once per group only pays off on a GPU. The
        rows' sequences and positions are unchanged.
        """
        rows = torch.arange(start, end, device=self.suffix_kv.device)
        g = self.group_ids[rows].long()
        plen, slen = self.prefix_len[g].long(), self.suffix_len[rows].long()
        lp, ls = int(plen.max()), int(slen.max())
        if lp == 0:
            return
        width = int((plen + slen).max())
        if width > self.suffix_capacity:
            raise ValueError(f"flatten needs {width} suffix slots, the cache has {self.suffix_capacity}")
        both = torch.cat(
            [self.prefix_kv[:, :, :, :, :lp].index_select(2, g), self.suffix_kv[:, :, rows, :, :ls]], dim=4
        )
        j = torch.arange(width, device=rows.device)[None]
        src = torch.where(j < plen[:, None], j, lp + j - plen[:, None]).clamp(max=lp + ls - 1)  # [n, width]
        idx = src[None, None, :, None, :, None].expand(both.shape[0], 2, -1, both.shape[3], -1, both.shape[5])
        self.suffix_kv[:, :, rows, :, :width] = both.gather(4, idx)
        self.suffix_len[rows] = (plen + slen).int()
        self.prefix_len[torch.unique(g)] = 0
