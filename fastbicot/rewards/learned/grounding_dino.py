"""GroundingDINO detections feeding the detector rules (``fastbicot.rewards.rules``).

The T2I-R1 seed uses GroundingDINO SwinT-OGC (``groundingdino_swint_ogc.pth`` with
``GroundingDINO_SwinT_OGC.py``, ``src/scripts/run_grpo.sh:51-52``); in transformers' format that model is
``IDEA-Research/grounding-dino-tiny`` (not ``grounding-dino-base``, which is the SwinB model).

Two ways of turning the model's per-token box logits into phrase scores, chosen by ``mode``:

* ``"t2i_r1"`` (default; the seed's ``get_grounding_output`` with token spans, ``reward_gdino.py:118-172``
  and ``grpo.py:63-82`` of CaraJ7/T2I-R1): the caption is ``" . ".join(nouns) + "."``; each noun's
  character span (a multi-word noun: its first and last word only) is mapped to tokens with the
  tokenizer's ``char_to_token`` and the seed's fallbacks, and the phrase score of a box is the mean of
  the token sigmoids over those tokens (``positive_map / (sum + 1e-6)``, as ``create_positive_map_from_span``).
  A box is kept when some phrase scores ``> box_threshold`` (0.3), and carries every phrase's score
  (``Detection.phrase_scores``); its label is the seed's phrase text (the span's words joined by a
  space), so the rules match it to nouns verbatim as the seed does. Boxes are not clamped.
* ``"fastbicot"``: ``[CLS] p1 . p2 . [SEP]`` from the lower-cased phrases, each phrase scored by its
  highest token probability, the box labelled with its best phrase only; boxes clamped to [0, 1] and
  kept when the best score is ``>= box_threshold`` (0.25).

Preprocessing follows the checkpoint's preprocessor_config.json (the seed: resize to 800, max 1333,
ImageNet mean/std) in torch on the reward's device.
"""

from __future__ import annotations

import torch

from ..rules import RULE_SETS, Detection, DetectorReward, check_unit
from ._common import batch_slices, load_model, preprocess, read_image_config

GROUNDING_DINO_TYPES = ("grounding-dino",)


def seed_caption(nouns: list[str]) -> tuple[str, list[list[tuple[int, int]]]]:
    """The seed's ``make_detection_prompt`` (grpo.py:63-82): the caption and each noun's character
    spans (one span for one word, first and last word for several)."""
    spans, pointer = [], 0
    for noun in nouns:
        words = noun.strip().split(" ")
        if len(words) == 1:
            length = len(words[0])
            spans.append([(pointer, pointer + length)])
            pointer += length + 3
        else:
            total, first, last = len(noun), len(words[0]), len(words[-1])
            spans.append([(pointer, pointer + first), (pointer + total - last, pointer + total)])
            pointer += total + 3
    return " . ".join(nouns) + ".", spans


