"""Grouped decode attention: one decode step for rows that share KV prefixes (DESIGN.md §4).

    grouped_decode_attention(q, prefix_k, prefix_v, prefix_len, group_ids, suffix_k, suffix_v,
                             suffix_len, *, scale=None, rows_by_group=None, num_splits=None)

    q          [B, Hq, D]            one query token per row
    prefix_k/v [P, Hkv, Lp_max, D]   P shared prefixes (one per prompt group, a batch-wide
                                     unconditional prefix, ...)
    prefix_len int [P]               valid length of each prefix, 0 allowed (empty prefix)
    group_ids  int [B]               the prefix each row attends to, in [0, P)
    suffix_k/v [B, Hkv, Ls_max, D]   each row's own KV after its prefix
    suffix_len int [B]               valid length of each suffix, 0 allowed
    scale      float                 default 1/sqrt(D)
    -> [B, Hq, D] in q's dtype:
       softmax(q . k * scale) @ v over concat(prefix[group_ids[b]][:prefix_len], suffix[b][:suffix_len])

Hq must be a multiple of Hkv (GQA: query head h reads kv head h // (Hq // Hkv)). Inputs may be
fp16/bf16/fp32 (fp64 on the torch path) with any strides; accumulation is fp32. A row whose
prefix and suffix are both empty has nothing to attend to: its output is defined as 0 (and its
log-sum-exp as -inf), because raising would need a host sync inside a CUDA graph. NaN in q, or
in a valid (within-length) k/v slot a row reads, makes that row's output NaN on every path (it
is never turned into 0); KV slots past the lengths are never read and may hold anything.

The two halves and the merge are public too, so a caller can place them differently:

    prefix_attention(q, prefix_k, prefix_v, prefix_len, group_ids, *, scale=None,
                     rows_by_group=None, num_splits=None) -> (out fp32 [B, Hq, D], lse fp32 [B, Hq])
    suffix_attention(q, suffix_k, suffix_v, suffix_len, *, scale=None)
                     -> (out fp32 [B, Hq, D], lse fp32 [B, Hq])
    merge_attention(o1, lse1, o2, lse2) -> (out [..., D], lse [...])

Halves return fp32 (fp64 for fp64 inputs on the torch path). `lse` is the natural-log
log-sum-exp of the scaled scores (-inf for an empty key set, whose out is 0); merging two disjoint
key sets is exact: out = (e^lse1 o1 + e^lse2 o2) / (e^lse1 + e^lse2).

Algorithm (Hydragen / cascade attention). The prefix kernel runs one program per (prefix, kv head,
split of the prefix length): it gathers the query rows of every row of the group (times the GQA
ratio) into a [BLOCK_M, D] tile and streams the prefix's K/V once, with tensor-core dots
[BLOCK_M, D] x [D, BLOCK_N], so G rows sharing an Lp-token prefix read Lp tokens of KV instead of
G * Lp. Long prefixes are split across programs (flash-decoding) and each split writes a partial
(out, lse). The suffix kernel runs one program per (row, query head): it starts from the combined
prefix partials and streams the row's own suffix with an online softmax, so the merge costs no
extra launch. Groups larger than BLOCK_M rows are processed in chunks that re-read the prefix tile
(from L2 in practice).

`rows_by_group` is the gather layout of the prefix kernel: (rows int32 [B] = row indices sorted
by group, starts int32 [P + 1] = where each group begins in `rows`), from `group_layout`. It is
computed with torch ops that never sync the host (sort + searchsorted); a caller that runs many
layers per step should build it once per step and pass it to every layer. `num_splits` overrides
the split-K heuristic of the prefix kernel (Triton path only).

CUDA-graph friendly: the CUDA path performs no host sync and no data-dependent Python control
flow; the kernels read the lengths from device memory and loop over exactly the valid tokens.
Grid sizes depend only on shapes. Value checks (lengths within capacity, group ids in range) run
on CPU tensors only; on CUDA out-of-range lengths are clamped to the capacity and a row with an
out-of-range group id gets no prefix.

Dispatch: CUDA tensors -> Triton; CPU tensors -> a torch path (one matmul per prefix group, so it
also reads each prefix once); CPU tensors with FASTBICOT_FORCE_TRITON=1 -> the Triton kernels,
which needs TRITON_INTERPRET=1 set before this module is imported (triton picks interpreter or
compiler when a kernel is decorated, i.e. at import; triton 3.6 and 3.9 alike).
"""

