"""Our own forward over the policy's decoder layers, so that the rollout controls the KV cache.

Same math as transformers' LlamaModel (RMSNorm, q/k/v/o projections, RoPE from the model's own
rotary embedding, SiLU MLP), read through the policy's Protocol members by role
(fastbicot/models/protocol.py); tests/test_rollout_trunk.py checks it against the HF trunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import DecodeAttention, prefill_attention


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
        self.fused = self.native = self.out_w = None  # see fuse_weights
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
        """CPU decode: one matmul for [q, k, rot(q), rot(k), v] and one for [gate, up].

        On CPU a decode step of a small model is dominated by per-op overhead, so fewer, larger
        ops win. rot(W) holds W's rows permuted and negated as rotate_half does, so
        ``W_q h * cos + rot(W_q) h * sin`` is RoPE exactly. The RMSNorm weight in front of each
        matmul and the attention scale (q rows) are folded into the fused weights, so the step
        runs a weightless norm and unscaled attention. Rebuilt on every rollout (weights change
        between training steps); never on CUDA, where the CUDA graph removes the overhead and
        the copies would cost memory.
        """
        H, D = self.num_heads, self.head_dim

        def rot(w):
            w = w.view(H, D, -1)
            return torch.cat([-w[:, D // 2 :], w[:, : D // 2]], dim=1).reshape(H * D, -1)

        self.fused, self.native, self.out_w = [], None, []
        for layer in self.layers:
            mods = (layer.q_proj, layer.k_proj, layer.v_proj, layer.o_proj, layer.gate_proj, layer.up_proj,
                    layer.down_proj)
            ws = [effective_weight(mod) for mod in mods]
            if any(mod.bias is not None for mod in mods) or any(w is None for w in ws):
                self.fused = self.out_w = None  # biased projections or an adapter variant: module path
                return
            wq_, wk_, wv, wo, wg, wu, wd = ws
            wq, wk = wq_ * self.scale, wk_
            w_in = torch.cat([wq, wk, rot(wq), rot(wk), wv]) * layer.input_norm.weight
            w_gu = torch.cat([wg, wu]) * layer.post_attention_norm.weight
            self.fused.append((w_in.detach(), w_gu.detach()))
            self.out_w.append((wo.detach(), wd.detach()))
        # the same weights as lists for fastbicot._C.decode_step_cpu (decode_flat_native)
        H_D = H * D  # [q, k, v] rows of w_in: the C++ step applies RoPE itself
        self.native = (
            [torch.cat([w[: 2 * H_D], w[4 * H_D :]]) for w, _ in self.fused],
            [wo for wo, _ in self.out_w],
            [w for _, w in self.fused],
            [wd for _, wd in self.out_w],
            self.norm.weight.detach(),
        )

    def _norm(self, norm, x):
        """LlamaRMSNorm in one op where the dtype allows (HF normalises in fp32, then scales)."""
        if x.dtype == torch.float32:
            return F.rms_norm(x, norm.weight.shape, norm.weight, self.eps)
        return norm(x)

    def _rms(self, x):
        """LlamaRMSNorm without its weight (folded into the next matmul by fuse_weights)."""
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), None, self.eps)
        xf = x.float()  # HF normalises in fp32 whatever the dtype
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

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
    def decode(self, x, cache, n: int, *, static: bool = False, flat: bool = False):
        """One token for rows [0, n) of ``cache``: x [n, H] -> final-normed hidden [n, H].

        Writes the token's K/V at each row's suffix end and advances suffix_len. No allocation
        beyond activations; ``static=True`` keeps shapes fixed for CUDA-graph capture.
        """
        pos = cache.positions(n)
        cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]  # [n, 1, D]
        rows = torch.arange(n, device=x.device)
        wpos = cache.suffix_len[:n].long()
        cache.suffix_len[:n] += 1  # the new token is visible to itself
        attn = DecodeAttention(cache, n, static=static, flat=flat)
        shape = (n, self.num_heads, self.head_dim)
        if self.fused is not None:
            return self._decode_fused(x, cache, n, rows, wpos, cos[:, None], sin[:, None], attn)
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

    def _decode_fused(self, x, cache, n, rows, wpos, cos, sin, attn):
        H, D = self.num_heads, self.head_dim
        hd = H * D
        for i, (layer, (w_in, w_gu), (w_o, w_down)) in enumerate(zip(self.layers, self.fused, self.out_w)):
            y = F.linear(self._rms(x), w_in)  # [n, 5 H D]
            qk = torch.addcmul(
                y[:, : 2 * hd].view(n, 2, H, D) * cos, y[:, 2 * hd : 4 * hd].view(n, 2, H, D), sin
            )
            cache.suffix_kv[i, 0, rows, :, wpos] = qk[:, 1]
            cache.suffix_kv[i, 1, rows, :, wpos] = y[:, 4 * hd :].view(n, H, D)
            o = attn(qk[:, 0], i, 1.0)  # q carries the attention scale (fuse_weights)
            x = torch.addmm(x, o.reshape(n, hd), w_o.t())
            gu = F.linear(self._rms(x), w_gu)
            f = gu.shape[1] // 2
            x = torch.addmm(x, layer.act(gu[:, :f]) * gu[:, f:], w_down.t())
        return self._norm(self.norm, x)

    def native_ok(self) -> bool:
        """True when decode_flat_native can run: the C++ extension is built, fused weights of a
        plain SiLU Llama MLP, a float32/float64 policy on CPU."""
        from fastbicot import _ext

        return (
            self.native is not None
            and _ext.available("cpu")
            and hasattr(_ext._C, "decode_step_cpu")  # an extension built before this op: fall back
            and self.cos.device.type == "cpu"
            and self.cos.dtype in (torch.float32, torch.float64)
            and self.policy.mlp_activation in ("silu", "swish")
        )

    @torch.no_grad()
    def decode_flat_native(self, x, cache, pos, cos_sin):
        """decode_flat in one C++ call (fastbicot._C.decode_step_cpu): same math, one Python entry
        per step instead of ~13 ops per layer. pos [n]: the slot each row writes this token to
        (the row attends to slots [0, pos]); cos_sin [n, 2 D]."""
        from fastbicot._ext import _C

        w_in, w_o, w_gu, w_down, nw = self.native
        return _C.decode_step_cpu(x, w_in, w_o, w_gu, w_down, nw, cache.suffix_kv, pos, cos_sin, self.eps)

    @torch.no_grad()
    def decode_flat(self, x, cache, write_index, cos_sin, ls, hidden=None):
        """The CPU image loop's step over flattened rows [0, n) (fused weights, no prefix blocks).

        x [n, Hd]; write_index [2 n H]: rows of ``cache.suffix_kv[layer].view(-1, D)`` that take
        this token's K and V (the caller advances it by one per step); cos_sin [n, 2 D]: RoPE of
        this step's positions; ls: keys to read (the longest row, new token included); hidden:
        optional bool [n, 1, 1, ls], True at keys a shorter row must not see. Attention is two
        batched matmuls + a softmax: at decode sizes SDPA's CPU kernel costs more than that.
        The caller advances ``cache.suffix_len`` when its loop ends.
        """
        n, H, D = x.shape[0], self.num_heads, self.head_dim
        hd = H * D
        cos, sin = cos_sin[:, None, None, :D], cos_sin[:, None, None, D:]
        for i, (layer, (w_in, w_gu), (w_o, w_down)) in enumerate(zip(self.layers, self.fused, self.out_w)):
            y = F.linear(self._rms(x), w_in)  # [n, 5 H D]: q, k, rot(q), rot(k), v
            qk = (y[:, : 2 * hd].view(n, 2, H, D) * cos).addcmul_(y[:, 2 * hd : 4 * hd].view(n, 2, H, D), sin)
            new_kv = torch.stack([qk[:, 1], y[:, 4 * hd :].view(n, H, D)])  # [2, n, H, D]
            kv = cache.suffix_kv[i]
            kv.view(-1, D).index_copy_(0, write_index, new_kv.view(-1, D))
            s = torch.matmul(qk[:, 0, :, None], kv[0, :n, :, :ls].transpose(-1, -2))  # [n, H, 1, ls]
            if hidden is not None:
                s.masked_fill_(hidden, float("-inf"))
            o = torch.matmul(torch.softmax(s, -1), kv[1, :n, :, :ls])  # [n, H, 1, D]
            x = torch.addmm(x, o.view(n, hd), w_o.t())
            gu = F.linear(self._rms(x), w_gu)
            f = gu.shape[1] // 2
            x = torch.addmm(x, layer.act(gu[:, :f]).mul_(gu[:, f:]), w_down.t())
        return self._norm(self.norm, x)
