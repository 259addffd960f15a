"""GoT-R1's rewards over layout plans (fastbicot.layout): R_sem, R_spa, R_RI, R_PI and their product.

GoT-R1 (arXiv 2505.17022; its training code is unreleased, gogoduan/GoT-R1 ships inference only) judges
each sample at two stages and multiplies:

    R = R_PI * (R_sem + R_spa) * R_RI

* R_sem  an MLLM judges the plan against the prompt (objects, attributes, counts): ``LayoutJudgeReward``
         with the plan text in the question (``{cot}``);
* R_spa  an MLLM judges the plan's spatial arrangement; the boxes are rendered on a blank canvas
         (``fastbicot.layout.render_layout``) and the judge looks at that canvas: ``LayoutJudgeReward``
         with ``image="canvas"``;
* R_RI   IoU between each planned box and the box of the same object grounded in the generated image,
         averaged over the plan's objects (``LayoutIoUReward`` over any detector, e.g. GroundingDINO);
* R_PI   an MLLM judges the generated image against the prompt (any judge reward, e.g. VLMJudgeReward).

``SumReward`` makes R_sem + R_spa one factor of the ensemble's product mode (its parts are logged as
``reward/<name>/<part>``). Plans are parsed strictly (``fastbicot.layout.parse_layout``): a malformed
plan scores ``malformed_score`` (0) in every plan reward, the reason is logged (logger
``fastbicot.rewards.layout``: one warning per call with the count and the first reason, every reason
at DEBUG) and counted in ``parts["malformed"]``; it never raises. Judges run locally (transformers:
``VLMJudgeReward``) or through an OpenAI-compatible server (``RemoteJudgeReward``);
``got_r1_rewards`` builds the four from paths or a URL.
"""

from __future__ import annotations

import abc
import logging
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..layout import COORD_MAX, match_ious, render_layout, try_parse_layout
from .base import Reward, RewardEnsemble, RewardError, _short

log = logging.getLogger("fastbicot.rewards.layout")


class LayoutPlanReward(Reward, metaclass=abc.ABCMeta):
    """Base of the rewards that read a layout plan from the CoT. Subclasses implement
    ``score_plans(images, prompts, metadata, cots, plans) -> [n]`` for the well-formed samples; a
    malformed plan scores ``malformed_score`` with its reason logged, and ``last_malformed`` holds
    ``(sample index, reason)`` of the last call, ``parts["malformed"]`` a 0/1 flag per sample."""

    def __init__(self, name: str | None = None, *, malformed_score: float = 0.0, min_objects: int = 1,
                 coord_max: int = COORD_MAX, fallback: float | None = None, device="cpu"):
        super().__init__(name, fallback=fallback, device=device)
        if not math.isfinite(malformed_score):
            raise ValueError(f"reward {self.name!r}: malformed_score must be finite, got {malformed_score}")
        self.malformed_score, self.min_objects, self.coord_max = float(malformed_score), int(min_objects), coord_max
        self.last_malformed: list[tuple[int, str]] = []
        self.parts: dict[str, torch.Tensor] = {}

    def parse(self, cots: Sequence[str]) -> list:
        out, bad = [], []
        for i, cot in enumerate(cots):
            plan, reason = try_parse_layout(cot, coord_max=self.coord_max, min_objects=self.min_objects)
            out.append(plan)
            if plan is None:
                bad.append((i, reason))
        return out, bad

    def score(self, images, prompts, metadata, cots):
        plans, bad = self.parse(cots)
        self.last_malformed = bad
        n = len(prompts)
        flags = torch.zeros(n, dtype=torch.float32)
        for i, reason in bad:
            flags[i] = 1.0
            log.debug("reward %r: malformed plan for prompt %s: %s", self.name, _short(prompts[i]), reason)
        if bad:
            i, reason = bad[0]
            log.warning("reward %r: %d of %d plans are malformed and score %g; first (prompt %s): %s", self.name,
                        len(bad), n, self.malformed_score, _short(prompts[i]), reason)
        out = torch.full((n,), self.malformed_score, dtype=torch.float32)
        ok = [i for i, p in enumerate(plans) if p is not None]
        if ok:
            sub = self.score_plans(images[ok], [prompts[i] for i in ok], [metadata[i] for i in ok],
                                   [cots[i] for i in ok], [plans[i] for i in ok])
            out[ok] = torch.as_tensor(sub, dtype=torch.float32).reshape(-1).cpu()
        self.parts = {"malformed": flags}
        return out

    @abc.abstractmethod
    def score_plans(self, images, prompts, metadata, cots, plans):
        """-> float [n]: the scores of the well-formed samples (a subclass that lacks it cannot be built)."""


