"""cfg_sample: exact sampling law (chi-square against the float64 sort-based reference),
reproducibility, row independence, log-probs, greedy, validation — on the CPU torch path and on
the Triton kernel (CUDA, or the interpreter on CPU via FASTBICOT_FORCE_TRITON=1)."""

import importlib
import math

import pytest
import torch
from helpers import chi2_pvalue

cs = importlib.import_module("fastbicot.kernels.cfg_sample")  # the module (the package re-exports the function)
from fastbicot.kernels.cfg_sample import cfg_probs_reference, cfg_sample

ALPHA = 1e-5  # chi-square significance: a correct sampler fails a given check once in 100k runs


@pytest.fixture(params=["torch", "triton"])
def device(request, monkeypatch):
    """Device for the inputs; the 'triton' param routes CPU tensors through the interpreted kernel."""
    if request.param == "torch":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if type(cs._cfg_sample_block_kernel).__name__ != "InterpretedFunction":
        pytest.skip("Triton kernels were defined without TRITON_INTERPRET=1")
    monkeypatch.setenv("FASTBICOT_FORCE_TRITON", "1")
    return "cpu"


def interpreted():
    """True when CPU tensors go through the interpreted Triton kernel."""
    return cs.os.environ.get("FASTBICOT_FORCE_TRITON") == "1" and not torch.cuda.is_available()


def draw_many(c, u, rows, offsets, **kw):
    """rows x offsets draws of the single row (c[0], u[0]) by repeating it in one batch per offset."""
    cb = c.expand(rows, -1).contiguous()
    ub = None if u is None else u.expand(rows, -1).contiguous()
    return torch.cat([cfg_sample(cb, ub, seed=11, offset=o, **kw) for o in range(offsets)])


SETTINGS = [
    {},
    {"guidance_scale": 3.0, "temperature": 0.7, "top_k": 5, "top_p": 0.8},
    {"guidance_scale": 1.5, "top_k": 10},
    {"guidance_scale": 0.5, "temperature": 1.3, "top_p": 0.6},
    {"guidance_scale": 1.0, "top_p": 0.9},  # uncond given but ignored
    {"top_k": 1},
    {"top_p": 1e-6, "temperature": 2.0},
]


@pytest.mark.parametrize("kw", SETTINGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "plain")
def test_distribution(device, seed, kw):
    V = 37
    c = (torch.randn(1, V) * 2).to(device)
    u = torch.randn(1, V).to(device)
    c[0, 3] = u[0, 5] = -math.inf  # banned in one branch: never drawn (with guidance)
    if "guidance_scale" not in kw:
        u = None  # no guidance at all; guidance_scale=1.0 passes uncond, which must be ignored
    p = cfg_probs_reference(c, u, **kw)[0].cpu()
    assert chi2_pvalue(draw_many(c, u, 8192, 4, **kw), p) > ALPHA


def test_distribution_ties_bf16(device, seed):
    """Integer-valued bf16 logits: many ties at the top-k and top-p cut-offs (all tied tokens kept)."""
    V = 100
    c = torch.randint(-3, 4, (1, V)).to(torch.bfloat16).to(device)
    u = torch.randint(-3, 4, (1, V)).to(torch.bfloat16).to(device)
    kw = {"guidance_scale": 2.0, "top_k": 7, "top_p": 0.7}
    p = cfg_probs_reference(c, u, **kw)[0].cpu()
    assert chi2_pvalue(draw_many(c, u, 4096, 2, **kw), p) > ALPHA


def test_tie_rule_reference():
    """The documented tie rule, on a hand-checked row: every token tied with the cut-off is kept."""
    z = torch.tensor([[5.0, 4.0, 4.0, 4.0, 1.0, 0.0]])
    assert (cfg_probs_reference(z, top_k=2)[0] > 0).tolist() == [True] * 4 + [False] * 2
    # p(5) = 0.470 < 0.6, so the 4's are needed, and all three come in together
    assert (cfg_probs_reference(z, top_p=0.6)[0] > 0).tolist() == [True] * 4 + [False] * 2
    assert (cfg_probs_reference(z, top_p=0.45)[0] > 0).tolist() == [True] + [False] * 5