import math
import os

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
_BLOCK_N_PREFIX = 64  # prefix tokens per tile of the prefix kernel
_BLOCK_N_SUFFIX = 64  # suffix tokens per tile of the suffix kernel
_MIN_SPLIT_TOKENS = 256  # a prefix split shorter than this is not worth its partial write
# Software-pipelining depth of the prefix kernel for fp16/bf16 caches. 3 stages put the
# BLOCK_M=64, D=128 tile at the 255-register cap with spills in the KV loop on sm_80 (found by the
# ahead-of-time compile, tests/aot_compile.py); 2 stages compile without spills on sm_80 and sm_90.
# Chosen from the compiler's report alone: it awaits a GPU measurement (bench/gpu_check.sh).
_PREFIX_NUM_STAGES_16BIT = 2
# fp32 caches take true fp32 products (no tensor cores): a [BLOCK_M, D] x [D, BLOCK_N] FMA dot held
# in registers. BLOCK_M=64 needed 180 KB of shared memory (over A100's 163 KB per block) and
# spilled 13-29 KB per thread in the KV loop; 16 query rows, 8 warps and no pipelining compile
# with no spill and 45 KB of shared memory on sm_80 and sm_90. Larger groups loop over 16-row
# chunks and re-read the prefix from L2: fp32 caches are the slow, exact path.
_PREFIX_FP32_CONFIG = {"BLOCK_M": 16, "num_warps": 8, "num_stages": 1}


# ----------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------


