"""GRPO / BiCoT-GRPO policy loss over packed per-token log-probs.

    loss, stats = grpo_loss(logprobs, advantages, seq_ids, *, old_logprobs=None, ref_logprobs=None,
                            beta=0.0, eps_low=0.2, eps_high=0.2, loss_type="token_mean",
                            token_weights=None, max_tokens=None)

Per token i (sequence s = seq_ids[i], A = advantage):
    r  = exp(logp - old)                    old = logp.detach() when None: r == 1, dr/dlogp == 1
    kl = exp(ref - logp) - (ref - logp) - 1 0 when ref is None (k3 estimator)
    l  = -min(r*A, clamp(r, 1-eps_low, 1+eps_high)*A) + beta*kl
and with weights w (1 when None; 0 masks a token):
    token_mean = sum(w*l) / sum(w)
    seq_mean   = mean over sequences with sum_s(w) > 0 of sum_s(w*l) / sum_s(w)
    dr_grpo    = sum(w*l) / (num_sequences * max_tokens)
Fully masked (or empty) sequences are left out of seq_mean's average; an all-masked batch gives
loss 0 (never NaN) for every loss type.

advantages: per sequence [S] (indexed by seq_ids) or per token [N]. A tensor with N entries is
read as per token; otherwise it must hold one entry per sequence, S = len(advantages), and
seq_ids must lie in [0, S). (If S happens to equal N, pass advantages[seq_ids].) With per-token
advantages S = max(seq_ids) + 1. num_sequences for dr_grpo is S, masked sequences included
(Dr.GRPO's normaliser is a constant); max_tokens defaults to the longest sequence's token count.

stats (detached 0-dim fp32 tensors, weighted by w over tokens, no host sync):
    "kl" mean k3 KL, "clip_fraction" share of tokens whose clipped branch is active (gradient
    zeroed), "ratio_mean" mean r.

The per-token part (l, its gradient, the stats terms) is one Triton kernel forward and one
backward over the packed tokens; the weighted reductions are a few [N]/[S] torch ops on top,
differentiated by autograd. CPU tensors take the same formulas in torch unless
FASTBICOT_FORCE_TRITON=1 (with TRITON_INTERPRET=1 set before triton is imported).
"""

import math
import numbers
import os

import torch
import triton
import triton.language as tl

__all__ = ["grpo_loss", "grpo_loss_reference"]


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

LOSS_TYPES = ("token_mean", "seq_mean", "dr_grpo")
_BLOCK = 1024