class LayoutIoUReward(LayoutPlanReward):
    """R_RI: the mean over the plan's objects of the IoU between the planned box and the box of that object
    grounded in the generated image (``fastbicot.layout.match_ious``: same name, one-to-one, greedy by IoU;
    an object the detector does not find scores 0).

    ``detector(images uint8 [N, H, W, 3], queries: N lists of names) -> N lists of Detection`` (label,
    score, normalised xyxy box), or None for an image it could not judge (-> NaN -> ``fallback`` or a
    RewardError), e.g. ``GroundingDinoDetector(mode="fastbicot")`` (``from_pretrained``). Detections
    below ``threshold`` are ignored.
    """

    name = "ri"

    def __init__(self, detector: Callable, name: str | None = None, *, threshold: float = 0.0, **kwargs):
        super().__init__(name, **kwargs)
        if not callable(detector):
            raise TypeError(f"reward {self.name!r}: detector must be callable, got {type(detector).__name__}")
        self.detector, self.threshold = detector, float(threshold)

    @classmethod
    def from_pretrained(cls, local_dir, *, device="cpu", dtype="auto", box_threshold: float = 0.25,
                        batch_size: int = 8, **kwargs):
        """GroundingDINO (transformers' format, e.g. a copy of IDEA-Research/grounding-dino-tiny) as the
        grounder, each box labelled with its best-scoring object name."""
        from . import GroundingDinoReward

        gdino = GroundingDinoReward.from_pretrained(local_dir, device=device, dtype=dtype, rules="fastbicot",
                                                    box_threshold=box_threshold, batch_size=batch_size)
        return cls(gdino.detector, device=device, **kwargs)

    def to(self, device):
        super().to(device)
        if hasattr(self.detector, "to") and not isinstance(self.detector, type):
            self.detector = self.detector.to(self.device) or self.detector
        return self

    def score_plans(self, images, prompts, metadata, cots, plans):
        queries = [list(dict.fromkeys(o.name for o in plan)) for plan in plans]
        found = self.detector(images, queries)
        if len(found) != len(plans):
            raise RewardError(f"reward {self.name!r}: detector returned {len(found)} results for {len(plans)} images")
        out = []
        for prompt, plan, dets in zip(prompts, plans, found):
            if dets is None:
                if self.fallback is None:
                    raise RewardError(f"reward {self.name!r}: the detector could not judge the image of prompt "
                                      f"{_short(prompt)} (non-finite outputs); set fallback=<value>")
                out.append(math.nan)  # check_scores substitutes the fallback and counts it
                continue
            grounded = [(d.label, tuple(d.box)) for d in dets if d.score >= self.threshold]
            ious = match_ious([(o.name, o.norm_box(self.coord_max)) for o in plan], grounded)
            out.append(sum(ious) / len(ious))
        return out


class LayoutJudgeReward(LayoutPlanReward):
    """R_sem / R_spa: a judge reward (``judge(images, prompts, metadata, cots) -> [n]``, e.g. VLMJudgeReward or
    RemoteJudgeReward with the plan in its question as ``{cot}``) asked about well-formed plans only.

    ``image="canvas"``: the judge sees the plan's boxes rendered on a blank canvas (``render_layout``:
    ``canvas_size`` pixels, default the generated images' size; ``labels``, ``fill``, ``line_width``,
    ``color(obj, i)``, ``background``); ``"generated"``: the generated image.
    """

    def __init__(self, judge: Reward, name: str | None = None, *, image: str = "canvas", canvas_size: int | None = None,
                 labels: bool = True, fill: bool = False, line_width: int = 3, color: Callable | None = None,
                 background=(255, 255, 255), **kwargs):
        if not isinstance(judge, Reward):
            raise TypeError(f"LayoutJudgeReward: judge must be a Reward, got {type(judge).__name__}")
        super().__init__(name or judge.name, **kwargs)
        if image not in ("canvas", "generated"):
            raise ValueError(f"reward {self.name!r}: image must be 'canvas' or 'generated', got {image!r}")
        self.judge, self.image = judge, image
        self.canvas = {"labels": labels, "fill": fill, "line_width": line_width, "color": color,
                       "background": tuple(background)}
        self.canvas_size = canvas_size

    def to(self, device):
        super().to(device)
        if hasattr(self.judge, "to"):
            self.judge.to(device)
        return self

    def canvases(self, images, plans) -> torch.Tensor:
        h, w = (self.canvas_size, self.canvas_size) if self.canvas_size else tuple(images.shape[1:3])
        arr = np.stack([render_layout(p, h, w, coord_max=self.coord_max, **self.canvas) for p in plans])
        return torch.from_numpy(arr)

    def score_plans(self, images, prompts, metadata, cots, plans):
        shown = self.canvases(images, plans) if self.image == "canvas" else images
        return self.judge(shown, prompts, metadata, cots)


