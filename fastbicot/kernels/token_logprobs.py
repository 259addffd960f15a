"""Fused per-token log-probabilities through a linear head, without [N, V] logits.

    token_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0) -> float32 [N]
    = log_softmax((hidden @ weight.T + bias) / T)[i, targets[i]]

Forward (Triton): a tiled matmul (tl.dot over H) whose vocabulary tiles feed an online
log-sum-exp; the grid is (row blocks x vocabulary splits) so that a few thousand rows still fill
the GPU, each split keeps one partial lse per row, and torch merges the [splits, N] partials.
Only lse and the target logit leave the chip.

Backward (Triton + GEMMs): per vocabulary chunk of C columns a Triton kernel recomputes the
logit tiles and writes grad_logits = (onehot - softmax) * g / T for that chunk only ([N, C] in the
input dtype, C chosen so the chunk is <= _GPU_CHUNK_BYTES); then
    grad_weight[chunk] = G^T @ hidden      (cuBLAS; each chunk owns its rows of grad_weight)
    grad_hidden       += G @ weight[chunk] (Triton GEMM accumulating in an fp32 [N, H] buffer)
    grad_bias[chunk]   = G.sum(0)
Why not one fused kernel with atomics (Cut-Cross-Entropy style)? grad_hidden would take
N*H*(V/BLOCK_V) fp32 atomic adds (~18e9 for the 102400-word text head at N=5408, H=4096), which
costs more than the three GEMMs themselves on an H100; holding a [BLOCK_N, H] accumulator in
registers is impossible at H=4096. A bounded grad_logits chunk costs one extra write+read of
2*N*V bytes in total (~1 ms for the text head) and lets the two weight/hidden products run as
plain dense GEMMs. The weight/bias work is skipped when they do not require grad (the frozen
image head), leaving recompute + one GEMM.

CPU (fast torch path): the same algorithm in fp32 torch, chunked over rows and vocabulary so
every temporary is <= _CPU_CHUNK_ELEMS elements.

FASTBICOT_FORCE_TRITON=1 sends CPU tensors through the Triton kernels under Triton's interpreter;
TRITON_INTERPRET=1 must be set before triton is first imported (triton 3.x reads it when each
@triton.jit function, its own tl.* helpers included, is decorated), else a clear error is raised.
"""

import math
import numbers
import os

import torch
import triton
import triton.language as tl

__all__ = ["token_logprobs", "token_logprobs_reference"]


def _check_scalar(fn, name, value, *, low=None, high=None, low_open=False, high_open=False):
    """Inline argument check (this file stays self-contained: no fastbicot import). A real number,
    not a bool, finite, inside the bounds; a one-element tensor is read with .item(). -> float"""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: {name} must be a real number, got {value!r} ({type(value).__name__})")
    try:
        x = float(value)
    except OverflowError:  # an int beyond float range
        raise ValueError(f"{fn}: {name} must be finite, got an integer with {len(str(value))} digits") from None
    if not math.isfinite(x):
        raise ValueError(f"{fn}: {name} must be finite, got {x}")
    if (low is not None and (x <= low if low_open else x < low)) or (
            high is not None and (x >= high if high_open else x > high)):
        bounds = " and ".join(
            ([f"{'>' if low_open else '>='} {low}"] if low is not None else [])
            + ([f"{'<' if high_open else '<='} {high}"] if high is not None else []))
        raise ValueError(f"{fn}: {name} must be {bounds}, got {x}")
    return x


def _check_tensor(fn, name, value, optional=False):
    if value is None and optional:
        return
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(value).__name__}")

_CPU_CHUNK_ELEMS = 1 << 20  # fp32 elements per CPU logits chunk (4 MiB)
_GPU_CHUNK_BYTES = 16 << 20  # bytes of the grad_logits chunk in the Triton backward


# ----------------------------------------------------------------------------- Triton kernels