@triton.jit
def _per_token(logp_ptr, old_ptr, ref_ptr, adv_ptr, seq_ptr, offs, mask, beta, eps_low, eps_high,
               HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, ADV_PER_SEQ: tl.constexpr):
    """Returns (l, dl/dlogp, kl, r, clipped) for the tokens at offs, in fp32."""
    logp = tl.load(logp_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if ADV_PER_SEQ:
        seq = tl.load(seq_ptr + offs, mask=mask, other=0)
        adv = tl.load(adv_ptr + seq, mask=mask, other=0.0).to(tl.float32)
    else:
        adv = tl.load(adv_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_OLD:
        r = tl.exp(logp - tl.load(old_ptr + offs, mask=mask, other=0.0).to(tl.float32))
    else:
        r = tl.full(logp.shape, 1.0, tl.float32)
    r_clip = tl.minimum(tl.maximum(r, 1.0 - eps_low), 1.0 + eps_high)
    unclipped = r * adv
    clipped_obj = r_clip * adv
    # the clipped branch wins the min only when clamp is active: then the token has no gradient
    clipped = (clipped_obj < unclipped) & (r_clip != r)
    l = -tl.minimum(unclipped, clipped_obj)
    dl = tl.where(clipped, 0.0, -adv * r)
    kl = tl.zeros_like(logp)
    if HAS_REF:
        d = tl.load(ref_ptr + offs, mask=mask, other=0.0).to(tl.float32) - logp
        e = tl.exp(d)
        kl = e - d - 1.0
        l += beta * kl
        dl += beta * (1.0 - e)
    return l, dl, kl, r, clipped


@triton.jit
def _fwd_kernel(logp_ptr, old_ptr, ref_ptr, adv_ptr, seq_ptr, l_ptr, kl_ptr, r_ptr, clip_ptr, N,
                beta, eps_low, eps_high, HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr,
                ADV_PER_SEQ: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    l, _, kl, r, clipped = _per_token(logp_ptr, old_ptr, ref_ptr, adv_ptr, seq_ptr, offs, mask, beta,
                                      eps_low, eps_high, HAS_OLD, HAS_REF, ADV_PER_SEQ)
    tl.store(l_ptr + offs, l, mask=mask)
    tl.store(kl_ptr + offs, kl, mask=mask)
    tl.store(r_ptr + offs, r, mask=mask)
    tl.store(clip_ptr + offs, clipped.to(tl.float32), mask=mask)


@triton.jit
def _bwd_kernel(logp_ptr, old_ptr, ref_ptr, adv_ptr, seq_ptr, gl_ptr, glogp_ptr, N, beta, eps_low,
                eps_high, HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, ADV_PER_SEQ: tl.constexpr,
                BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    dl = _per_token(logp_ptr, old_ptr, ref_ptr, adv_ptr, seq_ptr, offs, mask, beta, eps_low, eps_high,
                    HAS_OLD, HAS_REF, ADV_PER_SEQ)[1]
    g = tl.load(gl_ptr + offs, mask=mask, other=0.0)
    tl.store(glogp_ptr + offs, (g * dl).to(glogp_ptr.dtype.element_ty), mask=mask)


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
    if os.environ.get("FASTBICOT_FORCE_TRITON", "0") != "1":
        return False
    if not _interpreted():
        raise RuntimeError("FASTBICOT_FORCE_TRITON=1 with CPU tensors needs Triton's interpreter: set "
                           "TRITON_INTERPRET=1 before triton is first imported")
    return True


def _torch_per_token(logp, old, ref, adv, beta, eps_low, eps_high):
    """The kernel's formulas in torch (fp32, or fp64 for fp64 inputs): (l, dl/dlogp, kl, r, clipped)."""
    dt = torch.float64 if logp.dtype == torch.float64 else torch.float32
    logp, adv = logp.to(dt), adv.to(dt)
    r = torch.exp(logp - old.to(dt)) if old is not None else torch.ones_like(logp)
    r_clip = r.clamp(1.0 - eps_low, 1.0 + eps_high)
    unclipped, clipped_obj = r * adv, r_clip * adv
    clipped = (clipped_obj < unclipped) & (r_clip != r)
    l = -torch.minimum(unclipped, clipped_obj)
    dl = torch.where(clipped, 0.0, -adv * r)
    kl = torch.zeros_like(logp)
    if ref is not None:
        d = ref.to(dt) - logp
        e = torch.exp(d)
        kl = e - d - 1.0
        l = l + beta * kl
        dl = dl + beta * (1.0 - e)
    return l, dl, kl, r, clipped.to(dt)


class _PerTokenLoss(torch.autograd.Function):
    """logp [N] -> per-token loss l [N] (differentiable) and kl, r, clipped [N] (not)."""

    @staticmethod
    def forward(ctx, logp, old, ref, adv, seq_ids, beta, eps_low, eps_high):
        ctx.args = (beta, eps_low, eps_high)
        ctx.save_for_backward(logp, old, ref, adv, seq_ids)
        ctx.triton = _use_triton(logp)
        if ctx.triton:
            n = logp.numel()
            l, kl, r, clip = (torch.empty(n, device=logp.device, dtype=torch.float32) for _ in range(4))
            _fwd_kernel[(triton.cdiv(n, _BLOCK),)](
                logp, old if old is not None else logp, ref if ref is not None else logp, adv, seq_ids,
                l, kl, r, clip, n, beta, eps_low, eps_high, HAS_OLD=old is not None,
                HAS_REF=ref is not None, ADV_PER_SEQ=adv.numel() != n, BLOCK=_BLOCK)
        else:
            adv_tok = adv if adv.numel() == logp.numel() else adv[seq_ids]
            l, _, kl, r, clip = _torch_per_token(logp, old, ref, adv_tok, beta, eps_low, eps_high)
        ctx.mark_non_differentiable(kl, r, clip)
        return l, kl, r, clip

    @staticmethod
    def backward(ctx, grad_l, *_):
        logp, old, ref, adv, seq_ids = ctx.saved_tensors
        beta, eps_low, eps_high = ctx.args
        n = logp.numel()
        if ctx.triton:
            grad_logp = torch.empty_like(logp)
            _bwd_kernel[(triton.cdiv(n, _BLOCK),)](
                logp, old if old is not None else logp, ref if ref is not None else logp, adv, seq_ids,
                grad_l.contiguous(), grad_logp, n, beta, eps_low, eps_high, HAS_OLD=old is not None,
                HAS_REF=ref is not None, ADV_PER_SEQ=adv.numel() != n, BLOCK=_BLOCK)
        else:
            adv_tok = adv if adv.numel() == n else adv[seq_ids]
            _, dl, _, _, _ = _torch_per_token(logp, old, ref, adv_tok, beta, eps_low, eps_high)
            grad_logp = (grad_l * dl).to(logp.dtype)
        return grad_logp, None, None, None, None, None, None, None


def _check(logprobs, advantages, seq_ids, old_logprobs, ref_logprobs, token_weights, loss_type,
           eps_low, eps_high, beta, max_tokens):
    """Validates every argument; returns (beta, eps_low, eps_high, max_tokens) as Python numbers."""
    fn = "grpo_loss"
    if not isinstance(loss_type, str) or loss_type not in LOSS_TYPES:
        raise ValueError(f"grpo_loss: loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    for name, t, opt in (("logprobs", logprobs, False), ("advantages", advantages, False),
                         ("seq_ids", seq_ids, False), ("old_logprobs", old_logprobs, True),
                         ("ref_logprobs", ref_logprobs, True), ("token_weights", token_weights, True)):
        _check_tensor(fn, name, t, optional=opt)
    fmax = torch.finfo(torch.float32).max  # the per-token math runs in fp32
    beta = _check_scalar(fn, "beta", beta, low=0.0, high=fmax)
    eps_low = _check_scalar(fn, "eps_low", eps_low, low=0.0, high=1.0, high_open=True)
    eps_high = _check_scalar(fn, "eps_high", eps_high, low=0.0, high=fmax / 2)
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, numbers.Integral):
            raise TypeError(f"grpo_loss: max_tokens must be a positive integer or None, got {max_tokens!r} "
                             f"({type(max_tokens).__name__})")
        max_tokens = int(max_tokens)
        if not 0 < max_tokens <= 2**53:
            raise ValueError(f"grpo_loss: max_tokens must be in [1, 2**53], got {max_tokens}")
    if logprobs.dim() != 1 or not logprobs.is_floating_point():
        raise ValueError(f"grpo_loss: logprobs must be a 1-D float tensor [N], got {logprobs.dtype} "
                         f"{tuple(logprobs.shape)}")
    n = logprobs.numel()
    if n == 0:
        raise ValueError("grpo_loss: no tokens (logprobs is empty)")
    if seq_ids.shape != (n,) or seq_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"grpo_loss: seq_ids must be int32/int64 of shape ({n},), got {seq_ids.dtype} "
                         f"{tuple(seq_ids.shape)}")
    if advantages.dim() != 1 or advantages.numel() == 0 or not advantages.is_floating_point():
        raise ValueError(f"grpo_loss: advantages must be a 1-D float tensor, per sequence [S] or per token "
                         f"[{n}], got {advantages.dtype} {tuple(advantages.shape)}")
    for name, t in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs),
                    ("token_weights", token_weights)):
        if t is not None and t.shape != (n,):
            raise ValueError(f"grpo_loss: {name} must have shape ({n},), got {tuple(t.shape)}")
        if t is not None and not (t.is_floating_point() or (name == "token_weights" and t.dtype == torch.bool)):
            raise ValueError(f"grpo_loss: {name} must be a float tensor, got {t.dtype}")
    tensors = [t for t in (advantages, seq_ids, old_logprobs, ref_logprobs, token_weights) if t is not None]
    if any(t.device != logprobs.device for t in tensors):
        raise ValueError("grpo_loss: all tensors must be on one device")
    if beta > 0 and ref_logprobs is None:
        raise ValueError("grpo_loss: beta > 0 needs ref_logprobs")
    per_seq = advantages.numel() != n
    if seq_ids.device.type == "cpu":  # cheap here; a host sync on GPU
        if per_seq and not bool(((seq_ids >= 0) & (seq_ids < advantages.numel())).all()):
            raise ValueError(f"grpo_loss: seq_ids must lie in [0, {advantages.numel()}) = one entry of "
                             f"per-sequence advantages each")
        if not per_seq and loss_type != "token_mean" and bool((seq_ids < 0).any()):
            raise ValueError("grpo_loss: seq_ids must be >= 0")
        if token_weights is not None and bool((token_weights < 0).any()):
            raise ValueError("grpo_loss: token_weights must be >= 0")
    return beta, eps_low, eps_high, max_tokens


