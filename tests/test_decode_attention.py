"""grouped_decode_attention (and its halves and merge) vs float64 attention over each row's
concatenated [prefix | suffix] KV, on the CPU torch path and on the Triton kernels.

The Triton kernels run on CPU under Triton's interpreter, which triton selects when the kernels
are decorated (at import): without CUDA tests/conftest.py sets TRITON_INTERPRET=1 before any test
module imports the kernel module; if triton was imported earlier without it, the Triton cases run
in a fresh subprocess (test_triton_cases_in_fresh_interpreter). Interpreter shapes are kept small
because the interpreter is slow.
"""

import importlib

import pytest
import torch
from helpers import run_triton_cases_in_fresh_interpreter

from fastbicot.kernels.decode_attention import (
    group_layout,
    grouped_decode_attention,
    grouped_decode_attention_reference,
    merge_attention,
    prefix_attention,
    suffix_attention,
)

mod = importlib.import_module("fastbicot.kernels.decode_attention")
INTERPRETED = mod._interpreted()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_READY = INTERPRETED or DEVICE == "cuda"  # for the kernel_path fixture (conftest.py)


@pytest.fixture
def path(kernel_path):
    """The device of the inputs: 'torch' -> CPU tensors on the torch path; 'triton' -> the kernels
    (CUDA, or the CPU interpreter)."""
    return DEVICE if kernel_path == "triton" else "cpu"


def make_case(B, Hq, Hkv, D, P, Lp, Ls, dtype=torch.float32, device="cpu", q_scale=1.0,
              group_ids=None, prefix_len=None, suffix_len=None):
    """Random inputs; lengths random in [0, capacity] with forced zeros, but no row left empty."""
    q = (torch.randn(B, Hq, D) * q_scale).to(dtype)
    pk, pv = torch.randn(P, Hkv, Lp, D).to(dtype), torch.randn(P, Hkv, Lp, D).to(dtype)
    sk, sv = torch.randn(B, Hkv, Ls, D).to(dtype), torch.randn(B, Hkv, Ls, D).to(dtype)
    gid = torch.randint(0, P, (B,)) if group_ids is None else torch.as_tensor(group_ids)
    plen = torch.randint(0, Lp + 1, (P,)) if prefix_len is None else torch.as_tensor(prefix_len)
    slen = torch.randint(0, Ls + 1, (B,)) if suffix_len is None else torch.as_tensor(suffix_len)
    if prefix_len is None and P > 1:
        plen[torch.randint(0, P, ())] = 0  # an empty prefix
    if suffix_len is None:
        slen[torch.randint(0, B, ())] = 0  # an empty suffix
        empty = plen[gid] + slen == 0
        slen[empty] = torch.randint(1, Ls + 1, (int(empty.sum()),))
    ints = [plen.int(), gid.int(), slen.int()]
    tensors = [q, pk, pv, ints[0], ints[1], sk, sv, ints[2]]
    return [t.to(device) for t in tensors]


