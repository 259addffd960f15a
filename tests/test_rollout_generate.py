"""generate_images must equal transformers' Janus generate (greedy) token for token."""

import itertools

import pytest
import torch
from helpers import IDS, random_policy

from fastbicot.models import JanusPolicy
from fastbicot.rollout import generate_images
from fastbicot.rollout.baselines import hf_generate_images, t2i_r1_generate_images

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_policy(seed=0):
    policy = JanusPolicy.from_preset("tiny", seed=seed, dtype=torch.float64)
    with torch.no_grad():
        for p in policy.hf_model.parameters():
            p.mul_(3.0)
    return policy


def prompt(length, gen):
    """BOS + random bytes + BOI, ``length`` tokens in all (length 1 is a bare BOI)."""
    if length == 1:
        return [IDS["boi"]]
    body = torch.randint(0, 256, (length - 2,), generator=gen).tolist()
    return [IDS["bos"]] + body + [IDS["boi"]]


def hf_greedy(policy, rows, w):
    return hf_generate_images(policy, torch.tensor(rows), do_sample=False, guidance_scale=w)


POLICIES = {
    "tiny": lambda s: tiny_policy(s),
    "h40l2n5": lambda s: random_policy(40, 2, 5, grid=3, seed=s),
    "h24l3n3": lambda s: random_policy(24, 3, 3, grid=2, image_vocab=17, seed=s),
}


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_single_rows_match_hf_generate(seed, name):
    policy = POLICIES[name](seed)
    gen = torch.Generator().manual_seed(seed)
    cases = [(1, 5.0), (2, 3.0), (7, 5.0), (23, 1.7)] if name != "tiny" else [(2, 3.0), (19, 5.0)]
    for length, w in cases:
        row = prompt(length, gen)
        ref = hf_greedy(policy, [row], w)
        out = generate_images(policy, [row], guidance_scale=w, temperature=0)
        assert out.shape == (1, policy.num_image_tokens)
        assert torch.equal(out, ref), (length, w)


@pytest.mark.parametrize("name", ["h40l2n5", "h24l3n3"])
def test_equal_length_batch_matches_hf_batch(seed, name):
    policy = POLICIES[name](seed)
    gen = torch.Generator().manual_seed(seed)
    rows = [prompt(9, gen) for _ in range(3)]
    for w in (5.0, 2.0):
        assert torch.equal(
            generate_images(policy, torch.tensor(rows), guidance_scale=w, temperature=0),
            hf_greedy(policy, rows, w),
        )


def test_mixed_lengths_each_row_as_if_alone(seed):
    policy = POLICIES["h40l2n5"](seed)
    gen = torch.Generator().manual_seed(seed)
    rows = [prompt(n, gen) for n in (2, 31, 5, 12, 1)]
    out = generate_images(policy, rows, guidance_scale=4.0, temperature=0)
    for i, row in enumerate(rows):
        assert torch.equal(out[i : i + 1], hf_greedy(policy, [row], 4.0)), i


def test_grouped_layout_split_blocks_and_small_batches_each_row_as_if_alone(seed, monkeypatch):
    """The grouped layout (prefixes kept in blocks, as on CUDA): unconditional rows of very different
    lengths get more than one block so that no suffix holds the whole spread; prefill in batches of one
    row each (PREFILL_TOKENS=1) changes nothing; every row still equals HF generate on it alone."""
    from fastbicot.rollout import runner as gen_mod

    policy = POLICIES["h40l2n5"](seed)
    gen = torch.Generator().manual_seed(seed)
    rows = [prompt(n, gen) for n in (2, 31, 5, 12, 60, 58, 1)]
    layouts = []
    real = gen_mod.rows_cache

    def spy(policy, seqs, groups, decode_tokens, *, flat):
        cache, g = real(policy, seqs, groups, decode_tokens, flat=flat)
        layouts.append((cache, g))
        return cache, g

    monkeypatch.setattr(gen_mod, "rows_cache", spy)
    out = generate_images(policy, rows, guidance_scale=4.0, temperature=0, flatten=False)
    cache, groups = layouts[-1]
    B, N = len(rows), policy.num_image_tokens
    assert cache.prefix_kv.shape[2] > B + 1  # the BOS pad ... pad rows were cut into several blocks
    assert len(set(groups[B:])) > 1 and not set(groups[:B]) & set(groups[B:])
    spread = max(map(len, rows)) - min(map(len, rows))
    assert cache.suffix_capacity - 1 - N < spread
    monkeypatch.setattr(gen_mod, "PREFILL_TOKENS", 1)
    assert torch.equal(generate_images(policy, rows, guidance_scale=4.0, temperature=0, flatten=False), out)
    assert torch.equal(generate_images(policy, rows, guidance_scale=4.0, temperature=0, flatten=True), out)
    for i, row in enumerate(rows):
        assert torch.equal(out[i : i + 1], hf_greedy(policy, [row], 4.0)), i


def _partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _partitions(rest):
        yield [[first], *part]
        for i in range(len(part)):
            yield [*part[:i], [first, *part[i]], *part[i + 1:]]


def _cut_cost(ctx, blocks):
    """K * Lp + rows * S of rows ``ctx`` cut into ``blocks`` (lists of row indices)."""
    S = max(len(ctx[r]) - _lcp([ctx[x] for x in b]) for b in blocks for r in b)
    return len(blocks) * max(map(len, ctx)) + len(ctx) * S


def _lcp(seqs):
    n = 0
    while all(len(s) > n for s in seqs) and len({s[n] for s in seqs}) == 1:
        n += 1
    return n


