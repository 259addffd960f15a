"""Rank-independent random streams: a sample's draws depend on (seed, step, global prompt index,
generation index) only, never on the other samples in its batch, its row, or how the batch is split.

Engine level: generating prompts [p0, p1, p2, p3] in one call equals generating [p0, p1] and [p2, p3]
(group_index [0, 1] and [2, 3]) in two calls, and [p2, p3, p0, p1] with group_index [2, 3, 0, 1]:
identical CoT ids and image tokens, and the same sampling log-probs, through CoT compaction, CFG,
top-k/top-p, fp32 and float64 (the fused sampler's torch path).
Kernel level: keyed cfg_sample keeps the exact law (chi-square over many keys) and a keyed row's draw
does not depend on the batch, on the torch path and on the Triton kernels (interpreted on CPU).
"""

import importlib
import math

import pytest
import torch
from helpers import IDS, chi2_pvalue, random_policy, run_triton_cases_in_fresh_interpreter

from fastbicot.kernels.cfg_sample import cfg_probs_reference, cfg_sample, keyed_uniform
from fastbicot.rollout import RolloutEngine, decoders, generate_images
from fastbicot.rollout.sampling import Sampler, filtered_logits

cs = importlib.import_module("fastbicot.kernels.cfg_sample")  # the module (the package re-exports the function)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_READY = DEVICE == "cuda" or type(cs._cfg_sample_block_kernel).__name__ == "InterpretedFunction"
ALPHA = 1e-5  # chi-square significance: a correct sampler fails a given check once in 100k runs

PROMPTS = ["a red cube", "two small dogs to the left of a big cat", "x y", "three blue birds on a wire"]
SHORT = dict(system="Plan the image.", instruction="Draw: {prompt}")
G = 3

pytestmark = pytest.mark.usefixtures("one_thread")


def by_key(batch):
    """{(global prompt index, generation): sample}."""
    return {(batch.group_index[s.prompt_index], i % batch.num_generations): s for i, s in enumerate(batch.samples)}


def assert_same_samples(a, b):
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        assert x.cot_ids == y.cot_ids, k
        assert torch.equal(x.image_tokens, y.image_tokens), k
        # the same draws; the log-probs may differ by float rounding of a differently shaped batch
        torch.testing.assert_close(x.cot_logprobs, y.cot_logprobs)
        torch.testing.assert_close(x.image_logprobs, y.image_logprobs)
        assert x.image_context_ids == y.image_context_ids


def varied_cot_engine(seed, dtype, **kw):
    """An engine on a random tiny policy whose CoT rows stop at different steps (EOS logit scaled up
    until the 4-prompt batch has at least two CoT lengths, i.e. rows are compacted); -> (engine, batch)."""
    policy = random_policy(32, 2, 4, grid=2, image_vocab=23, seed=seed, dtype=dtype, scale=1.0)
    eng = RolloutEngine(policy, **SHORT, max_new_tokens=10, **kw)
    for _ in range(6):
        with torch.no_grad():
            policy.lm_head.weight[IDS["eos"]] *= 2.0
        full = eng.generate(PROMPTS, G, seed=seed)
        if len({len(s.cot_ids) for s in full.samples}) > 1:
            return eng, full
    raise AssertionError("no EOS-length variety: the compaction case is not exercised")


CASES = [  # dtype, image_mode, guidance, flatten, image top_k, image top_p, CoT top_p
    (torch.float32, "reprompt", 5.0, True, 0, 1.0, 1.0),  # plain CFG image sampling (per-row noise)
    (torch.float32, "continue", 1.0, False, 7, 0.9, 0.9),  # grouped layout, fused sampler, no CFG
    (torch.float32, "continue", 4.0, True, 0, 1.0, 1.0),  # image rows in the CoT's compacted order
    (torch.float64, "reprompt", 3.0, False, 5, 1.0, 1.0),  # the fused sampler's float64 torch path
    (torch.float64, "continue", 5.0, True, 0, 0.8, 0.95),
]


@pytest.mark.parametrize("dtype,mode,w,flatten,top_k,top_p,cot_top_p", CASES,
                         ids=lambda x: str(x).replace("torch.", ""))