@triton.jit
def _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, stride_h, stride_w, inv_t,
                HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """(hidden[rows] @ weight[cols].T + bias[cols]) / T as a fp32 [BLOCK_N, BLOCK_V] tile; padded
    columns are -inf so they vanish from every softmax sum."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < H
        a = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(w_ptr + cols[None, :] * stride_w + ks[:, None],
                    mask=col_mask[None, :] & k_mask[:, None], other=0.0)
        if UPCAST:  # the interpreter's tl.dot mishandles bf16 operands; fp32 products are exact
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:  # fp32 inputs: match torch's fp32 matmul instead of silently using tf32
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return tl.where(col_mask[None, :], acc * inv_t, float("-inf"))


@triton.jit
def _fwd_kernel(h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, tgt_ptr, N, V, H, stride_h, stride_w, inv_t,
                tiles_per_split,
                HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    targets = tl.load(t_ptr + rows, mask=row_mask, other=-1)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    tgt = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # The host sizes splits so that each one's first tile holds real columns: m is finite after it.
    for t in range(tiles_per_split):
        cols = (split * tiles_per_split + t) * BLOCK_V + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        z = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, stride_h, stride_w,
                        inv_t, HAS_BIAS, UPCAST, IEEE, BLOCK_N, BLOCK_V, BLOCK_K)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
        tgt += tl.sum(tl.where(cols[None, :] == targets[:, None], z, 0.0), axis=1)
    tl.store(lse_ptr + split * N + rows, m + tl.log(s), mask=row_mask)
    tl.store(tgt_ptr + split * N + rows, tgt, mask=row_mask)


@triton.jit
def _grad_logits_kernel(h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, scale_ptr, g_ptr, N, V, H, v0, C,
                        stride_h, stride_w, inv_t,
                        HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """G[:, :C] = (onehot(targets) - softmax) * scale for vocabulary columns v0 .. v0+C."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    local = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = v0 + local
    row_mask = rows < N
    col_mask = (local < C) & (cols < V)
    z = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, stride_h, stride_w,
                    inv_t, HAS_BIAS, UPCAST, IEEE, BLOCK_N, BLOCK_V, BLOCK_K)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    scale = tl.load(scale_ptr + rows, mask=row_mask, other=0.0)
    targets = tl.load(t_ptr + rows, mask=row_mask, other=-1)
    onehot = (cols[None, :] == targets[:, None]).to(tl.float32)
    g = (onehot - tl.exp(z - lse[:, None])) * scale[:, None]
    tl.store(g_ptr + rows[:, None] * C + local[None, :], g.to(g_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _matmul_acc_kernel(a_ptr, b_ptr, c_ptr, M, K, Ncols, stride_a, stride_b, stride_c,
                       UPCAST: tl.constexpr, IEEE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """c (fp32, [M, Ncols]) += a [M, K] @ b [K, Ncols]; all row-major with unit column stride."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < Ncols
    c_ptrs = c_ptr + rm[:, None] * stride_c + rn[None, :]
    c_mask = m_mask[:, None] & n_mask[None, :]
    acc = tl.load(c_ptrs, mask=c_mask, other=0.0)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        a = tl.load(a_ptr + rm[:, None] * stride_a + ks[None, :], mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0)
        b = tl.load(b_ptr + ks[:, None] * stride_b + rn[None, :], mask=k_mask[:, None] & n_mask[None, :],
                    other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    tl.store(c_ptrs, acc, mask=c_mask)


def _interpreted():
    """True when this module's kernels were built for Triton's interpreter (TRITON_INTERPRET=1 was set
    when they were decorated: triton reads it at @triton.jit time, i.e. at import)."""
    return type(_fwd_kernel).__name__ == "InterpretedFunction"


def _use_triton(t):
    """The dispatch rule (written the same way in every kernel file): CUDA tensors -> Triton; CPU
    tensors -> the torch path, or the Triton kernels under the interpreter with FASTBICOT_FORCE_TRITON=1
    (so anyone can check them without a GPU)."""
    if t.device.type == "cuda":
        return True
    if os.environ.get("FASTBICOT_FORCE_TRITON", "0") != "1":
        return False
    if not _interpreted():
        raise RuntimeError("FASTBICOT_FORCE_TRITON=1 with CPU tensors needs Triton's interpreter: set "
                           "TRITON_INTERPRET=1 before triton is first imported")
    return True


def _config(device, dtype):
    """Tile sizes: H100-sized on CUDA; tiny on the CPU interpreter (where each tile is numpy work)."""
    if device.type == "cpu":
        return {"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_K": 16, "num_warps": 4, "num_stages": 1}
    if dtype == torch.float32:
        return {"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}
    return {"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}


def _flags(hidden):
    cpu = hidden.device.type == "cpu"
    return {"UPCAST": cpu, "IEEE": hidden.dtype == torch.float32}


def _triton_forward(hidden, weight, bias, targets, inv_t):
    N, H = hidden.shape
    V = weight.shape[0]
    cfg = _config(hidden.device, hidden.dtype)
    bn, bv = cfg["BLOCK_N"], cfg["BLOCK_V"]
    row_blocks = triton.cdiv(N, bn)
    tiles = triton.cdiv(V, bv)
    if hidden.device.type == "cuda":
        target_programs = 4 * torch.cuda.get_device_properties(hidden.device).multi_processor_count
    else:
        target_programs = 4
    splits = max(1, min(tiles, triton.cdiv(target_programs, row_blocks)))
    tiles_per_split = triton.cdiv(tiles, splits)
    splits = triton.cdiv(tiles, tiles_per_split)  # every split starts on a real tile
    lse_part = torch.empty(splits, N, device=hidden.device, dtype=torch.float32)
    tgt_part = torch.empty(splits, N, device=hidden.device, dtype=torch.float32)
    _fwd_kernel[(row_blocks, splits)](
        hidden, weight, bias if bias is not None else hidden, targets, lse_part, tgt_part,
        N, V, H, hidden.stride(0), weight.stride(0), inv_t, tiles_per_split,
        HAS_BIAS=bias is not None, **_flags(hidden), **cfg)
    return torch.logsumexp(lse_part, dim=0), tgt_part.sum(dim=0)


def _triton_backward(hidden, weight, bias, targets, lse, scale, inv_t, need_h, need_w, need_b):
    N, H = hidden.shape
    V = weight.shape[0]
    cfg = _config(hidden.device, hidden.dtype)
    bn, bv = cfg["BLOCK_N"], cfg["BLOCK_V"]
    chunk = max(bv, (_GPU_CHUNK_BYTES // (N * hidden.element_size())) // bv * bv)
    chunk = min(chunk, triton.cdiv(V, bv) * bv)
    grad_logits = torch.empty(N, chunk, device=hidden.device, dtype=hidden.dtype)
    dh = torch.zeros(N, H, device=hidden.device, dtype=torch.float32) if need_h else None
    dw = torch.empty_like(weight) if need_w else None
    db = torch.empty(V, device=hidden.device, dtype=torch.float32) if need_b else None
    flags = _flags(hidden)
    for v0 in range(0, V, chunk):
        c = min(chunk, V - v0)
        g = grad_logits.view(-1)[: N * c].view(N, c)  # contiguous, row stride c
        _grad_logits_kernel[(triton.cdiv(N, bn), triton.cdiv(c, bv))](
            hidden, weight, bias if bias is not None else hidden, targets, lse, scale, g,
            N, V, H, v0, c, hidden.stride(0), weight.stride(0), inv_t,
            HAS_BIAS=bias is not None, **flags, **cfg)
        if need_w:
            torch.mm(g.t(), hidden, out=dw[v0:v0 + c])
        if need_b:
            torch.sum(g, dim=0, dtype=torch.float32, out=db[v0:v0 + c])
        if need_h:
            w_c = weight[v0:v0 + c]
            _matmul_acc_kernel[(triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(H, cfg["BLOCK_V"]))](
                g, w_c, dh, N, c, H, g.stride(0), w_c.stride(0), dh.stride(0), **flags,
                BLOCK_M=cfg["BLOCK_N"], BLOCK_N=cfg["BLOCK_V"], BLOCK_K=cfg["BLOCK_K"],
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return dh, dw, db


# ----------------------------------------------------------------------------- CPU torch path


def _cpu_chunks(N, V, H):
    rows = min(N, 256)
    cols = max(1, min(V, _CPU_CHUNK_ELEMS // max(rows, H)))
    return rows, cols


def _torch_forward(hidden, weight, bias, targets, inv_t):
    N, H = hidden.shape
    V = weight.shape[0]
    rows, cols = _cpu_chunks(N, V, H)
    h32 = hidden.float()
    lse = torch.full((N,), float("-inf"), dtype=torch.float32)
    tgt = torch.zeros(N, dtype=torch.float32)
    for v0 in range(0, V, cols):
        v1 = min(V, v0 + cols)
        w, b = weight[v0:v1].float(), None if bias is None else bias[v0:v1].float()
        for r0 in range(0, N, rows):
            r1 = min(N, r0 + rows)
            z = h32[r0:r1] @ w.t()
            if b is not None:
                z += b
            z *= inv_t
            lse[r0:r1] = torch.logaddexp(lse[r0:r1], torch.logsumexp(z, dim=1))
            t = targets[r0:r1] - v0
            hit = (t >= 0) & (t < v1 - v0)
            tgt[r0:r1] += torch.where(hit, z.gather(1, t.clamp(0, v1 - v0 - 1)[:, None])[:, 0], 0.0)
    return lse, tgt


def _torch_backward(hidden, weight, bias, targets, lse, scale, inv_t, need_h, need_w, need_b):
    N, H = hidden.shape
    V = weight.shape[0]
    rows, cols = _cpu_chunks(N, V, H)
    h32 = hidden.float()
    dh = torch.zeros(N, H, dtype=torch.float32) if need_h else None
    dw = torch.empty_like(weight) if need_w else None
    db = torch.empty(V, dtype=torch.float32) if need_b else None
    for v0 in range(0, V, cols):
        v1 = min(V, v0 + cols)
        w, b = weight[v0:v1].float(), None if bias is None else bias[v0:v1].float()
        dw_c = torch.zeros(v1 - v0, H, dtype=torch.float32) if need_w else None
        db_c = torch.zeros(v1 - v0, dtype=torch.float32) if need_b else None
        for r0 in range(0, N, rows):
            r1 = min(N, r0 + rows)
            z = h32[r0:r1] @ w.t()
            if b is not None:
                z += b
            z *= inv_t
            # grad_logits = (onehot - softmax) * g / T, built in place in the logits chunk
            g = z.sub_(lse[r0:r1, None]).exp_().neg_()
            t = targets[r0:r1] - v0
            hit = ((t >= 0) & (t < v1 - v0)).nonzero()[:, 0]
            g[hit, t[hit]] += 1.0
            g *= scale[r0:r1, None]
            if need_h:
                dh[r0:r1].addmm_(g, w)
            if need_w:
                dw_c.addmm_(g.t(), h32[r0:r1])
            if need_b:
                db_c += g.sum(0)
        if need_w:
            dw[v0:v1] = dw_c
        if need_b:
            db[v0:v1] = db_c
    return dh, dw, db


# ----------------------------------------------------------------------------- autograd + API


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, inv_t):
        if not _use_triton(hidden):
            targets = targets.long()  # torch indexing wants int64
        fwd = _triton_forward if _use_triton(hidden) else _torch_forward
        lse, tgt = fwd(hidden, weight, bias, targets, inv_t)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.inv_t = inv_t
        return tgt - lse

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        scale = (grad_out.float() * ctx.inv_t).contiguous()
        bwd = _triton_backward if _use_triton(hidden) else _torch_backward
        dh, dw, db = bwd(hidden, weight, bias, targets, lse, scale, ctx.inv_t, need_h, need_w, need_b)
        dh = dh.to(hidden.dtype) if dh is not None else None
        db = db.to(bias.dtype) if db is not None else None
        return dh, dw, db, None, None


def token_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0):
    """log_softmax((hidden @ weight.T + bias) / temperature)[i, targets[i]] as float32 [N].

    hidden [N, H], weight [V, H], targets [N] (int), bias [V] or None; floating inputs share one
    dtype (bf16 / fp16 / fp32). Never materialises [N, V]; differentiable w.r.t. hidden, weight
    and bias (each gradient is computed only when that input requires grad). Targets must lie in
    [0, V) (checked on CPU; on CUDA an out-of-range target silently yields -lse).
    """
    fn = "token_logprobs"
    for name, t, opt in (("hidden", hidden, False), ("weight", weight, False), ("targets", targets, False),
                         ("bias", bias, True)):
        _check_tensor(fn, name, t, optional=opt)
    temperature = _check_scalar(fn, "temperature", temperature, low=0.0, low_open=True)
    if 1.0 / temperature > torch.finfo(torch.float32).max:  # 1/T is applied in fp32
        raise ValueError(f"token_logprobs: temperature must be >= {1.0 / torch.finfo(torch.float32).max:.3g} "
                         f"(1/temperature overflows float32), got {temperature}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"token_logprobs: hidden [N, H] and weight [V, H] expected, got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    N, V = hidden.shape[0], weight.shape[0]
    if targets.shape != (N,) or targets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"token_logprobs: targets must be int32/int64 of shape ({N},), got "
                         f"{targets.dtype} {tuple(targets.shape)}")
    if bias is not None and bias.shape != (V,):
        raise ValueError(f"token_logprobs: bias must have shape ({V},), got {tuple(bias.shape)}")
    floats = [hidden, weight] + ([bias] if bias is not None else [])
    if hidden.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64) or any(
            t.dtype != hidden.dtype for t in floats):
        raise ValueError("token_logprobs: hidden, weight and bias must share one floating dtype, got "
                         + ", ".join(str(t.dtype) for t in floats))
    if any(t.device != hidden.device for t in floats + [targets]):
        raise ValueError("token_logprobs: all tensors must be on one device")
    if V == 0:
        raise ValueError("token_logprobs: weight has no rows (V == 0)")
    if N == 0:
        return hidden.new_zeros(0, dtype=torch.float32) + 0.0 * hidden.sum()
    if hidden.device.type == "cpu" and V > 0 and not bool(((targets >= 0) & (targets < V)).all()):
        raise ValueError(f"token_logprobs: targets must lie in [0, {V})")
    if _use_triton(hidden) and hidden.dtype == torch.float64:
        raise ValueError("token_logprobs: the Triton path takes bf16 / fp16 / fp32 inputs")
    return _TokenLogprobs.apply(hidden.contiguous(), weight.contiguous(),
                                None if bias is None else bias.contiguous(), targets.contiguous(),
                                1.0 / temperature)


def token_logprobs_reference(hidden, weight, targets, *, bias=None, temperature=1.0):
    """Plain torch: full [N, V] logits in float64 (for tests and small inputs only)."""
    logits = hidden.double() @ weight.double().t()
    if bias is not None:
        logits = logits + bias.double()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp.gather(1, targets.long()[:, None])[:, 0]