def test_tie_rule(device):
    z = torch.tensor([[5.0, 4.0, 4.0, 4.0, 1.0, 0.0]]).expand(256, -1).to(device)
    for kw in ({"top_k": 2}, {"top_p": 0.6}):
        tok = torch.cat([cfg_sample(z, seed=0, offset=o, **kw) for o in range(4)]).cpu()
        assert set(tok.tolist()) == {0, 1, 2, 3}


def test_tiled_kernel_distribution(device, seed, monkeypatch):
    """The long-row (tiled) kernel on a short row, by shrinking its tile: same law as the reference."""
    if device == "cpu" and not interpreted():
        pytest.skip("tiled kernel is Triton-only")
    monkeypatch.setattr(cs, "_MAX_BLOCK", 16)
    monkeypatch.setattr(cs, "_TILE", 16)
    V = 45
    c, u = (torch.randn(1, V) * 2).to(device), torch.randn(1, V).to(device)
    c[0, 40] = -math.inf
    kw = {"guidance_scale": 2.0, "temperature": 0.8, "top_k": 9, "top_p": 0.85}
    p = cfg_probs_reference(c, u, **kw)[0].cpu()
    assert chi2_pvalue(draw_many(c, u, 4096, 2, **kw), p) > ALPHA
    # greedy picks the first maximum even when it sits in a later tile
    z = torch.zeros(2, V, device=device)
    z[:, 20] = z[:, 33] = 1.0
    assert cfg_sample(z, temperature=0).tolist() == [20, 20]


TILED_CASES = [  # (settings, integer-valued logits full of ties)
    ({"top_k": 50}, False),  # the CoT default
    ({"top_k": 50}, True),
    ({"top_p": 0.7}, True),
    ({"guidance_scale": 3.0, "top_k": 40, "top_p": 0.6}, True),
    ({"top_k": 1, "temperature": 0.5}, False),
    ({"guidance_scale": 2.0, "top_p": 0.999}, False),
]


@pytest.mark.parametrize("kw,ties", TILED_CASES,
                         ids=lambda x: ",".join(f"{k}={v}" for k, v in x.items()) if isinstance(x, dict)
                         else ("ties" if x else "distinct"))
