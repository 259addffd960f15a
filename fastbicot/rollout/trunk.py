"""Our own forward over the policy's decoder layers, so that the rollout controls the KV cache.

Same math as transformers' LlamaModel (RMSNorm, q/k/v/o projections, RoPE from the model's own
rotary embedding, SiLU MLP), read through the policy's Protocol members by role
(fastbicot/models/protocol.py); tests/test_rollout_trunk.py checks it against the HF trunk.
"""

from __future__ import annotations

import torch

from .attention import DecodeAttention, prefill_attention
from .cpu_decode import FusedWeights


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def effective_weight(linear):
    """The weight a decoder projection applies, for the fused CPU decode (Trunk.fuse_weights).

    A plain ``nn.Linear``: its weight (no copy). A peft LoRA layer (``base_layer`` + ``lora_A`` /
    ``lora_B``): ``W + sum_a scaling_a * B_a @ A_a`` over its active adapters (W alone when they are
    disabled or already merged), so the rollout samples from the adapted policy -- the layer's own
    ``.weight`` is the *base* weight, which the fused path would otherwise read silently. None for an
    adapter variant this does not express (DoRA, ...): the caller keeps the module path.

    Why not merge the adapters into W for the rollout and unmerge after: ``W += d; W -= d`` is not
    the identity in bf16 (measured: 400 cycles with a growing adapter change 55 % of a bf16 weight's
    entries, median by 0.4 %), so the frozen base would drift over a run. This builds the sum into
    the copies fuse_weights makes anyway, once per rollout (toy policy, r = 16 on every projection, 128
    samples, one thread: 1.01x the rollout time without LoRA; peft's forward on the module path: 1.57x).
    The module path (CUDA, biased or unfused trunks) runs the LoRA layer's own forward
    ``W x + s B (A x)``: per decode step that reads r (in + out) / (in out) more weight bytes
    (0.8 % at r = 16, 4096 x 4096), and the CUDA graph hides the extra launches (not measured on GPU).
    """
    base = getattr(linear, "base_layer", None)
    if base is None:
        return linear.weight
    if not hasattr(linear, "lora_A") or any(getattr(linear, "lora_variant", {}).get(a) is not None
                                            for a in linear.active_adapters):
        return None
    w = base.weight
    if linear.disable_adapters or linear.merged:  # merged: already in W
        return w
    with torch.no_grad():
        delta = [linear.get_delta_weight(a) for a in linear.active_adapters if a in linear.lora_A]
        if not delta:
            return w
        d = sum(delta[1:], delta[0])  # fp32 adapters on a bf16 base: sum in the wider dtype, round once
        dt = torch.promote_types(w.dtype, d.dtype)
        return (w.to(dt) + d.to(dt)).to(w.dtype)


