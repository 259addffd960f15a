"""fastbicot._C.decode_step_cpu (the CPU image-decode step in one C++ call) against a float64
torch reference written here, against transformers' trunk run row by row, and end to end."""

import pytest
import torch
from helpers import random_policy

from fastbicot import _ext
from fastbicot.rollout import generate_images
from fastbicot.rollout.cpu_decode import FusedWeights
from fastbicot.rollout.kv_cache import KVCache
from fastbicot.rollout.trunk import Trunk

pytestmark = [pytest.mark.skipif(not _ext.available("cpu"), reason="fastbicot._C not built"),
              pytest.mark.usefixtures("one_thread")]


def rope(x, cos, sin):
    h = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., h:], x[..., :h]], -1) * sin


def rms(x, eps):
    xf = x.float()  # transformers normalises in fp32 whatever the dtype
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def reference_step(x, w_in, w_o, w_gu, w_down, nw, kv, pos, cos_sin, eps):
    """The op's contract in plain torch, computed in float64 on copies (kv updated like the op)."""
    n, D = x.shape[0], kv.shape[-1]
    H = kv.shape[3]
    x, cs = x.double(), cos_sin.double()
    cos, sin = cs[:, None, :D], cs[:, None, D:]
    for layer in range(len(w_in)):
        y = rms(x, eps).double() @ w_in[layer].double().t()
        q, k, v = (t.view(n, H, D) for t in y.split(H * D, dim=1))
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        rows = torch.arange(n)
        kv[layer, 0, rows, :, pos] = k.to(kv.dtype)
        kv[layer, 1, rows, :, pos] = v.to(kv.dtype)
        o = torch.empty(n, H, D, dtype=torch.float64)
        for r in range(n):
            K = kv[layer, 0, r, :, : pos[r] + 1].double()  # [H, len, D]
            V = kv[layer, 1, r, :, : pos[r] + 1].double()
            o[r] = torch.softmax(torch.einsum("hd,hld->hl", q[r], K), -1)[:, None].matmul(V)[:, 0]
        x = x + o.reshape(n, -1) @ w_o[layer].double().t()
        gu = rms(x, eps).double() @ w_gu[layer].double().t()
        g, u = gu.chunk(2, dim=1)
        x = x + (torch.nn.functional.silu(g) * u) @ w_down[layer].double().t()
    return nw.double() * rms(x, eps).double()


def random_inputs(n, hidden, H, D, F, layers, slots, dtype, scale=1.0, gen=None):
    def r(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * s).to(dtype)

    w_in = [r(3 * H * D, hidden, s=scale / hidden**0.5) for _ in range(layers)]
    w_o = [r(hidden, H * D, s=1 / (H * D) ** 0.5) for _ in range(layers)]
    w_gu = [r(2 * F, hidden, s=1 / hidden**0.5) for _ in range(layers)]
    w_down = [r(hidden, F, s=1 / F**0.5) for _ in range(layers)]
    kv = r(layers, 2, n + 2, H, slots, D)  # 2 spare rows: the op must only touch rows [0, n)
    pos = torch.randint(0, slots, (n,), generator=gen)
    pos[0] = 0  # a row that sees only its own token
    ang = torch.rand(n, D // 2, generator=gen, dtype=torch.float64) * 6.3
    ang = torch.cat([ang, ang], -1)
    cos_sin = torch.cat([ang.cos(), ang.sin()], -1).to(dtype)
    return r(n, hidden, s=3.0), w_in, w_o, w_gu, w_down, r(hidden), kv, pos, cos_sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "n,hidden,H,D,F,layers",
    [(1, 16, 1, 16, 24, 1), (7, 40, 5, 8, 70, 2), (5, 48, 3, 16, 33, 3), (3, 64, 2, 32, 96, 1), (2, 36, 3, 12, 50, 2)],
)
def test_op_matches_float64_reference(seed, dtype, n, hidden, H, D, F, layers):
    gen = torch.Generator().manual_seed(seed)
    for scale in (1.0, 40.0):  # 40: attention logits in the hundreds (near one-hot softmax)
        x, w_in, w_o, w_gu, w_down, nw, kv, pos, cs = random_inputs(n, hidden, H, D, F, layers, 23, dtype, scale, gen)
        kv_ref = kv.clone()
        got = _ext._C.decode_step_cpu(x, w_in, w_o, w_gu, w_down, nw, kv, pos, cs, 1e-6)
        want = reference_step(x, w_in, w_o, w_gu, w_down, nw, kv_ref, pos, cs, 1e-6)
        # float64: the RMSNorm runs in fp32 (as in transformers), summed in another order than
        # torch's, so float64 results agree to fp32 rounding of the normed values -- amplified
        # 40x into the attention logits in the extreme case, and again by each layer that reads
        # the one before (1800 seeds x 3 multi-layer shapes at scale 40: worst 0.56 of this bound;
        # without the layer factor 0.2 % of them failed, at up to 1.7x)
        tol = 1e-5 * layers if dtype == torch.float64 else 1e-4
        tol = dict(rtol=tol * scale, atol=tol * scale)
        assert got.dtype == dtype and got.shape == (n, hidden)
        torch.testing.assert_close(got.double(), want, **tol)
        torch.testing.assert_close(kv.double(), kv_ref.double(), **tol)  # K/V written, spare rows untouched