def attention_f64(q, pk, pv, plen, gid, sk, sv, slen, scale=None):
    """Plain attention in float64, row by row and head by head over the concatenated valid KV.
    Returns (out [B, Hq, D], lse [B, Hq]); an empty key set gives out 0 and lse -inf."""
    B, Hq, D = q.shape
    r = Hq // pk.shape[1]
    scale = D ** -0.5 if scale is None else scale
    out = torch.zeros(B, Hq, D, dtype=torch.float64)
    lse = torch.full((B, Hq), float("-inf"), dtype=torch.float64)
    q, pk, pv, sk, sv = (t.detach().cpu().double() for t in (q, pk, pv, sk, sv))
    for b in range(B):
        g, lp, ls = int(gid[b]), int(plen[int(gid[b])]), int(slen[b])
        for h in range(Hq):
            k = torch.cat([pk[g, h // r, :lp], sk[b, h // r, :ls]])
            v = torch.cat([pv[g, h // r, :lp], sv[b, h // r, :ls]])
            if k.shape[0] == 0:
                continue
            s = k @ q[b, h] * scale
            lse[b, h] = torch.logsumexp(s, 0)
            out[b, h] = torch.softmax(s, 0) @ v
    return out, lse


def assert_close(actual, expected, dtype, atol=None):
    atol = atol if atol is not None else (2e-2 if dtype == torch.bfloat16 else 1e-4)
    torch.testing.assert_close(actual.detach().cpu().double(), expected, atol=atol, rtol=atol)


# (B, Hq, Hkv, D, P, Lp, Ls, num_splits): odd lengths, GQA 2, several prefix splits
TRITON_SHAPES = [
    (7, 2, 2, 16, 3, 70, 37, None),
    (6, 4, 2, 32, 2, 150, 19, 3),
    (5, 2, 1, 64, 2, 33, 65, None),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=str)
def test_matches_float64(path, shape, dtype, seed):
    B, Hq, Hkv, D, P, Lp, Ls, splits = shape
    case = make_case(B, Hq, Hkv, D, P, Lp, Ls, dtype, device=path)
    out = grouped_decode_attention(*case, num_splits=splits)
    assert out.dtype == dtype and out.shape == (B, Hq, D) and out.device.type == path
    assert_close(out, attention_f64(*case)[0], dtype)


@pytest.mark.parametrize("D", [16, 32, 64, 128])
@pytest.mark.parametrize("gqa", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_path_head_dims(D, gqa, dtype, seed, monkeypatch):
    monkeypatch.setenv("FASTBICOT_FORCE_TRITON", "0")
    case = make_case(9, 2 * gqa, 2, D, 4, 53, 29, dtype)
    scale = 0.37
    assert_close(grouped_decode_attention(*case, scale=scale), attention_f64(*case, scale=scale)[0], dtype)


def test_big_group_and_singletons(path, seed):
    """One group larger than the kernel's 64-query tile (chunk loop), plus groups of one row."""
    B, P = 37, 3
    gid = [0] * 35 + [1, 2]
    case = make_case(B, 4, 2, 16, P, 45, 9, device=path, group_ids=gid)
    assert_close(grouped_decode_attention(*case), attention_f64(*case)[0], torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_logits(path, dtype, seed):
    """Large query norms: logits of several hundred, softmax nearly one-hot."""
    case = make_case(6, 2, 2, 32, 2, 40, 21, dtype, device=path, q_scale=60.0)
    expected, lse = attention_f64(*case)
    assert lse[lse.isfinite()].abs().max() > 100  # the case really is extreme
    atol = 2e-2 if dtype == torch.bfloat16 else 2e-3  # fp32: |logit| ~ 1e3 carries ~1e-4 rounding
    assert_close(grouped_decode_attention(*case), expected, dtype, atol=atol)


def test_halves_and_merge(path, seed):
    """prefix_attention / suffix_attention each equal attention over their own key set (lse too),
    and merge_attention of the two equals attention over the union."""
    case = make_case(7, 4, 2, 16, 3, 38, 27, device=path)
    q, pk, pv, plen, gid, sk, sv, slen = case
    no_prefix = torch.zeros_like(plen)
    no_suffix = torch.zeros_like(slen)
    o1, lse1 = prefix_attention(q, pk, pv, plen, gid, num_splits=2)
    o2, lse2 = suffix_attention(q, sk, sv, slen)
    e1, el1 = attention_f64(q, pk, pv, plen, gid, sk, sv, no_suffix)
    e2, el2 = attention_f64(q, pk, pv, no_prefix, gid, sk, sv, slen)
    for o, lse, e, el in [(o1, lse1, e1, el1), (o2, lse2, e2, el2)]:
        assert o.dtype == lse.dtype == torch.float32
        assert_close(o, e, torch.float32)
        assert torch.equal(lse.cpu().isinf(), el.isinf())  # -inf exactly where the set is empty
        assert_close(lse.nan_to_num(neginf=0.0), el.nan_to_num(neginf=0.0), torch.float32)
    out, lse = merge_attention(o1, lse1, o2, lse2)
    expected, expected_lse = attention_f64(*case)
    assert_close(out, expected, torch.float32)
    assert_close(lse, expected_lse, torch.float32)


def test_merge_of_random_partitions(seed):
    """merge_attention over a random split of one key set, with empty sides, vs float64."""
    N, L, D = 12, 17, 8
    q = torch.randn(N, D, dtype=torch.float64)
    k, v = torch.randn(N, L, D, dtype=torch.float64), torch.randn(N, L, D, dtype=torch.float64)
    s = torch.einsum("nd,nld->nl", q, k)
    side = torch.rand(N, L) < 0.5
    side[0], side[1] = True, False  # rows whose whole key set lies on one side
    parts = []
    for mask in (side, ~side):
        sm = s.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(sm, 1)
        parts += [torch.einsum("nl,nld->nd", torch.softmax(sm, 1).nan_to_num(0.0), v), lse]
    out, lse = merge_attention(*parts)
    torch.testing.assert_close(out, torch.einsum("nl,nld->nd", torch.softmax(s, 1), v))
    torch.testing.assert_close(lse, torch.logsumexp(s, 1))
    # both sides empty -> out 0, lse -inf (and a NaN out of an empty side is ignored)
    e = torch.full((3,), float("-inf"))
    out, lse = merge_attention(torch.full((3, D), float("nan")), e, torch.zeros(3, D), e)
    assert torch.equal(out, torch.zeros(3, D)) and torch.equal(lse, e)


def test_rows_with_nothing_to_attend_output_zero(path, seed):
    case = make_case(4, 2, 2, 16, 2, 20, 10, device=path, group_ids=[0, 1, 1, 0],
                     prefix_len=[0, 13], suffix_len=[0, 0, 4, 7])
    out = grouped_decode_attention(*case)
    assert torch.equal(out[0].cpu(), torch.zeros_like(out[0].cpu()))
    assert_close(out, attention_f64(*case)[0], torch.float32)
    assert torch.equal(grouped_decode_attention_reference(*[t.cpu() for t in case])[0], torch.zeros(2, 16))


@pytest.mark.filterwarnings("ignore:All-NaN slice")  # the interpreter's max over a NaN row
def test_nan_inputs_give_nan_rows(path, seed):
    """Issue 15: NaN in a row's q, or in a valid k/v slot the row reads, makes that row's output NaN
    (never 0) on every path and in the reference; NaN in slots past the lengths changes nothing."""
    B, Hq, Hkv, D, P, Lp, Ls = 8, 4, 2, 16, 3, 30, 20
    gid = [0, 0, 1, 1, 1, 2, 2, 0]
    case = make_case(B, Hq, Hkv, D, P, Lp, Ls, group_ids=gid, prefix_len=[12, 25, 0],
                     suffix_len=[3, 5, 0, 7, 20, 1, 9, 4])
    q, pk, pv, plen, g, sk, sv, slen = case
    # garbage past the lengths: an uninitialised cache
    pk[0, :, 12:] = float("nan")
    pv[1, :, 25:] = float("nan")
    pv[2] = float("nan")  # prefix 2 is empty
    sk[0, :, 3:] = float("nan")
    sv[2] = float("nan")  # row 2 has no suffix
    clean = attention_f64(q, pk, pv, plen, g, sk, sv, slen)[0]
    assert not clean.isnan().any()
    q[1, 2, 5] = float("nan")  # row 1: one head of q
    sk[3, 1, 6] = float("nan")  # row 3: a valid suffix key (kv head 1 -> q heads 2, 3)
    sv[5, 0, 0] = float("nan")  # row 5: a valid suffix value (kv head 0 -> q heads 0, 1)
    pv[0, 0, 11] = float("nan")  # prefix 0 (rows 0, 1, 7): a valid prefix value of kv head 0
    nan_heads = {(1, 2), (3, 2), (3, 3), (5, 0), (5, 1), (0, 0), (0, 1), (1, 0), (1, 1), (7, 0), (7, 1)}
    expect = torch.zeros(B, Hq, dtype=torch.bool)
    for b, h in nan_heads:
        expect[b, h] = True
    case = [t.to(path) for t in (q, pk, pv, plen, g, sk, sv, slen)]
    outs = {"dispatch": grouped_decode_attention(*case), "reference": grouped_decode_attention_reference(*case)}
    o1, l1 = prefix_attention(*case[:5])
    o2, l2 = suffix_attention(case[0], *case[5:])
    outs["merge"] = merge_attention(o1, l1, o2, l2)[0]
    for name, out in outs.items():
        nan = out.isnan().any(-1).cpu()
        assert torch.equal(nan, expect), f"{name}: NaN heads {nan.nonzero().tolist()}"
        ok = ~expect
        torch.testing.assert_close(out.cpu().double()[ok], clean[ok], atol=1e-4, rtol=1e-4, msg=name)


def test_precomputed_layout_and_strided_inputs(path, seed):
    """rows_by_group from group_layout gives the same result; non-contiguous q / KV views work."""
    B, Hq, Hkv, D, P, Lp, Ls = 6, 2, 2, 16, 3, 25, 18
    q, pk, pv, plen, gid, sk, sv, slen = make_case(B, Hq, Hkv, D, P, Lp, Ls, device=path)
    q = q.transpose(0, 1).contiguous().transpose(0, 1)  # [B, Hq, D] view with stride(0) = D
    kv = torch.stack([pk, pv], dim=1)  # the rollout's [P, 2, H, L, D] layout: k and v are views
    pk, pv = kv[:, 0], kv[:, 1]
    sk = torch.cat([sk, sk], dim=-1)[..., :D]  # stride(2) = 2 D
    layout = group_layout(gid, P)
    rows, starts = layout
    assert torch.equal(gid[rows.long()].cpu(), gid.sort(stable=True).values.cpu())
    for p in range(P):
        assert int(starts[p + 1] - starts[p]) == int((gid == p).sum())
    args = (q, pk, pv, plen, gid, sk, sv, slen)
    out = grouped_decode_attention(*args, rows_by_group=layout)
    assert torch.equal(out, grouped_decode_attention(*args))
    assert_close(out, attention_f64(*args)[0], torch.float32)


def test_reference_matches_float64(seed):
    case = make_case(8, 4, 2, 16, 3, 31, 12)
    assert_close(grouped_decode_attention_reference(*case), attention_f64(*case)[0], torch.float32)


def test_bad_inputs_raise_clear_errors(monkeypatch):
    monkeypatch.setenv("FASTBICOT_FORCE_TRITON", "0")
    q, pk, pv, plen, gid, sk, sv, slen = make_case(4, 4, 2, 16, 2, 8, 6)
    ok = {"q": q, "prefix_k": pk, "prefix_v": pv, "prefix_len": plen, "group_ids": gid, "suffix_k": sk,
          "suffix_v": sv, "suffix_len": slen}

    def call(**changes):
        return grouped_decode_attention(**{**ok, **changes})

    with pytest.raises(ValueError, match="q must be"):
        call(q=q[0])
    with pytest.raises(ValueError, match="multiple"):
        call(q=torch.randn(4, 3, 16))
    with pytest.raises(ValueError, match="head dim"):
        call(q=torch.randn(4, 4, 32))
    with pytest.raises(ValueError, match="dtype"):
        call(prefix_k=pk.bfloat16(), prefix_v=pv.bfloat16())
    with pytest.raises(ValueError, match="prefix_len"):
        call(prefix_len=plen.float())
    with pytest.raises(ValueError, match=r"prefix_len \(prefix capacity 8\) must lie"):
        call(prefix_len=torch.tensor([9, 0], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"suffix_len .* must lie"):
        call(suffix_len=torch.tensor([-1, 0, 0, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"group_ids \(2 prefixes\) must lie"):
        call(group_ids=torch.tensor([0, 1, 2, 0], dtype=torch.int32))
    with pytest.raises(ValueError, match="suffix_k has"):
        call(suffix_k=sk[:3], suffix_v=sv[:3])
    with pytest.raises(ValueError, match="rows_by_group"):
        call(rows_by_group=(gid[:2], torch.zeros(3, dtype=torch.int32)))


def test_triton_cases_in_fresh_interpreter():
    if INTERPRETED or DEVICE == "cuda":
        pytest.skip("the Triton cases ran in this process")
    run_triton_cases_in_fresh_interpreter(__file__)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [33, 96])
def test_cuda_head_dim_128_many_rows(dtype, rows, seed):
    """Issue 14: the prefix kernel's tuned configs (bf16: BLOCK_M 64, _PREFIX_NUM_STAGES_16BIT
    stages; fp32: BLOCK_M 16, 8 warps, 1 stage) at head dim 128 with >= 33 query rows on one prefix
    (so BLOCK_M is 64 for bf16 and fp32 loops over 16-row chunks), GQA 2, odd lengths."""
    gid = [0] * (rows - 3) + [1, 1, 2]
    case = make_case(rows, 8, 4, 128, 3, 517, 77, dtype, device="cuda", group_ids=gid)
    assert_close(grouped_decode_attention(*case), attention_f64(*case)[0], dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_real_shapes(dtype, seed):
    """Janus-Pro-1B-like step: 16 heads x 128 dims, 8 groups of 8 cond rows + 64 uncond rows on one
    shared prefix; long prefixes (split-K) and suffixes of several tiles."""
    gid = [g for g in range(8) for _ in range(8)] + [8] * 64
    case = make_case(128, 16, 16, 128, 9, 700, 300, dtype, device="cuda", group_ids=gid)
    assert_close(grouped_decode_attention(*case), attention_f64(*case)[0], dtype)