class GroundingDinoDetector:
    """``detector(images uint8 [N, H, W, 3], queries: N phrase lists) -> N lists of Detection``
    (None for an image whose outputs are NaN/inf)."""

    def __init__(self, model, tokenizer, image_config: dict, *, mode: str = "t2i_r1",
                 box_threshold: float | None = None, batch_size: int = 8):
        batch_slices(1, batch_size)  # validates batch_size
        if mode not in RULE_SETS:
            raise ValueError(f"GroundingDinoDetector: mode must be one of {list(RULE_SETS)}, got {mode!r}")
        if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
            raise ValueError("GroundingDINO needs a BERT-style tokenizer with [CLS] and [SEP] tokens")
        if box_threshold is None:
            box_threshold = 0.3 if mode == "t2i_r1" else 0.25
        self.model, self.tokenizer, self.image_config = model, tokenizer, image_config
        self.mode = mode
        self.box_threshold = check_unit(box_threshold, "GroundingDinoDetector: box_threshold")
        self.batch_size = batch_size
        self.dot_id = tokenizer.convert_tokens_to_ids(".")
        self.max_text_len = model.config.max_text_len

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device) -> GroundingDinoDetector:
        self.model.to(device)
        return self

    def encode(self, phrases: list[str]) -> tuple[list[int], list[tuple[int, int]]]:
        """fastbicot mode: token ids of ``[CLS] p1 . p2 . [SEP]`` and each phrase's [start, end) token span."""
        ids, spans = [self.tokenizer.cls_token_id], []
        for phrase in phrases:
            toks = self.tokenizer.encode(phrase.lower(), add_special_tokens=False)
            if not toks:
                raise ValueError(f"phrase {phrase!r} tokenizes to nothing")
            spans.append((len(ids), len(ids) + len(toks)))
            ids += toks + [self.dot_id]
        ids.append(self.tokenizer.sep_token_id)
        self._check_length(ids, phrases)
        return ids, spans

    def _check_length(self, ids, phrases):
        if len(ids) > self.max_text_len:
            raise ValueError(f"{len(phrases)} phrases need {len(ids)} tokens, GroundingDINO reads at most "
                             f"{self.max_text_len}: {phrases}")

    def encode_seed(self, nouns: list[str]) -> tuple[list[int], torch.Tensor, list[str]]:
        """t2i_r1 mode: ``[CLS] caption [SEP]`` ids, the normalised positive map [P, len(ids)] and the
        phrase labels (``create_positive_map_from_span``, GroundingDINO util/vl_utils.py:8-47)."""
        caption, spans = seed_caption(nouns)
        enc = self.tokenizer(caption, add_special_tokens=False)
        ids = [self.tokenizer.cls_token_id] + list(enc["input_ids"]) + [self.tokenizer.sep_token_id]
        self._check_length(ids, nouns)

        def char_to_token(i):  # position in [CLS] + tokens + [SEP]; None outside a token
            if i < 0 or i >= len(caption):
                return None
            t = enc.char_to_token(i)
            return None if t is None else t + 1

        pmap = torch.zeros(len(nouns), len(ids), dtype=torch.float64)
        for j, token_span in enumerate(spans):
            for beg, end in token_span:
                beg_pos = char_to_token(beg)
                end_pos = char_to_token(end - 1)
                if beg_pos is None:
                    beg_pos = char_to_token(beg + 1)
                    if beg_pos is None:
                        beg_pos = char_to_token(beg + 2)
                if end_pos is None:
                    end_pos = char_to_token(end - 2)
                    if end_pos is None:
                        end_pos = char_to_token(end - 3)
                if beg_pos is None or end_pos is None:
                    continue
                pmap[j, beg_pos:end_pos + 1] = 1
        pmap = pmap / (pmap.sum(-1, keepdim=True) + 1e-6)
        labels = [" ".join(caption[a:b] for a, b in token_span) for token_span in spans]
        return ids, pmap, labels

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, queries: list[list[str]]) -> list[list[Detection] | None]:
        """Detections per image; None for an image whose model outputs are not finite."""
        if len(queries) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(queries)} query lists")
        out: list[list[Detection] | None] = [[] for _ in queries]
        todo = [i for i, q in enumerate(queries) if q]  # nothing to look for -> no detections
        dtype = next(self.model.parameters()).dtype
        for s in batch_slices(len(todo), self.batch_size):
            rows = todo[s]
            if self.mode == "t2i_r1":
                encoded = [self.encode_seed(queries[i]) for i in rows]
            else:
                encoded = [self.encode(queries[i]) for i in rows]
            length = max(len(e[0]) for e in encoded)
            pad = self.tokenizer.pad_token_id or 0
            input_ids = torch.tensor([e[0] + [pad] * (length - len(e[0])) for e in encoded], device=self.device)
            mask = torch.tensor([[1] * len(e[0]) + [0] * (length - len(e[0])) for e in encoded], device=self.device)
            pixels = preprocess(images[rows], self.image_config, dtype)
            result = self.model(pixel_values=pixels, input_ids=input_ids, attention_mask=mask,
                                token_type_ids=torch.zeros_like(input_ids),
                                pixel_mask=torch.ones_like(pixels[:, 0], dtype=torch.long))
            probs = result.logits.float().sigmoid()  # [B, Q, max_text_len]
            cx, cy, w, h = result.pred_boxes.float().unbind(-1)
            boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
            for b, i in enumerate(rows):
                if self.mode == "t2i_r1":
                    out[i] = self._seed_detections(probs[b], boxes[b], *encoded[b][1:])
                else:
                    out[i] = self._detections(probs[b], boxes[b].clamp(0, 1), encoded[b][1], queries[i])
        return out

    def _seed_detections(self, probs, boxes, pmap, labels):
        n = pmap.shape[1]
        per_phrase = (probs[:, :n].double() @ pmap.to(probs.device).T).float()  # [Q, P]
        if not (torch.isfinite(per_phrase).all() and torch.isfinite(boxes).all()):
            return None  # the reward turns this into an error naming the prompt, or its fallback
        best, arg = per_phrase.max(-1)
        keep = (per_phrase > self.box_threshold).any(-1).nonzero().flatten().tolist()
        scores = per_phrase.tolist()
        return [Detection(labels[arg[q]], float(best[q]), tuple(boxes[q].tolist()),
                          tuple(zip(labels, scores[q]))) for q in keep]

    def _detections(self, probs, boxes, spans, phrases):
        per_phrase = torch.stack([probs[:, lo:hi].amax(-1) for lo, hi in spans], -1)  # [Q, P]
        if not (torch.isfinite(per_phrase).all() and torch.isfinite(boxes).all()):
            return None
        best, label = per_phrase.max(-1)
        keep = (best >= self.box_threshold).nonzero().flatten().tolist()
        return [Detection(phrases[label[q]], float(best[q]), tuple(boxes[q].tolist())) for q in keep]