@pytest.mark.parametrize("kind", ["lengths", "tokens"])
def test_layout_rows_against_every_partition(seed, kind):
    """layout_rows(split=True) against every way to cut each caller group into blocks (exhaustive, small
    inputs): K * Lp + rows * S is the minimum when rows differ only in length (BOS pad ... pad BOI), and
    never below it otherwise; each row's block is a prefix of its context; split=False keeps the groups."""
    from fastbicot.rollout.kv_cache import layout_rows

    gen = torch.Generator().manual_seed(seed)
    for _ in range(6):
        n_groups = int(torch.randint(1, 3, (), generator=gen))
        seqs, groups = [], []
        for g in range(n_groups):
            for _ in range(int(torch.randint(1, 5, (), generator=gen))):
                n = int(torch.randint(1, 30, (), generator=gen))
                if kind == "lengths":
                    seqs.append([7] + [3] * n + [9])
                else:  # a shared head, then a random tail over a 2-token alphabet (long common prefixes)
                    seqs.append([7, g] + torch.randint(0, 2, (n,), generator=gen).tolist() + [9])
                groups.append(g)
        ctx = [s[:-1] for s in seqs]
        Lp, n = max(map(len, ctx)), len(seqs)
        lay = layout_rows(seqs, groups, split=True)
        blocks = {}
        for r, g in enumerate(lay.groups):
            blocks.setdefault(g, []).append(r)
        for g, rs in blocks.items():
            assert len({groups[r] for r in rs}) == 1  # never across the caller's groups
            assert lay.prefix_lens[g] == _lcp([ctx[r] for r in rs])
            for r in rs:
                assert lay.remainders[r] == len(ctx[r]) - lay.prefix_lens[g]
        got = lay.num_prefixes * Lp + n * lay.max_remainder
        per_group = [[r for r in range(n) if groups[r] == g] for g in sorted(set(groups))]
        best = min(_cut_cost(ctx, [b for p in parts for b in p])
                   for parts in itertools.product(*[list(_partitions(rs)) for rs in per_group]))
        assert got >= best
        if kind == "lengths":
            assert got == best, (seqs, groups, lay)
        flat = layout_rows(seqs, groups, split=False)
        assert flat.num_prefixes == len(set(groups))


def test_guidance_one_matches_t2i_r1_loop(seed):
    """HF generate cannot run with guidance 1 (it keeps doubled rows); the seed loop (HF trunk +
    DynamicCache) is the reference there, and is itself checked against HF generate for w > 1."""
    policy = POLICIES["h24l3n3"](seed)
    gen = torch.Generator().manual_seed(seed)
    rows = [prompt(n, gen) for n in (4, 11, 2)]
    out = generate_images(policy, rows, guidance_scale=1.0, temperature=0)
    for i, row in enumerate(rows):
        assert torch.equal(
            out[i : i + 1], t2i_r1_generate_images(policy, [row], guidance_scale=1.0, temperature=0)
        )
    assert torch.equal(
        t2i_r1_generate_images(policy, [rows[1]], guidance_scale=3.0, temperature=0),
        hf_greedy(policy, [rows[1]], 3.0),
    )


def test_sampling_reproducible_and_in_range(seed):
    policy = POLICIES["h24l3n3"](seed)
    rows = [prompt(6, torch.Generator().manual_seed(seed)), [IDS["bos"], IDS["boi"]]]
    a = generate_images(policy, rows, guidance_scale=5.0, temperature=1.0, top_k=5, top_p=0.9, seed=seed)
    b = generate_images(policy, rows, guidance_scale=5.0, temperature=1.0, top_k=5, top_p=0.9, seed=seed)
    assert torch.equal(a, b)
    assert a.min() >= 0 and a.max() < policy.image_vocab_size


def test_bad_input_errors():
    policy = POLICIES["h24l3n3"](0)
    ok = [[IDS["bos"], 5, IDS["boi"]]]
    with pytest.raises(ValueError, match="empty"):
        generate_images(policy, [])
    with pytest.raises(ValueError, match="BOI"):
        generate_images(policy, [[IDS["bos"], 5]])
    with pytest.raises(ValueError, match="guidance_scale"):
        generate_images(policy, ok, guidance_scale=0.5)
    with pytest.raises(ValueError, match="top_p"):
        generate_images(policy, ok, top_p=0.0)
    with pytest.raises(ValueError, match="top_p"):
        generate_images(policy, ok, top_p=1.5)
    with pytest.raises(ValueError, match="position"):
        generate_images(policy, [[IDS["bos"]] + [7] * 600 + [IDS["boi"]]])


@pytest.mark.gpu
def test_cuda_graph_decode_matches_eager_and_hf(seed):
    policy = POLICIES["h40l2n5"](seed)
    policy.hf_model.to("cuda")
    gen = torch.Generator().manual_seed(seed)
    rows = [prompt(n, gen) for n in (3, 14, 8)]
    graph = generate_images(policy, rows, guidance_scale=3.0, temperature=0, cuda_graph=True)
    eager = generate_images(policy, rows, guidance_scale=3.0, temperature=0, cuda_graph=False)
    assert torch.equal(graph, eager)
    for i, row in enumerate(rows):
        assert torch.equal(graph[i : i + 1], hf_greedy(policy, [row], 3.0)), i
    a = generate_images(policy, rows, guidance_scale=3.0, seed=seed)
    assert torch.equal(a, generate_images(policy, rows, guidance_scale=3.0, seed=seed))
