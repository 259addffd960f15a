"""fastbicot.vq_decode against transformers' JanusVQVAE.decode (random weights, both paths)."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import JanusVQVAE, JanusVQVAEConfig

import fastbicot
from fastbicot import _ext, vq

# Tiny configs of the real architecture: GroupNorm(32) over 32, 64, 96 channels gives 1, 2 and 3
# (odd) channels per group; channel changes exercise nin_shortcut; odd codebook sizes.
TINY = {
    "c32x2": {
        "base_channels": 32,
        "channel_multiplier": [1, 2],
        "num_res_blocks": 1,
        "num_embeddings": 97,
        "embed_dim": 8,
        "latent_channels": 64,
        "num_patches": 5,
    },
    "c32x3": {
        "base_channels": 32,
        "channel_multiplier": [1, 3, 1],
        "num_res_blocks": 2,
        "num_embeddings": 33,
        "embed_dim": 5,
        "latent_channels": 48,
        "num_patches": 3,
    },
}
PATHS = ["ext", "torch"]
# Channels-last convolutions sum in a different order than HF's NCHW ones; through ~20 layers of
# random weights that moves outputs of magnitude ~1 by up to ~1e-4.
FP32_TOL = {"atol": 3e-4, "rtol": 1e-3}


def _use_extension(path):
    if path == "torch":
        return False
    if not _ext.available("cpu"):
        if os.environ.get("FASTBICOT_NO_EXT") == "1" or os.environ.get("FASTBICOT_DISABLE_EXT") == "1":
            pytest.skip("extension deliberately not built/disabled")
        pytest.fail(f"fastbicot._C not loaded: {_ext.status()} (build it: pip install -e .)")
    return True


def _model(seed, device="cpu", **cfg):
    torch.manual_seed(seed)
    model = JanusVQVAE(JanusVQVAEConfig(**cfg)).eval().to(device)
    # HF zero-initialises nothing here that matters, but make biases/affines non-trivial anyway.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def _ref_uint8(x):
    return ((x.float() + 1) / 2 * 255).clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1)


def _assert_uint8_close(out, ref):
    # Pixels may differ by one where the float images straddle a rounding boundary.
    diff = (out.int() - ref.int()).abs()
    assert out.dtype == torch.uint8 and out.shape == ref.shape
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize("batch", [1, 3])
def test_matches_hf_decode_tiny(seed, path, name, batch):
    use_ext = _use_extension(path)
    model = _model(seed, **TINY[name])
    k, n = model.config.num_embeddings, model.config.num_patches
    tokens = torch.randint(0, k, (batch, n * n))
    tokens[0, 0], tokens[-1, -1] = 0, k - 1
    with torch.no_grad():
        ref = model.decode(tokens)
    out = fastbicot.vq_decode(model, tokens, use_extension=use_ext)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, **FP32_TOL)
    _assert_uint8_close(
        fastbicot.vq_decode(model, tokens.int(), output="uint8", use_extension=use_ext), _ref_uint8(ref)
    )


@pytest.mark.parametrize("path", PATHS)
def test_non_square_latents(seed, path):
    use_ext = _use_extension(path)
    model = _model(seed, **TINY["c32x2"])
    tokens = torch.randint(0, model.config.num_embeddings, (2, 3, 7))
    with torch.no_grad():  # HF's decode only takes its square grid: run its pieces by hand
        entry = F.normalize(model.quantize.embedding(tokens), dim=-1).permute(0, 3, 1, 2)
        ref = model.decoder(model.post_quant_conv(entry))
    torch.testing.assert_close(vq.vq_decode(model, tokens, use_extension=use_ext), ref, **FP32_TOL)


@pytest.mark.parametrize("path,grid", [("ext", 24), ("torch", 6)])
def test_real_janus_config(seed, path, grid):
    """The real VQ-16 (128..512 channels, 16384x8 codebook): Janus-Pro's 24x24 grid -> 384 px on the
    extension path (~570 GFLOP, the slowest test here), a 6x6 grid on the fallback path."""
    use_ext = _use_extension(path)
    model = _model(seed, num_patches=grid)
    assert model.config.num_embeddings == 16384 and model.config.embed_dim == 8
    tokens = torch.randint(0, 16384, (1, grid * grid))
    with torch.no_grad():
        ref = model.decode(tokens)
    assert ref.shape == (1, 3, 16 * grid, 16 * grid)
    out = fastbicot.vq_decode(model, tokens, use_extension=use_ext)
    torch.testing.assert_close(out, ref, atol=2e-4 * ref.abs().max().item(), rtol=1e-3)
    ops = vq._ExtOps if use_ext else vq._TorchOps
    _assert_uint8_close(ops.to_uint8_image(out), _ref_uint8(ref))


@pytest.mark.parametrize("path", PATHS)
def test_bfloat16_model(seed, path):
    use_ext = _use_extension(path)
    model = _model(seed, **TINY["c32x2"]).to(torch.bfloat16)
    tokens = torch.randint(0, model.config.num_embeddings, (2, 25))
    with torch.no_grad():
        hf_bf16 = model.decode(tokens).float()
        exact = model.float().decode(tokens)  # the same (bf16-rounded) weights in fp32
    model.to(torch.bfloat16)
    out = fastbicot.vq_decode(model, tokens, use_extension=use_ext)
    assert out.dtype == torch.bfloat16
    # No worse than HF's own bf16 decode, with slack for the different rounding points.
    assert (out.float() - exact).abs().max() <= 3 * (hf_bf16 - exact).abs().max() + 1e-3


@pytest.mark.parametrize("path", PATHS)
def test_table_refreshes_when_weights_change(seed, path):
    use_ext = _use_extension(path)
    model = _model(seed, **TINY["c32x2"])
    tokens = torch.randint(0, model.config.num_embeddings, (1, 25))
    first = fastbicot.vq_decode(model, tokens, use_extension=use_ext)
    with torch.no_grad():
        model.quantize.embedding.weight.add_(
            torch.randn_like(model.quantize.embedding.weight)
        )  # in place: _version
        new_ref = model.decode(tokens)
    assert not torch.allclose(first, new_ref, atol=1e-3)
    torch.testing.assert_close(fastbicot.vq_decode(model, tokens, use_extension=use_ext), new_ref, **FP32_TOL)
    model.post_quant_conv.weight.data = torch.randn_like(
        model.post_quant_conv.weight
    )  # new storage: data_ptr
    with torch.no_grad():
        new_ref = model.decode(tokens)
    torch.testing.assert_close(fastbicot.vq_decode(model, tokens, use_extension=use_ext), new_ref, **FP32_TOL)


@pytest.mark.parametrize("path", PATHS)
def test_bad_input_errors(seed, path):
    use_ext = _use_extension(path)
    model = _model(seed, **TINY["c32x3"])  # 33 codes, 3x3 grid
    good = torch.randint(0, 33, (2, 9))
    for bad_id in (33, -1):
        bad = good.clone()
        bad[1, 4] = bad_id
        with pytest.raises(ValueError, match=r"must lie in \[0, 33\)"):
            fastbicot.vq_decode(model, bad, use_extension=use_ext)
    with pytest.raises(ValueError, match=r"\[batch, 9\] \(a 3x3 latent grid\)"):
        fastbicot.vq_decode(model, torch.zeros(2, 10, dtype=torch.long), use_extension=use_ext)
    with pytest.raises(ValueError, match=r"\[batch, h\*w\] or \[batch, h, w\]"):
        fastbicot.vq_decode(model, torch.zeros(9, dtype=torch.long), use_extension=use_ext)
    with pytest.raises(ValueError, match="empty"):
        fastbicot.vq_decode(model, torch.zeros(0, 9, dtype=torch.long), use_extension=use_ext)
    with pytest.raises(TypeError, match="int64 or int32"):
        fastbicot.vq_decode(model, good.float(), use_extension=use_ext)
    with pytest.raises(ValueError, match="output must be 'float' or 'uint8'"):
        fastbicot.vq_decode(model, good, output="png", use_extension=use_ext)
    with pytest.raises(TypeError, match="JanusVQVAE"):
        fastbicot.vq_decode(torch.nn.Linear(2, 2), good, use_extension=use_ext)


@pytest.mark.parametrize("path", PATHS)
def test_group_norm_size_rule_both_branches(seed, path, monkeypatch):
    """vq._group_norm_via_nchw (CPU): a decoder with norms on both sides of the rule (8x8 and 16x16
    x 128 channels: 4 per group, channels-last; 16x16 x 64: 2 per group, via NCHW; 32x32: 1024
    pixels, channels-last) decodes to the float64 HF decode."""
    use_ext = _use_extension(path)
    cfg = dict(TINY["c32x2"], channel_multiplier=[1, 2, 4], num_res_blocks=2, num_patches=8)
    model = _model(seed, **cfg)
    taken = {}
    rule = vq._group_norm_via_nchw

    def recording_rule(x, groups):
        via_nchw = rule(x, groups)
        taken.setdefault((x.shape[1], x.shape[2]), set()).add(via_nchw)
        return via_nchw

    monkeypatch.setattr(vq, "_group_norm_via_nchw", recording_rule)
    tokens = torch.randint(0, model.config.num_embeddings, (3, 64))
    out = fastbicot.vq_decode(model, tokens, use_extension=use_ext)
    # (channels, side) -> branches taken; each level's first block still has the previous level's width
    assert taken == {(128, 8): {False}, (128, 16): {False}, (64, 16): {True}, (64, 32): {False}, (32, 32): {False}}
    with torch.no_grad():
        ref = model.double().decode(tokens)
    torch.testing.assert_close(out.double(), ref, **FP32_TOL)


def test_fallback_selection(monkeypatch):
    if _ext.available("cpu"):  # on CPU: the extension's table/gather with torch's GroupNorm and uint8 ops
        assert vq._select_ops(torch.device("cpu"), None) is vq._ExtCpuOps
        assert vq._ExtCpuOps.group_norm_silu is vq.group_norm_silu_torch
    monkeypatch.setattr(_ext, "_C", None)
    assert vq._select_ops(torch.device("cpu"), None) is vq._TorchOps
    with pytest.raises(RuntimeError, match="cannot run on cpu"):
        vq._select_ops(torch.device("cpu"), True)


def test_missing_extension_warns_once_and_falls_back():
    code = (
        "import sys, warnings\n"
        "sys.modules['fastbicot._C'] = None  # makes `from fastbicot import _C` raise ImportError\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import fastbicot.vq, fastbicot._ext\n"
        "    import fastbicot.vq\n"
        "msgs = [str(w.message) for w in caught if 'fastbicot._C is not available' in str(w.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "assert fastbicot._ext.status()['extension'] is False\n"
        "assert fastbicot.vq._select_ops(__import__('torch').device('cpu'), None) is fastbicot.vq._TorchOps\n"
        "print('ok')\n"
    )
    env = dict(os.environ)
    env.pop("FASTBICOT_DISABLE_EXT", None)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_hf_decode_cuda(seed, dtype):
    assert _ext.available("cuda"), f"CUDA kernels not built: {_ext.status()}"
    model = _model(seed, device="cuda", num_patches=24).to(dtype)
    tokens = torch.randint(0, 16384, (2, 576), device="cuda")
    with torch.no_grad():
        exact = model.float().decode(tokens)
        model.to(dtype)
        hf = model.decode(tokens).float()
    out = fastbicot.vq_decode(model, tokens, use_extension=True)
    assert out.shape == (2, 3, 384, 384) and out.dtype == dtype
    assert (out.float() - exact).abs().max() <= 3 * (hf - exact).abs().max() + 1e-3
    _assert_uint8_close(
        fastbicot.vq_decode(model, tokens, output="uint8", use_extension=True), _ref_uint8(out)
    )