@triton.jit
def _prefix_kernel(q_ptr, k_ptr, v_ptr, plen_ptr, rows_ptr, starts_ptr, po_ptr, plse_ptr,
                   Hkv, Lp_max, D, split_len, qk_scale,
                   s_qb, s_qh, s_qd, s_kp, s_kh, s_kn, s_kd, s_vp, s_vh, s_vn, s_vd,
                   s_ob, s_oh, s_os, s_lb, s_lh,
                   GQA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr):
    """Partial attention of every query of group p (kv head hk) over one split of prefix p."""
    p = tl.program_id(0) // Hkv
    hk = tl.program_id(0) % Hkv
    split = tl.program_id(1)
    length = tl.minimum(tl.load(plen_ptr + p), Lp_max)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, length)
    start = tl.load(starts_ptr + p)
    # queries of this group: its rows x the GQA query heads of kv head hk; none if the split is empty
    m_total = tl.where(lo < hi, (tl.load(starts_ptr + p + 1) - start) * GQA, 0)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    k_base = k_ptr + p.to(tl.int64) * s_kp + hk * s_kh
    v_base = v_ptr + p.to(tl.int64) * s_vp + hk * s_vh
    for m0 in range(0, m_total, BLOCK_M):
        i = m0 + offs_m
        i_ok = i < m_total
        row = tl.load(rows_ptr + start + i // GQA, mask=i_ok, other=0).to(tl.int64)
        head = hk * GQA + i % GQA
        q = tl.load(q_ptr + row[:, None] * s_qb + head[:, None] * s_qh + offs_d[None, :] * s_qd,
                    mask=i_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for n0 in range(lo, hi, BLOCK_N):
            n = n0 + offs_n
            n_ok = n < hi
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + n[:, None] * s_kn + offs_d[None, :] * s_kd, mask=kv_mask, other=0.0)
            if DOT_F32:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # log2 units
            s = tl.where(n_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile holds a valid token
            alpha = tl.exp2(m_i - m_new)
            pr = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(pr, 1)
            v = tl.load(v_base + n[:, None] * s_vn + offs_d[None, :] * s_vd, mask=kv_mask, other=0.0)
            pr = pr.to(v.dtype)  # the MMA takes P in the cache dtype (flash-attention numerics)
            if DOT_F32:
                pr = pr.to(tl.float32)
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(pr, v, input_precision=PREC)
            m_i = m_new
        out = acc / l_i[:, None]
        lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # natural log
        tl.store(po_ptr + row[:, None] * s_ob + head[:, None] * s_oh + split * s_os + offs_d[None, :],
                 out, mask=i_ok[:, None] & d_ok[None, :])
        tl.store(plse_ptr + row * s_lb + head * s_lh + split, lse, mask=i_ok)


@triton.jit
def _suffix_merge_kernel(q_ptr, k_ptr, v_ptr, slen_ptr, po_ptr, plse_ptr, o_ptr, lse_ptr,
                         Ls_max, D, num_parts, qk_scale,
                         s_qb, s_qh, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
                         s_pb, s_ph, s_ps, s_plb, s_plh, s_ob, s_oh, s_lb,
                         GQA: tl.constexpr, HAS_PARTS: tl.constexpr, HAS_SUFFIX: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Out and lse of (row b, query head h): the prefix partials merged with the row's suffix."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    # running softmax state in log2 units: max m_i, sum l_i, unnormalised output acc
    m_i = tl.full([], float("-inf"), tl.float32)
    l_i = tl.full([], 0.0, tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    if HAS_PARTS:
        offs_s = tl.arange(0, BLOCK_S)
        lse = tl.load(plse_ptr + b * s_plb + h * s_plh + offs_s, mask=offs_s < num_parts,
                      other=float("-inf")) * 1.4426950408889634
        m_i = tl.max(lse, 0)
        w = tl.exp2(lse - tl.where(m_i == float("-inf"), 0.0, m_i))  # 0 for empty parts
        # empty parts were never written: do not read them (0 * garbage could be NaN)
        has = lse > float("-inf")
        o = tl.load(po_ptr + b * s_pb + h * s_ph + offs_s[:, None] * s_ps + offs_d[None, :],
                    mask=has[:, None] & d_ok[None, :], other=0.0)
        l_i = tl.sum(w, 0)
        acc = tl.sum(w[:, None] * o, 0)
    if HAS_SUFFIX:
        length = tl.minimum(tl.load(slen_ptr + b), Ls_max)
        offs_n = tl.arange(0, BLOCK_N)
        hk = h // GQA
        q = tl.load(q_ptr + b * s_qb + h * s_qh + offs_d * s_qd, mask=d_ok, other=0.0).to(tl.float32)
        k_base = k_ptr + b * s_kb + hk * s_kh
        v_base = v_ptr + b * s_vb + hk * s_vh
        for n0 in range(0, length, BLOCK_N):
            n = n0 + offs_n
            n_ok = n < length
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + n[:, None] * s_kn + offs_d[None, :] * s_kd, mask=kv_mask, other=0.0)
            s = tl.sum(q[None, :] * k.to(tl.float32), 1) * qk_scale
            s = tl.where(n_ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 0))
            alpha = tl.exp2(m_i - m_new)
            pr = tl.exp2(s - m_new)
            l_i = l_i * alpha + tl.sum(pr, 0)
            v = tl.load(v_base + n[:, None] * s_vn + offs_d[None, :] * s_vd, mask=kv_mask, other=0.0)
            acc = acc * alpha + tl.sum(pr[:, None] * v.to(tl.float32), 0)
            m_i = m_new
    # l_i == 0 exactly: no key at all -> out 0, lse -inf. A NaN l_i (NaN in q, k or v) stays NaN.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = tl.where(empty, 0.0, acc / l_safe)
    lse_out = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    tl.store(o_ptr + b * s_ob + h * s_oh + offs_d, out.to(o_ptr.dtype.element_ty), mask=d_ok)
    tl.store(lse_ptr + b * s_lb + h, lse_out)


def _block_d(d):
    return max(16, triton.next_power_of_2(d))  # tl.dot needs >= 16


def _num_splits(q, lp_max, programs, num_splits, sms=None):
    """Prefix splits: enough programs to fill the GPU, each split at least _MIN_SPLIT_TOKENS long."""
    lp_max = max(lp_max, 1)  # a zero-capacity prefix still gets one (empty) split
    if num_splits is None:
        if sms is None:
            sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 1
        num_splits = min(triton.cdiv(2 * sms, max(programs, 1)), triton.cdiv(lp_max, _MIN_SPLIT_TOKENS))
    num_splits = max(1, min(int(num_splits), triton.cdiv(lp_max, _BLOCK_N_PREFIX)))
    split_len = triton.cdiv(triton.cdiv(lp_max, num_splits), _BLOCK_N_PREFIX) * _BLOCK_N_PREFIX
    return triton.cdiv(lp_max, split_len), split_len


def _prefix_config(num_queries, dtype, on_gpu):
    """Tile and launch options of the prefix kernel for `num_queries` = B * (Hq // Hkv) query rows."""
    # 16 or 64 query rows: BLOCK_M=32 spilled 20 B in the KV loop on sm_90 with triton 3.6's ptxas
    # (tests/aot_compile.py); the kernel streams KV, so 64 rows with half of them masked cost little.
    block_m = 16 if num_queries <= 16 else 64
    if on_gpu and dtype == torch.float32:
        return dict(_PREFIX_FP32_CONFIG)
    stages = _PREFIX_NUM_STAGES_16BIT if on_gpu else 1  # the interpreter ignores num_stages
    return {"BLOCK_M": block_m, "num_warps": 4, "num_stages": stages}


def _prefix_launch(q, pk, pv, plen, layout, scale, num_splits, on_gpu=None, sms=None):
    """(grid, args, kwargs, (po, plse)) of the prefix kernel: what `_prefix_partials_triton` launches.

    on_gpu / sms default to q's device; tests/aot_compile.py passes them to plan a CUDA launch from
    CPU tensors of the real shapes, so the ahead-of-time compile sees exactly these specializations.
    """
    on_gpu = q.is_cuda if on_gpu is None else on_gpu
    B, Hq, D = q.shape
    P, Hkv, Lp, _ = pk.shape
    rows, starts = layout
    S, split_len = _num_splits(q, Lp, P * Hkv, num_splits, sms)
    po = torch.empty(B, Hq, S, D, dtype=torch.float32, device=q.device)
    plse = torch.full((B, Hq, S), float("-inf"), dtype=torch.float32, device=q.device)
    args = (q, pk, pv, plen, rows, starts, po, plse, Hkv, Lp, D, split_len, scale * _LOG2E,
            *q.stride(), *pk.stride(), *pv.stride(), po.stride(0), po.stride(1), po.stride(2),
            plse.stride(0), plse.stride(1))
    kwargs = dict(GQA=Hq // Hkv, BLOCK_N=_BLOCK_N_PREFIX, BLOCK_D=_block_d(D),
                  # triton's interpreter multiplies bf16 dot operands as raw uint16 bits: feed it fp32
                  DOT_F32=not on_gpu,
                  # fp32 caches get true fp32 products ("ieee", not tf32); fp16/bf16 use the usual MMA
                  PREC="ieee" if q.dtype == torch.float32 else "tf32",
                  **_prefix_config(B * (Hq // Hkv), q.dtype, on_gpu))
    return (P * Hkv, S), args, kwargs, (po, plse)


def _prefix_partials_triton(q, pk, pv, plen, layout, scale, num_splits):
    """Per-split partial (out, lse) of the prefix kernel: fp32 [B, Hq, S, D] and [B, Hq, S]."""
    grid, args, kwargs, (po, plse) = _prefix_launch(q, pk, pv, plen, layout, scale, num_splits)
    if q.shape[0] > 0 and grid[0] > 0:
        _prefix_kernel[grid](*args, **kwargs)
    return po, plse


def _suffix_merge_launch(q, parts, suffix, scale, out_dtype):
    """(grid, args, kwargs, (out, lse)) of the suffix kernel that merges `parts` = (po, plse) or None
    with `suffix` = (k, v, len) or None."""
    B, Hq, D = q.shape
    out = torch.empty(B, Hq, D, dtype=out_dtype, device=q.device)
    lse = torch.empty(B, Hq, dtype=torch.float32, device=q.device)
    po, plse = parts if parts is not None else (lse, lse)  # placeholders: the branch is compiled out
    sk, sv, slen = suffix if suffix is not None else (q[:, :, None], q[:, :, None], lse)
    S = po.shape[2] if parts is not None else 1
    args = (q, sk, sv, slen, po, plse, out, lse, sk.shape[2], D, S, scale * _LOG2E,
            *q.stride(), *sk.stride(), *sv.stride(),
            *(po.stride()[:3] if parts is not None else (0, 0, 0)),
            *(plse.stride()[:2] if parts is not None else (0, 0)),
            out.stride(0), out.stride(1), lse.stride(0))
    kwargs = {"GQA": Hq // sk.shape[1], "HAS_PARTS": parts is not None, "HAS_SUFFIX": suffix is not None,
              "BLOCK_N": _BLOCK_N_SUFFIX, "BLOCK_D": _block_d(D), "BLOCK_S": triton.next_power_of_2(S),
              "num_warps": 4}
    return (B, Hq), args, kwargs, (out, lse)


def _suffix_merge_triton(q, parts, suffix, scale, out_dtype):
    """Launch the suffix kernel: merge `parts` = (po, plse) or None with `suffix` = (k, v, len) or None."""
    grid, args, kwargs, (out, lse) = _suffix_merge_launch(q, parts, suffix, scale, out_dtype)
    if grid[0] > 0 and grid[1] > 0:
        _suffix_merge_kernel[grid](*args, **kwargs)
    return out, lse


# ----------------------------------------------------------------------------------------------
# torch (CPU path and references)
# ----------------------------------------------------------------------------------------------


def _compute_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _prefix_attention_torch(q, pk, pv, plen, gid, scale):
    """One matmul per prefix over its group's rows (each prefix read once); host syncs are fine."""
    B, Hq, D = q.shape
    Hkv = pk.shape[1]
    dt = _compute_dtype(q)
    out = torch.zeros(B, Hq, D, dtype=dt, device=q.device)
    lse = torch.full((B, Hq), float("-inf"), dtype=dt, device=q.device)
    gid = gid.long()
    for p, length in enumerate(plen.tolist()):
        rows = (gid == p).nonzero().flatten()
        if length == 0 or rows.numel() == 0:
            continue
        qp = q[rows].to(dt).view(-1, Hkv, Hq // Hkv, D)
        s = torch.einsum("nhgd,hld->nhgl", qp, pk[p, :, :length].to(dt)) * scale
        lse_p = torch.logsumexp(s, -1)
        o = torch.einsum("nhgl,hld->nhgd", torch.exp(s - lse_p[..., None]), pv[p, :, :length].to(dt))
        out[rows] = o.reshape(-1, Hq, D)
        lse[rows] = lse_p.reshape(-1, Hq)
    return out, lse


def _suffix_attention_torch(q, sk, sv, slen, scale):
    """All rows at once over the longest valid suffix, masking each row's tail."""
    B, Hq, D = q.shape
    Hkv = sk.shape[1]
    dt = _compute_dtype(q)
    ls = int(slen.max()) if B > 0 else 0
    qg = q.to(dt).view(B, Hkv, Hq // Hkv, D)
    s = torch.einsum("bhgd,bhld->bhgl", qg, sk[:, :, :ls].to(dt)) * scale
    valid = torch.arange(ls, device=q.device)[None, :] < slen.long()[:, None]  # [B, ls]
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, -1)  # -inf for an empty suffix, NaN if a valid score is NaN
    p = torch.exp(s - lse.masked_fill(lse == float("-inf"), 0.0)[..., None])  # exp(-inf) = 0 on empty rows
    # slots past a row's length may hold anything (an uninitialised cache): 0 * NaN must not leak
    v = sv[:, :, :ls].to(dt).masked_fill(~valid[:, None, :, None], 0.0)
    out = torch.einsum("bhgl,bhld->bhgd", p, v)
    return out.reshape(B, Hq, D), lse.reshape(B, Hq)


def merge_attention(o1, lse1, o2, lse2):
    """Attention over the union of two disjoint key sets from each set's (out, lse).

    o1, o2 [..., D]; lse1, lse2 [...] natural-log log-sum-exp (-inf = empty set, whose out is
    ignored). Returns (out [..., D] in the promoted dtype of o1 and o2, lse [...] fp32, fp64 for
    fp64 inputs); out is 0 and lse -inf where both sets are empty. A side counts as empty only when
    its lse is -inf: NaN in an out or lse of a non-empty side gives NaN, never 0. Pure torch without
    host sync, so it is fine inside CUDA graphs.
    """
    if o1.shape != o2.shape or lse1.shape != lse2.shape or o1.shape[:-1] != lse1.shape:
        raise ValueError(f"merge_attention: shapes do not match: o1 {tuple(o1.shape)}, lse1 "
                         f"{tuple(lse1.shape)}, o2 {tuple(o2.shape)}, lse2 {tuple(lse2.shape)}")
    out_dtype = torch.promote_types(o1.dtype, o2.dtype)
    dt = torch.promote_types(out_dtype, torch.float32)  # fp32 math (fp64 for fp64 inputs)
    lse1, lse2 = lse1.to(dt), lse2.to(dt)
    m = torch.maximum(lse1, lse2)
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)  # both empty: avoid -inf - -inf
    empty1, empty2 = (lse1 == float("-inf"))[..., None], (lse2 == float("-inf"))[..., None]
    w1, w2 = torch.exp(lse1 - m)[..., None], torch.exp(lse2 - m)[..., None]
    total = w1 + w2
    # an empty side (lse -inf) contributes nothing, even if its out holds garbage; NaN propagates
    acc = torch.where(empty1, 0.0, w1 * o1.to(dt)) + torch.where(empty2, 0.0, w2 * o2.to(dt))
    out = torch.where(empty1 & empty2, 0.0, acc / torch.where(empty1 & empty2, 1.0, total))
    return out.to(out_dtype), m + torch.log(total[..., 0])


def grouped_decode_attention_reference(q, prefix_k, prefix_v, prefix_len, group_ids, suffix_k,
                                       suffix_v, suffix_len, *, scale=None):
    """Plain attention over each row's gathered [prefix | suffix] KV with a masked softmax (fp32).

    Materialises every row's prefix (G copies per group): the semantics, not the fast path.
    """
    _check(q, prefix_k, prefix_v, prefix_len, group_ids, suffix_k, suffix_v, suffix_len)
    Hq, D = q.shape[1:]
    Hkv = prefix_k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    gid = group_ids.long()
    k = torch.cat([prefix_k[gid], suffix_k], dim=2).float().repeat_interleave(Hq // Hkv, dim=1)
    v = torch.cat([prefix_v[gid], suffix_v], dim=2).float().repeat_interleave(Hq // Hkv, dim=1)
    lp, ls = prefix_k.shape[2], suffix_k.shape[2]
    valid = torch.cat([torch.arange(lp, device=q.device)[None] < prefix_len.long()[gid][:, None],
                       torch.arange(ls, device=q.device)[None] < suffix_len.long()[:, None]], dim=1)
    s = torch.einsum("bhd,bhld->bhl", q.float(), k) * scale
    s = s.masked_fill(~valid[:, None, :], float("-inf"))
    # a row with no valid key outputs 0; NaN in a valid q/k/v entry stays NaN
    p = torch.softmax(s, dim=-1).masked_fill(~valid.any(1)[:, None, None], 0.0)
    v = v.masked_fill(~valid[:, None, :, None], 0.0)  # slots past the lengths may hold garbage
    return torch.einsum("bhl,bhld->bhd", p, v).to(q.dtype)


# ----------------------------------------------------------------------------------------------
# checks, layout and dispatch
# ----------------------------------------------------------------------------------------------


def _check_ints(name, t, q, n, lo, hi):
    """int32/int64 [n] on q's device; on CPU (no device sync needed) every value in [lo, hi]."""
    if t.shape != (n,) or t.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be int32/int64 [{n}], got {t.dtype} {tuple(t.shape)}")
    if t.device != q.device:
        raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    if q.device.type != "cuda" and t.numel() and not bool(((t >= lo) & (t <= hi)).all()):
        raise ValueError(f"{name} must lie in [{lo}, {hi}], got {t.tolist()}")


def _check_kv(name, q, k, v, lengths, rows):
    """k/v [rows, Hkv, L, D] matching q [B, Hq, D]; lengths int [rows] within the capacity L."""
    if k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"{name}_k/{name}_v must both be [N, Hkv, L, D], "
                         f"got {tuple(k.shape)} and {tuple(v.shape)}")
    if rows is not None and k.shape[0] != rows:
        raise ValueError(f"{name}_k has {k.shape[0]} rows, q has {rows}")
    if k.shape[3] != q.shape[2]:
        raise ValueError(f"{name}_k head dim {k.shape[3]} != q head dim {q.shape[2]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of {name} kv heads ({k.shape[1]})")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{name}_k/{name}_v dtype {k.dtype}/{v.dtype} != q dtype {q.dtype}")
    if not (k.device == v.device == q.device):
        raise ValueError(f"{name}_k/{name}_v must be on q's device {q.device}")
    _check_ints(f"{name}_len ({name} capacity {k.shape[2]})", lengths, q, k.shape[0], 0, k.shape[2])


def _check(q, prefix_k, prefix_v, prefix_len, group_ids, suffix_k=None, suffix_v=None, suffix_len=None,
           rows_by_group=None):
    if q.dim() != 3:
        raise ValueError(f"q must be [B, Hq, D] (one query per row), got {tuple(q.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"q dtype {q.dtype} is not a floating type this kernel supports")
    if q.dtype == torch.float64 and _use_triton(q):
        raise ValueError("the Triton kernels take fp16/bf16/fp32, not float64")
    if prefix_k is not None:
        _check_kv("prefix", q, prefix_k, prefix_v, prefix_len, None)
        P = prefix_k.shape[0]
        _check_ints(f"group_ids ({P} prefixes)", group_ids, q, q.shape[0], 0, P - 1)
        if rows_by_group is not None:
            rows, starts = rows_by_group
            if rows.shape != group_ids.shape or starts.shape != (P + 1,):
                raise ValueError(f"rows_by_group must be (rows [{group_ids.numel()}], starts [{P + 1}]) from "
                                 f"group_layout, got {tuple(rows.shape)} and {tuple(starts.shape)}")
    if suffix_k is not None:
        _check_kv("suffix", q, suffix_k, suffix_v, suffix_len, q.shape[0])
        if prefix_k is not None and suffix_k.shape[1] != prefix_k.shape[1]:
            raise ValueError(f"prefix and suffix kv heads differ: {prefix_k.shape[1]} vs {suffix_k.shape[1]}")


def group_layout(group_ids, num_prefixes):
    """(rows int32 [B]: row indices sorted by group, starts int32 [P + 1]: group p is
    rows[starts[p]:starts[p + 1]]). Sort + searchsorted: no host sync, CUDA-graph safe."""
    sorted_ids, order = torch.sort(group_ids.long(), stable=True)
    bounds = torch.arange(num_prefixes + 1, device=group_ids.device, dtype=torch.long)
    starts = torch.searchsorted(sorted_ids, bounds)
    return order.to(torch.int32), starts.to(torch.int32)


def _interpreted():
    """True when this module's kernels were built for Triton's interpreter (TRITON_INTERPRET=1 was set
    when they were decorated: triton reads it at @triton.jit time, i.e. at import)."""
    return type(_prefix_kernel).__name__ == "InterpretedFunction"


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


def _triton_layout(group_ids, num_prefixes, rows_by_group):
    if rows_by_group is None:
        return group_layout(group_ids, num_prefixes)
    return tuple(t.to(torch.int32) for t in rows_by_group)


def _len32(t):
    return t.to(torch.int32)  # no-op for int32 (the kernels load int32)


def prefix_attention(q, prefix_k, prefix_v, prefix_len, group_ids, *, scale=None, rows_by_group=None,
                     num_splits=None):
    """Attention of each row over its group's prefix only -> (out fp32 [B, Hq, D], lse fp32 [B, Hq]).
    Rows whose prefix is empty get out 0, lse -inf. See the module docstring."""
    _check(q, prefix_k, prefix_v, prefix_len, group_ids, rows_by_group=rows_by_group)
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else scale
    if not _use_triton(q):
        return _prefix_attention_torch(q, prefix_k, prefix_v, prefix_len, group_ids, scale)
    layout = _triton_layout(group_ids, prefix_k.shape[0], rows_by_group)
    parts = _prefix_partials_triton(q, prefix_k, prefix_v, _len32(prefix_len), layout, scale, num_splits)
    return _suffix_merge_triton(q, parts, None, scale, torch.float32)


def suffix_attention(q, suffix_k, suffix_v, suffix_len, *, scale=None):
    """Attention of each row over its own suffix only -> (out fp32 [B, Hq, D], lse fp32 [B, Hq]).
    Rows whose suffix is empty get out 0, lse -inf. See the module docstring."""
    _check(q, None, None, None, None, suffix_k, suffix_v, suffix_len)
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else scale
    if not _use_triton(q):
        return _suffix_attention_torch(q, suffix_k, suffix_v, suffix_len, scale)
    return _suffix_merge_triton(q, None, (suffix_k, suffix_v, _len32(suffix_len)), scale, torch.float32)


def grouped_decode_attention(q, prefix_k, prefix_v, prefix_len, group_ids, suffix_k, suffix_v, suffix_len,
                             *, scale=None, rows_by_group=None, num_splits=None):
    """One decode step over [shared group prefix | own suffix] per row -> [B, Hq, D] in q's dtype.
    Two launches on the Triton path (prefix kernel, then suffix kernel that merges); see the
    module docstring for shapes, semantics and options."""
    _check(q, prefix_k, prefix_v, prefix_len, group_ids, suffix_k, suffix_v, suffix_len, rows_by_group)
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else scale
    if not _use_triton(q):
        o1, lse1 = _prefix_attention_torch(q, prefix_k, prefix_v, prefix_len, group_ids, scale)
        o2, lse2 = _suffix_attention_torch(q, suffix_k, suffix_v, suffix_len, scale)
        return merge_attention(o1, lse1, o2, lse2)[0].to(q.dtype)
    layout = _triton_layout(group_ids, prefix_k.shape[0], rows_by_group)
    parts = _prefix_partials_triton(q, prefix_k, prefix_v, _len32(prefix_len), layout, scale, num_splits)
    out, _ = _suffix_merge_triton(q, parts, (suffix_k, suffix_v, _len32(suffix_len)), scale, q.dtype)
    return out