def grpo_loss(logprobs, advantages, seq_ids, *, old_logprobs=None, ref_logprobs=None, beta=0.0,
              eps_low=0.2, eps_high=0.2, loss_type="token_mean", token_weights=None, max_tokens=None):
    """GRPO loss over packed tokens; returns (loss fp32 0-dim, stats dict). See the module docstring."""
    beta, eps_low, eps_high, max_tokens = _check(logprobs, advantages, seq_ids, old_logprobs, ref_logprobs,
                                                 token_weights, loss_type, eps_low, eps_high, beta, max_tokens)
    n = logprobs.numel()
    per_token_adv = advantages.numel() == n
    # S is needed only where it changes the result (seq_mean / dr_grpo with per-token advantages).
    num_seq = advantages.numel() if not per_token_adv else None
    if num_seq is None and loss_type != "token_mean":
        num_seq = int(seq_ids.max()) + 1 if n else 1
    seq_ids = seq_ids.contiguous()
    l, kl, r, clip = _PerTokenLoss.apply(
        logprobs.contiguous(), None if old_logprobs is None else old_logprobs.detach().contiguous(),
        None if ref_logprobs is None else ref_logprobs.detach().contiguous(), advantages.detach().contiguous(),
        seq_ids, float(beta), float(eps_low), float(eps_high))
    w = token_weights.detach().to(l.dtype) if token_weights is not None else torch.ones_like(l)
    w_sum = w.sum()
    w_den = torch.where(w_sum > 0, w_sum, torch.ones_like(w_sum))  # all masked -> 0, not 0/0
    wl = w * l
    if loss_type == "token_mean":
        loss = wl.sum() / w_den
    elif loss_type == "seq_mean":
        sums = l.new_zeros(num_seq).index_add(0, seq_ids, wl)
        counts = l.new_zeros(num_seq).index_add(0, seq_ids, w)
        live = counts > 0
        per_seq = sums / torch.where(live, counts, torch.ones_like(counts))
        n_live = live.sum()
        loss = (per_seq * live).sum() / torch.where(n_live > 0, n_live, torch.ones_like(n_live))
    else:
        if max_tokens is None:
            max_tokens = int(torch.bincount(seq_ids.long(), minlength=num_seq).max()) if n else 1
        loss = wl.sum() / (num_seq * max_tokens)
    with torch.no_grad():
        stats = {"kl": (w * kl).sum() / w_den, "clip_fraction": (w * clip).sum() / w_den,
                 "ratio_mean": (w * r).sum() / w_den}
    return loss.float(), {k: v.float() for k, v in stats.items()}