class GroundingDinoReward(DetectorReward):
    """DetectorReward over GroundingDINO. ``rules="t2i_r1"`` (default) reproduces the seed's reward;
    ``rules="fastbicot"`` the continuous rules. Rule options: see ``fastbicot.rewards.rules.DetectorReward``."""

    name = "grounding_dino"

    def __init__(self, detector: GroundingDinoDetector, name: str | None = None, **kwargs):
        rules = kwargs.get("rules", "t2i_r1")
        if getattr(detector, "mode", rules) != rules:
            raise ValueError(f"GroundingDinoReward: rules={rules!r} needs a detector in mode {rules!r}, "
                             f"got mode {detector.mode!r}")
        super().__init__(detector, name or self.name, device=kwargs.pop("device", None) or detector.device, **kwargs)

    @classmethod
    def from_pretrained(cls, local_dir, *, device="cpu", dtype="auto", rules: str = "t2i_r1",
                        box_threshold: float | None = None, batch_size: int = 8, **kwargs):
        """Load GroundingDinoForObjectDetection, its tokenizer and preprocessor_config.json from ``local_dir``
        (the seed's model: a copy of IDEA-Research/grounding-dino-tiny). ``box_threshold``: 0.3 (seed) for
        ``rules="t2i_r1"``, 0.25 for ``rules="fastbicot"``."""
        from transformers import AutoTokenizer, GroundingDinoForObjectDetection

        name = kwargs.get("name") or cls.name
        model = load_model(GroundingDinoForObjectDetection, local_dir, name, GROUNDING_DINO_TYPES, device, dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(local_dir), local_files_only=True)
        detector = GroundingDinoDetector(model, tokenizer, read_image_config(local_dir, name), mode=rules,
                                         box_threshold=box_threshold, batch_size=batch_size)
        return cls(detector, device=device, rules=rules, **kwargs)