class SumReward(Reward):
    """The sum of several rewards as one reward (GoT-R1's R_sem + R_spa factor). Each part's raw score,
    and each part's own ``parts``, go to ``self.parts`` (the ensemble logs them as reward/<name>/<part>)."""

    def __init__(self, name: str, rewards: Sequence[Reward], *, fallback: float | None = None, device="cpu"):
        super().__init__(name, fallback=fallback, device=device)
        rewards = list(rewards)
        if not rewards or not all(isinstance(r, Reward) for r in rewards):
            raise TypeError(f"reward {self.name!r}: rewards must be a non-empty list of Rewards")
        names = [r.name for r in rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"reward {self.name!r}: part names must be unique, got {names}")
        self.rewards = rewards
        self.parts: dict[str, torch.Tensor] = {}

    def to(self, device):
        super().to(device)
        for r in self.rewards:
            r.to(device)
        return self

    def score(self, images, prompts, metadata, cots):
        parts, total = {}, torch.zeros(len(prompts), dtype=torch.float64)
        for r in self.rewards:
            s = r(images, prompts, metadata, cots)
            parts[r.name] = s
            for k, v in getattr(r, "parts", {}).items():
                parts[f"{r.name}/{k}"] = v
            total += s.double()
        self.parts = parts
        return total.float()


# The judges' questions. GoT-R1's judge prompts are not published; these ask for what its paper describes.
SEM_QUESTION = ('A text-to-image model planned an image for the prompt "{prompt}". Its plan: "{cot}". Does the '
                "plan name every object of the prompt with the right attributes and counts, and nothing that "
                "contradicts the prompt? Answer with yes or no.")
SPA_QUESTION = ('This canvas shows the layout planned for the prompt "{prompt}": each box is labelled with the '
                "object it places. Are the objects placed where the prompt says, with sensible sizes and "
                "positions? Answer with yes or no.")
PI_QUESTION = ('Does this image accurately show the following prompt: "{prompt}"? Check every object, '
               "attribute, count and spatial relation. Answer with yes or no.")


def got_r1_rewards(judge_path: str | None = None, grounding_path: str | None = None, *, judge_url: str | None = None,
                   judge_model: str | None = None, device="cpu", dtype="auto", sem_question: str = SEM_QUESTION,
                   spa_question: str = SPA_QUESTION, pi_question: str = PI_QUESTION, canvas_size: int = 448,
                   box_threshold: float = 0.25, judge_options: dict | None = None, fallback: float | None = None,
                   path: str | None = None, judge_processor=None) -> RewardEnsemble:
    """GoT-R1's rewards: ``RewardEnsemble([pi, plan = SumReward(sem, spa), ri], mode="product")``.

    The three judges share one MLLM: local (``judge_path``: a Qwen2.5-VL checkpoint, ``VLMJudgeReward``
    in "prob" mode, P(yes)) or remote (``judge_url`` + ``judge_model``: ``RemoteJudgeReward`` in "yesno"
    mode). R_RI grounds with GroundingDINO from ``grounding_path``. ``judge_options`` go to every judge;
    ``judge_processor`` replaces the processor saved with the local judge.
    Use from a config as ``name: fastbicot.rewards.layout:got_r1_rewards`` with ``rewards.mode: product``.
    """
    judge_path = judge_path or path
    options = dict(judge_options or {})
    if (judge_path is None) == (judge_url is None):
        raise ValueError("got_r1_rewards: give one of judge_path (local transformers judge) or judge_url "
                         "(OpenAI-compatible server)")
    if grounding_path is None:
        raise ValueError("got_r1_rewards: grounding_path (a GroundingDINO checkpoint for R_RI) is required")
    if judge_url is not None:
        from .remote import RemoteJudgeReward

        if not judge_model:
            raise ValueError("got_r1_rewards: judge_url needs judge_model (the served model's name)")

        def judge(name, question):
            return RemoteJudgeReward(judge_url, judge_model, question_template=question, mode="yesno", name=name,
                                     fallback=fallback, **options)
    else:
        from . import VLMJudgeReward

        loaded = VLMJudgeReward.from_pretrained(judge_path, device=device, dtype=dtype, mode="prob",
                                                processor=judge_processor)

        def judge(name, question):  # one model, three questions
            return VLMJudgeReward(loaded.model, loaded.processor, mode="prob", question_template=question, name=name,
                                  fallback=fallback, device=device, **options)

    sem = LayoutJudgeReward(judge("sem", sem_question), "sem", image="canvas", canvas_size=canvas_size)
    spa = LayoutJudgeReward(judge("spa", spa_question), "spa", image="canvas", canvas_size=canvas_size)
    ri = LayoutIoUReward.from_pretrained(grounding_path, device=device, dtype=dtype, box_threshold=box_threshold,
                                         fallback=fallback)
    return RewardEnsemble([judge("pi", pi_question), SumReward("plan", [sem, spa]), ri], mode="product")


__all__ = ["PI_QUESTION", "SEM_QUESTION", "SPA_QUESTION", "LayoutIoUReward", "LayoutJudgeReward",
           "LayoutPlanReward", "SumReward", "got_r1_rewards"]
