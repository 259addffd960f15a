"""GIT VQA reward, as the T2I-R1 seed computes it (``src/t2i-r1/src/utils/reward_git.py`` of CaraJ7/T2I-R1).

For each phrase of the prompt, ask a VQA-finetuned GIT (microsoft/git-large-vqav2, transformers'
GitForCausalLM) the question ``"{phrase}?"`` (e.g. "purple elephant?", reward_git.py:64) and take
P(yes) / (P(yes) + P(no)) of the first answer token (= sigmoid(l_yes - l_no)); the reward is the mean
over the phrases. Phrases: ``attr_nouns`` when present, else ``nouns`` (reward_git.py:52-59).
Prompts whose ``task_type`` is spatial or numeracy score 0 (reward_git.py:47-50); a prompt without
phrases (``attr_nouns`` absent and ``nouns`` absent or empty) scores 1 (reward_git.py:56-59). An
``attr_nouns`` present but empty gives the seed NaN (``np.mean([])``); here it is a RewardError, or
the reward's ``fallback``.

GIT reads ``[CLS] question`` after the image tokens and answers next. Questions are right-padded:
text attention is causal and image tokens never attend to text, so padding after a row's last
question token cannot change that token's logits and no attention mask is needed.
"""

from __future__ import annotations

import math

import torch

from ..base import Reward, RewardError, _short
from ..judging import yes_share
from ..rules import check_phrases, check_prompt, check_task_type
from ._common import batch_slices, load_model, preprocess, read_image_config, single_token_id

GIT_TYPES = ("git",)
SEED_QUESTION = "{}?"  # reward_git.py:64 (and grpo.py:90)


class GitVQAReward(Reward):
    """Options (defaults reproduce the seed): ``question_template`` ("{}?"), ``field`` ("attr_nouns") and
    ``fallback_field`` ("nouns"; None: ``field`` is required), ``zero_tasks`` (task types scored 0:
    ("spatial", "numeracy")), ``empty_score`` (score without phrases: 1.0; None makes it an error)."""

    name = "git_vqa"

    def __init__(self, model, tokenizer, image_config: dict, *, question_template: str = SEED_QUESTION,
                 field: str = "attr_nouns", fallback_field: str | None = "nouns",
                 zero_tasks: tuple[str, ...] = ("spatial", "numeracy"), empty_score: float | None = 1.0,
                 yes: str = "yes", no: str = "no", batch_size: int = 32,
                 name: str | None = None, fallback: float | None = None, device=None):
        super().__init__(name, fallback=fallback, device=device or next(model.parameters()).device)
        batch_slices(1, batch_size)  # validates batch_size
        if "{}" not in question_template:
            raise ValueError(f"reward {self.name!r}: question_template needs a '{{}}' for the phrase")
        if tokenizer.cls_token_id is None:
            raise ValueError(f"reward {self.name!r}: GIT questions start with [CLS]; the tokenizer has none")
        if empty_score is not None and not math.isfinite(float(empty_score)):
            raise ValueError(f"reward {self.name!r}: empty_score must be finite or None, got {empty_score!r}")
        self.model, self.tokenizer, self.image_config = model, tokenizer, image_config
        self.question_template, self.field, self.batch_size = question_template, field, batch_size
        self.fallback_field, self.zero_tasks = fallback_field, tuple(zero_tasks)
        self.empty_score = None if empty_score is None else float(empty_score)
        self.yes_id = single_token_id(tokenizer, yes, self.name)
        self.no_id = single_token_id(tokenizer, no, self.name)

    @classmethod
    def from_pretrained(cls, local_dir, *, device="cpu", dtype="auto", **kwargs):
        """Load GitForCausalLM, its tokenizer and preprocessor_config.json from ``local_dir``."""
        from transformers import AutoTokenizer, GitForCausalLM

        name = kwargs.get("name") or cls.name
        model = load_model(GitForCausalLM, local_dir, name, GIT_TYPES, device, dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(local_dir), local_files_only=True)
        return cls(model, tokenizer, read_image_config(local_dir, name), device=device, **kwargs)

    def plan(self, prompt: str, metadata: dict) -> float | list[str]:
        """A fixed score (zero task, no phrases) or the questions to ask for this prompt."""
        check_prompt(prompt, self.name)
        task = check_task_type(metadata, self.name, prompt)
        phrases = check_phrases(metadata, self.field, self.name, prompt, required=self.fallback_field is None)
        fallback = None if self.fallback_field is None else check_phrases(metadata, self.fallback_field, self.name,
                                                                           prompt)
        if task in self.zero_tasks:
            return 0.0
        if phrases is None:
            phrases = fallback
            if not phrases:
                if self.empty_score is None:
                    raise RewardError(f"reward {self.name!r}: prompt {_short(prompt)} has neither {self.field!r} "
                                      f"nor {self.fallback_field!r} phrases to ask about")
                return self.empty_score
        elif not phrases:
            raise RewardError(f"reward {self.name!r}: metadata field {self.field!r} of prompt {_short(prompt)} is an "
                              "empty list (the seed's mean over no questions is NaN)")
        return [self.question_template.format(p) for p in phrases]

    def questions(self, prompt: str, metadata: dict) -> list[str]:
        plan = self.plan(prompt, metadata)
        return [] if isinstance(plan, float) else plan

    @torch.no_grad()
    def yes_probability(self, pixels: torch.Tensor, questions: list[str]) -> torch.Tensor:
        """P(yes)/(P(yes)+P(no)) float32 [B] for one question per pixel row."""
        ids = [[self.tokenizer.cls_token_id] + self.tokenizer.encode(q, add_special_tokens=False) for q in questions]
        length = max(map(len, ids))
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.tensor([x + [pad] * (length - len(x)) for x in ids], device=self.device)
        hidden = self.model.git(input_ids=input_ids, pixel_values=pixels).last_hidden_state
        last = torch.tensor([len(x) - 1 for x in ids], device=self.device) + (hidden.shape[1] - length)
        logits = self.model.output(hidden[torch.arange(len(ids), device=self.device), last])  # [B, V]
        return yes_share(logits[:, self.yes_id].float(), logits[:, self.no_id].float())

    def score(self, images, prompts, metadata, cots):
        plans = [self.plan(p, m) for p, m in zip(prompts, metadata)]
        total = torch.tensor([p if isinstance(p, float) else 0.0 for p in plans], dtype=torch.float32)
        pairs = [(i, q) for i, plan in enumerate(plans) if not isinstance(plan, float) for q in plan]
        if not pairs:
            return total
        rows = sorted({i for i, _ in pairs})
        pixels = preprocess(images[rows], self.image_config, next(self.model.parameters()).dtype)
        where = {r: k for k, r in enumerate(rows)}
        probs = torch.cat([self.yes_probability(pixels[[where[i] for i, _ in pairs[s]]], [q for _, q in pairs[s]])
                           for s in batch_slices(len(pairs), self.batch_size)]).cpu()
        owner = torch.tensor([i for i, _ in pairs])
        sums = torch.zeros(len(prompts)).index_add_(0, owner, probs)
        counts = torch.bincount(owner, minlength=len(prompts)).float()
        asked = counts > 0
        total[asked] = sums[asked] / counts[asked]
        return total
