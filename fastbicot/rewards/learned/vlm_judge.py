"""VLM judge: a chat vision-language model asked whether the image matches the prompt.

Two modes:
* ``"prob"``: one forward over ``[chat template | image | question]``; the score is the answer's first
  token's yes-probability, P(yes)/(P(yes)+P(no)) (``normalize="yes_no"``) or P(yes) over the whole
  vocabulary (``normalize="vocab"``).
* ``"boxed"``: greedy generation, then strict parsing of ``\\boxed{0}`` / ``\\boxed{1}``: at least one
  box, every box holding the same 0 or 1 (``fastbicot.rewards.judging.boxed_verdict``). Anything else is
  unparsable: a RewardError quoting the answer, or the reward's ``fallback`` when one is configured
  (counted in ``num_fallbacks``).

Rows are left-padded so every row's next token sits at the last position. ``VLMJudgeReward`` takes any
transformers image-text-to-text model with a processor and a chat template; ``from_pretrained``
loads the Qwen2.5-VL family (Qwen/Qwen2.5-VL-3B/7B/72B-Instruct). ``fastbicot.rewards.learned.orm``
reuses it for the LLaVA-OneVision ORM.
"""

from __future__ import annotations

import torch

from ..base import Reward, RewardError, _short
from ..judging import UnscorableAnswer, boxed_verdict, yes_probability
from ._common import batch_slices, load_model, single_token_id

PROB_QUESTION = ('Does this image accurately show the following prompt: "{prompt}"? Answer with yes or no.')
BOXED_QUESTION = ('Does this image accurately show the following prompt: "{prompt}"? Check every object, '
                  "attribute, count and spatial relation, then give the final answer as \\boxed{{1}} if the "
                  "image matches the prompt and \\boxed{{0}} if it does not.")


class VLMJudgeReward(Reward):
    name = "vlm_judge"
    model_types: tuple[str, ...] = ("qwen2_5_vl",)

    def __init__(self, model, processor, *, mode: str = "prob", question_template: str | None = None,
                 normalize: str = "yes_no", yes: str = "yes", no: str = "no", max_new_tokens: int = 256,
                 batch_size: int = 8, name: str | None = None, fallback: float | None = None, device=None):
        super().__init__(name, fallback=fallback, device=device or next(model.parameters()).device)
        if mode not in ("prob", "boxed"):
            raise ValueError(f"reward {self.name!r}: mode must be 'prob' or 'boxed', got {mode!r}")
        if normalize not in ("yes_no", "vocab"):
            raise ValueError(f"reward {self.name!r}: normalize must be 'yes_no' or 'vocab', got {normalize!r}")
        batch_slices(1, batch_size)  # validates batch_size
        self.model, self.processor = model, processor
        self.mode, self.normalize, self.batch_size, self.max_new_tokens = mode, normalize, batch_size, max_new_tokens
        self.question_template = question_template or (PROB_QUESTION if mode == "prob" else BOXED_QUESTION)
        processor.tokenizer.padding_side = "left"
        if mode == "prob":
            self.yes_id = single_token_id(processor.tokenizer, yes, self.name)
            self.no_id = single_token_id(processor.tokenizer, no, self.name)

    @classmethod
    def model_class(cls):
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration

    @classmethod
    def from_pretrained(cls, local_dir, *, device="cpu", dtype="auto", processor=None, **kwargs):
        """Load the model and its processor (tokenizer, image processor, chat template) from ``local_dir``;
        ``processor`` overrides the saved one (e.g. a custom chat template)."""
        from transformers import AutoProcessor

        name = kwargs.get("name") or cls.name
        model = load_model(cls.model_class(), local_dir, name, cls.model_types, device, dtype)
        if processor is None:
            processor = AutoProcessor.from_pretrained(str(local_dir), local_files_only=True)
        return cls(model, processor, device=device, **kwargs)

    def question(self, prompt: str, cot: str) -> str:
        return self.question_template.format(prompt=prompt, cot=cot)

    def inputs(self, images: torch.Tensor, prompts: list[str], cots: list[str]) -> dict:
        texts = [self.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.question(p, c)}]}],
            add_generation_prompt=True, tokenize=False) for p, c in zip(prompts, cots)]
        arrays = list(images.cpu().numpy())  # the processors resize / tile on the CPU
        batch = self.processor(text=texts, images=arrays, return_tensors="pt", padding=True)
        dtype = next(self.model.parameters()).dtype
        return {k: (v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device)) for k, v in batch.items()}

    @torch.no_grad()
    def score(self, images, prompts, metadata, cots):
        out = []
        for s in batch_slices(len(prompts), self.batch_size):
            batch = self.inputs(images[s], prompts[s], cots[s])
            if self.mode == "prob":
                logits = self.model(**batch, logits_to_keep=1).logits[:, -1]
                out.append(yes_probability(logits, self.yes_id, self.no_id, self.normalize).cpu())
            else:
                out.append(self.judge_boxed(batch, prompts[s]))
        return torch.cat(out)

    def judge_boxed(self, batch: dict, prompts: list[str]) -> torch.Tensor:
        tokens = self.model.generate(**batch, max_new_tokens=self.max_new_tokens, do_sample=False)
        answers = self.processor.batch_decode(tokens[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        scores = []
        for prompt, answer in zip(prompts, answers):
            try:
                value = boxed_verdict(answer)
            except UnscorableAnswer as e:
                if self.fallback is None:
                    raise RewardError(f"reward {self.name!r}: unparsable judgement for prompt {_short(prompt)}: "
                                      f"{_short(answer)} ({e}; expected \\boxed{{0}} or \\boxed{{1}}); set "
                                      "fallback=<value> to substitute a fixed value") from None
                value = float("nan")  # NaN -> fallback in Reward.check_scores
            scores.append(value)
        return torch.tensor(scores, dtype=torch.float32)
