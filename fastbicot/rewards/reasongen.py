"""ReasonGen-R1's reward: a VLM judge that reasons about the image and ends with ``\\boxed{1}`` (the image
matches the prompt) or ``\\boxed{0}``.

As the published code (Franklin-Zhang0/ReasonGen-R1 ``verl/workers/fsdp_workers.py:1083-1160``,
``examples/janus_rl.sh``): Qwen2.5-VL-7B-Instruct, greedy decoding of up to 1024 tokens, a question
template whose ``<image>`` marker is where the image goes in the user turn, the prompt with "A photo of "
removed. Unlike it, the verdict is read with fastbicot's one strict ``\\boxed{}`` rule
(``fastbicot.rewards.judging.boxed_verdict``): an answer without a valid verdict is a RewardError, or the
reward's configured ``fallback`` (counted in ``num_fallbacks`` and, per sample, in
``parts["unparsable"]``, logged as ``reward/<name>/unparsable``) -- the published code scores it 0 silently,
and its reward manager falls back to a random 0/1 when no judge score is present.

``InlineImageJudgeReward`` runs the judge locally (transformers), ``InlineImageRemoteJudgeReward`` through
an OpenAI-compatible server; ``reasongen_judge`` builds either from a config.
"""

from __future__ import annotations

import torch

from . import VLMJudgeReward
from .remote import RemoteJudgeReward, png_data_url

IMAGE_MARKER = "<image>"
# fastbicot's wording of the published judge's instructions (examples/janus_rl.sh RM_TEMPLATE has the same
# steps: describe the image, list the prompt's requirements, check them strictly, answer in a box).
JUDGE_QUESTION = (
    'A text-to-image model was given the prompt: "{prompt}"\n'
    "This is the image it generated:\n<image>\n\n"
    "1. Describe what the image shows (objects, colours, counts, layout) without looking at the prompt.\n"
    "2. List what the prompt asks for.\n"
    "3. Check every requirement: are all the objects there, with the right counts, colours and positions?\n\n"
    "Judge strictly. Answer \\boxed{{1}} only if the image satisfies the prompt completely, otherwise "
    "\\boxed{{0}}. Reason first; put exactly one number in the box at the end."
)


def split_question(text: str) -> tuple[str, str]:
    """(text before, text after) the ``<image>`` marker; no marker: the image goes first ("", text)."""
    if IMAGE_MARKER not in text:
        return "", text
    before, after = text.split(IMAGE_MARKER, 1)
    if IMAGE_MARKER in after:
        raise ValueError(f"the question template has more than one {IMAGE_MARKER} marker")
    return before, after


class InlineImageJudgeReward(VLMJudgeReward):
    """VLMJudgeReward (default mode "boxed") whose image sits at the question's ``<image>`` marker, with
    ``strip_prefix`` removed from the prompt (ReasonGen-R1: "A photo of "). Per-sample unparsable answers
    (given a fallback) are flagged in ``parts["unparsable"]``."""

    name = "judge"

    def __init__(self, model, processor, *, mode: str = "boxed", question_template: str = JUDGE_QUESTION,
                 strip_prefix: str = "A photo of ", **kwargs):
        split_question(question_template)  # validates the markers
        super().__init__(model, processor, mode=mode, question_template=question_template, **kwargs)
        self.strip_prefix = strip_prefix
        self.parts: dict[str, torch.Tensor] = {}

    def question(self, prompt: str, cot: str) -> str:
        if self.strip_prefix:
            prompt = prompt.replace(self.strip_prefix, "")
        return super().question(prompt, cot)

    def messages(self, prompt: str, cot: str) -> list:
        before, after = split_question(self.question(prompt, cot))
        content = ([{"type": "text", "text": before}] if before else []) + [{"type": "image"}]
        content += [{"type": "text", "text": after}] if after else []
        return [{"role": "user", "content": content}]

    def inputs(self, images: torch.Tensor, prompts: list[str], cots: list[str]) -> dict:
        texts = [self.processor.apply_chat_template(self.messages(p, c), add_generation_prompt=True, tokenize=False)
                 for p, c in zip(prompts, cots)]
        batch = self.processor(text=texts, images=list(images.cpu().numpy()), return_tensors="pt", padding=True)
        dtype = next(self.model.parameters()).dtype
        return {k: (v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device)) for k, v in batch.items()}

    def score(self, images, prompts, metadata, cots):
        out = super().score(images, prompts, metadata, cots)
        self.parts = {"unparsable": torch.isnan(out).float().cpu()}  # NaN: the fallback's samples
        return out


class InlineImageRemoteJudgeReward(RemoteJudgeReward):
    """RemoteJudgeReward (default mode "boxed") with the image at the question's ``<image>`` marker and
    ``strip_prefix`` removed from the prompt."""

    def __init__(self, base_url: str, model: str, *, mode: str = "boxed", question_template: str = JUDGE_QUESTION,
                 strip_prefix: str = "A photo of ", name: str = "judge", **kwargs):
        split_question(question_template)
        super().__init__(base_url, model, mode=mode, question_template=question_template, name=name, **kwargs)
        self.strip_prefix = strip_prefix

    def question(self, prompt: str, metadata: dict, cot: str) -> str:
        if self.strip_prefix:
            prompt = prompt.replace(self.strip_prefix, "")
        return super().question(prompt, metadata, cot)

    def request_body(self, image: torch.Tensor, question: str) -> dict:
        body = super().request_body(image, question)
        before, after = split_question(question)
        content = ([{"type": "text", "text": before}] if before else [])
        content += [{"type": "image_url", "image_url": {"url": png_data_url(image)}}]
        content += [{"type": "text", "text": after}] if after else []
        body["messages"][-1]["content"] = content
        return body


def reasongen_judge(path: str | None = None, *, base_url: str | None = None, model: str | None = None,
                    device="cpu", dtype="auto", question_template: str = JUDGE_QUESTION, max_new_tokens: int = 1024,
                    strip_prefix: str = "A photo of ", fallback: float | None = None, batch_size: int = 8,
                    name: str = "judge", **kwargs):
    """ReasonGen-R1's judge from a config: local (``path``: a Qwen2.5-VL checkpoint) or remote (``base_url``
    + ``model``). ``fallback``: the score of an answer without a valid verdict (None: an error)."""
    if (path is None) == (base_url is None):
        raise ValueError("reasongen_judge: give one of path (local transformers judge) or base_url (server)")
    if base_url is not None:
        if not model:
            raise ValueError("reasongen_judge: base_url needs model (the served model's name)")
        return InlineImageRemoteJudgeReward(base_url, model, question_template=question_template,
                                            strip_prefix=strip_prefix, fallback=fallback, name=name,
                                            max_tokens=max_new_tokens, **kwargs)
    return InlineImageJudgeReward.from_pretrained(path, device=device, dtype=dtype, question_template=question_template,
                                                  strip_prefix=strip_prefix, fallback=fallback, name=name,
                                                  max_new_tokens=max_new_tokens, batch_size=batch_size, **kwargs)


__all__ = ["IMAGE_MARKER", "JUDGE_QUESTION", "InlineImageJudgeReward", "InlineImageRemoteJudgeReward",
           "reasongen_judge", "split_question"]