def test_split_and_permuted_batches_draw_the_same_samples(seed, dtype, mode, w, flatten, top_k, top_p, cot_top_p):
    eng, full = varied_cot_engine(seed, dtype, image_mode=mode, flatten=flatten, guidance_scale=w, top_k=top_k,
                                  top_p=top_p, cot=dict(top_p=cot_top_p))
    assert full.group_index == [0, 1, 2, 3]
    first = eng.generate(PROMPTS[:2], G, seed=seed, group_index=[0, 1])
    second = eng.generate(PROMPTS[2:], G, seed=seed, group_index=[2, 3])
    assert_same_samples(by_key(full), {**by_key(first), **by_key(second)})
    permuted = eng.generate([PROMPTS[i] for i in (2, 3, 0, 1)], G, seed=seed, group_index=[2, 3, 0, 1])
    assert_same_samples(by_key(full), by_key(permuted))
    # the local group of each sample (advantages) is still 0 .. P-1 in each call
    assert permuted.group_ids.tolist() == [s // G for s in range(4 * G)]
    assert permuted.global_group_ids.tolist() == [(2, 3, 0, 1)[s // G] for s in range(4 * G)]
    assert permuted.sample_keys.tolist() == [(2, 3, 0, 1)[s // G] * G + s % G for s in range(4 * G)]


def test_image_loop_alone_is_keyed(seed):
    """semantic_cot=False: the image loop is the only draw (contexts straight from the prompts)."""
    policy = random_policy(32, 2, 4, grid=2, image_vocab=23, seed=seed, dtype=torch.float32, scale=1.0)
    eng = RolloutEngine(policy, **SHORT, semantic_cot=False, max_new_tokens=4, guidance_scale=3.0)
    full = eng.generate(PROMPTS, G, seed=seed)
    parts = [eng.generate([PROMPTS[i]], G, seed=seed, group_index=[i]) for i in (3, 1, 0, 2)]
    assert_same_samples(by_key(full), {k: v for p in parts for k, v in by_key(p).items()})


@pytest.mark.parametrize("w,temperature", [(4.0, 1.0), (1.0, 0.8), (4.0, 0.0)])
def test_image_sampler_path_is_keyed(seed, monkeypatch, w, temperature):
    """Codebooks above PLAIN_MAX_VOCAB draw plain image tokens through the sampler's keyed torch path
    instead of Sampler.draw_plain (here the limit is lowered below the tiny codebook): split and
    permuted batches still draw the same samples, with and without CFG, and greedy draws draw_plain's
    greedy tokens."""
    drew_plain = []
    draw_plain = Sampler.draw_plain
    monkeypatch.setattr(Sampler, "draw_plain", lambda self, *a, **kw: drew_plain.append(1) or draw_plain(self, *a, **kw))
    eng, plain = varied_cot_engine(seed, torch.float32, image_mode="continue", flatten=True, guidance_scale=w,
                                   temperature=temperature)
    assert drew_plain and eng.policy.image_vocab_size == 23
    monkeypatch.setattr(decoders, "PLAIN_MAX_VOCAB", 22)
    drew_plain.clear()
    full = eng.generate(PROMPTS, G, seed=seed)
    assert not drew_plain
    first = eng.generate(PROMPTS[:2], G, seed=seed, group_index=[0, 1])
    second = eng.generate(PROMPTS[2:], G, seed=seed, group_index=[2, 3])
    assert_same_samples(by_key(full), {**by_key(first), **by_key(second)})
    permuted = eng.generate([PROMPTS[i] for i in (2, 3, 0, 1)], G, seed=seed, group_index=[2, 3, 0, 1])
    assert_same_samples(by_key(full), by_key(permuted))
    if temperature == 0:
        assert_same_samples(by_key(plain), by_key(full))
        assert not any(s.image_logprobs.any() for s in full.samples)
    else:  # another stream: 12 samples of 4 tokens of 23 all equal only by a fluke
        assert not torch.equal(plain.image_tokens, full.image_tokens)
        assert [s.cot_ids for s in plain.samples] == [s.cot_ids for s in full.samples]


def test_different_keys_draw_differently(seed):
    policy = random_policy(32, 2, 4, grid=3, image_vocab=23, seed=seed, dtype=torch.float32, scale=1.0)
    eng = RolloutEngine(policy, **SHORT, max_new_tokens=6, guidance_scale=3.0)
    a = eng.generate(PROMPTS[:2], G, seed=seed, group_index=[0, 1])
    b = eng.generate(PROMPTS[:2], G, seed=seed, group_index=[5, 9])
    assert b.group_index == [5, 9] and b.group_ids.tolist() == a.group_ids.tolist()
    # 6 samples, each 6 CoT tokens (top-k 50 of 264) and 9 image tokens of 23: equal only by a fluke
    assert all(x.cot_ids != y.cot_ids or not torch.equal(x.image_tokens, y.image_tokens)
               for x, y in zip(a.samples, b.samples))
    assert not torch.equal(a.image_tokens, b.image_tokens)
    # the same prompt twice in one call: distinct keys, distinct samples
    c = eng.generate([PROMPTS[0], PROMPTS[0]], G, seed=seed)
    samples = [(tuple(s.cot_ids), tuple(s.image_tokens.tolist())) for s in c.samples]
    assert len(set(samples)) == len(samples)


def test_group_index_validation():
    policy = random_policy(32, 2, 4, grid=2, image_vocab=23, seed=0, dtype=torch.float32, scale=1.0)
    eng = RolloutEngine(policy, **SHORT, max_new_tokens=2)
    for bad in ([0], [0, 1, 2], [1, 1], [0, -1], [0, 1.0], [True, 2], "ab", [0, 2**62]):
        with pytest.raises(ValueError, match="group_index"):
            eng.generate(PROMPTS[:2], 4, group_index=bad)
    with pytest.raises(ValueError, match="group_index"):
        eng.generate(PROMPTS[:2], 2, group_index=torch.tensor([0.0, 1.0]))
    batch = eng.generate(PROMPTS[:2], 2, group_index=torch.tensor([7, 3]), decode=False)
    assert batch.group_index == [7, 3] and batch.sample_keys.tolist() == [14, 15, 6, 7]


def test_generate_images_keys(seed):
    policy = random_policy(seed=seed, dtype=torch.float32, scale=1.0)
    g = torch.Generator().manual_seed(seed)
    rows = [[IDS["bos"]] + torch.randint(0, 256, (n,), generator=g).tolist() + [IDS["boi"]] for n in (3, 11, 6, 8)]
    for kw in ({}, dict(top_k=6, top_p=0.9)):
        toks, lps = generate_images(policy, rows, guidance_scale=4.0, seed=seed, return_logprobs=True, **kw)
        t2, l2 = generate_images(policy, [rows[3], rows[1]], guidance_scale=4.0, seed=seed, keys=[3, 1],
                                 return_logprobs=True, **kw)
        assert torch.equal(t2, toks[[3, 1]])
        torch.testing.assert_close(l2, lps[[3, 1]])
        t3 = generate_images(policy, rows[:2], guidance_scale=4.0, seed=seed, keys=[10, 11], **kw)
        assert not torch.equal(t3, toks[:2])
    for bad in ([0], [1, 1], [0, 0.5]):
        with pytest.raises(ValueError, match="keys"):
            generate_images(policy, rows[:2], keys=bad)


# ---- the sampler and the fused kernel -----------------------------------------------------------


def _mix32_reference(x):
    """The 0x45d9f3b xor-shift-multiply hash on unbounded Python ints, reduced mod 2**32."""
    x = ((x >> 16) ^ x) * 0x45D9F3B % 2**32
    x = ((x >> 16) ^ x) * 0x45D9F3B % 2**32
    return (x >> 16) ^ x


def _keyed_uniform_reference(seed, offset, key):
    lanes = []
    for h in (0x243F6A88, 0x85A308D3):
        for v in (seed, offset, key):
            v %= 2**64
            for word in (v % 2**32, v >> 32):
                h = _mix32_reference(h ^ word)
        lanes.append(h)
    return ((lanes[0] >> 6) * 2**26 + (lanes[1] >> 6) + 0.5) / 2**52


def test_keyed_uniform_matches_python_ints(seed):
    """The int64 tensor hash (16-bit-safe products, no overflow) equals the same hash on Python ints."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.cat([torch.randint(-(2**63), 2**63 - 1, (200,), generator=g),
                      torch.tensor([0, 1, 2**32 - 1, 2**32, -1, 2**63 - 1, -(2**63)])])
    for s, o in ((seed, 3), (-5, 2**40 + 7), (2**64 - 1, -(2**63))):
        u = keyed_uniform(s, o, keys)
        ref = torch.tensor([_keyed_uniform_reference(s, o, k) for k in keys.tolist()], dtype=torch.float64)
        assert torch.equal(u, ref)
        assert bool(((u > 0) & (u < 1)).all())
    # 0-dim tensors act as the same numbers, also through the device-side math (CUDA tensors take it)
    assert torch.equal(keyed_uniform(torch.tensor(seed), torch.tensor(3), keys), keyed_uniform(seed, 3, keys))
    for s, o in ((seed, 3), (-5, 2**40 + 7), (2**64 - 1, -(2**63))):
        lanes = cs._lanes_tensor(torch.tensor(cs._as_int64(s)), o, "cpu")
        assert lanes.tolist() == cs._lanes_int(s, o) == cs._lanes_tensor(s, torch.tensor(cs._as_int64(o)), "cpu").tolist()


def _random_keys(n, g):
    """n distinct keys, half below 2**32 and half anywhere in int64 (the high word is keyed too)."""
    low = torch.randperm(2**20, generator=g)[: n // 2].long() * 4099
    high = torch.randint(-(2**62), 2**62, (n - n // 2,), generator=g) * 2 + 1  # odd: never equal to a low one
    return torch.cat([low, high])


LAW = [
    {},
    {"guidance_scale": 3.0, "temperature": 0.7, "top_k": 5, "top_p": 0.8},
    {"guidance_scale": 0.5, "temperature": 1.3, "top_p": 0.6},
]


@pytest.mark.parametrize("kw", LAW, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "plain")
def test_keyed_cfg_sample_law(kernel_path, seed, kw):
    """One row drawn under 4096 x 2 distinct keys: the float64 softmax of its guided, filtered logits."""
    dev = DEVICE if kernel_path == "triton" else "cpu"
    g = torch.Generator().manual_seed(seed)
    V, n = 37, 4096
    c, u = torch.randn(1, V, generator=g) * 2, torch.randn(1, V, generator=g)
    c[0, 3] = -math.inf
    p = cfg_probs_reference(c, u, **kw)[0]
    cb, ub = c.expand(n, -1).contiguous().to(dev), u.expand(n, -1).contiguous().to(dev)
    toks = [cfg_sample(cb, ub, seed=seed, offset=o, keys=_random_keys(n, g).to(dev), **kw) for o in range(2)]
    assert chi2_pvalue(torch.cat(toks), p) > ALPHA


@pytest.mark.parametrize("tiled", [False, True])
def test_keyed_rows_do_not_depend_on_the_batch(kernel_path, seed, monkeypatch, tiled):
    """A keyed row draws the same token (and log-prob) in any batch, at any position."""
    if tiled:
        if kernel_path != "triton":
            pytest.skip("the tiled kernel is Triton-only")
        monkeypatch.setattr(cs, "_MAX_BLOCK", 32)
        monkeypatch.setattr(cs, "_TILE", 64)  # V = 200: 4 tiles, the last one partial
    dev = DEVICE if kernel_path == "triton" else "cpu"
    g = torch.Generator().manual_seed(seed)
    B, V = 12, 200
    c, u = torch.randn(B, V, generator=g) * 3, torch.randn(B, V, generator=g) * 3
    keys = _random_keys(B, g)
    # the interpreted tiled kernel is slow (1 + 8 passes per filter + 1): unfiltered there, its draw is keyed
    settings = [{"guidance_scale": 3.0, "temperature": 0.8}] if tiled else [
        {"guidance_scale": 3.0, "top_k": 40, "top_p": 0.9}, {"temperature": 0.8}]
    for kw in settings:
        args = dict(seed=seed, offset=5, return_logprobs=True, **kw)
        tok, lp = cfg_sample(c.to(dev), u.to(dev), keys=keys.to(dev), **args)
        # rows 7, 2, 9 in another order, among 5 fresh rows with fresh keys
        pick = torch.tensor([7, 2, 9])
        c2 = torch.cat([torch.randn(2, V, generator=g), c[pick], torch.randn(3, V, generator=g)])
        u2 = torch.cat([torch.randn(2, V, generator=g), u[pick], torch.randn(3, V, generator=g)])
        k2 = torch.cat([torch.tensor([-1, -2]), keys[pick], torch.tensor([-10, -11, -12])])
        t2, l2 = cfg_sample(c2.to(dev), u2.to(dev), keys=k2.to(dev), **args)
        assert torch.equal(t2[2:5].cpu(), tok[pick].cpu())
        torch.testing.assert_close(l2[2:5].cpu(), lp[pick].cpu())
        # other keys, other draws: on near-flat logits (the guided, filtered rows above may leave one
        # token), 12 rows of 200 tokens all equal only with probability ~200**-12
        flat = torch.randn(B, V, generator=g) * 0.1
        t3 = cfg_sample(flat.to(dev), keys=keys.to(dev), seed=seed, offset=5)
        t4 = cfg_sample(flat.to(dev), keys=(keys + 1).to(dev), seed=seed, offset=5)
        assert not torch.equal(t3.cpu(), t4.cpu())
    if kernel_path == "triton":  # the kernel's counter takes the key where it took the row
        unkeyed = cfg_sample(c.to(dev), seed=seed, offset=5)
        assert torch.equal(unkeyed, cfg_sample(c.to(dev), seed=seed, offset=5, keys=torch.arange(B, device=dev)))


def test_many_keys_many_tokens(kernel_path, seed):
    """The same flat row under 256 keys: ~248 distinct tokens of 4096 expected (not one stream reused)."""
    dev = DEVICE if kernel_path == "triton" else "cpu"
    g = torch.Generator().manual_seed(seed)
    tok = cfg_sample(torch.zeros(256, 4096, device=dev), seed=seed, keys=_random_keys(256, g).to(dev))
    assert len(set(tok.tolist())) > 200


def test_cfg_sample_keys_validation():
    c = torch.randn(3, 10)
    for bad in (torch.arange(3, dtype=torch.int32), torch.arange(4), torch.arange(6).view(3, 2), [0, 1, 2],
                torch.zeros(3), torch.arange(3, device="meta")):
        with pytest.raises(ValueError, match="keys"):
            cfg_sample(c, keys=bad)


def test_sampler_float64_keyed(seed):
    """float64 logits (the kernel's torch path, in float64): keyed rows are batch-independent and the
    law is the float64 softmax of the guided, filtered logits."""
    g = torch.Generator().manual_seed(seed)
    V = 29
    # small logits: ~11 tokens survive the filters, so the draws are far from deterministic
    c, u = (torch.randn(2, V, generator=g, dtype=torch.float64) * 0.3).split(1)
    kw = dict(guidance_scale=2.5, temperature=0.9, top_k=12, top_p=0.9)
    sampler = Sampler(seed)
    p = torch.softmax(filtered_logits(u + 2.5 * (c - u), temperature=0.9, top_k=12, top_p=0.9), -1)[0]
    assert int((p > 0).sum()) >= 5
    n = 8192
    keys = _random_keys(n, g)
    tok, lp = sampler(c.expand(n, -1), u.expand(n, -1), offset=7, keys=keys, **kw)
    assert chi2_pvalue(tok, p) > ALPHA
    torch.testing.assert_close(lp, p[tok].log().float())
    # batch independence: a subset of the rows, reversed, among other rows
    pick = torch.tensor([5, 0, 3])
    x = torch.randn(5, V, generator=g, dtype=torch.float64)
    rows = torch.cat([x[:2], c.expand(3, -1), x[2:]])
    t2, _ = sampler(rows, torch.cat([x[:2], u.expand(3, -1), x[2:]]), offset=7,
                    keys=torch.cat([torch.tensor([-1, -2]), keys[pick], torch.tensor([-9, -10, -11])]), **kw)
    assert torch.equal(t2[2:5], tok[pick])
    # the stream moves with the offset (step) and the seed
    assert not torch.equal(sampler(c.expand(n, -1), u.expand(n, -1), offset=8, keys=keys, **kw)[0], tok)
    assert not torch.equal(Sampler(seed + 1)(c.expand(n, -1), u.expand(n, -1), offset=7, keys=keys, **kw)[0], tok)


def test_triton_cases_in_fresh_interpreter():
    if TRITON_READY:
        pytest.skip("the Triton cases ran in this process")
    run_triton_cases_in_fresh_interpreter(__file__)
