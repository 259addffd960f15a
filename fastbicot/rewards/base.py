"""The Reward protocol, the ensemble that combines rewards, and input validation helpers.

A reward maps a batch of generated images (uint8 [N, H, W, 3]) plus their prompts, prompt metadata
(T2I-CompBench / T2I-R1 JSONL fields) and CoT texts to float32 scores [N]. Implementations subclass
``Reward`` and write ``score``; ``Reward.__call__`` validates what goes in and what comes out, so a
wrong image layout, a missing metadata field or a NaN from a model is a clear error naming the
reward and the prompt, or the reward's explicit ``fallback`` value -- never a silent random number.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch


class RewardError(ValueError):
    """A reward could not score its input; the message names the reward and, where known, the prompt."""


def _short(prompt) -> str:
    text = str(prompt)
    return repr(text if len(text) <= 120 else text[:117] + "...")


def require_field(metadata: Mapping, field: str, reward: str, prompt: str):
    """``metadata[field]``, or a RewardError naming the reward, the prompt and the missing field."""
    value = metadata.get(field) if isinstance(metadata, Mapping) else None
    if value is None:
        have = sorted(metadata) if isinstance(metadata, Mapping) else type(metadata).__name__
        raise RewardError(
            f"reward {reward!r} needs metadata field {field!r} for prompt {_short(prompt)} "
            f"(metadata has: {have})"
        )
    return value


def check_images(images, reward: str) -> torch.Tensor:
    """Validate a batch of images: uint8 [N, H, W, 3] (torch tensor or numpy array) -> torch tensor."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor):
        raise RewardError(
            f"reward {reward!r}: images must be a uint8 tensor [N, H, W, 3], got {type(images).__name__}"
        )
    if images.dtype != torch.uint8:
        raise RewardError(
            f"reward {reward!r}: images must be uint8 [N, H, W, 3] with values 0..255, "
            f"got dtype {images.dtype} "
            "(convert float images in [-1, 1] with ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))"
        )
    if images.dim() != 4 or images.shape[-1] != 3:
        hint = (
            " (looks channels-first: permute(0, 2, 3, 1))"
            if images.dim() == 4 and images.shape[1] == 3
            else ""
        )
        raise RewardError(
            f"reward {reward!r}: images must be [N, H, W, 3], got shape {tuple(images.shape)}{hint}"
        )
    if images.shape[1] == 0 or images.shape[2] == 0:
        raise RewardError(f"reward {reward!r}: images have an empty side, shape {tuple(images.shape)}")
    return images


def _check_list(values, n: int, what: str, reward: str, fill):
    if values is None:
        return [fill() for _ in range(n)]
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Sequence):
        raise RewardError(
            f"reward {reward!r}: {what} must be a list with one entry per image, got {type(values).__name__}"
        )
    if len(values) != n:
        raise RewardError(f"reward {reward!r}: {n} images but {len(values)} {what}")
    return list(values)


