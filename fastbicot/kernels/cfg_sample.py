"""Fused classifier-free-guidance sampling: one launch per decode step (DESIGN.md §4).

    cfg_sample(cond_logits, uncond_logits=None, *, guidance_scale=1.0, temperature=1.0,
               top_k=0, top_p=1.0, seed=0, offset=0, keys=None, return_logprobs=False, check_nan=True)

Per row: z = (u + w (c - u)) / T; keep z >= the k-th largest z (top_k); p = softmax(z); keep the
tokens whose probability is >= the smallest probability of the shortest most-probable prefix
whose mass reaches top_p; renormalise; draw one token. Tie rule: every token tied with the last
kept value is kept (so top_k=5 with a 3-way tie at the 5th value keeps 7 tokens), for both top-k
and top-p. A token that is -inf in the conditional or (with guidance) the unconditional logits is
never drawn. temperature == 0 is greedy: argmax of the guided logits (lowest index on ties), whose
log-prob under the final (point-mass) distribution is 0.

The Triton kernels never sort. Both thresholds are searched over the order-preserving integer image
(key) of the fp32 scores and always land on an existing score's key, so the kept sets are exact,
not approximations: top-k keeps the scores >= the k-th largest; top-p the scores >= the largest
key whose tokens (key >= it) hold >= top_p of the mass. Rows of V <= 16384 sit in registers and
bisect (32 halvings of the key range, on chip). Longer rows (the text vocabulary, V = 102400) are
streamed from memory, so they use a radix select instead: each pass over the row fixes 4 more
bits of the threshold from a 16-bin histogram (counts for top-k, mass for top-p) of the next digit,
8 passes per threshold (the key span [key(-inf), key(0)] holds < 2**31 keys): 1 + 8 + 1 = 10
passes per token with top-k (the CoT default, top-k 50; bisection took 34), 18 with top-k and
top-p, 2 unfiltered. Counts are fp32 sums, exact for V < 2**24. The draw is
Gumbel-max, argmax(score + Gumbel), with Philox keyed by `seed` and counter (token // 4, row,
offset), one call giving the uniforms of 4 consecutive tokens:
rows are independent and (seed, offset) reproduces a step. seed/offset may be int64 0-dim device
tensors that the kernel reads from memory, so a captured CUDA graph can advance them in place.

Per-row stream keys: with `keys` (int64 [B], a device tensor the kernel reads, so CUDA-graph
friendly) row r's stream is (seed, offset, keys[r]) instead of (seed, offset, r): the Philox
counter takes the key's low 32 bits where it took the row, and its high 32 bits are xored into the
high half of the Philox key (seed), so for one seed distinct keys are distinct streams and
keys == arange(B) is the unkeyed stream. A row's token then depends only on its logits and its key,
not on which rows share the batch or where it sits (the rollout keys a sample by its global prompt
and generation index, so N ranks draw what 1 rank draws). The CPU torch path draws one inverse-CDF
uniform per row, from a torch.Generator of (seed, offset) without keys, and with keys from a
counter-based integer hash of (seed, offset, key) (`keyed_uniform`: two 32-bit xor-shift-multiply
lanes held in int64 without overflow, 52 bits of them forming a float64 on the 2**-53 grid).
With top-k on a long CPU row (V >= 8 k: the CoT's top-k 50 of 102400) the torch path works on the k
candidates from torch.topk instead of the whole row: the same token for the same uniform, up to the
float rounding of the softmax normaliser (rows tied at the k-th score take the whole-row path).
float64 logits always take the torch path, in float64 (the rollout's exactness tests sample through it).

Rows with V <= 16384 run one program per row (several short rows per program), held in registers;
longer rows (text vocab, V = 102400) run a tiled kernel that streams the row once per pass (the
pass counts above).
"""

import math
import operator
import os

import torch
import triton
import triton.language as tl

_MAX_BLOCK = 16384  # widest row held in registers by one program
_TILE = 4096  # chunk width of the tiled kernel for longer rows
_NEG_INF_KEY = tl.constexpr(-2139095041)  # _ordered_key(-inf): 0xff800000 ^ 0x7fffffff as int32
_BISECT_STEPS = tl.constexpr(32)  # halves a span of < 2**32 keys down to one key
# Radix select of the tiled kernel: keys of scores in [-inf, 0] are offsets u = key - key(-inf) in
# [0, 2**31); each pass over the row fixes _RADIX_BITS more bits of the threshold, most significant
# first, from a 2**_RADIX_BITS-bin histogram of the next digit (counts for top-k, probability mass
# for top-p) among the tokens that match the bits fixed so far.
_RADIX_BITS = tl.constexpr(4)
_RADIX_BINS = tl.constexpr(16)  # 2 ** _RADIX_BITS
_RADIX_PASSES = tl.constexpr(8)  # ceil(31 / _RADIX_BITS): passes over the row per threshold


# ----------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------


@triton.jit
def _guided(c_ptr, u_ptr, rows, cols, row_ok, V, stride_c, stride_u, w, HAS_U: tl.constexpr):
    """fp32 guided logits of a [R, C] tile; -inf outside the row and on tokens banned in a branch."""
    col_ok = cols[None, :] < V
    ld = row_ok[:, None] & col_ok
    c = tl.load(c_ptr + rows[:, None].to(tl.int64) * stride_c + cols[None, :], mask=ld, other=0.0)
    z = c.to(tl.float32)
    if HAS_U:
        u = tl.load(u_ptr + rows[:, None].to(tl.int64) * stride_u + cols[None, :], mask=ld, other=0.0)
        u = u.to(tl.float32)
        # -inf in either branch bans the token (u + w(c-u) would be NaN or +inf there).
        banned = (z == float("-inf")) | (u == float("-inf"))
        z = tl.where(banned, 0.0, z)  # zeroed first so no inf - inf is ever evaluated
        u = tl.where(banned, 0.0, u)
        z = tl.where(banned, float("-inf"), u + w * (z - u))
    return tl.where(col_ok, z, float("-inf"))


