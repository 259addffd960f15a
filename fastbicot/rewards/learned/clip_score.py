"""CLIP score / PickScore: scaled cosine similarity of CLIP image and prompt embeddings.

``score = scale * cos(E_img(image), E_txt(prompt))`` with transformers' ``CLIPModel``. ``scale``:
``"logit_scale"`` (default) uses the checkpoint's learned temperature exp(logit_scale), which is
PickScore's definition (yuvalkirstain/PickScore_v1, ~100 * cos); a number gives a fixed scale
(1.0: raw cosine; CLIPScore of Hessel et al. is 2.5 * max(cos, 0), set ``clip_at_zero=True``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..base import Reward
from ._common import batch_slices, load_model, preprocess, read_image_config

CLIP_TYPES = ("clip",)


class CLIPScoreReward(Reward):
    name = "clip_score"

    def __init__(self, model, tokenizer, image_config: dict, *, name: str | None = None, scale="logit_scale",
                 clip_at_zero: bool = False, batch_size: int = 32, fallback: float | None = None, device=None):
        super().__init__(name, fallback=fallback, device=device or next(model.parameters()).device)
        if scale != "logit_scale" and not isinstance(scale, (int, float)):
            raise ValueError(f"reward {self.name!r}: scale must be 'logit_scale' or a number, got {scale!r}")
        batch_slices(1, batch_size)  # validates batch_size
        self.model, self.tokenizer, self.image_config = model, tokenizer, image_config
        self.scale, self.clip_at_zero, self.batch_size = scale, clip_at_zero, batch_size
        self.max_length = model.config.text_config.max_position_embeddings

    @classmethod
    def from_pretrained(cls, local_dir, *, device="cpu", dtype="auto", **kwargs):
        """Load a CLIPModel checkpoint, its tokenizer and preprocessor_config.json from ``local_dir``."""
        from transformers import AutoTokenizer, CLIPModel

        name = kwargs.get("name") or cls.name
        model = load_model(CLIPModel, local_dir, name, CLIP_TYPES, device, dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(local_dir), local_files_only=True)
        return cls(model, tokenizer, read_image_config(local_dir, name), device=device, **kwargs)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def texts(self, prompts, metadata, cots) -> list[str]:
        return list(prompts)

    @torch.no_grad()
    def embed(self, images: torch.Tensor, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised float32 image and text embeddings [N, D] (stable across transformers versions:
        the towers' pooled outputs through the projections, as CLIPModel.forward does)."""
        pixels = preprocess(images, self.image_config, self.dtype)
        tok = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        tok = {k: v.to(self.device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}
        img = self.model.visual_projection(self.model.vision_model(pixel_values=pixels).pooler_output)
        txt = self.model.text_projection(self.model.text_model(**tok).pooler_output)
        return F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)

    def score(self, images, prompts, metadata, cots):
        texts = self.texts(prompts, metadata, cots)
        scale = self.model.logit_scale.float().exp() if self.scale == "logit_scale" else float(self.scale)
        out = []
        for s in batch_slices(len(texts), self.batch_size):
            img, txt = self.embed(images[s], texts[s])
            cos = (img * txt).sum(-1)
            out.append(scale * (cos.clamp(min=0) if self.clip_at_zero else cos))
        return torch.cat(out)


class PickScoreReward(CLIPScoreReward):
    """PickScore (yuvalkirstain/PickScore_v1): exp(logit_scale) * cos, the CLIP score defaults."""

    name = "pickscore"