class Reward:
    """Base class of every reward.

    Subclasses set ``name`` (unique inside an ensemble) and implement
    ``score(images, prompts, metadata, cots) -> float32 [N]`` (tensor, numpy array or list), where
    ``images`` is a validated uint8 [N, H, W, 3] tensor already on ``self.device``, ``prompts`` a list
    of N strings, ``metadata`` a list of N dicts ({} when none was given) and ``cots`` a list of N
    strings ("" when none was given). ``__call__`` returns float32 [N] on the CPU.

    ``fallback``: the value used for a sample whose score is not finite (NaN/inf) or that the reward
    could not judge. ``None`` (default) makes that an error instead. Each substitution increments
    ``num_fallbacks`` so a training loop can log how often it happened.
    """

    name: str = "reward"

    def __init__(self, name: str | None = None, *, fallback: float | None = None, device="cpu"):
        if name is not None:
            self.name = name
        if fallback is not None and not math.isfinite(float(fallback)):
            raise ValueError(
                f"reward {self.name!r}: fallback must be a finite number or None, got {fallback!r}"
            )
        self.fallback = None if fallback is None else float(fallback)
        self.device = torch.device("cpu" if device is None else device)
        self.num_fallbacks = 0

    def score(self, images: torch.Tensor, prompts: list[str], metadata: list[dict], cots: list[str]):
        raise NotImplementedError(f"{type(self).__name__} must implement score()")

    def to(self, device) -> Reward:
        """Move every torch module / tensor attribute to ``device``; later calls score there."""
        self.device = torch.device(device)
        for key, value in vars(self).items():
            if isinstance(value, (torch.nn.Module, torch.Tensor)):
                setattr(self, key, value.to(self.device))
        return self

    def __call__(self, images, prompts, metadata=None, cots=None) -> torch.Tensor:
        images = check_images(images, self.name)
        n = images.shape[0]
        prompts = _check_list(prompts, n, "prompts", self.name, str)
        metadata = _check_list(metadata, n, "metadata entries", self.name, dict)
        cots = _check_list(cots, n, "CoTs", self.name, str)
        for i, meta in enumerate(metadata):
            if not isinstance(meta, Mapping):
                raise RewardError(
                    f"reward {self.name!r}: metadata for prompt {_short(prompts[i])} must be a dict, "
                    f"got {type(meta).__name__}"
                )
        if n == 0:
            return torch.zeros(0, dtype=torch.float32)
        if images.device != self.device:
            images = images.to(self.device)
        out = self.score(images, prompts, metadata, cots)
        return self.check_scores(out, prompts)

    def check_scores(self, out, prompts: list[str]) -> torch.Tensor:
        """Scores -> float32 [N] on CPU; non-finite entries become ``fallback`` or an error."""
        n = len(prompts)
        try:
            scores = torch.as_tensor(out if not isinstance(out, torch.Tensor) else out.detach())
        except (TypeError, ValueError, RuntimeError) as e:
            raise RewardError(
                f"reward {self.name!r}: score() returned {type(out).__name__}, not numbers ({e})"
            ) from None
        if scores.dim() != 1 or scores.shape[0] != n:
            raise RewardError(
                f"reward {self.name!r}: score() must return [{n}] scores, got shape {tuple(scores.shape)}"
            )
        scores = scores.to(device="cpu", dtype=torch.float32)
        bad = ~torch.isfinite(scores)
        if bad.any():
            rows = bad.nonzero().flatten().tolist()
            if self.fallback is None:
                raise RewardError(
                    f"reward {self.name!r} produced a non-finite score ({scores[rows[0]].item()}) for prompt "
                    f"{_short(prompts[rows[0]])} ({len(rows)} of {n} samples); set fallback=<value> to "
                    "substitute a fixed value instead"
                )
            scores = scores.masked_fill(bad, self.fallback)
            self.num_fallbacks += len(rows)
        return scores

    def __repr__(self) -> str:
        cls = type(self).__name__
        return f"{cls}(name={self.name!r}, device={str(self.device)!r}, fallback={self.fallback})"