def grpo_loss_reference(logprobs, advantages, seq_ids, *, old_logprobs=None, ref_logprobs=None, beta=0.0,
                        eps_low=0.2, eps_high=0.2, loss_type="token_mean", token_weights=None,
                        max_tokens=None):
    """The formulas written out with torch autograd, per sequence in a Python loop (tests only)."""
    n = logprobs.numel()
    adv = advantages if advantages.numel() == n else advantages[seq_ids]
    num_seq = advantages.numel() if advantages.numel() != n else int(seq_ids.max()) + 1
    old = logprobs.detach() if old_logprobs is None else old_logprobs
    r = torch.exp(logprobs - old)
    l = -torch.minimum(r * adv, torch.clamp(r, 1 - eps_low, 1 + eps_high) * adv)
    kl = torch.zeros_like(l)
    if ref_logprobs is not None:
        kl = torch.exp(ref_logprobs - logprobs) - (ref_logprobs - logprobs) - 1
        l = l + beta * kl
    w = torch.ones_like(l) if token_weights is None else token_weights.to(l.dtype)
    if loss_type == "token_mean":
        loss = (w * l).sum() / w.sum() if w.sum() > 0 else (w * l).sum()
    elif loss_type == "seq_mean":
        terms = [(w * l)[seq_ids == s].sum() / w[seq_ids == s].sum()
                 for s in range(num_seq) if w[seq_ids == s].sum() > 0]
        loss = torch.stack(terms).mean() if terms else (w * l).sum()
    else:
        if max_tokens is None:
            max_tokens = max(int((seq_ids == s).sum()) for s in range(num_seq))
        loss = (w * l).sum() / (num_seq * max_tokens)
    lo, hi = 1 - eps_low, 1 + eps_high
    clipped = ((adv > 0) & (r > hi)) | ((adv < 0) & (r < lo))
    den = w.sum() if w.sum() > 0 else torch.ones((), dtype=w.dtype)
    stats = {"kl": (w * kl).sum() / den, "clip_fraction": (w * clipped).sum() / den,
             "ratio_mean": (w * r).sum() / den}
    return loss, {k: v.detach() for k, v in stats.items()}
