"""GroundingDINO detections feeding the detector rules (presence, counting with NMS, spatial).

For each image the detector is asked for the phrases the prompt needs (``detection_queries``:
nouns, numeracy objects, spatial objects, optionally attribute phrases), written GroundingDINO's
way: ``[CLS] phrase1 . phrase2 . ... [SEP]``, lower case. Each of the model's query boxes gets, per
phrase, the highest token probability (sigmoid of the text logits) over that phrase's tokens; the
box is labelled with its best phrase and scored with that probability. Phrases are matched to
token spans directly (as GLIP / mmdet do) instead of decoding tokens above a text threshold back
into strings, so a box always carries one of the queried labels. Boxes (normalised cx, cy, w, h)
become normalised (x1, y1, x2, y2); those below ``box_threshold`` are dropped before the rules.
"""

from __future__ import annotations

import torch

from ..rules import Detection, DetectorReward, detection_queries, rule_score
from ._common import batch_slices, load_model, preprocess, read_image_config

GROUNDING_DINO_TYPES = ("grounding-dino",)


class GroundingDinoDetector:
    """``detector(images uint8 [N, H, W, 3], queries: N phrase lists) -> N lists of Detection``
    (None for an image whose outputs are NaN/inf)."""

    def __init__(self, model, tokenizer, image_config: dict, *, box_threshold: float = 0.25, batch_size: int = 8):
        batch_slices(1, batch_size)  # validates batch_size
        if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
            raise ValueError("GroundingDINO needs a BERT-style tokenizer with [CLS] and [SEP] tokens")
        self.model, self.tokenizer, self.image_config = model, tokenizer, image_config
        self.box_threshold, self.batch_size = float(box_threshold), batch_size
        self.dot_id = tokenizer.convert_tokens_to_ids(".")
        self.max_text_len = model.config.max_text_len

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device) -> GroundingDinoDetector:
        self.model.to(device)
        return self

    def encode(self, phrases: list[str]) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of ``[CLS] p1 . p2 . [SEP]`` and each phrase's [start, end) token span."""
        ids, spans = [self.tokenizer.cls_token_id], []
        for phrase in phrases:
            toks = self.tokenizer.encode(phrase.lower(), add_special_tokens=False)
            if not toks:
                raise ValueError(f"phrase {phrase!r} tokenizes to nothing")
            spans.append((len(ids), len(ids) + len(toks)))
            ids += toks + [self.dot_id]
        ids.append(self.tokenizer.sep_token_id)
        if len(ids) > self.max_text_len:
            raise ValueError(f"{len(phrases)} phrases need {len(ids)} tokens, GroundingDINO reads at most "
                             f"{self.max_text_len}: {phrases}")
        return ids, spans

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, queries: list[list[str]]) -> list[list[Detection] | None]:
        """Detections per image; None for an image whose model outputs are not finite."""
        if len(queries) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(queries)} query lists")
        out: list[list[Detection]] = [[] for _ in queries]
        todo = [i for i, q in enumerate(queries) if q]  # nothing to look for -> no detections
        dtype = next(self.model.parameters()).dtype
        for s in batch_slices(len(todo), self.batch_size):
            rows = todo[s]
            encoded = [self.encode(queries[i]) for i in rows]
            length = max(len(ids) for ids, _ in encoded)
            pad = self.tokenizer.pad_token_id or 0
            input_ids = torch.tensor([ids + [pad] * (length - len(ids)) for ids, _ in encoded], device=self.device)
            mask = torch.tensor([[1] * len(ids) + [0] * (length - len(ids)) for ids, _ in encoded], device=self.device)
            pixels = preprocess(images[rows], self.image_config, dtype)
            result = self.model(pixel_values=pixels, input_ids=input_ids, attention_mask=mask,
                                token_type_ids=torch.zeros_like(input_ids),
                                pixel_mask=torch.ones_like(pixels[:, 0], dtype=torch.long))
            probs = result.logits.float().sigmoid()  # [B, Q, max_text_len]
            cx, cy, w, h = result.pred_boxes.float().unbind(-1)
            boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1).clamp(0, 1)
            for b, i in enumerate(rows):
                spans = encoded[b][1]
                per_phrase = torch.stack([probs[b, :, lo:hi].amax(-1) for lo, hi in spans], -1)  # [Q, P]
                if not (torch.isfinite(per_phrase).all() and torch.isfinite(boxes[b]).all()):
                    out[i] = None  # the reward turns this into an error naming the prompt, or its fallback
                    continue
                best, label = per_phrase.max(-1)
                keep = (best >= self.box_threshold).nonzero().flatten().tolist()
                out[i] = [Detection(queries[i][label[q]], float(best[q]), tuple(boxes[b, q].tolist())) for q in keep]
        return out


class GroundingDinoReward(DetectorReward):
    """DetectorReward over GroundingDINO; rule parameters (threshold, iou_threshold, presence_credit,
    partial, attributes) are those of ``fastbicot.rewards.rules.rule_score``."""

    name = "grounding_dino"

    def __init__(self, detector: GroundingDinoDetector, name: str | None = None, **kwargs):
        super().__init__(detector, name or self.name, device=kwargs.pop("device", None) or detector.device, **kwargs)

    @classmethod
    def from_pretrained(cls, local_dir, *, device="cpu", dtype="auto", box_threshold: float = 0.25,
                        batch_size: int = 8, **kwargs):
        """Load GroundingDinoForObjectDetection, its tokenizer and preprocessor_config.json from ``local_dir``
        (e.g. a copy of IDEA-Research/grounding-dino-base)."""
        from transformers import AutoTokenizer, GroundingDinoForObjectDetection

        name = kwargs.get("name") or cls.name
        model = load_model(GroundingDinoForObjectDetection, local_dir, name, GROUNDING_DINO_TYPES, device, dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(local_dir), local_files_only=True)
        detector = GroundingDinoDetector(model, tokenizer, read_image_config(local_dir, name),
                                         box_threshold=box_threshold, batch_size=batch_size)
        return cls(detector, device=device, **kwargs)

    def score(self, images, prompts, metadata, cots):
        queries = [detection_queries(m, self.rule_kwargs["attributes"]) for m in metadata]
        detections = self.detector(images, queries)
        return [float("nan") if d is None else rule_score(d, m, reward=self.name, prompt=p, **self.rule_kwargs)
                for d, m, p in zip(detections, metadata, prompts)]