class FunctionReward(Reward):
    """Adapter for a plain python callable.

    ``batched=True``: ``fn(images, prompts, metadata, cots) -> [N]`` scores.
    ``batched=False``: ``fn(image uint8 [H, W, 3], prompt, metadata dict, cot) -> float``, called per sample.
    """

    def __init__(
        self, name: str, fn: Callable, *, batched: bool = True, fallback: float | None = None, device="cpu"
    ):
        super().__init__(name, fallback=fallback, device=device)
        if not callable(fn):
            raise TypeError(f"FunctionReward {name!r}: fn must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.batched = batched

    def score(self, images, prompts, metadata, cots):
        if self.batched:
            return self.fn(images, prompts, metadata, cots)
        return [float(self.fn(images[i], prompts[i], metadata[i], cots[i])) for i in range(len(prompts))]


@dataclass
class RewardOutput:
    """``total`` float32 [N]; ``components`` name -> raw (un-normalised, un-weighted) float32 [N]."""

    total: torch.Tensor
    components: dict[str, torch.Tensor]

    def __getitem__(self, key):  # dict-style access: out["total"], out["components"]
        return getattr(self, key)


def group_ids_from(n: int, group_ids=None, group_size: int | None = None) -> torch.Tensor:
    """int64 [n] group index per sample, from explicit ids or a contiguous group size."""
    if group_ids is not None and group_size is not None:
        raise ValueError("pass group_ids or group_size, not both")
    if group_ids is not None:
        ids = torch.as_tensor(group_ids).flatten().to(torch.int64).cpu()
        if ids.numel() != n:
            raise ValueError(f"group_ids has {ids.numel()} entries for {n} samples")
        return ids
    if group_size is not None:
        if (
            isinstance(group_size, bool)
            or not isinstance(group_size, int)
            or group_size <= 0
            or n % group_size
        ):
            raise ValueError(
                f"group_size must be a positive int dividing the batch size {n}, got {group_size!r}"
            )
        return torch.arange(n) // group_size
    raise ValueError("normalize='group' needs group_ids=[...] or group_size=G")


def group_normalize(x: torch.Tensor, ids: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(x - mean_g) / (std_g + eps) with the unbiased std of each group; singleton groups give 0."""
    _, inv = torch.unique(ids, return_inverse=True)
    g = int(inv.max()) + 1 if inv.numel() else 0
    x64 = x.double()
    count = torch.zeros(g, dtype=torch.float64).index_add_(0, inv, torch.ones_like(x64))
    mean = torch.zeros(g, dtype=torch.float64).index_add_(0, inv, x64) / count
    dev = x64 - mean[inv]
    var = torch.zeros(g, dtype=torch.float64).index_add_(0, inv, dev * dev) / (count - 1).clamp(min=1)
    return (dev / (var.sqrt()[inv] + eps)).float()


class RewardEnsemble:
    """Several rewards scored on the same batch and combined into one total.

    ``weights``: list (one per reward) or dict name -> weight; default 1 each.
    ``mode="sum"``: total = sum_i w_i * r_i (T2I-R1 sums its rewards).
    ``mode="product"``: total = prod_i r_i ** w_i (GoT-R1 multiplies its rewards); every component
    must be >= 0 then.
    ``normalize="group"``: each component is first normalised within its group,
    (r - mean_g) / (std_g + 1e-4), so rewards of different scales count equally; needs
    ``group_ids=`` or ``group_size=`` at call time and only makes sense with ``mode="sum"``.
    Returns ``RewardOutput(total, components)``; components are the raw scores of every reward.
    """

    def __init__(self, rewards: Sequence[Reward], weights=None, mode: str = "sum", normalize: str = "none"):
        rewards = list(rewards)
        if not rewards:
            raise ValueError("RewardEnsemble needs at least one reward")
        names = [r.name for r in rewards]
        dup = sorted({x for x in names if names.count(x) > 1})
        if dup:
            raise ValueError(f"reward names must be unique inside an ensemble; repeated: {dup}")
        if mode not in ("sum", "product"):
            raise ValueError(f"mode must be 'sum' or 'product', got {mode!r}")
        if normalize not in ("none", "group"):
            raise ValueError(f"normalize must be 'none' or 'group', got {normalize!r}")
        if mode == "product" and normalize == "group":
            raise ValueError("normalize='group' gives negative components; combine it with mode='sum' only")
        if weights is None:
            weights = [1.0] * len(rewards)
        elif isinstance(weights, Mapping):
            unknown = sorted(set(weights) - set(names))
            if unknown:
                raise ValueError(f"weights name unknown rewards {unknown}; rewards are {names}")
            weights = [float(weights.get(n, 1.0)) for n in names]
        else:
            weights = [float(w) for w in weights]
            if len(weights) != len(rewards):
                raise ValueError(f"{len(weights)} weights for {len(rewards)} rewards")
        if not all(math.isfinite(w) for w in weights):
            raise ValueError(f"weights must be finite, got {weights}")
        self.rewards, self.weights, self.mode, self.normalize = rewards, weights, mode, normalize

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rewards]

    def to(self, device) -> RewardEnsemble:
        for r in self.rewards:
            r.to(device)
        return self

    def __call__(
        self, images, prompts, metadata=None, cots=None, *, group_ids=None, group_size: int | None = None
    ) -> RewardOutput:
        components = {r.name: r(images, prompts, metadata, cots) for r in self.rewards}
        n = len(prompts)
        ids = group_ids_from(n, group_ids, group_size) if self.normalize == "group" else None
        if self.mode == "sum":
            total = torch.zeros(n, dtype=torch.float64)
            for w, (name, c) in zip(self.weights, components.items()):
                total += w * (group_normalize(c, ids) if ids is not None else c).double()
        else:
            total = torch.ones(n, dtype=torch.float64)
            for w, (name, c) in zip(self.weights, components.items()):
                if (c < 0).any():
                    raise RewardError(
                        f"mode='product' needs non-negative rewards; {name!r} gave {c.min().item()}"
                    )
                total *= c.double() ** w
            if not torch.isfinite(total).all():  # 0 ** negative weight
                raise RewardError(
                    "mode='product' gave a non-finite total (a zero reward with a negative weight?)"
                )
        return RewardOutput(total.float(), components)

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}*{w:g}" for n, w in zip(self.names, self.weights))
        return f"RewardEnsemble([{parts}], mode={self.mode!r}, normalize={self.normalize!r})"