@triton.jit
def _ordered_key(x):
    """int32 with the same order as the fp32 x (x must not be NaN; -0.0 and +0.0 both map to 0)."""
    x = x + 0.0  # -0.0 -> +0.0, so equal floats get equal keys
    i = x.to(tl.int32, bitcast=True)
    return i ^ ((i >> 31) & 0x7FFFFFFF)


@triton.jit
def _midpoint(lo, hi):
    """floor((lo + hi) / 2) without int32 overflow."""
    return (lo >> 1) + (hi >> 1) + (lo & hi & 1)


@triton.jit
def _gumbel(seed, offset, rows, start, WIDTH: tl.constexpr, ROW_SEED: tl.constexpr = False):
    """Gumbel(0, 1) noise for the tokens start .. start + WIDTH - 1 (start a multiple of 4) of each row.

    One Philox-4x32-10 call per 4 tokens, counter (token // 4, row, offset low, offset high): its 4
    outputs are the 4 tokens' uniforms (a quarter of the Philox work and of its live state).
    `rows` is each row's counter word (its index, or the low 32 bits of its stream key); with
    ROW_SEED, `seed` is a per-row [R] Philox key (see _row_stream) instead of a scalar.
    """
    quads = start // 4 + tl.arange(0, WIDTH // 4)
    c0 = quads[None, :].to(tl.uint32) + tl.zeros_like(rows[:, None]).to(tl.uint32)
    c1 = rows[:, None].to(tl.uint32) + tl.zeros_like(quads[None, :]).to(tl.uint32)
    c2 = offset.to(tl.uint32) + tl.zeros_like(c0)  # truncates to the low 32 bits
    c3 = (offset >> 32).to(tl.uint32) + tl.zeros_like(c0)
    if ROW_SEED:
        seed = seed[:, None]
    r0, r1, r2, r3 = tl.random.philox(seed, c0, c1, c2, c3)
    # [R, WIDTH/4, 2, 2] -> [R, WIDTH]: token 4q + 2a + b takes output 2a + b of quad q
    r = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), [rows.shape[0], WIDTH])
    # u in [0, 1); clamping away 0 keeps the noise finite (u == 0 has probability 2**-31).
    u = tl.maximum(tl.random.uint_to_uniform_float(r), 1.0e-30)
    return -tl.log(-tl.log(u))


@triton.jit
def _read_rng(seed_ptr, offset_ptr, seed, offset, RNG_IN_MEMORY: tl.constexpr):
    if RNG_IN_MEMORY:  # 0-dim device tensors: a captured CUDA graph sees their current values
        seed = tl.load(seed_ptr)
        offset = tl.load(offset_ptr)
    return seed.to(tl.int64), offset.to(tl.int64)


@triton.jit
def _row_keys(keys_ptr, rows, row_ok, seed):
    """Per-row stream of keyed rows: (counter word, Philox key) = (key's low 32 bits, seed ^ the key's
    high 32 bits << 32). For a fixed seed distinct keys give distinct (Philox key, counter) pairs,
    and keys < 2**32 leave the seed as it is (keys == arange(B) reproduce the unkeyed stream)."""
    key = tl.load(keys_ptr + rows, mask=row_ok, other=0)
    return key, seed ^ (key & -4294967296)  # -4294967296 == 0xFFFFFFFF00000000 as int64