def test_tiled_radix_select_equals_block_bisection(device, seed, monkeypatch, kw, ties):
    """The streamed kernel's radix select keeps exactly the block kernel's set: same Philox noise,
    so the same tokens, and log-probs equal to the float64 reference (ties at the cut included)."""
    if device == "cpu" and not interpreted():
        pytest.skip("Triton-only")
    B, V = 12, 200
    if ties:  # integer-valued logits: every cut-off has many tied tokens
        c = torch.randint(-4, 5, (B, V)).float()
        u = torch.randint(-4, 5, (B, V)).float()
    else:
        c, u = torch.randn(B, V) * 3, torch.randn(B, V) * 3
    c[:, 7] = -math.inf
    c, u = c.to(device), u.to(device)
    if "guidance_scale" not in kw:
        u = None
    args = {"seed": seed, "offset": 3, "return_logprobs": True, **kw}
    tok_block, lp_block = cfg_sample(c, u, **args)
    monkeypatch.setattr(cs, "_MAX_BLOCK", 32)
    monkeypatch.setattr(cs, "_TILE", 64)  # 4 tiles of 64, the last one partial
    tok_tiled, lp_tiled = cfg_sample(c, u, **args)
    assert torch.equal(tok_tiled.cpu(), tok_block.cpu())
    ref = cfg_probs_reference(c, u, **kw).cpu().gather(1, tok_tiled.cpu()[:, None]).squeeze(1)
    assert (ref > 0).all()
    torch.testing.assert_close(lp_tiled.cpu().double(), ref.log(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(lp_tiled.cpu(), lp_block.cpu(), atol=1e-5, rtol=1e-5)


def test_radix_constants_cover_the_key_span():
    """The radix select reads the row a constant number of times, 8 passes per threshold, and those
    passes must cover the 31-bit span of score keys (u = key - key(-inf) < 2**31) with 4-bit digits."""
    assert cs._RADIX_BINS == 2 ** cs._RADIX_BITS
    assert cs._RADIX_PASSES == -(-31 // cs._RADIX_BITS) == 8


def test_rows_independent(device, seed):
    """Adjacent identical rows: the joint law of (row 2i, row 2i+1) is the product of marginals."""
    c = torch.tensor([[0.0, 0.5, 1.0]]).expand(1024, -1).contiguous().to(device)
    tok = torch.cat([cfg_sample(c, seed=3, offset=o) for o in range(8)]).cpu()
    p = torch.softmax(torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64), 0)
    assert chi2_pvalue(tok[0::2] * 3 + tok[1::2], torch.outer(p, p).flatten()) > ALPHA
    # a row's draw does not depend on the other rows' logits
    x = torch.randn(6, 50, device=device)
    y = x.clone()
    y[1:] = torch.randn(5, 50, device=device)
    assert cfg_sample(x, seed=5, offset=2)[0] == cfg_sample(y, seed=5, offset=2)[0]


def test_reproducible(device, seed):
    c, u = torch.randn(64, 300, device=device), torch.randn(64, 300, device=device)
    kw = {"guidance_scale": 2.0, "top_p": 0.95}
    a = cfg_sample(c, u, seed=7, offset=3, **kw)
    assert torch.equal(a, cfg_sample(c, u, seed=7, offset=3, **kw))
    assert not torch.equal(a, cfg_sample(c, u, seed=7, offset=4, **kw))
    assert not torch.equal(a, cfg_sample(c, u, seed=8, offset=3, **kw))
    # 0-dim int64 tensors (what a captured CUDA graph advances) act as the same numbers
    t = cfg_sample(c, u, seed=torch.tensor(7, device=device), offset=torch.tensor(3, device=device), **kw)
    assert torch.equal(a, t)
    # offsets beyond 32 bits still change the stream
    assert not torch.equal(cfg_sample(c, seed=7, offset=2**40), cfg_sample(c, seed=7, offset=2**41))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_logprobs_match_reference(device, seed, dtype):
    B, V = 8, 1000
    c = (torch.randn(B, V) * 3).to(dtype).to(device)
    u = (torch.randn(B, V) * 3).to(dtype).to(device)
    c[:, :10] = -math.inf
    for kw in ({}, {"guidance_scale": 4.0, "temperature": 0.6, "top_k": 40, "top_p": 0.9}, {"top_p": 0.3}):
        tok, lp = cfg_sample(c, u, return_logprobs=True, seed=1, offset=2, **kw)
        assert tok.dtype == torch.int64 and lp.dtype == torch.float32 and tok.shape == lp.shape == (B,)
        ref = cfg_probs_reference(c, u, **kw).cpu().gather(1, tok.cpu()[:, None]).squeeze(1)
        assert (ref > 0).all()
        torch.testing.assert_close(lp.cpu().double(), ref.log(), atol=1e-4, rtol=1e-5)


def test_greedy_is_argmax(device, seed):
    c = torch.randn(16, 301, device=device).to(torch.bfloat16)
    u = torch.randn(16, 301, device=device).to(torch.bfloat16)
    c[3, 7] = c[3, 9] = 100.0  # tie: the first index wins
    u[3, 7] = u[3, 9] = 0.0
    g = u.float() + 2.5 * (c.float() - u.float())
    tok, lp = cfg_sample(c, u, guidance_scale=2.5, temperature=0, top_k=3, top_p=0.5, return_logprobs=True)
    assert torch.equal(tok.cpu(), g.argmax(-1).cpu()) and tok[3] == 7
    assert torch.equal(lp.cpu(), torch.zeros(16))


@pytest.mark.filterwarnings("ignore:overflow encountered")  # -3e38 - 3e38 = -inf, in the interpreter
def test_extreme_and_awkward(device, seed):
    # V = 1: the only token, log-prob 0
    tok, lp = cfg_sample(torch.randn(3, 1, device=device), return_logprobs=True)
    assert tok.tolist() == [0, 0, 0] and lp.abs().max() < 1e-6
    # huge logits and tiny temperature do not overflow; only the single finite token is drawable
    c = torch.full((4, 100), -math.inf, device=device)
    c[:, 17] = 3e38
    c[0, 18] = -3e38
    tok, lp = cfg_sample(c, temperature=1e-3, return_logprobs=True)
    assert tok.tolist() == [17] * 4 and lp.abs().max() < 1e-6
    # strided rows (a slice of a wider buffer) are read in place correctly
    wide = torch.randn(5, 400, device=device)
    assert torch.equal(cfg_sample(wide[:, :300], temperature=0), wide[:, :300].argmax(-1))


def test_large_vocab(device, seed):
    """V > 16384 takes the tiled kernel: drawn tokens are in the support with exact log-probs."""
    B, V = 2, 20000
    c, u = torch.randn(B, V, device=device) * 3, torch.randn(B, V, device=device) * 3
    for kw in ({"guidance_scale": 2.0, "top_k": 50, "top_p": 0.9}, {"temperature": 0}):
        tok, lp = cfg_sample(c, u, return_logprobs=True, seed=3, offset=1, **kw)
        ref = cfg_probs_reference(c, u, **kw).cpu().gather(1, tok.cpu()[:, None]).squeeze(1)
        assert (ref > 0).all()
        torch.testing.assert_close(lp.cpu().double(), ref.log(), atol=1e-4, rtol=1e-5)


def test_validation():
    c = torch.randn(2, 10)
    with pytest.raises(ValueError, match="NaN"):
        cfg_sample(torch.where(torch.arange(10) == 4, math.nan, c))
    with pytest.raises(ValueError, match="NaN"):
        cfg_sample(c, c.clone().fill_(math.nan), guidance_scale=2.0)
    with pytest.raises(ValueError, match=r"\+inf"):
        cfg_sample(torch.where(torch.arange(10) == 4, math.inf, c))
    banned = c.clone()
    banned[1, :5] = -math.inf
    u = c.clone()
    u[1, 5:] = -math.inf
    with pytest.raises(ValueError, match="all -inf"):
        cfg_sample(banned, u, guidance_scale=2.0)
    cfg_sample(banned, u, guidance_scale=1.0)  # without guidance uncond is not consulted
    for kwargs, msg in [
        ({"uncond_logits": torch.randn(2, 11)}, "shape"),
        ({"uncond_logits": c.half()}, "must match"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.0}, "top_k"),
        ({"temperature": -0.1}, "temperature"),
        ({"guidance_scale": math.inf}, "guidance_scale"),
        ({"seed": torch.tensor([1])}, "0-dim int64"),
        # issue 15: non-finite reals and non-integral ints are rejected, naming the argument
        ({"guidance_scale": math.nan}, "guidance_scale"),
        ({"guidance_scale": -math.inf}, "guidance_scale"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"top_p": math.nan}, "top_p"),
        ({"top_p": math.inf}, "top_p"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"seed": 1.5}, "seed"),
        ({"seed": 2.0}, "seed"),
        ({"offset": 0.5}, "offset"),
        ({"seed": "7"}, "seed"),
        ({"temperature": "hot"}, "temperature"),
    ]:
        with pytest.raises(ValueError, match=msg):
            cfg_sample(c, **kwargs)
    # integral numpy / 0-dim values are fine and mean the same numbers
    import numpy as np

    a = cfg_sample(c, top_k=np.int64(3), seed=np.int32(4), offset=np.uint8(1), temperature=np.float32(0.5))
    assert torch.equal(a, cfg_sample(c, top_k=3, seed=4, offset=1, temperature=0.5))
    with pytest.raises(ValueError, match=r"\[B, V\]"):
        cfg_sample(torch.randn(10))
    with pytest.raises(ValueError, match="float32"):
        cfg_sample(torch.zeros(2, 10, dtype=torch.int64))


