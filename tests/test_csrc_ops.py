"""The three ops of fastbicot._C (and their pure-torch fallbacks) against float64 references."""

import os

import pytest
import torch
import torch.nn.functional as F

from fastbicot import _ext, vq

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _ops(impl, device="cpu"):
    if impl == "torch":
        return vq._TorchOps
    if not _ext.available(device):
        if os.environ.get("FASTBICOT_NO_EXT") == "1" or os.environ.get("FASTBICOT_DISABLE_EXT") == "1":
            pytest.skip("extension deliberately not built/disabled")
        pytest.fail(f"fastbicot._C cannot run on {device}: {_ext.status()} (build it: pip install -e .)")
    return vq._ExtOps


def _ref_group_norm_silu(x, weight, bias, groups, eps, silu):
    n, c = x.shape[:2]
    xd = x.double().reshape(n, groups, -1)
    y = (xd - xd.mean(-1, keepdim=True)) / torch.sqrt(xd.var(-1, unbiased=False, keepdim=True) + eps)
    y = y.reshape(x.shape) * weight.double().view(1, c, 1, 1) + bias.double().view(1, c, 1, 1)
    return y * torch.sigmoid(y) if silu else y


TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (3e-2, 2e-2), torch.float16: (4e-3, 2e-3)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["ext", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "n,c,h,w,groups",
    # the last two: either side of the torch op's CPU size rule (vq._group_norm_via_nchw), 2 channels
    # per group under 1024 pixels (NCHW copy) and 1 per group at 32x33 (channels-last)
    [(1, 15, 5, 3, 5), (2, 7, 1, 1, 7), (3, 12, 4, 6, 1), (1, 96, 9, 7, 32), (2, 33, 2, 17, 11),
     (2, 64, 6, 5, 32), (1, 32, 32, 33, 32)],
)
def test_group_norm_silu(seed, device, impl, dtype, n, c, h, w, groups):
    if impl == "torch" and h * w * c // groups == 1:
        pytest.skip("zero-variance groups: torch's GroupNorm folds the mean into a shift (fp32 cancellation)")
    ops = _ops(impl, device)
    # An offset much larger than the spread checks that the variance does not cancel away.
    x = (torch.randn(n, c, h, w, device=device) * 2 + 20 * torch.rand(1, device=device)).to(dtype)
    if torch.rand(()) < 0.5:
        x = x.contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(c, device=device), torch.randn(c, device=device)
    for silu in (True, False):
        y = ops.group_norm_silu(x, weight, bias, groups, 1e-6, silu)
        ref = _ref_group_norm_silu(x, weight, bias, groups, 1e-6, silu)
        assert y.dtype == dtype and y.shape == x.shape
        assert y.is_contiguous(memory_format=torch.channels_last)
        atol, rtol = TOL[dtype]
        if impl == "torch" and dtype == torch.float32:
            atol, rtol = 1e-4, 1e-4  # torch's own GroupNorm: fp32 statistics, mean folded into a shift
        torch.testing.assert_close(y.double(), ref, atol=atol, rtol=rtol)


def test_group_norm_silu_errors():
    C = _ops("ext")
    x = torch.randn(1, 6, 2, 2)
    with pytest.raises(RuntimeError, match="do not split into 4 groups"):
        C.group_norm_silu(x, torch.ones(6), torch.zeros(6), 4, 1e-6, True)
    with pytest.raises(RuntimeError, match="weight and bias must be"):
        C.group_norm_silu(x, torch.ones(5), torch.zeros(6), 3, 1e-6, True)
    with pytest.raises(RuntimeError, match=r"must be \[N, C, H, W\]"):
        C.group_norm_silu(x[0], torch.ones(6), torch.zeros(6), 3, 1e-6, True)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        C.group_norm_silu(x.double(), torch.ones(6), torch.zeros(6), 3, 1e-6, True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["ext", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_vq_table_and_embed(seed, device, impl, dtype, with_bias):
    ops = _ops(impl, device)
    K, E, C = 37, 5, 11
    emb = torch.randn(K, E, device=device).to(dtype)
    emb[3] = 0  # a zero row: normalize(0) is 0 (eps), not NaN
    conv_w = torch.randn(C, E, 1, 1, device=device).to(dtype)
    conv_b = torch.randn(C, device=device).to(dtype) if with_bias else None
    table = ops.build_table(emb, conv_w, conv_b)
    ref = F.normalize(emb.double(), dim=-1) @ conv_w.double().view(C, E).T
    if with_bias:
        ref = ref + conv_b.double()
    assert table.shape == (K, C) and table.dtype == dtype
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(table.double(), ref, atol=atol * 4, rtol=rtol)

    tokens = torch.randint(0, K, (1, 3, 5), device=device)
    tokens[0, 0, 0], tokens[0, -1, -1], tokens[0, 1, 2] = 0, K - 1, 3
    for ids in (tokens, tokens.int()):
        out = ops.embed(table, ids)
        assert out.shape == (1, C, 3, 5) and out.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(out, table[tokens.long()].permute(0, 3, 1, 2), atol=0, rtol=0)


def test_vq_embed_errors():
    C = _ops("ext")
    table = torch.randn(10, 4)
    for bad in (10, -1):
        tokens = torch.zeros(2, 2, 3, dtype=torch.long)
        tokens[1, 1, 2] = bad
        with pytest.raises(RuntimeError, match=r"token ids must lie in \[0, 10\)"):
            C.embed(table, tokens)
    with pytest.raises(RuntimeError, match=r"tokens must be \[B, h, w\]"):
        C.embed(table, torch.zeros(2, 6, dtype=torch.long))
    with pytest.raises(RuntimeError, match="int64 or int32"):
        C.embed(table, torch.zeros(1, 2, 3))
    with pytest.raises(RuntimeError, match=r"conv_weight must be \[C, 4, 1, 1\]"):
        C.build_table(torch.randn(10, 4), torch.randn(3, 5, 1, 1), None)


def _ref_uint8(x):
    # The documented formula, in fp32, rounded half to even; NHWC.
    v = (x.float() + 1.0) / 2.0 * 255.0
    return torch.round(torch.clamp(v, 0.0, 255.0)).to(torch.uint8).permute(0, 2, 3, 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["ext", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 3, 5, 7), (2, 4, 1, 3)])
def test_to_uint8_image(seed, device, impl, dtype, shape):
    ops = _ops(impl, device)
    x = torch.randn(shape, device=device) * 1.5  # many values outside [-1, 1]
    flat = x.view(-1)
    flat[:4] = torch.tensor([float("inf"), float("-inf"), -1.0, 1.0])
    # exact .5 ties of (x+1)/2*255 in fp32 (k/255*2-1 is not exact, so build them from k+0.5)
    k = torch.randint(0, 255, (4,)).float()
    flat[4:8] = ((k + 0.5) / 255.0 * 2.0 - 1.0).to(device)
    x = x.to(dtype)
    if torch.rand(()) < 0.5:
        x = x.contiguous(memory_format=torch.channels_last)
    out = ops.to_uint8_image(x)
    assert out.dtype == torch.uint8 and out.shape == (shape[0], shape[2], shape[3], shape[1])
    assert out.is_contiguous()
    torch.testing.assert_close(out, _ref_uint8(x), atol=0, rtol=0)
    assert out.permute(0, 3, 1, 2).reshape(-1)[:4].tolist() == [255, 0, 0, 255]
