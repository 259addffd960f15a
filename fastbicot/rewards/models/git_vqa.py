"""GIT VQA reward: for each attribute phrase of the prompt (``attr_nouns``, e.g. "green bench"), ask
a VQA-finetuned GIT (microsoft/git-large-vqav2 style, transformers' GitForCausalLM) a yes/no
question about the image and take P(yes) / (P(yes) + P(no)) of the first answer token; the reward
is the mean over the phrases.

GIT reads ``[CLS] question`` after the image tokens and answers next. Questions are right-padded:
text attention is causal and image tokens never attend to text, so padding after a row's last
question token cannot change that token's logits and no attention mask is needed.
"""

from __future__ import annotations

import torch

from ..base import Reward, RewardError, require_field
from ._common import batch_slices, load_model, preprocess, read_image_config, single_token_id

GIT_TYPES = ("git",)


class GitVQAReward(Reward):
    name = "git_vqa"

    def __init__(self, model, tokenizer, image_config: dict, *, question_template: str = "is this a {}?",
                 field: str = "attr_nouns", yes: str = "yes", no: str = "no", batch_size: int = 32,
                 name: str | None = None, fallback: float | None = None, device=None):
        super().__init__(name, fallback=fallback, device=device or next(model.parameters()).device)
        batch_slices(1, batch_size)  # validates batch_size
        if "{}" not in question_template:
            raise ValueError(f"reward {self.name!r}: question_template needs a '{{}}' for the phrase")
        if tokenizer.cls_token_id is None:
            raise ValueError(f"reward {self.name!r}: GIT questions start with [CLS]; the tokenizer has none")
        self.model, self.tokenizer, self.image_config = model, tokenizer, image_config
        self.question_template, self.field, self.batch_size = question_template, field, batch_size
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

    def questions(self, prompt: str, metadata: dict) -> list[str]:
        phrases = require_field(metadata, self.field, self.name, prompt)
        if isinstance(phrases, str) or not phrases:
            raise RewardError(f"reward {self.name!r}: metadata field {self.field!r} of prompt {prompt!r} must be a "
                              f"non-empty list of phrases, got {phrases!r}")
        return [self.question_template.format(p) for p in phrases]

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
        return torch.sigmoid(logits[:, self.yes_id].float() - logits[:, self.no_id].float())

    def score(self, images, prompts, metadata, cots):
        pairs = [(i, q) for i, (p, m) in enumerate(zip(prompts, metadata)) for q in self.questions(p, m)]
        pixels = preprocess(images, self.image_config, next(self.model.parameters()).dtype)
        probs = torch.cat([self.yes_probability(pixels[[i for i, _ in pairs[s]]], [q for _, q in pairs[s]])
                           for s in batch_slices(len(pairs), self.batch_size)])
        owner = torch.tensor([i for i, _ in pairs], device=probs.device)
        total = torch.zeros(len(prompts), device=probs.device).index_add_(0, owner, probs)
        return total / torch.bincount(owner, minlength=len(prompts)).float()
