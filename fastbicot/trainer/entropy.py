"""Entropy bonus of the GRPO loss (ReasonGen-R1): a fixed coefficient, or one adaptive coefficient per
token kind (CoT text, image) steered towards a target entropy.

ReasonGen-R1 (Franklin-Zhang0/ReasonGen-R1 ``verl/utils/adaptive_entropy_coeff.py``,
``verl/workers/actor/dp_actor.py:332-355``) adds to the policy loss

    + alpha_text * H_text + alpha_image * H_image

where H_kind is the mean entropy of the policy's distribution over that kind's tokens and each alpha is
learned: alpha = sinh(psi), one Adam step on ``-alpha * (H - target)`` after each use (so alpha turns
negative -- an entropy bonus -- when H is below target, positive when above), then alpha clipped to
[min_coeff, max_coeff] (psi = asinh(clip(alpha))). The coefficient used by a step is the one before its
update. Defaults: text target 2.0, image target 7.0, lr 5e-5, alpha in [-5e-3, 5e-3], alpha_0 = 0
(``image_generation_trainer.yaml``). ``mode: fixed`` is the original's non-adaptive form:
``- coeff * H`` over every trained token.

Differences (docs/recipes/reasongen_r1.md): H is the token mean over the whole step (the original: the
mean of each micro-batch, divided by the gradient accumulation), and each controller takes one Adam step
per optimizer step with that step's mean entropy (the original: one per micro-batch, on each rank).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..settings import Settings, check_choice, check_range


@dataclass
class EntropyTarget(Settings):
    """One adaptive coefficient: alpha_0 = ``init_alpha``, Adam ``lr``, alpha clipped to [min_coeff, max_coeff]."""

    target: float = 2.0
    init_alpha: float = 0.0
    lr: float = 5e-5
    min_coeff: float = -5e-3
    max_coeff: float = 5e-3

    def check(self, path):
        check_range(self, path, "lr", low=0.0)
        if self.min_coeff > self.max_coeff:
            self.fail(path, "min_coeff", f"{self.min_coeff} > max_coeff {self.max_coeff}")


@dataclass
class ImageEntropyTarget(EntropyTarget):
    """The image tokens' coefficient: as EntropyTarget with ReasonGen-R1's image target 7.0."""

    target: float = 7.0


@dataclass
class EntropyBonusConfig(Settings):
    """``mode``: "none" (default, T2I-R1), "fixed" (loss - coeff * mean entropy of all trained tokens),
    "adaptive" (ReasonGen-R1: loss + alpha_text * H_text + alpha_image * H_image, each alpha steered to
    its ``target``)."""

    mode: str = "none"
    coeff: float = 0.0
    text: EntropyTarget = field(default_factory=EntropyTarget)
    image: ImageEntropyTarget = field(default_factory=ImageEntropyTarget)

    def check(self, path):
        check_choice(self, path, "mode", ("none", "fixed", "adaptive"))


class AdaptiveCoefficient:
    """alpha = sinh(psi) learned by Adam on ``-alpha * (H - target)`` and clipped (see the module docstring)."""

    def __init__(self, spec: EntropyTarget):
        self.spec = spec
        self.psi = torch.nn.Parameter(torch.asinh(torch.tensor(float(spec.init_alpha))))
        self.opt = torch.optim.Adam([self.psi], lr=spec.lr)

    @property
    def alpha(self) -> float:
        return float(torch.sinh(self.psi.detach()))

    def update(self, entropy: float) -> None:
        loss = -(torch.sinh(self.psi) * (float(entropy) - self.spec.target))
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            clipped = torch.sinh(self.psi).clamp(self.spec.min_coeff, self.spec.max_coeff)
            self.psi.copy_(torch.asinh(clipped))

    def state_dict(self) -> dict:
        return {"psi": self.psi.detach().clone(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.psi.copy_(state["psi"])
        self.opt.load_state_dict(state["opt"])


class EntropyBonus:
    """The entropy term of one run. Per step: ``coefficients()`` (fixed for the step), ``term(...)`` for each
    micro-batch, then ``update(mean_text, mean_image)`` after the optimizer step."""

    def __init__(self, config: EntropyBonusConfig):
        if config.mode == "none":
            raise ValueError("EntropyBonus: mode is 'none'")
        self.config = config
        self.text = AdaptiveCoefficient(config.text) if config.mode == "adaptive" else None
        self.image = AdaptiveCoefficient(config.image) if config.mode == "adaptive" else None

    def coefficients(self) -> tuple[float, float]:
        """(weight of the text tokens' mean entropy, weight of the image tokens' mean entropy) in the loss;
        for "fixed" both are -coeff and the means are taken over all tokens together (see ``term``)."""
        if self.config.mode == "fixed":
            return -self.config.coeff, -self.config.coeff
        return self.text.alpha, self.image.alpha

    def term(self, entropy_text, entropy_image, n_text: int, n_image: int):
        """This micro-batch's share of the step's entropy term: ``entropy_text`` / ``entropy_image`` are the
        per-token entropies (with graph) of its text / image tokens; ``n_text`` / ``n_image`` the step's
        token counts (so the shares add up to the step's token means)."""
        a_t, a_i = self.coefficients()
        parts = []
        if self.config.mode == "fixed":
            n = n_text + n_image
            for e in (entropy_text, entropy_image):
                if e is not None and e.numel() and n:
                    parts.append(a_t * e.sum() / n)
        else:
            for e, a, n in ((entropy_text, a_t, n_text), (entropy_image, a_i, n_image)):
                if e is not None and e.numel() and n:
                    parts.append(a * e.sum() / n)
        return sum(parts) if parts else None

    def update(self, mean_text: float | None, mean_image: float | None) -> dict:
        """One controller step with the step's mean entropies; returns the coefficients this step used."""
        a_t, a_i = self.coefficients()
        out = {"entropy_bonus/text_coeff": a_t, "entropy_bonus/image_coeff": a_i}
        if self.config.mode == "adaptive":
            if mean_text is not None:
                self.text.update(mean_text)
            if mean_image is not None:
                self.image.update(mean_image)
        return out

    def state_dict(self) -> dict:
        if self.config.mode != "adaptive":
            return {}
        return {"text": self.text.state_dict(), "image": self.image.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state and self.config.mode == "adaptive":
            self.text.load_state_dict(state["text"])
            self.image.load_state_dict(state["image"])


def head_entropy_grad(h: torch.Tensor, weight: torch.Tensor, bias=None, chunk_elems: int = 1 << 24) -> torch.Tensor:
    """Entropy of softmax(h @ W.T + b) per row, differentiable, float32 [n]. Row chunks of at most
    ``chunk_elems`` logits, each under activation checkpointing: the backward recomputes a chunk's
    logits instead of keeping [n, V] of them alive."""
    from torch.utils.checkpoint import checkpoint

    def chunk(x, w, b):
        z = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
        logp = torch.log_softmax(z, -1)
        return -(logp.exp() * logp).sum(-1)

    rows = max(1, chunk_elems // weight.shape[0])
    out = [checkpoint(chunk, h[i:i + rows], weight, bias, use_reentrant=False) for i in range(0, h.shape[0], rows)]
    return torch.cat(out) if out else h.new_zeros(0, dtype=torch.float32)


__all__ = ["AdaptiveCoefficient", "EntropyBonus", "EntropyBonusConfig", "EntropyTarget", "ImageEntropyTarget",
           "head_entropy_grad"]
