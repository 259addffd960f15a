"""The CPU decode step of small models: fused weights, the step over flattened rows, the C++ step.

On CPU a decode step of a small model is bound by the number of torch ops (per-op dispatch, not
FLOPs), so fewer, larger ops win. FusedWeights holds one matmul's weight for [q, k, rot(q), rot(k), v]
and one for [gate, up] per layer; FlatRowsStep is the image loop's step over flattened rows (RoPE
rows and the K/V write index advanced once per step, not per layer; attention as two batched
matmuls), or the whole step in one C++ call (fastbicot._C.decode_step_cpu) when the extension is
built. Never used on CUDA, where the CUDA graph removes the per-op overhead and the fused copies
would cost memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class FusedWeights:
    """One rollout's fused copies of the trunk's weights (rebuilt per rollout: weights change between
    training steps), and the decode step that reads them.

    ``layers``: per decoder layer (wq, wk, wv, wo, wg, wu, wd, input-norm weight, post-attention-norm
    weight, MLP activation module), the weights each projection applies. rot(W) holds W's rows
    permuted and negated as rotate_half does, so ``W_q h * cos + rot(W_q) h * sin`` is RoPE exactly.
    The RMSNorm weight in front of each matmul and the attention ``scale`` (q rows) are folded into
    the fused weights, so the step runs a weightless norm and unscaled attention.
    """

    def __init__(self, layers, final_norm, *, num_heads, head_dim, scale, eps, silu):
        H, D = num_heads, head_dim

        def rot(w):
            w = w.view(H, D, -1)
            return torch.cat([-w[:, D // 2 :], w[:, : D // 2]], dim=1).reshape(H * D, -1)

        self.num_heads, self.head_dim, self.eps, self.final_norm, self.silu = H, D, eps, final_norm, silu
        self.layers = []
        for wq_, wk, wv, wo, wg, wu, wd, norm_in, norm_post, act in layers:
            wq = wq_ * scale
            w_in = torch.cat([wq, wk, rot(wq), rot(wk), wv]) * norm_in
            w_gu = torch.cat([wg, wu]) * norm_post
            self.layers.append((w_in.detach(), w_gu.detach(), wo.detach(), wd.detach(), act))
        # the same weights as lists for fastbicot._C.decode_step_cpu, which applies RoPE itself: [q, k, v]
        hd = H * D
        self.native_weights = (
            [torch.cat([w[: 2 * hd], w[4 * hd :]]) for w, _, _, _, _ in self.layers],
            [wo for _, _, wo, _, _ in self.layers],
            [w for _, w, _, _, _ in self.layers],
            [wd for _, _, _, wd, _ in self.layers],
            final_norm.weight.detach(),
        )

    def _rms(self, x):
        """LlamaRMSNorm without its weight (folded into the next matmul)."""
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), None, self.eps)
        xf = x.float()  # HF normalises in fp32 whatever the dtype
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def _final_norm(self, x):
        """LlamaRMSNorm in one op where the dtype allows (HF normalises in fp32, then scales)."""
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.final_norm.weight.shape, self.final_norm.weight, self.eps)
        return self.final_norm(x)

    def decode(self, x, cache, n, rows, wpos, cos, sin, attn):
        """Trunk.decode's step with the fused weights (any cache layout; ``attn``: DecodeAttention)."""
        H, D = self.num_heads, self.head_dim
        hd = H * D
        for i, (w_in, w_gu, w_o, w_down, act) in enumerate(self.layers):
            y = F.linear(self._rms(x), w_in)  # [n, 5 H D]
            qk = torch.addcmul(
                y[:, : 2 * hd].view(n, 2, H, D) * cos, y[:, 2 * hd : 4 * hd].view(n, 2, H, D), sin
            )
            cache.suffix_kv[i, 0, rows, :, wpos] = qk[:, 1]
            cache.suffix_kv[i, 1, rows, :, wpos] = y[:, 4 * hd :].view(n, H, D)
            o = attn(qk[:, 0], i, 1.0)  # q carries the attention scale
            x = torch.addmm(x, o.reshape(n, hd), w_o.t())
            gu = F.linear(self._rms(x), w_gu)
            f = gu.shape[1] // 2
            x = torch.addmm(x, act(gu[:, :f]) * gu[:, f:], w_down.t())
        return self._final_norm(x)

    def flat(self, x, cache, write_index, cos_sin, ls, hidden=None):
        """The step over flattened rows [0, n) (no prefix blocks), in torch ops.

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
        for i, (w_in, w_gu, w_o, w_down, act) in enumerate(self.layers):
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
            x = torch.addmm(x, act(gu[:, :f]).mul_(gu[:, f:]), w_down.t())
        return self._final_norm(x)

    def native_ok(self) -> bool:
        """True when ``native`` can run: the C++ extension is built, a plain SiLU Llama MLP, float32 or
        float64 weights."""
        from fastbicot import _ext

        return (
            _ext.available("cpu")
            and hasattr(_ext._C, "decode_step_cpu")  # an extension built before this op: fall back
            and self.native_weights[-1].device.type == "cpu"
            and self.native_weights[-1].dtype in (torch.float32, torch.float64)
            and self.silu
        )

    def native(self, x, cache, pos, cos_sin):
        """``flat`` in one C++ call (fastbicot._C.decode_step_cpu): same math, one Python entry per
        step instead of ~13 ops per layer. pos [n]: the slot each row writes this token to (the row
        attends to slots [0, pos]); cos_sin [n, 2 D]."""
        from fastbicot._ext import _C

        w_in, w_o, w_gu, w_down, nw = self.native_weights
        return _C.decode_step_cpu(x, w_in, w_o, w_gu, w_down, nw, cache.suffix_kv, pos, cos_sin, self.eps)


class FlatRowsStep:
    """The image loop's trunk step over the flattened rows [0, rows) of ``cache`` (KVCache.flatten), with
    the per-rollout tables built once: RoPE rows of every step, the K/V write index, the key mask of
    rows shorter than the longest (None when all rows are equally long). ``step(x, t)`` -> hidden;
    ``finish()`` advances the rows' suffix lengths by the steps taken (the step itself does not)."""

    def __init__(self, fused: FusedWeights, cos_sin, cache, rows, num_tokens):
        self.fused, self.cache, self.rows, self.num_tokens = fused, cache, rows, num_tokens
        c, R, N, dev = cache, rows, num_tokens, cache.suffix_kv.device
        s0 = c.suffix_len[:R].long()  # flattened: a row's suffix is its whole context
        steps = torch.arange(N, device=dev)
        self.cos_sin = cos_sin[c.positions(R)[None] + steps[:, None]]  # [N, R, 2D]
        H, Ls = c.suffix_kv.shape[3], c.suffix_kv.shape[4]
        kv_t, row, head = torch.meshgrid(
            torch.arange(2, device=dev), torch.arange(R, device=dev), torch.arange(H, device=dev), indexing="ij"
        )
        self.widx0 = (((kv_t * c.num_rows + row) * H + head) * Ls + s0[None, :, None]).reshape(-1)
        self.ls0 = int(s0.max())
        self.lim = None if int(s0.min()) == self.ls0 else (s0 + 1)[:, None, None, None]
        self.keys = torch.arange(Ls, device=dev)
        self.wpos = s0[None] + steps[:, None]  # [N, R]: the slot each row writes at each step
        self.native = fused.native_ok()

    @property
    def name(self) -> str:
        return "cpp-decode-step" if self.native else "torch-matmul-flat"

    def __call__(self, x, t):
        if self.native:
            return self.fused.native(x, self.cache, self.wpos[t], self.cos_sin[t])
        ls = self.ls0 + t + 1
        hidden = None if self.lim is None else self.keys[:ls] >= self.lim + t
        return self.fused.flat(x, self.cache, self.widx0 + t, self.cos_sin[t], ls, hidden)

    def finish(self):
        self.cache.suffix_len[: self.rows] += self.num_tokens
