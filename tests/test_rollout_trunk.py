"""The rollout's own trunk forward and decode attention against transformers / float64 references."""

import math

import pytest
import torch
from helpers import random_policy

from fastbicot.kernels.decode_attention import grouped_decode_attention_reference
from fastbicot.rollout.kv_cache import KVCache
from fastbicot.rollout.trunk import Trunk

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("fused", [False, True])
def test_prefill_then_decode_matches_hf_trunk(seed, fused):
    policy = random_policy(36, 2, 3, seed=seed, dtype=torch.float64, scale=1.0)
    trunk = Trunk(policy, 64)
    if fused:
        trunk.fuse_weights()
    B, L, steps = 3, 13, 4
    x = torch.randn(B, L + steps, policy.hidden_size, dtype=torch.float64)
    # prefill at arbitrary absolute positions (a remainder after a prefix starts past 0)
    pos = torch.tensor([0, 5, 17])[:, None] + torch.arange(L)[None]
    torch.testing.assert_close(trunk.prefill(x[:, :L], pos), policy.trunk(x[:, :L], position_ids=pos)[0])
    # then decode the remaining tokens one at a time from a cache holding the first L tokens
    pos = torch.arange(L + steps)[None].expand(B, -1)
    ref = policy.trunk(x, position_ids=pos)[0]
    cache = KVCache(
        policy.num_layers,
        policy.num_heads,
        policy.head_dim,
        num_prefixes=B + 2,
        prefix_capacity=L + 3,
        num_rows=B,
        suffix_capacity=steps,
        dtype=torch.float64,
        device="cpu",
    )
    blocks = torch.tensor([4, 0, 2])  # prefill writes each layer's K/V at the given blocks, nowhere else
    before = cache.prefix_kv.clone()
    trunk.prefill(x[:, :L], pos[:, :L], kv_out=(cache.prefix_kv, blocks))
    _, hf_cache = policy.trunk(x[:, :L], position_ids=pos[:, :L], use_cache=True)
    for i, layer in enumerate(hf_cache.layers):  # transformers' own K (after RoPE) and V of every layer
        torch.testing.assert_close(cache.prefix_kv[i, 0, blocks, :, :L], layer.keys)
        torch.testing.assert_close(cache.prefix_kv[i, 1, blocks, :, :L], layer.values)
    untouched = torch.ones_like(before, dtype=torch.bool)
    untouched[:, :, blocks, :, :L] = False
    assert torch.equal(cache.prefix_kv[untouched], before[untouched])
    cache.prefix_len[blocks] = L
    cache.group_ids[:] = blocks.int()
    for t in range(steps):
        torch.testing.assert_close(trunk.decode(x[:, L + t], cache, B), ref[:, L + t])
    assert cache.suffix_len.tolist() == [steps] * B


def test_decode_positions_follow_prefix_and_suffix(seed):
    """Rows with different prefix lengths (packed, no padding) equal HF rows run alone."""
    policy = random_policy(24, 2, 2, seed=seed, dtype=torch.float64, scale=1.0)
    trunk = Trunk(policy, 64)
    lens = [1, 9, 4]
    seqs = [torch.randn(n + 3, policy.hidden_size, dtype=torch.float64) for n in lens]
    cache = KVCache(
        policy.num_layers,
        policy.num_heads,
        policy.head_dim,
        num_prefixes=3,
        prefix_capacity=9,
        num_rows=3,
        suffix_capacity=3,
        dtype=torch.float64,
        device="cpu",
    )
    for b, (n, s) in enumerate(zip(lens, seqs)):
        trunk.prefill(s[None, :n], torch.arange(n)[None], kv_out=(cache.prefix_kv, torch.tensor([b])))
        cache.prefix_len[b] = n
    cache.group_ids[:] = torch.arange(3, dtype=torch.int32)
    for t in range(3):
        out = trunk.decode(torch.stack([s[n + t] for n, s in zip(lens, seqs)]), cache, 3)
        for b, (n, s) in enumerate(zip(lens, seqs)):
            ref = policy.trunk(s[None, : n + t + 1], position_ids=torch.arange(n + t + 1)[None])[0][0, -1]
            torch.testing.assert_close(out[b], ref)


