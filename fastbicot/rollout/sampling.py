"""The one place the rollout draws tokens.

Calls the fused kernel ``fastbicot.kernels.cfg_sample`` (DESIGN.md §4) when it exists; otherwise an
equivalent torch implementation (same filtering and log-prob semantics; its random stream comes
from a torch.Generator seeded with ``seed`` instead of the kernel's counter-based RNG).
"""

from __future__ import annotations

import torch

try:
    from fastbicot.kernels.cfg_sample import cfg_sample as _kernel_cfg_sample
except ImportError:  # pragma: no cover - depends on what has landed
    _kernel_cfg_sample = None


def check_sampling_args(*, guidance_scale=1.0, temperature=1.0, top_k=0, top_p=1.0) -> None:
    if guidance_scale < 1:
        raise ValueError(f"guidance_scale must be >= 1 (1 disables CFG), got {guidance_scale}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def filtered_logits(logits, *, temperature=1.0, top_k=0, top_p=1.0):
    """z / T with top-k and top-p applied (dropped tokens -> -inf): the final sampling logits.

    Used by the torch sampler and by anyone recomputing the sampler's log-probs.
    """
    z = logits.float() / temperature
    if top_k and top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        sorted_z, idx = torch.sort(z, dim=-1, descending=True)
        probs = torch.softmax(sorted_z, dim=-1)
        # keep a token when the mass strictly before it is < top_p (so at least one survives)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
        z = z.masked_fill(drop, float("-inf"))
    return z


class Sampler:
    """Draws tokens for one rollout; ``seed`` fixes the random stream, ``offset`` advances per step."""

    def __init__(self, seed: int, device):
        self.seed = int(seed)
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)  # the torch path's stream
        self.generator.manual_seed(self.seed)

    @staticmethod
    def uses_kernel(dtype) -> bool:
        """The fused kernel takes fp32/fp16/bf16 logits; float64 (exactness tests) stays in torch."""
        return _kernel_cfg_sample is not None and dtype in (torch.float32, torch.float16, torch.bfloat16)

    def __call__(
        self, logits, uncond_logits=None, *, guidance_scale=1.0, temperature=1.0, top_k=0, top_p=1.0, offset=0
    ):
        """-> (tokens int64 [B], log-probs float32 [B] under the final sampling distribution)."""
        if self.uses_kernel(logits.dtype):
            # check_nan=False: the check synchronises with the device (not allowed in CUDA graphs)
            return _kernel_cfg_sample(
                logits,
                uncond_logits,
                guidance_scale=guidance_scale,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                seed=self.seed,
                offset=offset,
                return_logprobs=True,
                check_nan=False,
            )
        if uncond_logits is not None:
            logits = uncond_logits + guidance_scale * (logits - uncond_logits)
        if temperature == 0:
            tokens = logits.argmax(-1)
            return tokens, torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device)
        logp = torch.log_softmax(
            filtered_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p), dim=-1
        )
        # Gumbel-max in its exponential form: argmax p / E with E ~ Exp(1) draws from p.
        e = torch.empty_like(logp).exponential_(generator=self.generator)
        tokens = (logp - e.log()).argmax(-1)
        return tokens, logp.gather(-1, tokens[:, None])[:, 0]
