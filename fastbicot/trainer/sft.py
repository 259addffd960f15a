"""Supervised fine-tuning on (prompt, CoT, image tokens) examples: the warm start of the method family
(ReasonGen-R1 trains this way before GRPO; the toy world uses it to start from an imperfect policy).

Each example becomes exactly the sequences the rollout would have produced for it (the same CoT
context, the same image context -- RolloutConfig decides reprompt/continue and the template), so a
warm-started policy meets in RL the layout it was taught. Loss: the weighted token mean of
``-log p`` over CoT tokens (+ the final EOS; ``text_weight``, ReasonGen-R1: 2) and image tokens
(``image_weight``: 1); BOI is never a target (ReasonGen-R1's weight 0). With probability
``cond_dropout`` an example's image row loses its prompt and CoT (every token but BOS and BOI
-> pad, the unconditional row of CFG), so the policy also learns the unconditional branch.

Data: JSONL, one example per line: ``{"prompt": str, "cot": str, "image_tokens": [int, ...]}``
(extra fields are kept as metadata). ReasonGen-R1's field names ``instruction`` / ``thinking``
are accepted for ``prompt`` / ``cot``, and ``"image": "path.png"`` (relative to the JSONL) for the
tokens: the file is encoded by the policy's VQ encoder when the stage starts (``fastbicot.vq_encode``).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time

import torch

from ..rollout import RolloutEngine
from .batch import IMAGE, TEXT, Row, TrainSample, aggregation_weights
from .logprobs import sample_logprobs
from .optim import MasterOptimizer

ALIASES = {"instruction": "prompt", "thinking": "cot"}


class SFTDataError(ValueError):
    """A malformed SFT file; the message names the file and the line."""


def _image_path(jsonl: str, obj: dict) -> str | None:
    """The image file an example names instead of its tokens (relative to the JSONL's folder), or None."""
    if obj.get("image_tokens") is not None or not isinstance(obj.get("image"), str):
        return None
    return os.path.join(os.path.dirname(os.path.abspath(jsonl)), obj["image"])


def _check_tokens(where, toks, num_image_tokens, image_vocab_size):
    if not isinstance(toks, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in toks):
        raise SFTDataError(f"{where}: field 'image_tokens' must be a list of integers")
    if len(toks) != num_image_tokens:
        raise SFTDataError(f"{where}: {len(toks)} image tokens, the model makes {num_image_tokens}")
    bad = [t for t in toks if not 0 <= t < image_vocab_size]
    if bad:
        raise SFTDataError(f"{where}: image token {bad[0]} outside the codebook [0, {image_vocab_size})")


def load_sft_examples(path, num_image_tokens: int, image_vocab_size: int, encode=None) -> list:
    """Read and validate an SFT JSONL file -> list of dicts {prompt, cot, image_tokens, metadata}.

    An example may name an image file (``"image": "relative/path.png"``) instead of its ``image_tokens``;
    ``encode(paths) -> token lists`` (the policy's VQ encoder, ``fastbicot.vq_encode.encode_image_files``)
    turns those files into tokens."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SFT data file not found: {path!r}")
    out, pending = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise SFTDataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise SFTDataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            obj = {ALIASES.get(k, k): v for k, v in obj.items()}
            for key in ("prompt", "cot"):
                if not isinstance(obj.get(key), str):
                    raise SFTDataError(f"{where}: field {key!r} must be a string, got {obj.get(key)!r:.60}")
            if not obj["prompt"].strip():
                raise SFTDataError(f"{where}: field 'prompt' is empty")
            toks = obj.get("image_tokens")
            image = _image_path(path, obj)
            if image is not None:
                if not os.path.isfile(image):
                    raise SFTDataError(f"{where}: image file not found: {image!r}")
                pending.append((len(out), where, image))
            else:
                _check_tokens(where, toks, num_image_tokens, image_vocab_size)
            meta = {k: v for k, v in obj.items() if k not in ("prompt", "cot", "image_tokens", "image")}
            out.append({"prompt": obj["prompt"], "cot": obj["cot"], "image_tokens": toks, "metadata": meta})
    if not out:
        raise SFTDataError(f"{path}: no examples")
    if pending:
        if encode is None:
            raise SFTDataError(f"{pending[0][1]}: names an image file; encoding it needs the policy's VQ encoder "
                               "(load through SFTTrainer)")
        for (i, where, _), toks in zip(pending, encode([p for _, _, p in pending])):
            toks = [int(t) for t in toks]
            _check_tokens(where, toks, num_image_tokens, image_vocab_size)
            out[i]["image_tokens"] = toks
    return out


def example_sample(engine: RolloutEngine, ex: dict, drop: bool, train_text: bool = True) -> TrainSample:
    """One example as the rollout would have laid it out (see the module docstring). ``drop``: the image
    row loses prompt and CoT; ``train_text=False`` (with ``drop``): the CoT is not a target either."""
    p, o = engine.policy, engine.config
    ctx = engine.cot_context(ex["prompt"])
    body = p.tokenizer.encode(ex["cot"], add_special_tokens=False)
    cot = body + [p.eos_token_id]
    img = list(ex["image_tokens"])
    ictx, _ = engine.image_context(ctx, ex["prompt"], body, p.tokenizer.decode(body, skip_special_tokens=True))
    if drop:
        keep = (p.bos_token_id, p.boi_token_id)
        ictx = [t if (i == 0 or i == len(ictx) - 1) and t in keep else p.pad_token_id for i, t in enumerate(ictx)]
    b = len(ictx)
    image_t = [(b - 1 + j, t, IMAGE) for j, t in enumerate(img)]
    c0 = len(ctx)
    text_t = [(c0 - 1 + j, t, TEXT) for j, t in enumerate(cot)]
    if drop and not train_text:  # ReasonGen-R1: a dropped example trains its image only
        return TrainSample(0, 0, 0.0, [Row(ictx + img[:-1], b, "image", image_t)], None, 0, len(img))
    if o.image_mode == "continue" and not drop:  # one row: the image follows the CoT
        rows = [Row(ictx + img[:-1], b, "image", text_t + image_t)]
    else:
        rows = [Row(ctx + cot[:-1], c0 + len(cot) - 1, "cot", text_t), Row(ictx + img[:-1], b, "image", image_t)]
    return TrainSample(0, 0, 0.0, rows, None, len(cot), len(img))


class SFTTrainer:
    """``SFTTrainer(config, policy=None)``: ``config.sft`` on the policy of ``config.model``; writes
    ``{config.output_dir}/sft/`` (metrics.jsonl, the final policy in transformers format)."""

    def __init__(self, config, policy=None):
        from .trainer import build_policy, enable_checkpointing, set_trainable

        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        s = config.sft
        if not s.data:
            raise ValueError("sft.data: give the SFT examples file (JSONL: prompt, cot, image_tokens)")
        self.policy = policy if policy is not None else build_policy(config.model)
        set_trainable(self.policy, s.trainable or config.model.trainable, config.model.frozen)
        if config.model.gradient_checkpointing:
            enable_checkpointing(self.policy.language_model)
        rollout = config.rollout if s.instruction is None else config.rollout.replace(instruction=s.instruction)
        self.engine = RolloutEngine(self.policy, rollout)
        from ..vq_encode import encode_image_files

        self.examples = load_sft_examples(s.data, self.policy.num_image_tokens, self.policy.image_vocab_size,
                                          encode=lambda paths: encode_image_files(self.policy, paths))
        optim = config.optim.replace(lr=s.lr, warmup_steps=s.warmup_steps, schedule=s.schedule,
                                     **{k: getattr(s, k) for k in ("betas", "weight_decay") if getattr(s, k) is not None})
        self.optim = MasterOptimizer(self.policy.parameters(), optim, s.steps)
        self.rng = random.Random(s.seed)
        self.order: list = []
        self.step_idx = 0

    def _next_examples(self) -> list:
        out = []
        while len(out) < self.config.sft.batch_size:
            if not self.order:
                self.order = list(range(len(self.examples)))
                self.rng.shuffle(self.order)
            out.append(self.examples[self.order.pop()])
        return out

    def step(self) -> dict:
        s = self.config.sft
        t0 = time.perf_counter()
        exs = self._next_examples()
        samples = [example_sample(self.engine, ex, self.rng.random() < s.cond_dropout, s.dropout_text) for ex in exs]
        seq = torch.cat([torch.full((x.num_tokens,), k) for k, x in enumerate(samples)])
        seg = torch.cat([torch.tensor([TEXT] * x.num_text + [IMAGE] * x.num_image) for x in samples])
        w = aggregation_weights(seq, seg, seq, aggregation="token_mean", text_weight=s.text_weight,
                                image_weight=s.image_weight)
        if s.normalize == "token_count":  # ReasonGen-R1: sum(weight * nll) / number of target tokens
            w = torch.where(seg == TEXT, float(s.text_weight), float(s.image_weight)).double() / max(seg.numel(), 1)
        self.policy.train()
        try:
            lp = sample_logprobs(self.policy, samples, loss=self.config.loss).logprobs
            loss = -(w.to(lp.device, lp.dtype) * lp).sum()
            if not bool(torch.isfinite(loss)):
                raise FloatingPointError(f"SFT step {self.step_idx + 1}: the loss is {float(loss)}")
            loss.backward()
            gn = self.optim.grad_norm()
            if not bool(torch.isfinite(gn)):
                self.optim.zero_grad()
                raise FloatingPointError(f"SFT step {self.step_idx + 1}: the gradient is not finite")
            lr = self.optim.lr
            self.optim.step(gn)
        finally:
            self.policy.eval()
        self.step_idx += 1
        with torch.no_grad():
            text = lp[seg.to(lp.device) == TEXT].detach()
            image = lp[seg.to(lp.device) == IMAGE].detach()
        return {"step": self.step_idx, "loss": float(loss.detach()), "nll/text": float(-text.mean()),
                "nll/image": float(-image.mean()), "grad_norm": float(gn), "lr": lr,
                "time/step": time.perf_counter() - t0}

    def train(self, out_dir: str | None = None) -> str:
        """Run ``sft.steps`` steps; the final policy goes to ``out_dir`` (default ``{output_dir}/sft``)."""
        from .metrics import MetricsLogger
        from .trainer import save_policy

        out = out_dir or os.path.join(self.config.output_dir, "sft")
        os.makedirs(out, exist_ok=True)
        metrics = os.path.join(out, "metrics.jsonl")
        if os.path.exists(metrics):
            os.remove(metrics)
        log = self.config.log.replace(tensorboard=False, wandb=False)
        logger = MetricsLogger(out, log, total_steps=self.config.sft.steps)
        if logger.bar is not None:
            logger.bar.set_description("sft")
        try:
            while self.step_idx < self.config.sft.steps:
                logger.log(self.step())
        finally:
            logger.close()
        tmp = os.path.join(out, ".tmp-final")
        shutil.rmtree(tmp, ignore_errors=True)
        save_policy(self.policy, tmp)
        final = os.path.join(out, "final")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return final


def sft_cache_key(config) -> str:
    """What the warm start depends on: the model, the rollout layout, the SFT settings, the data bytes."""
    h = hashlib.sha256()
    h.update(json.dumps([config.model.to_dict(), config.rollout.to_dict(), config.sft.to_dict(),
                         config.loss.cfg_logprobs], sort_keys=True).encode())
    with open(config.sft.data, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    with open(config.sft.data, encoding="utf-8") as f:  # the image files examples name instead of tokens
        for line in f:
            try:
                image = _image_path(config.sft.data, json.loads(line)) if '"image"' in line else None
            except (json.JSONDecodeError, AttributeError):
                image = None
            if image is not None and os.path.isfile(image):
                with open(image, "rb") as g:
                    h.update(g.read())
    return h.hexdigest()[:16]


def _stderr(msg):
    import sys

    print(msg, file=sys.stderr, flush=True)


def warm_start(config, policy=None, log=_stderr):
    """The SFT warm start of ``config`` -> the directory of its policy, reused from the cache
    (``sft.cache_dir``/<key>) when the same settings and data were trained before."""
    key = sft_cache_key(config)
    cached = os.path.join(config.sft.cache_dir, key)
    if os.path.isfile(os.path.join(cached, "final", "config.json")):
        log(f"fastbicot: SFT warm start found in the cache: {cached} (skipping {config.sft.steps} steps)")
        return os.path.join(cached, "final")
    log(f"fastbicot: SFT warm start: {config.sft.steps} steps on {config.sft.data}")
    tmp = cached + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    SFTTrainer(config, policy).train(tmp)
    os.makedirs(config.sft.cache_dir, exist_ok=True)
    shutil.rmtree(cached, ignore_errors=True)
    os.replace(tmp, cached)
    return os.path.join(cached, "final")