def test_grouped_decode_attention_reference_matches_float64(seed):
    """The grouped decode attention's torch semantics (the kernel module's own reference) against a
    float64 softmax over each row's [prefix | suffix] written here."""
    B, H, D, P = 7, 3, 12, 3
    q = torch.randn(B, H, D)
    pk, pv = torch.randn(P, H, 10, D), torch.randn(P, H, 10, D)
    sk, sv = torch.randn(B, H, 6, D), torch.randn(B, H, 6, D)
    plen = torch.tensor([10, 0, 3], dtype=torch.int32)  # an empty prefix, a full one
    gid = torch.randint(0, P, (B,), dtype=torch.int32)
    slen = torch.randint(1, 7, (B,), dtype=torch.int32)
    slen[0] = 1
    gid[0] = 1  # a row that sees only its own token
    out = grouped_decode_attention_reference(q, pk, pv, plen, gid, sk, sv, slen)
    for b in range(B):
        g = int(gid[b])
        k = torch.cat([pk[g, :, : plen[g]], sk[b, :, : slen[b]]], 1).double()
        v = torch.cat([pv[g, :, : plen[g]], sv[b, :, : slen[b]]], 1).double()
        p = torch.softmax(torch.einsum("hd,hld->hl", q[b].double(), k) / math.sqrt(D), -1)
        torch.testing.assert_close(out[b].double(), torch.einsum("hl,hld->hd", p, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(40))
def test_flatten_puts_each_rows_prefix_before_its_suffix(seed):
    """KVCache.flatten on random caches (several groups, unequal suffixes, empty prefixes and suffixes,
    a sub-range of rows): each flattened row holds its group's prefix then its old suffix, its length
    is their sum, the groups' prefixes become empty, and rows outside the range are untouched."""
    g = torch.Generator().manual_seed(seed + 1000 * int(torch.randint(0, 1000, ())))
    P, R = int(torch.randint(1, 4, (), generator=g)), int(torch.randint(1, 8, (), generator=g))
    Lp, extra = int(torch.randint(1, 7, (), generator=g)), int(torch.randint(1, 7, (), generator=g))
    c = KVCache(2, 2, 3, num_prefixes=P, prefix_capacity=Lp, num_rows=R, suffix_capacity=Lp + extra,
                dtype=torch.float64, device="cpu")
    c.prefix_kv.copy_(torch.randn(c.prefix_kv.shape, generator=g, dtype=torch.float64))
    c.suffix_kv.copy_(torch.randn(c.suffix_kv.shape, generator=g, dtype=torch.float64))
    c.prefix_len.copy_(torch.randint(0, Lp + 1, (P,), generator=g))
    c.group_ids.copy_(torch.randint(0, P, (R,), generator=g))
    c.suffix_len.copy_(torch.stack([torch.randint(0, Lp + extra - int(c.prefix_len[int(x)]) + 1, (), generator=g)
                                    for x in c.group_ids]))
    a = int(torch.randint(0, R, (), generator=g))
    b = int(torch.randint(a + 1, R + 1, (), generator=g))
    before = (c.prefix_kv.clone(), c.suffix_kv.clone(), c.prefix_len.clone(), c.suffix_len.clone())
    c.flatten(a, b)
    pkv, skv, plen, slen = before
    for r in range(R):
        grp, ls = int(c.group_ids[r]), int(slen[r])
        if a <= r < b:
            lp = int(plen[grp])
            assert int(c.suffix_len[r]) == lp + ls
            want = torch.cat([pkv[:, :, grp, :, :lp], skv[:, :, r, :, :ls]], dim=-2)
            assert torch.equal(c.suffix_kv[:, :, r, :, : lp + ls], want)
            assert int(c.prefix_len[grp]) == 0
        else:
            assert int(c.suffix_len[r]) == ls and torch.equal(c.suffix_kv[:, :, r], skv[:, :, r])