def test_op_rejects_bad_input():
    x, w_in, w_o, w_gu, w_down, nw, kv, pos, cs = random_inputs(3, 16, 2, 8, 20, 1, 9, torch.float32)
    C = _ext._C
    with pytest.raises(RuntimeError, match="float32 or float64"):
        C.decode_step_cpu(x.half(), w_in, w_o, w_gu, w_down, nw, kv, pos, cs, 1e-6)
    with pytest.raises(RuntimeError, match="outside the cache"):
        C.decode_step_cpu(x, w_in, w_o, w_gu, w_down, nw, kv, pos + 9, cs, 1e-6)
    with pytest.raises(RuntimeError, match="w_in must be"):
        C.decode_step_cpu(x, [w_in[0][1:]], w_o, w_gu, w_down, nw, kv, pos, cs, 1e-6)
    with pytest.raises(RuntimeError, match="dtype"):
        C.decode_step_cpu(x, [w_in[0].double()], w_o, w_gu, w_down, nw, kv, pos, cs, 1e-6)
    with pytest.raises(RuntimeError, match="kv must be"):
        C.decode_step_cpu(x, w_in, w_o, w_gu, w_down, nw, kv[:, :, :, :, :4], pos, cs, 1e-6)
    with pytest.raises(RuntimeError, match="one w_in, w_o, w_gu, w_down per layer"):
        C.decode_step_cpu(x, w_in, w_o, w_gu, [], nw, kv, pos, cs, 1e-6)


def test_trunk_native_step_matches_hf_rows_alone(seed):
    """Rows of different lengths in one flattened cache; each step equals transformers' trunk on
    that row alone, and the Python twin (FusedWeights.flat) agrees."""
    policy = random_policy(48, 2, 3, seed=seed, dtype=torch.float64, scale=1.0)
    trunk = Trunk(policy, 64)
    trunk.fuse_weights()
    assert trunk.fused.native_ok()
    lens, steps = [1, 9, 4, 6], 4
    seqs = [torch.randn(n + steps, policy.hidden_size, dtype=torch.float64) for n in lens]
    cache = KVCache(
        policy.num_layers, policy.num_heads, policy.head_dim, num_prefixes=1, prefix_capacity=1,
        num_rows=len(lens), suffix_capacity=max(lens) + steps, dtype=torch.float64, device="cpu",
    )  # fmt: skip
    for b, (n, s) in enumerate(zip(lens, seqs)):
        trunk.prefill(s[None, :n], torch.arange(n)[None], kv_out=(cache.suffix_kv, torch.tensor([b])))
    twin = cache.suffix_kv.clone()
    lens_t = torch.tensor(lens)
    for t in range(steps):
        pos = lens_t + t
        x = torch.stack([s[n + t] for n, s in zip(lens, seqs)])
        out = trunk.fused.native(x, cache, pos, trunk.cos_sin[pos])
        for b, (n, s) in enumerate(zip(lens, seqs)):
            ref = policy.trunk(s[None, : n + t + 1], position_ids=torch.arange(n + t + 1)[None])[0][0, -1]
            torch.testing.assert_close(out[b], ref, rtol=1e-6, atol=1e-6)  # RMSNorm in fp32, own sum order
        # the Python twin on its own copy of the cache
        R, H, Ls = len(lens), policy.num_heads, cache.suffix_capacity
        kv_t, row, head = torch.meshgrid(torch.arange(2), torch.arange(R), torch.arange(H), indexing="ij")
        widx = (((kv_t * R + row) * H + head) * Ls + pos[None, :, None]).reshape(-1)
        ls = int(pos.max()) + 1
        hidden = torch.arange(ls)[None, None, None] > pos[:, None, None, None]
        saved, cache.suffix_kv = cache.suffix_kv, twin
        py = trunk.fused.flat(x, cache, widx, trunk.cos_sin[pos], ls, hidden)
        cache.suffix_kv = saved
        torch.testing.assert_close(py, out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(twin, cache.suffix_kv, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_generate_images_same_tokens_with_and_without_the_op(seed, dtype, monkeypatch):
    """Greedy image tokens and sampled log-probs through the C++ step equal the Python step's."""
    policy = random_policy(seed=seed, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    ids = [
        [policy.bos_token_id] + torch.randint(0, 256, (n,), generator=g).tolist() + [policy.boi_token_id]
        for n in (3, 11, 6)
    ]
    runs = []
    for native in (True, False):
        if not native:
            monkeypatch.setattr(FusedWeights, "native_ok", lambda self: False)
        greedy = generate_images(policy, ids, guidance_scale=4.0, temperature=0)
        toks, lps = generate_images(policy, ids, guidance_scale=4.0, temperature=1.0, seed=seed, return_logprobs=True)
        runs.append((greedy, toks, lps))
    (g1, t1, l1), (g2, t2, l2) = runs
    if dtype == torch.float64:  # float32 rounding may legitimately move a near-tie
        assert torch.equal(g1, g2) and torch.equal(t1, t2)
        torch.testing.assert_close(l1, l2)
    else:
        assert (g1 == g2).float().mean() > 0.9
