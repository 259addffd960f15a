"""JanusPolicy satisfies the Policy Protocol (members, kinds, call signatures), and the trunk-by-role
members (decoder_layers, final_norm, rope_tables, attention_scale, rms_norm_eps, mlp_activation,
max_positions) rebuild exactly what transformers' LlamaModel computes."""

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from fastbicot.models import JanusPolicy, Policy
from fastbicot.models.janus import DecoderLayer


def protocol_members():
    """(name, kind) of every member Policy declares: 'data', 'property' or 'method'."""
    out = {name: "data" for name in Policy.__annotations__}
    for name, value in vars(Policy).items():
        if name.startswith("_"):
            continue
        if isinstance(value, property):
            out[name] = "property"
        elif inspect.isfunction(value):
            out[name] = "method"
    return out


def shape(sig: inspect.Signature):
    """Names, kinds and defaults of a signature's parameters (annotations are strings here)."""
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


@pytest.fixture(scope="module")
def policy():
    return JanusPolicy.from_preset("tiny", seed=0)


def test_janus_policy_is_a_policy(policy):
    assert isinstance(policy, Policy)
    members = protocol_members()
    assert len(members) >= 30
    assert {"embed_text", "trunk", "decoder_layers", "rope_tables", "max_positions", "tokenizer"} <= set(members)


def test_every_member_exists_with_its_kind_and_signature(policy):
    for name, kind in protocol_members().items():
        assert hasattr(policy, name), name
        impl = inspect.getattr_static(JanusPolicy, name, None)
        if kind == "method":
            assert callable(getattr(policy, name)), name
            want = shape(inspect.signature(getattr(Policy, name)))
            got = shape(inspect.signature(getattr(JanusPolicy, name)))
            assert got == want, f"{name}: JanusPolicy{got} != Policy{want}"
        elif kind == "property":
            assert isinstance(impl, property), f"{name} should be a property of JanusPolicy"
        else:  # data: an instance attribute (set in __init__) or a property
            assert impl is None or isinstance(impl, property), name


def test_a_missing_member_is_not_a_policy(policy):
    class Partial:
        pass

    p = Partial()
    for name in protocol_members():
        if name != "rope_tables":
            setattr(p, name, getattr(policy, name))
    assert not isinstance(p, Policy)
    p.rope_tables = policy.rope_tables
    assert isinstance(p, Policy)


def role_forward(policy, x):
    """The trunk from decoder_layers / final_norm / rope_tables alone (causal, one row)."""
    L, H, D = x.shape[1], policy.num_heads, policy.head_dim
    cos, sin = policy.rope_tables(L)
    eps = policy.rms_norm_eps

    def norm(module, h):
        hf = h.float()
        return module.weight * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)

    def rope(t):
        half = t.shape[-1] // 2
        return t * cos + torch.cat((-t[..., half:], t[..., :half]), -1) * sin

    for layer in policy.decoder_layers():
        h = norm(layer.input_norm, x)
        q, k, v = (p(h).view(1, L, H, D).transpose(1, 2) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
        o = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True, scale=policy.attention_scale)
        x = x + layer.o_proj(o.transpose(1, 2).reshape(1, L, H * D))
        h = norm(layer.post_attention_norm, x)
        mlp = layer.down_proj(layer.act(layer.gate_proj(h)) * layer.up_proj(h))
        torch.testing.assert_close(mlp, layer.mlp(h), rtol=0, atol=0)
        x = x + mlp
    return norm(policy.final_norm, x)


def test_trunk_by_role_matches_transformers(seed):
    policy = JanusPolicy.from_preset("tiny", seed=seed % 1000, dtype=torch.float64)
    layers = policy.decoder_layers()
    assert len(layers) == policy.num_layers and all(isinstance(lay, DecoderLayer) for lay in layers)
    assert policy.mlp_activation == "silu" and policy.max_positions == 2048
    assert policy.attention_scale == pytest.approx(1 / math.sqrt(policy.head_dim))
    cos, sin = policy.rope_tables(11)
    assert cos.shape == sin.shape == (11, policy.head_dim) and cos.dtype == torch.float64
    ids = torch.randint(0, 256, (1, 11))
    x = policy.embed_text(ids)
    want, _ = policy.trunk(x)
    torch.testing.assert_close(role_forward(policy, x), want, rtol=1e-10, atol=1e-10)
    with pytest.raises(Exception, match="num_positions"):
        policy.rope_tables(0)