@triton.jit(do_not_specialize=["seed", "offset"])
def _cfg_sample_block_kernel(
    c_ptr, u_ptr, tok_ptr, lp_ptr, seed_ptr, offset_ptr, keys_ptr,
    B, V, stride_c, stride_u, w, temperature, top_k, top_p, seed, offset,
    HAS_U: tl.constexpr, GREEDY: tl.constexpr, DO_TOPK: tl.constexpr, DO_TOPP: tl.constexpr,
    RNG_IN_MEMORY: tl.constexpr, HAS_KEYS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """BLOCK_R whole rows per program, each held in registers for every pass."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < B
    cols = tl.arange(0, BLOCK_V)
    z = _guided(c_ptr, u_ptr, rows, cols, row_ok, V, stride_c, stride_u, w, HAS_U)
    if GREEDY:
        tok = tl.argmax(z, axis=1)
        lp = tl.zeros([BLOCK_R], tl.float32)
    else:
        m = tl.max(z, axis=1)
        m = tl.where(m == float("-inf"), 0.0, m)  # fully banned row: keep NaN out of the scores
        s = (z - m[:, None]) / temperature  # <= 0, max exactly 0: no overflow for tiny T
        key = _ordered_key(s)
        if DO_TOPK:  # largest key t with #(key >= t) >= k, i.e. the k-th largest score
            lo = tl.full([BLOCK_R], _NEG_INF_KEY, tl.int32)
            hi = tl.full([BLOCK_R], 1, tl.int32)  # _ordered_key(0.0) + 1: nothing is >= hi
            for _ in range(_BISECT_STEPS):
                mid = _midpoint(lo, hi)
                ok = tl.sum((key >= mid[:, None]).to(tl.int32), axis=1) >= top_k
                lo = tl.where(ok, mid, lo)
                hi = tl.where(ok, hi, mid)
            s = tl.where(key >= lo[:, None], s, float("-inf"))
        e = tl.exp(s)
        total = tl.sum(e, axis=1)
        if DO_TOPP:  # largest key t whose tokens with key >= t hold >= top_p of the mass
            need = top_p * total
            lo = tl.full([BLOCK_R], _NEG_INF_KEY, tl.int32)
            hi = tl.full([BLOCK_R], 1, tl.int32)
            for _ in range(_BISECT_STEPS):
                mid = _midpoint(lo, hi)
                ok = tl.sum(tl.where(key >= mid[:, None], e, 0.0), axis=1) >= need
                lo = tl.where(ok, mid, lo)
                hi = tl.where(ok, hi, mid)
            keep = key >= lo[:, None]
            s = tl.where(keep, s, float("-inf"))
            total = tl.sum(tl.where(keep, e, 0.0), axis=1)
        seed, offset = _read_rng(seed_ptr, offset_ptr, seed, offset, RNG_IN_MEMORY)
        if HAS_KEYS:
            ctr, seed = _row_keys(keys_ptr, rows, row_ok, seed)
        else:
            ctr = rows
        tok = tl.argmax(s + _gumbel(seed, offset, ctr, 0, BLOCK_V, HAS_KEYS), axis=1)
        s_tok = tl.sum(tl.where(cols[None, :] == tok[:, None], s, 0.0), axis=1)
        lp = s_tok - tl.log(total)
    tl.store(tok_ptr + rows, tok.to(tl.int64), mask=row_ok)
    tl.store(lp_ptr + rows, lp, mask=row_ok)


@triton.jit
def _radix_select(c_ptr, u_ptr, rows, cols0, row_ok, V, stride_c, stride_u, w, m, temperature, floor,
                  target, frac, HAS_U: tl.constexpr, USE_MASS: tl.constexpr, BLOCK_R: tl.constexpr,
                  TILE: tl.constexpr):
    """Largest key offset t with measure(tokens with u >= t) >= target, per row, in _RADIX_PASSES
    passes over the row. u = ordered key of the score minus key(-inf).

    USE_MASS=False: measure = token count (t is the offset of the target-th largest score).
    USE_MASS=True: measure = sum of exp(score) over tokens with u >= floor; the target is `frac`
    times the total mass, which the first pass measures (its histogram covers every token).
    Greedy digit by digit, most significant first: measure(u >= x) is non-increasing in x, so the
    largest digit whose bin still reaches the target gives the largest such x; t is an existing
    token's key, so ties with it are kept by `u >= t`.
    """
    bins = tl.arange(0, _RADIX_BINS)
    prefix = tl.zeros([BLOCK_R], tl.int32)  # the threshold bits fixed so far
    above = tl.zeros([BLOCK_R], tl.float32)  # measure of the tokens above the prefix's range
    for p in range(_RADIX_PASSES):
        shift = (_RADIX_PASSES - 1 - p) * _RADIX_BITS
        hi = tl.minimum(shift + _RADIX_BITS, 31)  # u < 2**31: the first pass matches every token
        # hist[:, j] = measure of the matching tokens whose digit is >= j
        hist = tl.zeros([BLOCK_R, _RADIX_BINS], tl.float32)
        for start in range(0, V, TILE):
            z = _guided(c_ptr, u_ptr, rows, start + cols0, row_ok, V, stride_c, stride_u, w, HAS_U)
            sc = (z - m) / temperature
            u = _ordered_key(sc) - _NEG_INF_KEY
            match = (u >> hi) == (prefix[:, None] >> hi)
            if USE_MASS:
                wgt = tl.where(match & (u >= floor[:, None]), tl.exp(sc), 0.0)
            else:
                wgt = tl.where(match, 1.0, 0.0)
            digit = (u >> shift) & (_RADIX_BINS - 1)
            for j in tl.static_range(_RADIX_BINS):
                part = tl.sum(tl.where(digit >= j, wgt, 0.0), axis=1)
                hist += tl.where(bins[None, :] == j, part[:, None], 0.0)
        if USE_MASS:  # the first pass's bin 0 holds every kept token: the total mass
            total = tl.sum(tl.where(bins[None, :] == 0, hist, 0.0), axis=1)
            target = tl.where(p == 0, frac * total, target)
        ok = (above[:, None] + hist) >= target[:, None]  # true for bins 0..d, d the wanted digit
        d = tl.max(tl.where(ok, bins[None, :], 0), axis=1)
        above += tl.sum(tl.where(bins[None, :] == d[:, None] + 1, hist, 0.0), axis=1)
        prefix = prefix | (d << shift)
    return prefix


@triton.jit(do_not_specialize=["seed", "offset"])
def _cfg_sample_tiled_kernel(
    c_ptr, u_ptr, tok_ptr, lp_ptr, seed_ptr, offset_ptr, keys_ptr,
    B, V, stride_c, stride_u, w, temperature, top_k, top_p, seed, offset,
    HAS_U: tl.constexpr, GREEDY: tl.constexpr, DO_TOPK: tl.constexpr, DO_TOPP: tl.constexpr,
    RNG_IN_MEMORY: tl.constexpr, HAS_KEYS: tl.constexpr, BLOCK_R: tl.constexpr, TILE: tl.constexpr,
):
    """Rows longer than one block, streamed in TILE-wide chunks: same law as the block kernel.

    Passes over the row: 1 (max) + _RADIX_PASSES (top-k) + _RADIX_PASSES (top-p) + 1 (draw), the
    filters only when on: 10 for the CoT default (top-k 50), 18 with top-k and top-p, 2 greedy or
    unfiltered. Scores are recomputed from the logits on every pass rather than staged in a scratch
    buffer.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < B
    cols0 = tl.arange(0, TILE)
    # pass 1: row max and (greedy) its first position
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    arg = tl.zeros([BLOCK_R], tl.int32)
    for start in range(0, V, TILE):
        z = _guided(c_ptr, u_ptr, rows, start + cols0, row_ok, V, stride_c, stride_u, w, HAS_U)
        zm = tl.max(z, axis=1)
        arg = tl.where(zm > m, tl.argmax(z, axis=1) + start, arg)  # strict: earlier chunks win ties
        m = tl.maximum(m, zm)
    if GREEDY:
        tok = arg
        lp = tl.zeros([BLOCK_R], tl.float32)
    else:
        m = tl.where(m == float("-inf"), 0.0, m)[:, None]
        lo_u = tl.zeros([BLOCK_R], tl.int32)  # kept iff key - key(-inf) >= lo_u (all kept so far)
        if DO_TOPK:
            lo_u = _radix_select(c_ptr, u_ptr, rows, cols0, row_ok, V, stride_c, stride_u, w, m, temperature,
                                 lo_u, tl.zeros([BLOCK_R], tl.float32) + top_k, 1.0, HAS_U, False, BLOCK_R, TILE)
        if DO_TOPP:
            t_p = _radix_select(c_ptr, u_ptr, rows, cols0, row_ok, V, stride_c, stride_u, w, m, temperature,
                                lo_u, tl.zeros([BLOCK_R], tl.float32), top_p, HAS_U, True, BLOCK_R, TILE)
            lo_u = tl.maximum(lo_u, t_p)
        lo = lo_u + _NEG_INF_KEY
        seed, offset = _read_rng(seed_ptr, offset_ptr, seed, offset, RNG_IN_MEMORY)
        if HAS_KEYS:
            ctr, seed = _row_keys(keys_ptr, rows, row_ok, seed)
        else:
            ctr = rows
        best = tl.full([BLOCK_R], float("-inf"), tl.float32)
        tok = tl.zeros([BLOCK_R], tl.int32)
        s_tok = tl.zeros([BLOCK_R], tl.float32)
        kept = tl.zeros([BLOCK_R], tl.float32)
        for start in range(0, V, TILE):
            cols = start + cols0
            z = _guided(c_ptr, u_ptr, rows, cols, row_ok, V, stride_c, stride_u, w, HAS_U)
            s = (z - m) / temperature
            s = tl.where(_ordered_key(s) >= lo[:, None], s, float("-inf"))
            kept += tl.sum(tl.exp(s), axis=1)
            r = s + _gumbel(seed, offset, ctr, start, TILE, HAS_KEYS)
            rm = tl.max(r, axis=1)
            ra = tl.argmax(r, axis=1)
            better = rm > best
            tok = tl.where(better, ra + start, tok)
            s_tok = tl.where(better, tl.sum(tl.where(cols0[None, :] == ra[:, None], s, 0.0), axis=1), s_tok)
            best = tl.maximum(best, rm)
        lp = s_tok - tl.log(kept)
    tl.store(tok_ptr + rows, tok.to(tl.int64), mask=row_ok)
    tl.store(lp_ptr + rows, lp, mask=row_ok)


def _as_int64(x):
    """Python int -> the int64 with the same low 64 bits (any int is a valid seed/offset)."""
    return (int(x) + 2**63) % 2**64 - 2**63


def _cfg_launch(c, u, w, temperature, top_k, top_p, seed, offset, keys=None, on_gpu=None):
    """(kernel, grid, args, kwargs, (tok, lp)): what `_cfg_sample_triton` launches. on_gpu defaults
    to c's device; tests/aot_compile.py passes True to plan a CUDA launch from CPU tensors."""
    on_gpu = c.is_cuda if on_gpu is None else on_gpu
    B, V = c.shape
    tok = torch.empty(B, dtype=torch.int64, device=c.device)
    lp = torch.empty(B, dtype=torch.float32, device=c.device)
    in_memory = torch.is_tensor(seed) or torch.is_tensor(offset)
    if in_memory:
        seed_t = torch.as_tensor(seed, dtype=torch.int64, device=c.device)
        offset_t = torch.as_tensor(offset, dtype=torch.int64, device=c.device)
        seed, offset = 0, 0
    else:
        seed_t = offset_t = tok  # unused pointer arguments
        seed, offset = _as_int64(seed), _as_int64(offset)
    has_u = u is not None
    u_arg = u if has_u else c
    greedy = temperature == 0
    # greedy reads no threshold and no random stream: one specialization whatever the other flags
    common = {
        "HAS_U": has_u, "GREEDY": greedy, "DO_TOPK": not greedy and 0 < top_k < V,
        "DO_TOPP": not greedy and top_p < 1.0, "RNG_IN_MEMORY": not greedy and in_memory,
        "HAS_KEYS": not greedy and keys is not None,
    }
    keys_arg = keys if common["HAS_KEYS"] else tok  # unused pointer argument without keys
    args = (c, u_arg, tok, lp, seed_t, offset_t, keys_arg, B, V, c.stride(0), u_arg.stride(0), float(w),
            float(temperature) or 1.0, int(top_k), float(top_p), int(seed), int(offset))
    # >= 4: the Gumbel noise comes 4 tokens per Philox call (masked columns past V are -inf)
    block_v = max(4, min(triton.next_power_of_2(V), _MAX_BLOCK if V <= _MAX_BLOCK else _TILE))
    # Short rows share a program so small vocabularies still fill the machine; the CPU
    # interpreter pays per program, not per element, so it takes far more rows at once.
    block_r = min(triton.next_power_of_2(B), max(1, (4096 if on_gpu else 65536) // block_v))
    num_warps = max(1, min(16, block_r * block_v // 1024))
    grid = (triton.cdiv(B, block_r),)
    if V <= _MAX_BLOCK:
        kernel, kwargs = _cfg_sample_block_kernel, {"BLOCK_R": block_r, "BLOCK_V": block_v}
    else:
        kernel, kwargs = _cfg_sample_tiled_kernel, {"BLOCK_R": block_r, "TILE": block_v}
    return kernel, grid, args, {**kwargs, **common, "num_warps": num_warps}, (tok, lp)


def _cfg_sample_triton(c, u, w, temperature, top_k, top_p, seed, offset, keys=None):
    kernel, grid, args, kwargs, (tok, lp) = _cfg_launch(c, u, w, temperature, top_k, top_p, seed, offset, keys)
    kernel[grid](*args, **kwargs)
    return tok, lp


# ----------------------------------------------------------------------------------------------
# torch
# ----------------------------------------------------------------------------------------------


def _guided_torch(c, u, w, dtype):
    z = c.to(dtype)
    if u is None:
        return z
    u = u.to(dtype)
    banned = (z == -math.inf) | (u == -math.inf)
    return torch.where(banned, -math.inf, u + w * (z - u))


def _mix64(x):
    """splitmix64 finaliser: a bijection of 64-bit ints that scatters nearby inputs."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 % 2**64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB % 2**64
    return x ^ (x >> 31)


def _generator(seed, offset):
    """A CPU generator for step (seed, offset) of the torch paths (its stream differs from Philox).

    torch's CPU generator keeps only 32 seed bits, so all 128 input bits are hashed into them.
    """
    h = _mix64(_mix64(int(seed) % 2**64) ^ (int(offset) % 2**64))
    return torch.Generator().manual_seed((h ^ (h >> 32)) & 0xFFFFFFFF)


_M32 = 0xFFFFFFFF
_HASH_MUL = 0x45D9F3B  # < 2**27: its product with a 32-bit word stays < 2**59 (no int64 overflow)
_LANES = (0x243F6A88, 0x85A308D3)  # initial states of the hash's two 32-bit lanes (digits of pi)


def _mix32(x):
    """Bijective 32-bit integer hash (xor-shift-multiply, multiplier 0x45d9f3b) of x in [0, 2**32):
    a Python int or an int64 tensor of 32-bit words, elementwise."""
    x = ((x >> 16) ^ x) * _HASH_MUL & _M32
    x = ((x >> 16) ^ x) * _HASH_MUL & _M32
    return (x >> 16) ^ x


def _words(x):
    """(low, high) 32-bit words of int64 x (a Python int in int64 range or an int64 tensor)."""
    return x & _M32, (x >> 32) & _M32


def _lanes_int(seed, offset):
    """The two lane states after absorbing seed low/high and offset low/high (Python ints)."""
    h = list(_LANES)
    for word in (*_words(_as_int64(seed)), *_words(_as_int64(offset))):
        h = [_mix32(x ^ word) for x in h]
    return h


def _lanes_tensor(seed, offset, device):
    """_lanes_int as int64 [2] device math: fills and elementwise ops only, no host-to-device copy
    (legal inside CUDA-graph capture, where seed/offset are 0-dim device tensors)."""
    seed, offset = (v if torch.is_tensor(v) else torch.full((), _as_int64(v), dtype=torch.int64, device=device)
                    for v in (seed, offset))
    h = torch.arange(2, dtype=torch.int64, device=device) * (_LANES[1] - _LANES[0]) + _LANES[0]
    for word in (*_words(seed), *_words(offset)):
        h = _mix32(h ^ word)
    return h


def _stream_state(seed, offset, keys):
    """int64 [2, B]: the two 32-bit lane states of the counter-based streams (seed, offset, keys[r]).

    Each lane absorbs the words seed low/high, offset low/high, key low/high, one _mix32 per word;
    the lanes differ only in their initial state, so a stream is 64 hashed bits. For a fixed
    (seed, offset), keys < 2**32 map to distinct states in each lane (each step is a bijection).
    seed/offset: ints or 0-dim int64 tensors; CUDA tensors stay on the device (no host sync).
    """
    if any(torch.is_tensor(v) and v.device.type != "cpu" for v in (seed, offset)):
        h = _lanes_tensor(seed, offset, keys.device)
    else:  # host ints: 8 scalar hashes in Python instead of 8 x 10 tiny tensor ops
        h = torch.tensor(_lanes_int(seed, offset), dtype=torch.int64, device=keys.device)
    lo, hi = _words(keys)
    return _mix32(_mix32(h[:, None] ^ lo) ^ hi)


def _uniform53(h):
    """float64 uniforms on the grid of odd multiples of 2**-53, strictly inside (0, 1), from lane states
    h [2, ...]: 26 bits of each lane (so -log(u) is finite and > 0)."""
    m = (h[0] >> 6) * 67108864 + (h[1] >> 6)  # 52 bits: lane 0's top 26, then lane 1's
    return (m * 2 + 1).double() * 2.0**-53


def keyed_uniform(seed, offset, keys):
    """float64 [B]: one uniform in (0, 1) per stream key, a counter-based hash of (seed, offset, keys[r]).

    The torch paths' keyed random numbers (the fused sampler's fallback and the reference): a row's
    value depends on its key only, not on the other rows. keys: int64 tensor [B]."""
    return _uniform53(_stream_state(seed, offset, keys))


def cfg_probs_reference(cond_logits, uncond_logits=None, *, guidance_scale=1.0, temperature=1.0,
                        top_k=0, top_p=1.0):
    """float64 [B, V]: the exact final distribution of cfg_sample, by sorting each row."""
    z = _guided_torch(cond_logits, uncond_logits if guidance_scale != 1.0 else None,
                      guidance_scale, torch.float64)
    if temperature == 0:
        return torch.nn.functional.one_hot(z.argmax(-1), z.shape[-1]).double()
    z = z / temperature
    out = torch.zeros_like(z)
    for b in range(z.shape[0]):
        row = z[b]
        if 0 < top_k < row.numel():
            kth = row.sort(descending=True).values[top_k - 1]
            row = torch.where(row >= kth, row, -math.inf)
        p = torch.softmax(row, -1)
        if top_p < 1.0:
            sorted_p = p.sort(descending=True).values
            last = int((sorted_p.cumsum(0) < top_p).sum().clamp(max=p.numel() - 1))
            p = torch.where(p >= sorted_p[last], p, 0.0)
        out[b] = p / p.sum()
    return out


def cfg_sample_reference(cond_logits, uncond_logits=None, *, guidance_scale=1.0, temperature=1.0,
                         top_k=0, top_p=1.0, seed=0, offset=0, keys=None, return_logprobs=False):
    """cfg_sample by sorting in float64 and torch.multinomial (same law, different random stream);
    with keys, row r is the inverse CDF of its float64 distribution at keyed_uniform(seed, offset, keys)[r]."""
    p = cfg_probs_reference(cond_logits, uncond_logits, guidance_scale=guidance_scale,
                            temperature=temperature, top_k=top_k, top_p=top_p).cpu()
    if keys is None:
        tok = torch.multinomial(p, 1, generator=_generator(seed, offset)).squeeze(1)
    else:
        cum = p.cumsum(-1)
        r = keyed_uniform(seed, offset, keys.cpu())[:, None] * cum[:, -1:]
        last = p.shape[-1] - 1 - (p > 0).flip(-1).to(torch.uint8).argmax(-1, keepdim=True)
        tok = torch.searchsorted(cum, r, right=True).minimum(last).squeeze(1)
    tok = tok.to(cond_logits.device)
    if not return_logprobs:
        return tok
    return tok, p.gather(1, tok.cpu()[:, None]).squeeze(1).log().float().to(cond_logits.device)


# The torch path draws on the top-k candidates when V >= this many times k: below, the full path's
# passes over V cost less than the candidates' extra ops (topk, sort, gathers). Per call, 1 thread,
# k = 50, candidates / full (us): B=16: V=264 460/430, V=512 517/523, V=1024 798/950, V=4096 794/1383;
# B=4: V=512 413/374, V=4096 464/561; B=64: V=264 797/846, V=1024 1376/1936; B=16 V=102400 (the text
# vocabulary) ~5 ms / ~50 ms. A function of (V, k) only, not of B, so a row's path (and rounding)
# does not depend on the rows that share its batch.
_CANDIDATES_MIN_RATIO = 8


def _cfg_sample_torch(c, u, w, temperature, top_k, top_p, seed, offset, return_logprobs, keys=None,
                      candidates=True):
    """Batched torch path (fp32; float64 for float64 logits), one inverse-CDF draw per row (its uniform
    from the step's generator, or with keys from keyed_uniform: a function of (seed, offset, keys[r])
    alone).

    With 0 < top_k <= V / _CANDIDATES_MIN_RATIO on CPU (and ``candidates``), a row works on its top-k
    candidates only (_draw_candidates) and falls back to the full-vocabulary path (_draw_full) when
    the k-th score is tied with a token outside them; ``candidates=False`` forces the full path (the
    reference the restricted one is tested against). Not on other devices: the fallback's row
    selection reads the tie mask on the host, which a CUDA-graph capture of the float64 path would
    not allow.
    """
    dt = torch.float64 if c.dtype == torch.float64 else torch.float32
    z = c.to(dt)
    if u is not None:
        # lerp = u + w(c - u); inf - inf (NaN) or a +inf marks a token banned in one branch
        z = torch.lerp(u.to(dt), z, w).nan_to_num_(nan=-math.inf, posinf=-math.inf)
    if temperature == 0:
        tok = z.argmax(-1)
        return tok, torch.zeros(tok.shape, dtype=torch.float32, device=c.device)
    if keys is None:
        r = torch.rand(z.shape[0], 1, dtype=torch.float64, generator=_generator(seed, offset))
    else:
        r = keyed_uniform(seed, offset, keys)[:, None]
    V = z.shape[-1]
    if candidates and 0 < top_k and top_k * _CANDIDATES_MIN_RATIO <= V and z.device.type == "cpu":
        tok, lp = _draw_candidates(z, temperature, top_k, top_p, r)
    else:
        m = z.amax(-1, keepdim=True)
        s = (z - m.masked_fill_(m == -math.inf, 0.0)).div_(temperature)  # <= 0: no overflow
        tok, lp = _draw_full(s, top_k, top_p, r)
    return tok, lp.float() if return_logprobs else None


def _draw_full(s, top_k, top_p, r):
    """(token, its log-prob) per row of the scores s [B, V] (max 0), top-k / top-p filtered over the
    whole vocabulary, drawn by inverse CDF at the uniforms r [B, 1] (float64)."""
    V = s.shape[-1]
    top = None  # scores sorted descending, enough of them to locate the top-p cut
    if 0 < top_k < V:
        top = s.topk(top_k, -1).values
        s = s.masked_fill_(s < top[:, -1:], -math.inf)  # ties with the k-th stay
    if top_p < 1.0:
        top = s.sort(-1, descending=True).values if top is None else top
        cum = (top - s.logsumexp(-1, keepdim=True)).exp_().cumsum_(-1)
        last = (cum < top_p).sum(-1, keepdim=True).clamp_(max=top.shape[-1] - 1)
        s = s.masked_fill_(s < top.gather(-1, last), -math.inf)
    logp = s.log_softmax(-1)
    tok = _inverse_cdf(logp, r)
    return tok, logp.gather(-1, tok[:, None]).squeeze(1)


def _inverse_cdf(logp, r):
    """Column of each row of log-probs [B, n] at its uniform r [B, 1]."""
    # Inverse CDF in float64 (torch.multinomial is ~10x slower here): the first token whose
    # cumulative mass exceeds r ~ U[0, total), capped at the last positive-mass token in case
    # r rounds up to the total.
    prob = logp.exp()
    n = prob.shape[-1]
    # == prob.cumsum(-1, dtype=torch.float64), which casts first too, but its cast is slower on CPU
    cum = prob.double().cumsum(-1)
    tok = torch.searchsorted(cum, r * cum[:, -1:], right=True)
    if cum.device.type != "cpu":  # no host sync (CUDA-graph capture of the float64 path)
        return tok.minimum(n - 1 - (prob > 0).flip(-1).to(torch.uint8).argmax(-1, keepdim=True)).squeeze(1)
    # cum is flat past the last positive-mass token, so the search passes that token only when it
    # runs off the end (tok == n): only those rows need the cap, found by a reverse scan of the row.
    tok = tok.squeeze(1)
    over = (tok == n).nonzero().squeeze(1)
    if over.numel():
        tok[over] = n - 1 - (prob[over] > 0).flip(-1).to(torch.uint8).argmax(-1)
    return tok


def _draw_candidates(z, temperature, top_k, top_p, r):
    """_draw_full's top-k draw on the top_k candidates of each row instead of all V tokens.

    The score map s = (z - max) / T is non-decreasing, so the k-th largest score is that of the k-th
    largest z, and the (k+1)-th z is the largest outside the candidates: when its score is below the
    k-th's, the full path keeps exactly the candidates. Otherwise (a tie at the k-th score, possibly
    made by rounding in the map, or fewer than k + 1 finite scores) the row takes _draw_full. The
    candidates are drawn in vocabulary order with the row's own uniform, so the inverse CDF picks the
    token the full path picks (a zero-mass token never changes the float64 cumulative sum): the draws
    and log-probs equal the full path's except for the float rounding of the softmax normaliser (and
    of the top-p mass), summed over k terms instead of V.
    """
    vals, idx = z.topk(top_k + 1, -1)  # sorted descending; vals[:, 0] is the row max
    m = vals[:, :1].masked_fill(vals[:, :1] == -math.inf, 0.0)
    s = (vals - m).div_(temperature)  # the full path's scores of these tokens, exactly
    tied = s[:, top_k] >= s[:, top_k - 1]
    if not tied.any():  # the common case: every row on its candidates, no row selection
        return _draw_top(s[:, :top_k], idx[:, :top_k], top_p, r)
    tok = torch.empty(z.shape[0], dtype=torch.int64)
    lp = torch.empty(z.shape[0], dtype=z.dtype)
    fast = (~tied).nonzero().squeeze(1)
    if fast.numel():
        tok[fast], lp[fast] = _draw_top(s[fast, :top_k], idx[fast, :top_k], top_p, r[fast])
    slow = tied.nonzero().squeeze(1)
    tok[slow], lp[slow] = _draw_full((z[slow] - m[slow]).div_(temperature), top_k, top_p, r[slow])
    return tok, lp


def _draw_top(top, idx, top_p, r):
    """_draw_candidates' draw: the candidates' scores top [B, k] (descending) and vocabulary ids idx."""
    cand = top
    if top_p < 1.0:
        cum = (top - top.logsumexp(-1, keepdim=True)).exp_().cumsum_(-1)
        last = (cum < top_p).sum(-1, keepdim=True).clamp_(max=top.shape[-1] - 1)
        cand = top.masked_fill(top < top.gather(-1, last), -math.inf)
    idx, order = idx.sort(-1)  # vocabulary order: the full path's cumulative order
    logp = cand.gather(-1, order).log_softmax(-1)
    pos = _inverse_cdf(logp, r)[:, None]
    return idx.gather(-1, pos).squeeze(1), logp.gather(-1, pos).squeeze(1)


# ----------------------------------------------------------------------------------------------
# public
# ----------------------------------------------------------------------------------------------


def _real(name, x):
    """float(x) for a real number (Python, numpy or 0-dim tensor); ValueError naming `name` otherwise."""
    if isinstance(x, (bool, str, bytes)):
        raise ValueError(f"{name} must be a number, got {x!r}")  # noqa: TRY004 -- the API raises ValueError
    try:
        return float(x)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be a number, got {x!r}") from None


def _integer(x):
    """int(x) for an integral Python/numpy int (not bool, not float), else None."""
    if isinstance(x, bool) or torch.is_tensor(x):
        return None
    try:
        return operator.index(x)
    except TypeError:
        return None


def _check(c, u, w, temperature, top_k, top_p, seed, offset, check_nan, keys=None):
    if c.dim() != 2:
        raise ValueError(f"cond_logits must be [B, V], got shape {tuple(c.shape)}")
    if c.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ValueError(f"cond_logits must be float32/float16/bfloat16/float64, got {c.dtype}")
    if c.shape[0] == 0 or c.shape[1] == 0:
        raise ValueError(f"cond_logits must have at least one row and one token, got {tuple(c.shape)}")
    if u is not None:
        if u.shape != c.shape:
            raise ValueError(f"uncond_logits shape {tuple(u.shape)} != cond_logits shape {tuple(c.shape)}")
        if u.dtype != c.dtype or u.device != c.device:
            raise ValueError(f"uncond_logits ({u.dtype}, {u.device}) must match cond_logits "
                             f"({c.dtype}, {c.device})")
    if not math.isfinite(w):
        raise ValueError(f"guidance_scale must be finite, got {w}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if _integer(top_k) is None or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 disables), got {top_k!r}")
    if not (math.isfinite(top_p) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] (1 disables), got {top_p}")
    for name, v in (("seed", seed), ("offset", offset)):
        if not torch.is_tensor(v) and _integer(v) is None:
            raise ValueError(f"{name} must be an int or a 0-dim int64 tensor, got {v!r}")
        if torch.is_tensor(v) and (v.dim() != 0 or v.dtype != torch.int64):
            raise ValueError(f"{name} tensor must be a 0-dim int64 tensor, got {v.dtype} {tuple(v.shape)}")
        if torch.is_tensor(v) and v.device != c.device:
            raise ValueError(f"{name} tensor is on {v.device}, logits on {c.device}")
    if keys is not None:
        if not torch.is_tensor(keys) or keys.dtype != torch.int64 or keys.shape != c.shape[:1]:
            got = f"{keys.dtype} {tuple(keys.shape)}" if torch.is_tensor(keys) else f"{type(keys).__name__}"
            raise ValueError(f"keys must be an int64 tensor of shape [B] = [{c.shape[0]}] (one stream key per "
                             f"row), got {got}")
        if keys.device != c.device:
            raise ValueError(f"keys tensor is on {keys.device}, logits on {c.device}")
    if not check_nan:
        return
    if w == 1.0:
        u = None  # not read: no guidance
    for name, x in (("cond_logits", c), ("uncond_logits", u)):
        if x is not None and bool((x.isnan() | (x == math.inf)).any()):
            raise ValueError(f"{name} contains NaN or +inf")
    banned = c == -math.inf
    if u is not None:
        banned |= u == -math.inf
    if bool(banned.all(-1).any()):
        raise ValueError("a row has no token that is finite in every guidance branch (all -inf)")


def _interpreted():
    """True when this module's kernels were built for Triton's interpreter (TRITON_INTERPRET=1 was set
    when they were decorated: triton reads it at @triton.jit time, i.e. at import)."""
    return type(_cfg_sample_block_kernel).__name__ == "InterpretedFunction"


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


def cfg_sample(cond_logits, uncond_logits=None, *, guidance_scale=1.0, temperature=1.0,
               top_k=0, top_p=1.0, seed=0, offset=0, keys=None, return_logprobs=False, check_nan=True):
    """Draw one token per row from the guided, tempered, top-k/top-p filtered distribution.

    cond_logits, uncond_logits: [B, V] float32/float16/bfloat16 (math in fp32), or float64 (math in
    float64, on the torch path whatever the device). uncond_logits=None
    or guidance_scale == 1 means no guidance (uncond is then not read). Any finite guidance_scale is
    accepted (w < 1 moves towards the unconditional logits, w = 0 samples from them alone).
    seed/offset: ints or 0-dim int64 tensors on the logits' device (CUDA-graph friendly).
    keys: None, or an int64 tensor [B] on the logits' device: row r's random numbers then come from
    (seed, offset, keys[r]) instead of (seed, offset, r), so a row draws the same token whatever
    rows share its batch and wherever it sits (the kernel reads keys from memory: CUDA-graph
    friendly). keys=None is the same stream as keys=arange(B) on the Triton path, not on the torch one.
    check_nan: reject NaN / +inf logits and rows without any allowed token. It reads the inputs
    once more and synchronises with the device, so turn it off inside CUDA graphs / hot loops;
    unchecked, such rows give an unspecified token and log-prob.
    Returns int64 tokens [B], and float32 log-probs [B] of them under the final distribution
    when return_logprobs=True.
    """
    c, u = cond_logits, uncond_logits
    w, temperature = _real("guidance_scale", guidance_scale), _real("temperature", temperature)
    top_p = _real("top_p", top_p)
    _check(c, u, w, temperature, top_k, top_p, seed, offset, check_nan, keys)
    top_k = _integer(top_k)
    seed = seed if torch.is_tensor(seed) else _integer(seed)
    offset = offset if torch.is_tensor(offset) else _integer(offset)
    if w == 1.0:
        u = None
    if c.stride(-1) != 1:
        c = c.contiguous()
    if u is not None and u.stride(-1) != 1:
        u = u.contiguous()
    if c.dtype != torch.float64 and _use_triton(c):
        tok, lp = _cfg_sample_triton(c, u, w, temperature, top_k, top_p, seed, offset, keys)
    else:
        tok, lp = _cfg_sample_torch(c, u, w, temperature, top_k, top_p, seed, offset, return_logprobs, keys)
    return (tok, lp) if return_logprobs else tok