def test_sample_reference(seed):
    """The multinomial reference sampler follows its own distribution and reports its log-probs."""
    c, u = torch.randn(1, 23).expand(2000, -1), torch.randn(1, 23).expand(2000, -1)
    kw = {"guidance_scale": 2.0, "top_k": 12, "top_p": 0.9}
    tok, lp = cs.cfg_sample_reference(c, u, seed=1, offset=2, return_logprobs=True, **kw)
    p = cfg_probs_reference(c[:1], u[:1], **kw)[0]
    assert chi2_pvalue(tok, p) > ALPHA
    torch.testing.assert_close(lp.double(), p[tok].log(), atol=1e-6, rtol=1e-6)


# ---- the torch path's top-k draw on the candidates ------------------------------------------------


def _torch_path(c, u, kw, candidates, seed, keys):
    """(tokens, log-probs) of the torch path, restricted to the top-k candidates or over all V."""
    w = kw.get("guidance_scale", 1.0)
    return cs._cfg_sample_torch(c, u if w != 1.0 else None, w, kw.get("temperature", 1.0), kw["top_k"],
                                kw.get("top_p", 1.0), seed, 5, True, keys, candidates=candidates)


def _random_keys(n, g):
    """n distinct stream keys, negative and beyond 32 bits."""
    return torch.randperm(2**20, generator=g)[:n].long() * 4099 - 2**40


