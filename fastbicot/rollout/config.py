"""Rollout settings: one definition per knob, shared by RolloutEngine and TrainerConfig.

Defaults are T2I-R1's (CaraJ7/T2I-R1 ``grpo_trainer.py`` / ``run_grpo.sh``); docs/fidelity.md lists
every option that departs from the seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..settings import Settings, check_choice, check_range
from .templates import COT_TEMPLATE, INSTRUCTION, SYSTEM_PROMPT

IMAGE_MODES = ("reprompt", "continue")
IMAGE_CONTEXTS = ("retokenize", "splice")
UNCOND_MODES = ("all", "cot", "keep_cot")
PIXEL_ROUNDING = ("truncate", "round")


@dataclass
class SamplingParams(Settings):
    """How one kind of token is drawn: z / T, keep the top-k, keep the top-p mass, draw.

    temperature 0 is greedy; top_k 0 and top_p 1.0 disable filtering. ``max_new_tokens`` bounds a
    text (CoT) sequence and is ignored for image tokens (their count is the model's).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 1024

    def check(self, path):
        check_range(self, path, "temperature", low=0.0)
        check_range(self, path, "top_k", low=0)
        check_range(self, path, "top_p", low=0.0, high=1.0, low_open=True)
        check_range(self, path, "max_new_tokens", low=1)


def _cot_sampling():
    # The seed's CoT is HF generate(do_sample=True) under the language model's default
    # GenerationConfig: T = 1, top-k 50, top-p 1; max_completion_length 1024 (run_grpo.sh).
    return SamplingParams(temperature=1.0, top_k=50, top_p=1.0, max_new_tokens=1024)


@dataclass
class RolloutConfig(Settings):
    """Everything that decides what the rollout generates (DESIGN.md §3).

    image_mode     "reprompt" (T2I-R1): a fresh image context per sample; "continue" (ReasonGen /
                   GoT): image tokens follow the CoT in the same sequence, reusing its KV.
    image_context  reprompt only. "retokenize" (the seed): the CoT decoded with special tokens
                   skipped, re-templated as one string ``User: {prompt}. {cot}\\n\\nAssistant:`` and
                   tokenized at once; "splice": the raw CoT ids between the encoded template pieces.
    uncond         CFG's unconditional row: "all" (every token except BOS and BOI -> pad, the
                   seed), "cot" (only the CoT -> pad), "keep_cot" (only the prompt -> pad).
    guidance_scale CFG weight w (l = u + w (c - u)); 1 disables CFG and builds no unconditional rows.
    max_prompt_length   the CoT prompt ([BOS] + template) is left-truncated to this many tokens,
                   as the seed's ``prompt_ids[:, -max_prompt_length:]``; None keeps it whole.
    max_textcot_length  keep only the last N sampled CoT tokens (the seed's option); None keeps all.
    pixel_rounding "truncate" (the seed's uint8 cast of clip((x+1)/2*255)) or "round".
    semantic_cot   False skips the plan: the image context holds the prompt and an empty CoT
                   (evaluation without the semantic-level CoT; BiCoT-GRPO needs it on).
    prompts_per_pass    an execution choice, not semantics: generate at most this many prompt groups
                   at a time (0: all of them in one pass). Fewer rows per pass bound the KV caches
                   and the VQ decode (``fastbicot plan`` shows the peak); the samples are the same,
                   each drawn from its own keyed stream.
    """

    num_generations: int = 8
    cot: SamplingParams = field(default_factory=_cot_sampling)
    image: SamplingParams = field(default_factory=SamplingParams)
    guidance_scale: float = 5.0
    image_mode: str = "reprompt"
    image_context: str = "retokenize"
    uncond: str = "all"
    template: str = COT_TEMPLATE
    system: str = SYSTEM_PROMPT
    instruction: str = INSTRUCTION
    max_prompt_length: int | None = 512
    max_textcot_length: int | None = None
    pixel_rounding: str = "truncate"
    semantic_cot: bool = True
    decode: bool = True
    cuda_graph: bool = True
    prompts_per_pass: int = 0

    def check(self, path):
        check_range(self, path, "num_generations", low=1)
        check_range(self, path, "prompts_per_pass", low=0)
        check_range(self, path, "guidance_scale", low=1.0)
        check_choice(self, path, "image_mode", IMAGE_MODES)
        check_choice(self, path, "image_context", IMAGE_CONTEXTS)
        check_choice(self, path, "uncond", UNCOND_MODES)
        check_choice(self, path, "pixel_rounding", PIXEL_ROUNDING)
        check_range(self, path, "max_prompt_length", low=1)
        check_range(self, path, "max_textcot_length", low=1)
        if self.max_textcot_length is not None and self.image_mode == "continue":
            self.fail(path, "max_textcot_length", "applies to image_mode 'reprompt' only: in 'continue' the "
                                                  "image tokens follow the whole CoT in the same sequence")
        for name, holes in (("template", ("{system}", "{instruction}")), ("instruction", ("{prompt}",))):
            text = getattr(self, name)
            missing = [h for h in holes if h not in text]
            if missing:
                self.fail(path, name, f"needs the placeholder(s) {missing}, got {text[:80]!r}")
            try:
                text.format(system="", instruction="", prompt="")
            except (KeyError, IndexError, ValueError) as e:
                self.fail(path, name, f"is not a valid format string ({type(e).__name__}: {e}); "
                                      "write literal braces as {{ and }}")


# The engine's keyword arguments before RolloutConfig existed; they map onto its fields.
LEGACY_KWARGS = {
    "cot_temperature": ("cot", "temperature"),
    "cot_top_k": ("cot", "top_k"),
    "cot_top_p": ("cot", "top_p"),
    "max_new_tokens": ("cot", "max_new_tokens"),
    "temperature": ("image", "temperature"),
    "top_k": ("image", "top_k"),
    "top_p": ("image", "top_p"),
}


def apply_overrides(config: RolloutConfig, overrides: dict) -> RolloutConfig:
    """``config`` with keyword overrides: field names, or the legacy flat names above."""
    if not overrides:
        return config
    names = set(RolloutConfig.__dataclass_fields__)
    changes: dict = {}
    for key, value in overrides.items():
        if key in LEGACY_KWARGS:
            section, name = LEGACY_KWARGS[key]
            changes.setdefault(section, {})[name] = value
        elif key in names:
            if isinstance(value, Settings):
                value = value.to_dict()
            if isinstance(value, dict) and key in changes:
                changes[key].update(value)
            else:
                changes[key] = value
        else:
            raise TypeError(
                f"unknown rollout option {key!r}; options are {sorted(names | set(LEGACY_KWARGS))}"
            )
    return config.replace(**changes)