class Trunk:
    """The decoder trunk read through the policy's Protocol members by role (``decoder_layers()``,
    ``final_norm``, ``rope_tables``, ``attention_scale``, ``rms_norm_eps``, ``mlp_activation``,
    ``max_positions``; fastbicot/models/protocol.py)."""

    def __init__(self, policy, max_positions: int | None = None):
        self.policy = policy
        self.num_heads, self.num_kv_heads, self.head_dim = policy.num_heads, policy.num_kv_heads, policy.head_dim
        if self.num_kv_heads != self.num_heads:
            raise NotImplementedError("the rollout trunk supports multi-head attention (Janus-Pro); got GQA")
        self.scale = policy.attention_scale
        self.eps = policy.rms_norm_eps
        self.fused = None  # see fuse_weights
        self.refresh()
        self.max_positions = policy.max_positions if max_positions is None else int(max_positions)
        # RoPE tables for every position, computed once by the model's own rotary embedding.
        self.cos, self.sin = policy.rope_tables(self.max_positions)  # [max_positions, D] each
        self.cos_sin = torch.cat([self.cos, self.sin], dim=-1)  # one gather per step for both

    def refresh(self) -> None:
        """Re-read the layers by role: a LoRA wrapper injected since (peft replaces the projection
        modules) is what the next rollout must run."""
        self.layers = self.policy.decoder_layers()
        self.norm = self.policy.final_norm

    def fuse_weights(self) -> None:
        """CPU decode: fused copies of this rollout's weights (rollout.cpu_decode.FusedWeights) in
        ``self.fused``; None (the module path) for biased projections or an adapter variant
        effective_weight does not express. Rebuilt on every rollout: weights change between
        training steps."""
        layers = []
        for layer in self.layers:
            mods = (layer.q_proj, layer.k_proj, layer.v_proj, layer.o_proj, layer.gate_proj, layer.up_proj,
                    layer.down_proj)
            ws = [effective_weight(mod) for mod in mods]
            if any(mod.bias is not None for mod in mods) or any(w is None for w in ws):
                self.fused = None
                return
            layers.append((*ws, layer.input_norm.weight, layer.post_attention_norm.weight, layer.act))
        self.fused = FusedWeights(layers, self.norm, num_heads=self.num_heads, head_dim=self.head_dim,
                                  scale=self.scale, eps=self.eps,
                                  silu=self.policy.mlp_activation in ("silu", "swish"))

    def _rope(self, x, cos, sin):
        return x * cos + _rotate_half(x) * sin

    def _qkv(self, layer, h, shape):
        return layer.q_proj(h).view(shape), layer.k_proj(h).view(shape), layer.v_proj(h).view(shape)

    def check_positions(self, max_pos: int) -> None:
        if max_pos > self.max_positions:
            raise ValueError(
                f"sequence needs position {max_pos - 1} but the model supports {self.max_positions}"
            )

    # ---- prefill --------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, x, positions, *, kv_out=None, prefix=None):
        """x [N, L, H] right-padded rows starting at ``positions`` [N, L] -> hidden [N, L, H] after the
        final norm.

        ``kv_out``: (kv, rows) -- every layer's K/V go straight into ``kv``, a cache tensor
        [layers, 2, slots, heads, capacity, D] (a KVCache's ``prefix_kv`` or ``suffix_kv``), as each layer
        computes them: K and V of input row j at ``kv[layer, :, rows[j], :, :L]`` (``rows``: a LongTensor
        [N] or a slice). Only one layer's K/V exist outside the cache at a time. None: K/V are not kept.
        ``prefix``: optional (cache, group_ids [N], lp) -- each row first attends to its group's
        prefix block (valid length prefix_len[group] <= lp), then causally to its own tokens.
        """
        N, L, _ = x.shape
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]
        mask = None
        if prefix is not None:
            cache, gid, lp = prefix
            g = gid.long()
            dev = x.device
            see_prefix = (torch.arange(lp, device=dev)[None] < cache.prefix_len[g][:, None])[
                :, None, :
            ].expand(N, L, lp)
            causal = torch.ones(L, L, dtype=torch.bool, device=dev).tril()[None].expand(N, L, L)
            mask = torch.cat([see_prefix, causal], dim=2)[:, None]
        for i, layer in enumerate(self.layers):
            h = layer.input_norm(x)
            q, k, v = (t.transpose(1, 2) for t in self._qkv(layer, h, (N, L, self.num_heads, self.head_dim)))
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            if kv_out is not None:
                kv, rows = kv_out
                kv[i, 0, rows, :, :L] = k
                kv[i, 1, rows, :, :L] = v
            if prefix is not None:
                kk = torch.cat([cache.prefix_k[i, :, :, :lp].index_select(0, g), k], dim=2)
                vv = torch.cat([cache.prefix_v[i, :, :, :lp].index_select(0, g), v], dim=2)
                o = prefill_attention(q, kk, vv, scale=self.scale, attn_mask=mask)
            else:
                o = prefill_attention(q, k, v, scale=self.scale)
            x = x + layer.o_proj(o.transpose(1, 2).reshape(N, L, -1))
            x = x + layer.mlp(layer.post_attention_norm(x))
        return self.norm(x)

    # ---- decode ---------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, x, cache, n: int, *, flat: bool = False):
        """One token for rows [0, n) of ``cache``: x [n, H] -> final-normed hidden [n, H].

        Writes the token's K/V at each row's suffix end and advances suffix_len. No allocation
        beyond activations and no host sync on CUDA (the image loop captures it in a CUDA graph).
        Flattened rows (``flat``) with fused CPU weights take the CPU step (rollout.cpu_decode), the
        one the image loop runs; otherwise the layers' modules and the kernel's decode attention.
        """
        pos = cache.positions(n)
        wpos = cache.suffix_len[:n].long()
        if flat and self.fused is not None:
            h = self.fused.step(x, cache, wpos, self.cos_sin[pos])
            cache.suffix_len[:n] += 1
            return h
        cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]  # [n, 1, D]
        rows = torch.arange(n, device=x.device)
        cache.suffix_len[:n] += 1  # the new token is visible to itself
        attn = DecodeAttention(cache, n, flat=flat)
        shape = (n, self.num_heads, self.head_dim)
        for i, layer in enumerate(self.layers):
            h = layer.input_norm(x)
            q, k, v = self._qkv(layer, h, shape)
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            cache.suffix_k[i, rows, :, wpos] = k
            cache.suffix_v[i, rows, :, wpos] = v
            o = attn(q, i, self.scale)
            x = x + layer.o_proj(o.reshape(n, -1))
            x = x + layer.mlp(layer.post_attention_norm(x))
        return self.norm(x)
