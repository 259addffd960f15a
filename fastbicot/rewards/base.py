"""The Reward protocol, the ensemble that combines rewards, and input validation helpers.

A reward maps a batch of generated images (uint8 [N, H, W, 3]) plus their prompts, prompt metadata
(T2I-CompBench / T2I-R1 JSONL fields) and CoT texts to float32 scores [N]. Implementations subclass
``Reward`` and write ``score``; ``Reward.__call__`` validates what goes in and what comes out, so a
wrong image layout, a missing metadata field or a NaN from a model is a clear error naming the
reward and the prompt, or the reward's explicit ``fallback`` value -- never a silent random number.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..checks import ArgumentError, check_bool, check_float, check_int, check_str


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


def _check_strings(values: list, what: str, reward: str) -> None:
    """Every entry a str: a PromptRecord, None or a number is an error naming the reward and the index
    (it would otherwise be scored as its repr)."""
    for i, v in enumerate(values):
        if not isinstance(v, str):
            hint = (" (pass record.prompt as the prompt and record.metadata as its metadata)"
                    if hasattr(v, "prompt") and hasattr(v, "metadata") else "")
            raise RewardError(
                f"reward {reward!r}: {what}[{i}] must be a str, got {type(v).__name__} {_short(repr(v))}{hint}"
            )


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
            self.name = check_str("name", name)
        self.fallback = check_float(f"reward {self.name!r}: fallback", fallback, optional=True)
        try:
            self.device = torch.device("cpu" if device is None else device)
        except (RuntimeError, TypeError, ValueError) as e:
            raise ArgumentError(f"reward {self.name!r}: device {device!r} is not a torch device ({e})") from e
        self.num_fallbacks = 0

    def score(self, images: torch.Tensor, prompts: list[str], metadata: list[dict], cots: list[str]):
        raise NotImplementedError(f"{type(self).__name__} must implement score()")

    def to(self, device) -> Reward:
        """Move every torch module / tensor attribute to ``device``; later calls score there."""
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError, ValueError) as e:
            raise ArgumentError(f"reward {self.name!r}: device {device!r} is not a torch device ({e})") from e
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
        _check_strings(prompts, "prompts", self.name)
        _check_strings(cots, "cots", self.name)
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
        self.batched = check_bool("batched", batched)

    def score(self, images, prompts, metadata, cots):
        if self.batched:
            return self.fn(images, prompts, metadata, cots)
        out = []
        for i in range(len(prompts)):
            try:
                value = self.fn(images[i], prompts[i], metadata[i], cots[i])
            except RewardError:
                raise
            except Exception as e:
                raise RewardError(f"reward {self.name!r} failed on prompts[{i}] {_short(prompts[i])}: "
                                  f"{type(e).__name__}: {e}") from e
            try:
                out.append(float(value))
            except (TypeError, ValueError) as e:
                raise RewardError(f"reward {self.name!r} returned {type(value).__name__} {_short(repr(value))} "
                                  f"for prompts[{i}] {_short(prompts[i])}, not a number") from e
        return out


@dataclass
class RewardOutput:
    """``total`` float32 [N]; ``components`` name -> raw (un-normalised, un-weighted) float32 [N]."""

    total: torch.Tensor
    components: dict[str, torch.Tensor]

    def __getitem__(self, key):  # dict-style access: out["total"], out["components"]
        return getattr(self, key)


def _group_labels(group_ids) -> list:
    """group_ids -> a flat list of hashable labels (ints or strs); errors name group_ids[i]."""
    if isinstance(group_ids, torch.Tensor):
        group_ids = group_ids.detach().cpu().numpy()
    if isinstance(group_ids, np.ndarray):
        group_ids = group_ids.reshape(-1).tolist()
    if isinstance(group_ids, (str, bytes, Mapping)) or not isinstance(group_ids, Sequence):
        raise ArgumentError(f"group_ids must be a list or tensor with one id per sample, got "
                            f"{type(group_ids).__name__}")
    labels, kinds = [], set()
    for i, g in enumerate(group_ids):
        if isinstance(g, (bool, np.bool_)):
            raise ArgumentError(f"group_ids[{i}] must be an int or a str, got bool {g!r}")
        if isinstance(g, str):
            labels.append(g)
            kinds.add("str")
        elif isinstance(g, numbers.Integral):
            labels.append(int(g))
            kinds.add("int")
        elif isinstance(g, numbers.Real):
            # an exact-integer float (e.g. from a float tensor) names that integer; 0.5 or NaN names nothing
            if not (math.isfinite(float(g)) and float(g).is_integer()):
                raise ArgumentError(f"group_ids[{i}] must be an int, a str or an exact-integer float, got {g!r}")
            labels.append(int(g))
            kinds.add("int")
        elif isinstance(g, Hashable) and not isinstance(g, (tuple, bytes)):
            raise ArgumentError(f"group_ids[{i}] must be an int or a str, got {type(g).__name__} {g!r}")
        else:
            raise ArgumentError(f"group_ids[{i}] must be an int or a str, got {type(g).__name__}")
    if len(kinds) > 1:
        raise ArgumentError("group_ids mixes strings and numbers; use one kind of id")
    return labels


def group_ids_from(n: int, group_ids=None, group_size: int | None = None) -> torch.Tensor:
    """int64 [n] group index per sample, from explicit ids or a contiguous group size.

    ``group_ids``: one id per sample (list, tuple, numpy array or tensor, any shape with n entries);
    ints, exact-integer floats (2.0) or strings (mapped to groups in order of first appearance);
    samples with equal ids form a group. ``group_size``: contiguous groups of G samples.
    """
    n = check_int("n", n, low=0)
    if group_ids is not None and group_size is not None:
        raise ArgumentError("pass group_ids or group_size, not both")
    if group_ids is not None:
        labels = _group_labels(group_ids)
        if len(labels) != n:
            raise ArgumentError(f"group_ids has {len(labels)} entries for {n} samples")
        index: dict = {}
        return torch.tensor([index.setdefault(g, len(index)) for g in labels], dtype=torch.int64)
    if group_size is not None:
        group_size = check_int("group_size", group_size, low=1)  # "group_size must be ..." on error
        if n % group_size:
            raise ArgumentError(f"group_size must be a positive int dividing the batch size {n}, got {group_size}")
        return torch.arange(n) // group_size
    raise ArgumentError("normalize='group' needs group_ids=[...] or group_size=G")


def group_normalize(x: torch.Tensor, ids: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(x - mean_g) / (std_g + eps) with the unbiased std of each group; singleton groups give 0."""
    eps = check_float("eps", eps, low=0.0, low_open=True)
    if not isinstance(x, torch.Tensor) or not isinstance(ids, torch.Tensor):
        raise ArgumentError("group_normalize: x and ids must be tensors")
    if x.dim() != 1 or ids.shape != x.shape:
        raise ArgumentError(f"group_normalize: x and ids must be 1-D of one length, got {tuple(x.shape)} and "
                            f"{tuple(ids.shape)}")
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ArgumentError("group_normalize: x has non-finite values")
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
        if isinstance(rewards, Reward) or not isinstance(rewards, Sequence):
            raise ArgumentError(f"rewards must be a list of Reward objects, got {type(rewards).__name__}")
        rewards = list(rewards)
        if not rewards:
            raise ValueError("RewardEnsemble needs at least one reward")
        for i, r in enumerate(rewards):
            if not isinstance(r, Reward):
                raise ArgumentError(f"rewards[{i}] must be a Reward (wrap a function in FunctionReward), got "
                                    f"{type(r).__name__}")
        names = [r.name for r in rewards]
        dup = sorted({x for x in names if names.count(x) > 1})
        if dup:
            raise ValueError(f"reward names must be unique inside an ensemble; repeated: {dup}")
        mode = check_str("mode", mode, choices=("sum", "product"))
        normalize = check_str("normalize", normalize, choices=("none", "group"))
        if mode == "product" and normalize == "group":
            raise ValueError("normalize='group' gives negative components; combine it with mode='sum' only")
        if weights is None:
            weights = [1.0] * len(rewards)
        elif isinstance(weights, Mapping):
            unknown = sorted(set(weights) - set(names))
            if unknown:
                raise ValueError(f"weights name unknown rewards {unknown}; rewards are {names}")
            weights = [check_float(f"weights[{n!r}]", weights.get(n, 1.0)) for n in names]
        elif isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
            raise ArgumentError(f"weights must be a list or a dict name -> weight, got {type(weights).__name__}")
        else:
            if len(weights) != len(rewards):
                raise ArgumentError(f"{len(weights)} weights for {len(rewards)} rewards")
            weights = [check_float(f"weights[{i}]", w) for i, w in enumerate(weights)]
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
        components = {r.name: self._call_one(r, images, prompts, metadata, cots) for r in self.rewards}
        n = len(next(iter(components.values())))
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
        for r in self.rewards:  # a composite reward's parts (e.g. SumReward) are logged, not combined
            for part, values in (getattr(r, "parts", None) or {}).items():
                components[f"{r.name}/{part}"] = values
        return RewardOutput(total.float(), components)

    @staticmethod
    def _call_one(reward, images, prompts, metadata, cots) -> torch.Tensor:
        """One reward's scores; an exception other than RewardError is wrapped into a RewardError naming
        the reward and the prompt(s), with the original as ``__cause__``."""
        try:
            return reward(images, prompts, metadata, cots)
        except RewardError:
            raise
        except Exception as e:
            try:
                plist = list(prompts)
            except TypeError:
                plist = []
            if len(plist) == 1:
                where = f"prompt {_short(plist[0])}"
            else:
                shown = ", ".join(_short(p) for p in plist[:3]) + (", ..." if len(plist) > 3 else "")
                where = f"a batch of {len(plist)} prompts ({shown})"
            raise RewardError(f"reward {reward.name!r} failed on {where}: {type(e).__name__}: {e}") from e

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}*{w:g}" for n, w in zip(self.names, self.weights))
        return f"RewardEnsemble([{parts}], mode={self.mode!r}, normalize={self.normalize!r})"
