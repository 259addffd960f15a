"""The GRPO objective over per-token log-probs: pure tensors in, loss and metric sums out; no I/O.

    l = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) + beta * kl,   kl = exp(ref - logp) - (ref - logp) - 1
    loss = sum(w * l)      (w: trainer/batch.py's aggregation weights, normalised over the whole step)

At mu = 1 (the seed) ``old`` is None and r = exp(logp - logp.detach()) == 1 with gradient 1.
The per-token work is ``fastbicot.kernels.grpo_loss`` (one fused kernel on GPU); GSPO's sequence
ratio enters it through a shifted ``old`` (r_t = exp(logp_t - old_t) then equals the sequence
ratio with gradient r_t, exactly GSPO's token form sg[s_i] * pi_t / sg[pi_t]); TRL's
bias-corrected KL (kl * r) is added here in torch.
"""

from __future__ import annotations

import torch

from ..kernels import grpo_loss


def grpo_objective(logp, advantages, seq_ids, weights, *, old=None, ref=None, beta=0.0, eps_low=0.2,
                   eps_high=0.2, importance_sampling="token", kl_bias_correction=False):
    """-> (loss = sum(w * l) (0-dim, differentiable), sums) where sums holds the w-weighted sums of
    kl, clip fraction and ratio, and the weight total (to average across micro-batches).

    logp [T]; advantages [S] per sample; seq_ids [T] in [0, S); weights [T]; old / ref [T] or None.
    """
    w = weights.to(device=logp.device, dtype=torch.float32 if logp.dtype != torch.float64 else torch.float64)
    seq_ids = seq_ids.to(logp.device)
    adv_tok = advantages.to(device=logp.device, dtype=logp.dtype)[seq_ids]
    if importance_sampling == "sequence":
        delta = logp.detach() - (old if old is not None else logp.detach())
        n_seq = int(advantages.numel())
        count = torch.zeros(n_seq, dtype=delta.dtype, device=delta.device).index_add_(0, seq_ids, torch.ones_like(delta))
        log_s = torch.zeros_like(count).index_add_(0, seq_ids, delta) / count.clamp(min=1)
        old = logp.detach() - log_s[seq_ids]
    kernel_beta, kernel_ref = (0.0, None) if kl_bias_correction else (beta, ref if beta > 0 else None)
    w_sum = w.sum()
    mean, stats = grpo_loss(logp, adv_tok, seq_ids, old_logprobs=old, ref_logprobs=kernel_ref, beta=kernel_beta,
                            eps_low=eps_low, eps_high=eps_high, loss_type="token_mean", token_weights=w)
    loss = mean.to(w.dtype) * w_sum
    kl_sum = stats["kl"].to(w.dtype) * w_sum
    if kl_bias_correction and beta > 0 and ref is not None:
        d = ref.to(logp.dtype) - logp
        kl = torch.exp(d) - d - 1
        r = torch.exp(logp - (old if old is not None else logp.detach()))
        loss = loss + beta * (w * (kl * r).to(w.dtype)).sum()
        kl_sum = (w * kl.detach().to(w.dtype)).sum()
    sums = {"kl": kl_sum.detach(), "clip_fraction": (stats["clip_fraction"] * w_sum).detach(),
            "ratio_mean": (stats["ratio_mean"] * w_sum).detach(), "weight": w_sum.detach()}
    return loss, sums
