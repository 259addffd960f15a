"""The CPU decode step of small models over flattened rows: fused weights, the step in torch ops, the C++ step.

On CPU a decode step of a small model is bound by the number of torch ops (per-op dispatch, not
FLOPs), so fewer, larger ops win. FusedWeights holds one matmul's weight for [q, k, rot(q), rot(k), v]
and one for [gate, up] per layer; its ``step`` runs one token for the flattened rows (KVCache.flatten)
in one C++ call (fastbicot._C.decode_step_cpu) when the extension is built, else in torch ops
(attention as two batched matmuls). The CoT loop calls it through Trunk.decode; the image loop
through FlatRowsStep, which builds the per-step tables once per rollout. Never used on CUDA, where the
CUDA graph removes the per-op overhead and the fused copies would cost memory.
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
        self.use_native = self.native_ok()

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

    def flat(self, x, cache, write_index, cos_sin, ls, hidden=None):
        """The step over flattened rows [0, n) (no prefix blocks), in torch ops.

        x [n, Hd]; write_index [2 n H]: rows of ``cache.suffix_kv[layer].view(-1, D)`` that take
        this token's K and V; cos_sin [n, 2 D]: RoPE of
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

    def step(self, x, cache, pos, cos_sin):
        """One token for the flattened rows [0, n): row r writes its K/V at slot pos[r] and attends to
        slots [0, pos[r]]; cos_sin [n, 2 D]. ``native`` when it can run, else ``flat`` (its write index
        and key mask built from ``pos``). The caller advances ``cache.suffix_len``."""
        if self.use_native:
            return self.native(x, cache, pos, cos_sin)
        n, (H, Ls), dev = x.shape[0], cache.suffix_kv.shape[3:5], x.device
        kv_t, row, head = torch.meshgrid(
            torch.arange(2, device=dev), torch.arange(n, device=dev), torch.arange(H, device=dev), indexing="ij"
        )
        write_index = (((kv_t * cache.num_rows + row) * H + head) * Ls + pos[None, :, None]).reshape(-1)
        ls = int(pos.max()) + 1
        hidden = None if int(pos.min()) + 1 == ls else torch.arange(ls, device=dev) > pos[:, None, None, None]
        return self.flat(x, cache, write_index, cos_sin, ls, hidden)

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
    """The image loop's FusedWeights.step over the flattened rows [0, rows) of ``cache``
    (KVCache.flatten), with every step's RoPE rows and write slots built once per rollout.
    ``step(x, t)`` -> hidden; ``finish()`` advances the rows' suffix lengths by the steps taken (the
    step itself does not)."""

    def __init__(self, fused: FusedWeights, cos_sin, cache, rows, num_tokens):
        self.fused, self.cache, self.rows, self.num_tokens = fused, cache, rows, num_tokens
        steps = torch.arange(num_tokens, device=cache.suffix_kv.device)[:, None]
        self.cos_sin = cos_sin[cache.positions(rows)[None] + steps]  # [N, R, 2D]
        self.wpos = cache.suffix_len[:rows].long()[None] + steps  # [N, R]: flattened, a row's suffix is its context

    def __call__(self, x, t):
        return self.fused.step(x, self.cache, self.wpos[t], self.cos_sin[t])

    def finish(self):
        self.cache.suffix_len[: self.rows] += self.num_tokens