def _count_full_draws(monkeypatch):
    """Rows that went through the full-vocabulary draw (the candidates' tie fallback), counted per call."""
    calls = []
    full = cs._draw_full

    def counted(s, *args):
        calls.append(s.shape[0])
        return full(s, *args)

    monkeypatch.setattr(cs, "_draw_full", counted)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_candidates_draw_the_full_paths_tokens(seed, monkeypatch, dtype):
    """Random rows without ties: the restricted top-k draw takes no fallback and returns the tokens
    the full-vocabulary path returns for the same uniforms, with log-probs of the float64 reference."""
    g = torch.Generator().manual_seed(seed)
    for case in range(24):
        B = (1, 3, 7)[case % 3]
        V = int(torch.randint(2, 3000, (), generator=g)) | 1  # odd: never a power of two
        k = int(torch.randint(1, min(V, 300), (), generator=g))
        scale = (0.3, 3.0, 300.0)[case % 3]  # near-flat to extreme (one token holds all the mass)
        c = torch.randn(B, V, generator=g, dtype=dtype) * scale
        u = torch.randn(B, V, generator=g, dtype=dtype) * scale
        c[:, 0] = -math.inf  # banned in one branch
        kw = {"top_k": k, "temperature": (1.0, 0.6, 2.5)[case % 3]}
        if case % 2:
            kw["guidance_scale"] = 3.0
        if case % 4 >= 2:
            kw["top_p"] = 0.3 + 0.6 * float(torch.rand((), generator=g))
        keys = _random_keys(B, g) if case % 3 else None
        calls = _count_full_draws(monkeypatch)
        monkeypatch.setattr(cs, "_CANDIDATES_MIN_RATIO", 1)  # the candidates for every k < V
        tok, lp = _torch_path(c, u, kw, True, seed + case, keys)
        assert calls == [], "distinct scores: no row needs the full path"
        tok_full, lp_full = _torch_path(c, u, kw, False, seed + case, keys)
        assert torch.equal(tok, tok_full), (case, B, V, kw)
        ref = cfg_probs_reference(c, u, **kw).gather(1, tok[:, None]).squeeze(1)
        assert (ref > 0).all()
        torch.testing.assert_close(lp.double(), ref.log(), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(lp, lp_full, atol=1e-5, rtol=1e-5)


def test_topk_candidates_only_where_they_pay(seed, monkeypatch):
    """The CoT's top-k 50 of the text vocabulary (102400) draws on the candidates; a short row (the
    tiny preset's 264 tokens) keeps the full path, where it is cheaper."""
    calls = _count_full_draws(monkeypatch)
    cfg_sample(torch.randn(2, 102400), top_k=50, seed=seed)
    assert calls == []
    cfg_sample(torch.randn(2, 264), top_k=50, seed=seed)
    assert calls == [2]


def test_topk_candidates_tie_at_the_kth_value(seed, monkeypatch):
    """A tie at the k-th score with a token outside the top-k: that row (only) takes the full path,
    which keeps every tied token; the other rows of the batch still take the candidates."""
    g = torch.Generator().manual_seed(seed)
    B, V, k = 6, 301, 5
    c = torch.randn(B, V, generator=g) * 0.5
    c[1, 10:14] = 4.0  # row 1: top 4 ...
    c[1, [50, 200, 300]] = 3.0  # ... then a 3-way tie at the 5th value: 7 tokens kept
    c[4] = torch.randint(-3, 4, (V,), generator=g).float()  # integer-valued: ties everywhere
    keys = _random_keys(B, g)
    calls = _count_full_draws(monkeypatch)
    tok, lp = _torch_path(c, None, {"top_k": k}, True, seed, keys)
    assert calls == [2]  # rows 1 and 4, in one fallback call
    tok_full, lp_full = _torch_path(c, None, {"top_k": k}, False, seed, keys)
    assert torch.equal(tok, tok_full)
    torch.testing.assert_close(lp, lp_full, atol=1e-5, rtol=1e-5)
    ref = cfg_probs_reference(c, top_k=k).gather(1, tok[:, None]).squeeze(1)
    torch.testing.assert_close(lp.double(), ref.log(), atol=1e-4, rtol=1e-5)
    # row 1 under many keys: each of the 3 tokens tied at the 5th value outside the top-5 is drawn
    n = 512
    drawn = _torch_path(c[1:2].expand(n, -1), None, {"top_k": k}, True, seed, _random_keys(n, g))[0]
    assert {50, 200, 300} <= set(drawn.tolist()) <= {10, 11, 12, 13, 50, 200, 300}


def test_topk_candidates_tie_made_by_rounding(seed, monkeypatch):
    """Distinct logits whose fp32 scores (z - max) / T round to one value: the full path keeps both
    (a tie at the k-th score), so the candidates must detect the tie on the scores, not on z."""
    z = torch.tensor([[1000.0, 5.0, 1.0000001, 1.0, 0.0, -1.0]])
    assert z[0, 2] != z[0, 3] and z[0, 2] - z[0, 0] == z[0, 3] - z[0, 0]  # -999 both
    n = 1024
    keys = _random_keys(n, torch.Generator().manual_seed(seed))
    kw = {"top_k": 3, "temperature": 1000.0}
    monkeypatch.setattr(cs, "_CANDIDATES_MIN_RATIO", 1)  # V = 6: candidates for k = 3 too
    calls = _count_full_draws(monkeypatch)
    tok, lp = _torch_path(z.expand(n, -1), None, kw, True, seed, keys)
    assert calls == [n]
    tok_full, lp_full = _torch_path(z.expand(n, -1), None, kw, False, seed, keys)
    assert torch.equal(tok, tok_full) and set(tok.tolist()) == {0, 1, 2, 3}
    torch.testing.assert_close(lp, lp_full)


def test_inverse_cdf_caps_at_the_last_positive_mass_token(seed):
    """The first token whose float64 cumulative mass exceeds r * total; when r * total reaches the
    total (r = 1 here, by rounding in a real draw) the last token of positive mass, never the
    zero-mass tail (-inf, or a log-prob whose exp underflows to 0)."""
    g = torch.Generator().manual_seed(seed)
    logp = (torch.randn(6, 41, generator=g) * 3).log_softmax(-1)
    logp[:, 30:] = -math.inf
    logp[1, 12:] = -1000.0  # exp underflows to 0 in float32
    logp[2, 25:] = -math.inf
    r = torch.tensor([[1.0], [1.0], [1.0], [0.0], [0.5], [torch.rand((), generator=g, dtype=torch.float64).item()]],
                     dtype=torch.float64)
    tok = cs._inverse_cdf(logp, r)
    cum = logp.exp().double().cumsum(-1)
    first = [int((cum[i] > r[i, 0] * cum[i, -1]).nonzero()[0]) if r[i, 0] < 1 else None for i in range(6)]
    assert tok.tolist() == [29, 11, 24] + first[3:]
