"""Memory plan: the per-GPU bytes of a training recipe, from the model's config alone (docs/memory_plan.md).

    plan = plan_memory(TrainerConfig.from_yaml("configs/t2i_r1.yaml"), gpus=8, gpu_memory_gib=80)
    print(plan.format())        # a table in GiB: every item, the peak of each phase, fits / advice

The model is built on the meta device (``JanusPolicy.from_preset(name, device="meta")``, or
transformers' ``JanusConfig`` read from a local checkpoint's config.json), so no weight is ever
loaded; a ``model.builder`` policy is built and measured as it is. Sharding is FSDP2 as the trainer
applies it: ``fully_shard`` per decoder layer, then the root; trainable parameters, their gradients,
the fp32 master weights and the AdamW states are sharded over ``gpus``; frozen modules are
replicated; the bf16 compute parameters are all-gathered one layer at a time (plus the root group:
embeddings, final norm, text head) during the update and all at once during the rollout.

Every item is a formula of the config's shapes (the docstring of each ``_*`` helper below and
docs/memory_plan.md give it); ``MemoryTracker`` measures the same quantities on CPU, and
tests/test_memory_plan.py holds each formula to the measurement within a stated factor.

Phases and the moments whose sum is each phase's peak (items resident in every phase -- weights,
optimizer states, the reference, reward models -- are added to every moment):

    rollout  CoT prefill + decode (CoT KV cache) | image prefill | image decode (image KV cache; the
             CoT cache is freed before it is allocated) | VQ decode (both caches freed)
    reward   the images and the reward models (their activations are not modelled)
    update   reference forward | policy forward+backward (saved activations, one recomputed layer,
             the backward working set, the fused log-prob kernel) | optimizer step
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import math
import sys
import types
from dataclasses import dataclass, field

import torch
import torch.utils._pytree
from torch.utils._python_dispatch import TorchDispatchMode

from .config import TrainerConfig

GiB = 1 << 30
PHASES = ("rollout", "reward", "update")

# Parameter counts of the model rewards (their weights live on the policy's GPU unless
# rewards.functions[i].device says otherwise); loaded in bf16 on CUDA. Approximate, public sizes.
REWARD_PARAMS = {
    "hps": 986e6,  # HPS v2.1: open_clip ViT-H-14 (vision + text towers)
    "pickscore": 986e6,  # PickScore_v1: CLIP ViT-H-14
    "clip": 428e6,  # CLIP ViT-L/14
    "git": 394e6,  # GIT-large (VQAv2)
    "gdino": 172e6,  # GroundingDINO SwinT-OGC (grounding-dino-tiny)
    "orm": 8.03e9,  # the seed's ORM: LLaVA-OneVision-Qwen2-7B fine-tune
    "remote_judge": 0,  # served elsewhere
}


# ----------------------------------------------------------------------------------------- shapes


@dataclass
class ModelShapes:
    """What the plan needs of the model: dimensions and parameter counts by role."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    text_vocab: int
    image_vocab: int
    image_embed: int  # the image head's hidden width (generation_head.proj_out out_features)
    image_tokens: int
    image_size: int
    vq_levels: list  # [(channels, resolution)] of the VQ decoder's levels
    max_positions: int
    trainable: int  # parameter counts
    frozen: int
    layer_trainable_max: int  # the largest decoder layer's trainable parameters (one FSDP2 unit)
    root_trainable: int  # trainable parameters outside the decoder layers (the root FSDP2 unit)
    ref_unused: int  # parameters the reference forward never reads (vision encoder, aligner, VQ)
    largest_param: int
    text_head_trainable: bool
    image_head_bias: bool
    # LoRA (lora.enabled): the trainable parameters are the adapters (fp32, no master copy); every base
    # parameter is frozen, and those inside FSDP2 units (all but the vision encoder, aligner and VQ)
    # are sharded with the adapters. Without LoRA the frozen modules count as replicated.
    lora: bool = False
    unit_frozen: int = 0  # frozen parameters inside FSDP2 units (LoRA: the base language model, heads)
    layer_gather: int = 0  # parameters of the largest decoder layer unit gathered at a time
    root_gather: int = 0  # parameters of the root unit gathered with it

    def __post_init__(self):
        self.layer_gather = self.layer_gather or self.layer_trainable_max
        self.root_gather = self.root_gather or self.root_trainable

    @property
    def total(self) -> int:
        return self.trainable + self.frozen


def _hf_model(config: TrainerConfig, policy=None):
    """The transformers Janus module of the config's model, on the meta device when built here."""
    m = config.model
    if policy is not None:
        return getattr(policy, "hf_model", policy)
    if m.preset is not None:
        from ..models import JanusPolicy

        return JanusPolicy.from_preset(m.preset, device="meta").hf_model
    if m.path is not None:
        from transformers import JanusConfig, JanusForConditionalGeneration

        cfg = JanusConfig.from_pretrained(m.path)
        with torch.device("meta"):
            return JanusForConditionalGeneration(cfg)
    if m.builder is not None:
        from .rewards import load_callable

        policy = load_callable(m.builder, "model.builder")(seed=m.seed)
        return policy.hf_model
    raise ValueError("model: give model.path, model.preset or model.builder to plan its memory")


def _lora_adapters(hf, lora) -> dict:
    """LoRA: decoder layer (its index as a string, or "" outside the layers) -> adapter parameters
    r * (in + out) of each Linear that ``lora.target_modules`` selects (trainer/lora.py's rule)."""
    from .lora import LM_PREFIX, match_targets

    mods = {n: m for n, m in hf.named_modules() if n.startswith(LM_PREFIX) and type(m) is torch.nn.Linear}
    out: dict = {}
    for name in match_targets(list(mods), lora.target_modules):
        m = mods[name]
        parts = name.split(".")
        key = parts[3] if name.startswith(LM_PREFIX + "layers.") else ""
        out[key] = out.get(key, 0) + lora.r * (m.in_features + m.out_features)
    return out


def model_shapes(config: TrainerConfig, policy=None) -> ModelShapes:
    """Dimensions and parameter counts (by trainable / frozen / FSDP2 unit) of the config's model."""
    hf = _hf_model(config, policy)
    cfg = hf.config
    text = cfg.text_config
    lora = config.lora.enabled
    trainable_pats, frozen_pats = config.model.trainable, config.model.frozen
    trainable = frozen = root = ref_unused = largest = unit_frozen = 0
    per_layer: dict = {}
    layer_total: dict = {}
    text_head_trainable = False
    injected: dict = {}  # an already adapted policy (peft): its adapters by layer
    for name, p in hf.named_parameters():
        n = p.numel()
        if ".lora_" in name:
            key = name.split(".")[3] if name.startswith("model.language_model.layers.") else ""
            injected[key] = injected.get(key, 0) + n
            continue
        largest = max(largest, n)
        on = not lora and any(fnmatch.fnmatchcase(name, t) for t in trainable_pats) and not any(
            fnmatch.fnmatchcase(name, f) for f in frozen_pats)
        if name.startswith(("model.vision_model.", "model.aligner.", "model.vqmodel.")):
            ref_unused += n
        elif not on:
            unit_frozen += n
        if name.startswith("model.language_model.layers."):
            layer_total[name.split(".")[3]] = layer_total.get(name.split(".")[3], 0) + n
        if on:
            trainable += n
            parts = name.split(".")
            if name.startswith("model.language_model.layers."):
                per_layer[parts[3]] = per_layer.get(parts[3], 0) + n
            else:
                root += n
            if name.startswith("lm_head."):
                text_head_trainable = True
        else:
            frozen += n
    root_total = trainable + frozen - ref_unused - sum(layer_total.values())
    extra = {}
    if lora:  # only the adapters train; the units gather base + adapters
        adapters = injected or _lora_adapters(hf, config.lora)
        per_layer = {k: v for k, v in adapters.items() if k}
        trainable, root = sum(adapters.values()), adapters.get("", 0)
        extra = dict(lora=True, unit_frozen=unit_frozen,
                     layer_gather=max((layer_total[k] + per_layer.get(k, 0) for k in layer_total), default=0),
                     root_gather=root_total + root)
    gh = hf.model.generation_head
    vq = cfg.vq_config
    mult = list(vq.channel_multiplier)
    grid = int(vq.num_patches)
    levels, res = [], grid
    for i, cm in enumerate(reversed(mult)):
        levels.append((int(vq.base_channels) * int(cm), res))
        if i != len(mult) - 1:
            res *= 2
    return ModelShapes(
        name=config.model.preset or config.model.path or config.model.builder or "model",
        hidden=int(text.hidden_size), layers=int(text.num_hidden_layers), heads=int(text.num_attention_heads),
        kv_heads=int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads),
        head_dim=int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads),
        intermediate=int(text.intermediate_size), text_vocab=int(text.vocab_size),
        image_vocab=int(vq.num_embeddings), image_embed=int(gh.proj_out.out_features),
        image_tokens=int(cfg.vision_config.num_image_tokens), image_size=res,
        vq_levels=levels, max_positions=int(text.max_position_embeddings),
        trainable=trainable, frozen=frozen, layer_trainable_max=max(per_layer.values(), default=0),
        root_trainable=root, ref_unused=ref_unused, largest_param=largest,
        text_head_trainable=text_head_trainable, image_head_bias=gh.vision_head.bias is not None, **extra,
    )


@dataclass
class Lengths:
    """Token lengths of the longest rows (the plan is for the longest: static caches are sized by them).

    cot_context  [BOS] + the rendered CoT prompt (left-truncated to rollout.max_prompt_length)
    cot          sampled CoT tokens (EOS included); the CoT cache is always sized by max_new_tokens
    image_context  the image step's context, BOS ... BOI
    image_context_min  the shortest image context of the rows (None: the shortest there can be, a
                   one-token prompt and an empty CoT). The grouped image cache's suffixes are sized by
                   how far a row runs past its block's shared prefix, so the spread of the lengths
                   counts, not only the longest.
    image_shared   the head the image contexts of a prompt group share (BOS, the template's head,
                   the prompt): the packed update stores it once per group (0: assume nothing shared)
    """

    cot_context: int
    cot: int
    image_context: int
    image_context_min: int | None = None
    image_shared: int = 0


def default_lengths(config: TrainerConfig, *, prompt_tokens: int = 20, cot_tokens: int | None = None,
                    chars_per_token: float = 5.0) -> Lengths:
    """The longest rows of a step, estimated from the config's templates: ``chars_per_token`` 5 is
    DeepSeek's BPE on the seed's English CoT prompt (774 chars, ~150 tokens); ``prompt_tokens`` the
    prompt (T2I-CompBench prompts are 10-25 tokens); ``cot_tokens`` the CoT (None: the worst case,
    rollout.cot.max_new_tokens). The shortest image context is left to the plan (the worst case)."""
    r = config.rollout
    cot = r.cot.max_new_tokens if cot_tokens is None else min(cot_tokens, r.cot.max_new_tokens)
    ctx = _cot_context_tokens(config, prompt_tokens, chars_per_token)
    img = _image_context_tokens(config, ctx, prompt_tokens, cot, chars_per_token)
    if r.image_mode == "continue":
        shared = ctx
    else:  # BOS + the head of the image template + the prompt (rounded down: a lower bound)
        from ..rollout.templates import IMAGE_TEMPLATE_HEAD

        shared = 1 + int(len(IMAGE_TEMPLATE_HEAD.format(prompt="")) / chars_per_token) + prompt_tokens
    return Lengths(ctx, cot, img, image_shared=min(shared, img - 1))


def _cot_context_tokens(config, prompt_tokens, chars_per_token=5.0) -> int:
    from ..rollout.templates import cot_prompt

    r = config.rollout
    ctx = 1 + math.ceil(len(cot_prompt("", r.template, r.system, r.instruction)) / chars_per_token) + prompt_tokens
    return min(ctx, r.max_prompt_length) if r.max_prompt_length is not None else ctx


def _image_context_tokens(config, cot_context, prompt_tokens, cot, chars_per_token=5.0) -> int:
    """The image step's context of a row with a ``cot``-token CoT (EOS included; 0: none sampled)."""
    from ..rollout.templates import IMAGE_TEMPLATE_HEAD, IMAGE_TEMPLATE_TAIL

    r = config.rollout
    body = max(0, cot - 1)  # the CoT without its EOS
    if r.max_textcot_length is not None:
        body = min(body, r.max_textcot_length)
    if r.image_mode == "continue":
        return cot_context + body + 1
    fixed = len(IMAGE_TEMPLATE_HEAD.format(prompt="")) + len(IMAGE_TEMPLATE_TAIL)
    return 1 + math.ceil(fixed / chars_per_token) + prompt_tokens + body + 1


def uncond_blocks(rows: int, uncond: int, span: int, block: int, mode: str = "all") -> tuple:
    """(K, S): prefix blocks of the ``uncond`` unconditional rows and the longest remainder S past
    their block's shared prefix that the grouped image cache holds, at most, for any lengths within
    ``span`` tokens of each other -- an upper bound of what ``rollout.kv_cache.layout_rows(split=True)``
    picks (it minimises K * block + rows * S over its exact rows; ``rows``: all rows of the cache,
    conditional ones included, whose suffixes are sized by S too; ``block``: the prefix capacity).

    ``uncond="all"`` rows (``BOS pad ... pad BOI``) differ only in length: K equal-width length buckets
    leave S <= ceil((span + 1) / K) - 1, and the engine's choice costs no more than the best K.
    Other modes: every row in a block of its own (S = 0) is one of the engine's choices."""
    if uncond == 0:
        return 0, 0
    if mode != "all":
        return uncond, 0
    best = None
    for k in range(1, uncond + 1):
        S = -(-(span + 1) // k) - 1
        cost = k * block + rows * S
        if best is None or cost < best[0]:
            best = (cost, k, S)
    return best[1], best[2]


# ------------------------------------------------------------------------------------------ plan


@dataclass
class Item:
    key: str
    label: str
    nbytes: int
    note: str = ""


@dataclass
class MemoryPlan:
    """Per-GPU bytes of every item, the moments of each phase (lists of item keys alive together),
    the peak per phase, whether the worst phase fits ``gpu_memory_gib`` less ``margin``, advice."""

    title: str
    gpus: int
    gpu_memory_gib: float
    margin: float
    items: dict  # key -> Item
    moments: dict  # phase -> {moment name: [item keys]}
    assumptions: dict = field(default_factory=dict)
    advice: list = field(default_factory=list)

    def bytes(self, key: str) -> int:
        return self.items[key].nbytes if key in self.items else 0

    def moment_bytes(self, phase: str) -> dict:
        return {m: sum(self.bytes(k) for k in keys) for m, keys in self.moments[phase].items()}

    @property
    def peaks(self) -> dict:
        """phase -> (peak bytes, the moment that reaches it)."""
        out = {}
        for ph in self.moments:
            mb = self.moment_bytes(ph)
            name = max(mb, key=mb.get)
            out[ph] = (mb[name], name)
        return out

    @property
    def peak(self) -> int:
        return max(b for b, _ in self.peaks.values())

    @property
    def peak_phase(self) -> str:
        return max(self.peaks.items(), key=lambda kv: kv[1][0])[0]

    @property
    def budget(self) -> float:
        return self.gpu_memory_gib * GiB * (1 - self.margin)

    @property
    def fits(self) -> bool:
        return self.peak <= self.budget

    def summary(self) -> dict:
        """Plain numbers (GiB) for JSON: items, peaks, fits."""
        return {
            "title": self.title, "gpus": self.gpus, "gpu_memory_gib": self.gpu_memory_gib, "margin": self.margin,
            "items_gib": {k: round(i.nbytes / GiB, 3) for k, i in self.items.items()},
            "peaks_gib": {ph: {"gib": round(b / GiB, 3), "moment": m} for ph, (b, m) in self.peaks.items()},
            "fits": self.fits, "assumptions": self.assumptions, "advice": list(self.advice),
        }

    def format(self) -> str:
        """A readable table in GiB: the items, the phases each is alive in, the peaks, the verdict."""
        phases = list(self.moments)
        alive = {k: [ph for ph in phases if any(k in keys for keys in self.moments[ph].values())] for k in self.items}
        w = max(len(i.label) for i in self.items.values()) + 2
        lines = [self.title, (f"per GPU, {self.gpus} GPU(s) x {self.gpu_memory_gib:g} GiB, margin "
                              f"{self.margin:.0%} (fragmentation, CUDA context)")]
        if self.assumptions:
            lines.append("  " + ", ".join(f"{k}={v}" for k, v in self.assumptions.items()))
        lines.append("")
        head = f"{'item':<{w}}{'GiB':>9}  " + " ".join(f"{ph:^7}" for ph in phases)
        lines += [head, "-" * len(head)]
        for k, it in self.items.items():
            if it.nbytes == 0:
                continue
            marks = " ".join(f"{'x' if ph in alive[k] else '.':^7}" for ph in phases)
            note = f"  {it.note}" if it.note else ""
            lines.append(f"{it.label:<{w}}{it.nbytes / GiB:>9.3f}  {marks}{note}")
        lines.append("-" * len(head))
        for ph, (b, m) in self.peaks.items():
            lines.append(f"{'peak ' + ph:<{w}}{b / GiB:>9.3f}  at: {m}")
        verdict = "FITS" if self.fits else "DOES NOT FIT"
        lines.append(f"{'budget':<{w}}{self.budget / GiB:>9.3f}  -> {verdict} (peak {self.peak / GiB:.2f} GiB in "
                     f"{self.peak_phase})")
        if self.advice:
            lines.append("")
            lines.append("to fit / to save memory:" if not self.fits else "notes:")
            lines += [f"  - {a}" for a in self.advice]
        return "\n".join(lines)


def _reward_names(config, rewards=None) -> list:
    if rewards is not None:
        return list(rewards)
    return [f.name for f in config.rewards.functions
            if f.device in (None, "auto") or str(f.device).startswith("cuda")]


def _dtype_bytes(name: str, device: str) -> int:
    if name == "auto":
        return 2 if device == "cuda" else 4
    return torch.empty(0, dtype=getattr(torch, name)).element_size()


def _cpu_logprob_bytes(n, h, v, b, need_w) -> int:
    """The CPU path of token_logprobs' backward (kernels/token_logprobs.py): fp32 dh [n, h] (+ an
    fp32 copy of the input when it is not fp32), the [rows, cols] logits chunk, and with a
    trainable head dW [V, h] plus its fp32 [cols, h] chunk."""
    if n == 0:
        return 0
    rows = min(n, 256)
    cols = max(1, min(v, (1 << 20) // max(rows, h)))
    out = n * h * (4 + (4 if b != 4 else 0)) + rows * cols * 4
    if need_w:
        out += v * h * b + cols * h * 4
    return out


def layer_saved_bytes(s: ModelShapes, b: int) -> int:
    """Bytes one decoder layer saves for backward per token (no checkpointing), HF Llama + SDPA:
    each RMSNorm keeps its fp32 input, its normalised input in the compute dtype and its output
    (4H + 2bH); attention keeps q, k, v (after RoPE) and its output, which o_proj takes as it is
    (4bH; flash/efficient SDPA: no [L, L] matrix, the output already [B, L, heads, D] in memory);
    the SiLU MLP keeps gate, silu(gate), up and their product (4bI)."""
    H, Iw = s.hidden, s.intermediate
    return 2 * (4 * H + 2 * b * H) + 4 * b * H + 4 * b * Iw


def layer_work_bytes(s: ModelShapes, b: int) -> int:
    """Per token, what a layer's backward holds beyond its saved tensors at its worst: one [T, I]
    gradient and two [T, H] gradients (saved tensors are released node by node as it goes)."""
    H, Iw = s.hidden, s.intermediate
    return b * Iw + 2 * b * H


def layer_forward_bytes(s: ModelShapes, b: int) -> int:
    """Per token, the transient activations of one layer's no-grad forward (the rollout's prefill
    and the reference forward): residual, normed input, q, k, v, attention output, gate, up, silu."""
    H, Iw = s.hidden, s.intermediate
    return b * (7 * H + 3 * Iw) + 8 * H


def plan_memory(config: TrainerConfig, *, gpus: int, gpu_memory_gib: float = 80.0, margin: float = 0.10,
                reference: str | None = None, device: str = "cuda", lengths: Lengths | None = None,
                cot_tokens: int | None = None, prompt_tokens: int = 20, rewards: list | None = None, policy=None,
                shapes: ModelShapes | None = None, flatten: bool | None = None, advise: bool = True) -> MemoryPlan:
    """The per-GPU memory of ``config`` trained on ``gpus`` GPUs of ``gpu_memory_gib`` each (FSDP2).

    reference   "replicated" (a deep copy of the whole policy on every GPU), "sharded" (fully_shard like
                the policy: 1/N resident, a layer all-gathered at a time), "cpu" (kept in host memory,
                streamed a layer at a time); None: what Trainer does with ``config`` -- one process: the
                deep copy (replicated); gpus > 1 (torchrun): FSDP2 shards it as ``distributed.reference``
                says ("shard" -> sharded, "cpu_offload" -> cpu)
    device      "cuda" (the plan's target) or "cpu" (the CPU code paths: fp32, chunked log-prob
                kernel, per-tensor AdamW, flattened KV, fused decode weights) -- for the CPU check
    lengths     the longest rows (default: ``default_lengths(config, prompt_tokens=, cot_tokens=)``,
                the worst case cot = rollout.cot.max_new_tokens) and the shortest image context
                (default: the shortest there can be)
    rewards     reward names on the policy's GPU (default: config.rewards.functions whose device is
                the policy's); sizes from REWARD_PARAMS
    policy / shapes   an already-built model (tests) or its shapes, instead of config.model
    flatten     the rollout's KV layout: False grouped (prefixes stay in shared blocks; the CUDA
                default, where the grouped decode kernel runs), True flattened (prefixes copied into
                the rows: the CPU default); None: the device's default
    """
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise ValueError(f"gpus must be a positive integer, got {gpus!r}")
    if not gpu_memory_gib > 0:
        raise ValueError(f"gpu_memory_gib must be > 0, got {gpu_memory_gib!r}")
    if reference is None:
        reference = "replicated" if gpus == 1 else {"shard": "sharded", "cpu_offload": "cpu"}[
            config.distributed.reference]
    if reference not in ("replicated", "sharded", "cpu"):
        raise ValueError(f"reference must be replicated, sharded or cpu, got {reference!r}")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be cuda or cpu, got {device!r}")
    s = shapes or model_shapes(config, policy)
    L = lengths or default_lengths(config, prompt_tokens=prompt_tokens, cot_tokens=cot_tokens)
    c, r, lo, o = config, config.rollout, config.loss, config.optim
    N = gpus
    b = _dtype_bytes(c.model.dtype, device)
    mb = _dtype_bytes(o.master_dtype, device)
    masters = mb != b and not s.lora  # peft keeps the adapters in fp32: they are their own masters
    tb = mb if s.lora else b  # bytes of a trainable parameter and of its gradient
    cpu = device == "cpu"
    flat = cpu if flatten is None else bool(flatten)
    ckpt = c.model.gradient_checkpointing
    G = r.num_generations
    P = math.ceil(c.data.prompts_per_step / N)  # prompt groups this rank rolls out
    R = P * G
    # the rollout holds at most rollout.prompts_per_pass of them at a time (caches, decode, VQ)
    Pr = min(P, r.prompts_per_pass) if r.prompts_per_pass else P
    Rr = Pr * G
    cfg = r.guidance_scale > 1
    cont = r.image_mode == "continue"
    Nimg = s.image_tokens
    H, Iw = s.hidden, s.intermediate
    kv_tok = 2 * s.layers * s.kv_heads * s.head_dim * b
    items: dict = {}

    def add(key, label, nbytes, note=""):
        items[key] = Item(key, label, int(max(0, nbytes)), note)

    shard = 1 if N == 1 else N
    # ---- resident: weights, optimizer, reference, reward models --------------------------------
    add("params.trainable", ("LoRA adapters" if s.lora else "policy trainable weights") + (" (shard)" if N > 1 else ""),
        s.trainable * tb / shard)
    if s.lora and N > 1:  # the base inside the FSDP2 units is sharded; the vision encoder, aligner, VQ are not
        add("params.frozen", "policy frozen base (shard) + vision/aligner/VQ (replicated)",
            s.unit_frozen * b / shard + (s.frozen - s.unit_frozen) * b)
    else:
        add("params.frozen", "policy frozen modules" + ("" if s.lora else " (replicated)"), s.frozen * b)
    add("master", "fp32 master weights" + (" (shard)" if N > 1 else ""), s.trainable * mb / shard if masters else 0)
    add("adam", "AdamW exp_avg + exp_avg_sq" + (" (shard)" if N > 1 else ""), 2 * s.trainable * mb / shard)
    if lo.beta > 0 and not s.lora:  # LoRA: the reference is the policy with its adapters disabled
        ref_b = s.total * b
        if reference == "sharded":
            ref_b = s.total * b / shard
        elif reference == "cpu":
            ref_b = 0
        add("reference", f"reference model ({reference})", ref_b)
    add("rope", "RoPE tables (rollout trunk)", 4 * s.max_positions * s.head_dim * b)
    rw, unknown = 0, []
    for name in _reward_names(c, rewards):
        n = REWARD_PARAMS.get(name)
        if n is None:
            unknown.append(name)
        else:
            rw += n * 2
    add("rewards", "reward models (bf16)", rw, f"not counted: {', '.join(unknown)}" if unknown else "")
    if cpu:  # Trunk.fuse_weights: [q k rot(q) rot(k) v], [gate up] and the native [q k v] copies
        add("fused", "CPU fused decode weights", s.layers * (8 * H * H + 2 * Iw * H) * b)
    resident = [k for k in ("params.trainable", "params.frozen", "master", "adam", "reference", "rope", "rewards",
                            "fused") if k in items]

    # ---- rollout ---------------------------------------------------------------------------------
    add("rollout.unsharded", "all-gathered weights of the FSDP2 units",
        ((s.unit_frozen + s.trainable) if s.lora else s.trainable) * b if N > 1 else 0, "FSDP2 unshard for the rollout")
    # The engine (rollout/engine.py, runner.py): the CoT cache, freed before the image cache is
    # allocated; each cache laid out by layout_rows -- prefix blocks (a prompt's template; a conditional
    # row's whole image context; the unconditional rows' BOS pad ... pad), and per row a suffix of its
    # remainder past its block + 1 + the tokens it decodes (flattened: its whole context + 1 + ...);
    # Trunk.prefill writes each layer's K/V into the cache as it computes them.
    Lc, max_new, Li = L.cot_context, r.cot.max_new_tokens, L.image_context
    Li_min = L.image_context_min
    if Li_min is None:  # the shortest there can be: a one-token prompt, no CoT
        Li_min = _image_context_tokens(c, _cot_context_tokens(c, 1), 1, 0)
    Li_min = max(2, min(Li_min, Li))
    rows = 2 * Rr if cfg else Rr
    kv_l = kv_tok // s.layers  # one layer's K/V per token
    per_tok = layer_forward_bytes(s, b) + kv_l  # a prefill token: one layer's activations and its K/V
    if cont:  # the conditional rows keep their CoT KV; the CFG rows join them in the same cache
        cap = Lc + max_new + 2
        add("kv.cot", f"KV cache, CoT + image ({2 * Rr} rows x {cap + Nimg} + {2 * Pr} prefixes x {cap})",
            kv_tok * (2 * Pr * cap + 2 * Rr * (cap + Nimg)))
    else:
        scap = (Lc if flat else 1) + max_new  # G rows share their template: nothing remains past it
        add("kv.cot", f"KV cache, CoT phase ({Rr} rows x {scap} + {Pr} prefixes x {Lc - 1})",
            kv_tok * (Pr * (Lc - 1) + Rr * scap))
    K_u = S = 0
    if not cont:
        span = Li - Li_min  # how far the unconditional rows' lengths spread
        if flat:  # the caller's blocks: one per conditional row, 1 unconditional (uncond="cot": one per prompt)
            K_u = (Pr if r.uncond == "cot" else 1) if cfg else 0
            S = span if cfg else 0
            scap = Li + Nimg
        else:
            K_u, S = uncond_blocks(rows, Rr if cfg else 0, span, Li - 1, r.uncond)
            scap = S + 1 + Nimg
        npre = Rr + K_u
        add("kv.image", f"KV cache, image phase ({rows} rows x {scap} + {npre} prefixes x {Li - 1})",
            kv_tok * (npre * (Li - 1) + rows * scap))
    # prefill (rollout.runner.prefill_rows): batches of at most PREFILL_TOKENS padded positions (a
    # row over it alone); a batch holds one layer's activations and K/V at a time
    from ..rollout.runner import PREFILL_TOKENS

    def batch_rows(n, width):  # rows of the largest batch of n rows `width` positions wide
        return min(n, max(1, PREFILL_TOKENS // max(width, 1)))

    add("prefill.cot", "CoT prefill (a layer + its K/V)", batch_rows(Pr, Lc - 1) * (Lc - 1) * per_tok)
    if cont:
        pre_i = batch_rows(Rr if cfg else 0, Li) * Li * per_tok
    else:  # the prefix blocks, then the rows with a remainder attending to their block
        n_r = batch_rows(Rr if cfg and S > 0 else 0, Li - 1 + S)
        gather = 2 * n_r * (Li - 1 + S) * kv_l + n_r * S * (Li - 1 + S) * (1 + b)  # their block's K/V, mask
        pre_i = max(batch_rows(npre, Li - 1) * (Li - 1) * per_tok, n_r * S * per_tok + gather)
    add("prefill.image", "image prefill (a layer + its K/V)", pre_i)
    if flat:  # KVCache.flatten: the concatenated [prefix | suffix] and its gathered copy
        add("flatten.cot", "CPU flatten of CoT prefixes", 2 * kv_tok * Rr * Lc)
        add("flatten.image", "CPU flatten of image prefixes", 2 * kv_tok * rows * Li if not cont else 0)
    # decode: CoT logits + sampler; image: the embedding table, the head copy, logits, sampler
    add("decode.cot", "CoT decode step (logits, sampler)", Rr * s.text_vocab * 4 * 4 + Rr * (8 * H + 3 * Iw) * b)
    table = s.image_vocab * H * b
    head = s.image_vocab * s.image_embed * b
    add("decode.image_tables", "image decode tables (embedding, head copy)", table + head)
    add("decode.image_setup", "image embedding table build (aligner MLP)", 2 * s.image_vocab * H * b)
    step = Rr * s.image_vocab * 4 * 4 + rows * (8 * H + 3 * Iw) * b + Rr * Nimg * 12
    if cpu:  # the Gumbel noise of a chunk of steps, the RoPE rows of every step
        step += min(1 << 22, Nimg * Rr * s.image_vocab) * b + Nimg * rows * 2 * s.head_dim * b
    add("decode.image", "image decode step (logits, sampler, buffers)", step)
    full = max(ch * res * res for ch, res in s.vq_levels)
    pix = s.image_size * s.image_size * 3
    add("vq", f"VQ decode of {Rr} images", Rr * (4 * full * b + pix * (b + 4)))
    add("images", "uint8 images", R * pix)  # every pass's images are kept
    ro = resident + ["rollout.unsharded"]
    cot_m = ro + ["kv.cot", "prefill.cot", "decode.cot"] + (["flatten.cot"] if flat else [])
    moments = {"rollout": {"CoT decode": cot_m}}
    if cont:
        moments["rollout"]["image prefill"] = ro + ["kv.cot", "prefill.image"]
        moments["rollout"]["image decode"] = ro + ["kv.cot", "decode.image_tables", "decode.image"]
    else:  # no moment holds both caches: the CoT cache is freed before the image cache is allocated
        moments["rollout"]["image prefill"] = ro + ["kv.image", "prefill.image"] + (["flatten.image"] if flat else [])
        moments["rollout"]["image decode"] = ro + ["kv.image", "decode.image_setup", "decode.image_tables",
                                                   "decode.image"]
    moments["rollout"]["VQ decode"] = ro + ["vq", "images"]  # the cache and the decoder are freed first
    if Pr < P:  # in passes: the images of the passes before stay while the next one runs
        for name, keys in moments["rollout"].items():
            if "images" not in keys:
                moments["rollout"][name] = keys + ["images"]
    moments["reward"] = {"rewards": resident + ["images"]}

    # ---- update ------------------------------------------------------------------------------------
    # One packed forward per micro-batch, in one process and under FSDP alike (trainer/logprobs.py):
    # rows end to end without padding, a prompt group's shared prefixes once -- its CoT prompt, the
    # image contexts' common head (Lengths.image_shared), the unconditional rows' pad context.
    # (rows, row length, shared prefix) per kind of row of a prompt group:
    Lrow = Li + Nimg - 1
    if cont:
        kinds = [(G, Lrow, L.cot_context)]
    else:
        kinds = [(G, L.cot_context + L.cot - 1, L.cot_context), (G, Lrow, min(L.image_shared, Li - 1))]
    if lo.cfg_logprobs != "none":
        kinds.append((G, Lrow, Li - 1))
    M = o.micro_batch_prompts
    group_tokens = sum(sh + n * (Lk - sh) for n, Lk, sh in kinds)
    tokens = M * group_tokens
    if o.micro_batch_tokens:  # cut into pieces of <= micro_batch_tokens packed tokens (a longer row: alone)
        unit = max(Lk for _, Lk, _ in kinds) * (2 if lo.cfg_logprobs != "none" else 1)  # + its uncond row
        tokens = min(tokens, max(o.micro_batch_tokens, unit))
    frac = tokens / (M * group_tokens)  # of a micro-batch of whole groups
    nT = M * G * L.cot * frac
    nI = M * G * Nimg * (1 if lo.cfg_logprobs == "none" else 2) * frac
    # attention (per layer): keys and values are gathered per row, a shared prefix once for each row
    # that reads it (kv_rows positions instead of the packed tokens: the extra is ``attn``); one causal
    # mask [own, prefix + own] per batch of rows (CPU; none on CUDA), built once for all layers
    kv_rows = M * frac * sum(n * Lk for n, Lk, _ in kinds)
    masks = M * sum((Lk - sh) * Lk for _, Lk, sh in kinds) * b if cpu else 0
    attn = 2 * max(0.0, kv_rows - tokens) * H * b
    per_layer = (b * H) if ckpt else layer_saved_bytes(s, b) + attn / max(tokens, 1)
    saved = tokens * (s.layers * per_layer + 4 * H + b * H)  # + the final norm (fp32 input, normed input)
    saved += masks
    saved += nT * H * b + nI * (H + 2 * s.image_embed) * b  # gathered hidden, image head activations
    tmax = tokens  # one forward
    add("act.saved", "activations saved for backward" + (" (checkpointed)" if ckpt else ""), saved,
        f"micro-batch {o.micro_batch_prompts} x {G}" + (f", <= {o.micro_batch_tokens} tokens" if o.micro_batch_tokens
                                                          else "") + f", {int(tokens)} packed tokens")
    add("act.recompute", "one recomputed layer (checkpointing)", tmax * layer_saved_bytes(s, b) + attn if ckpt else 0)
    add("act.work", "backward working set of a layer", tmax * layer_work_bytes(s, b))
    # the fused log-prob kernel's backward: fp32 grad of its input, the grad_logits chunk, dW
    if cpu:
        t_k = _cpu_logprob_bytes(nT, H, s.text_vocab, b, s.text_head_trainable)
        i_k = _cpu_logprob_bytes(nI, s.image_embed, s.image_vocab, b, False)
    else:
        t_k = nT * H * (4 + b) + (s.text_vocab * H * b if s.text_head_trainable else 0) + min(
            16 << 20, nT * s.text_vocab * b)
        i_k = nI * s.image_embed * (4 + b) + min(16 << 20, nI * s.image_vocab * b)
    add("logprob", "fused log-prob backward (text / image head)", max(t_k if nT else 0, i_k))
    grads_b = s.trainable * tb / shard
    add("grads", "gradients" + (" (shard)" if N > 1 else ""), grads_b)
    if N > 1:
        unsh = s.root_gather * b + 2 * s.layer_gather * b
        add("update.unsharded", "all-gathered weights (root + 2 layers)", unsh, "embeddings, lm_head, norm stay "
                                                                            "gathered")
        add("update.grads_unsharded", "unsharded grads (root + 1 layer)", (s.root_trainable + s.layer_trainable_max) * tb)
    if lo.beta > 0:
        ref_act = (tokens * layer_forward_bytes(s, b) + attn + masks + tokens * b * H * 2 + nT * H * b
                   + nI * (H + 2 * s.image_embed) * b)
        if reference != "replicated" and not s.lora:  # a layer gathered (sharded) or streamed from the host
            ref_act += 2 * s.layer_gather * b + (s.root_gather * b if reference == "sharded" else 0)
        add("act.reference", "reference forward (no grad)", ref_act)
    if masters:
        add("opt.master_grads", "fp32 gradients of the masters (step)", s.trainable * mb / shard)
    # torch AdamW: foreach on CUDA (a full _foreach_sqrt copy), per tensor on CPU
    add("opt.temps", "AdamW step temporaries", (s.trainable / shard if not cpu else 2 * s.largest_param) * mb)
    up = resident + ["grads"] + (["update.unsharded", "update.grads_unsharded"] if N > 1 else [])
    moments["update"] = {
        "policy forward+backward": up + ["act.saved", "act.recompute", "act.work"],
        "log-prob backward": up + ["act.saved", "logprob"],
        "optimizer step": resident + ["grads", "opt.master_grads", "opt.temps"],
    }
    if lo.beta > 0:
        moments["update"]["reference forward"] = resident + ["act.reference"] + (
            ["update.unsharded"] if N > 1 else [])
    plan = MemoryPlan(
        title=f"fastbicot memory plan: {s.name}, {c.data.prompts_per_step} prompts x G={G}, "
              f"micro-batch {o.micro_batch_prompts} prompt(s), {'bf16' if b == 2 else f'{8 * b}-bit'} compute, "
              f"{'fp32 masters, ' if masters else ''}{'checkpointing' if ckpt else 'no checkpointing'}, "
              + (f"beta={lo.beta:g}, reference = adapters disabled, LoRA r={c.lora.r}" if s.lora
                 else f"beta={lo.beta:g}, reference {reference}"),
        gpus=N, gpu_memory_gib=float(gpu_memory_gib), margin=margin, items=items, moments=moments,
        assumptions={"prompts/gpu": P, "rows": R, "cot_context": L.cot_context, "cot": L.cot,
                     "image_context": Li, "image_context_min": Li_min, "uncond_blocks": K_u, "remainder": S,
                     "layout": "flattened" if flat else "grouped", "image_tokens": Nimg,
                     "image_shared": L.image_shared, "update_tokens": int(tokens), "params": s.total,
                     "trainable": s.trainable, "dtype_bytes": b},
    )
    if advise:
        plan.advice = _advice(plan, config, s, L, gpus=N, gpu_memory_gib=gpu_memory_gib, margin=margin,
                              reference=reference, device=device, rewards=rewards, flatten=flatten)
    return plan


def R_of(plan) -> int:
    return int(plan.assumptions["rows"])


def _advice(plan, config, s, L, *, gpus, gpu_memory_gib, margin, reference, device, rewards, flatten) -> list:
    """What to change: each candidate re-planned, with its peak."""
    out = []
    kw = dict(gpus=gpus, gpu_memory_gib=gpu_memory_gib, margin=margin, reference=reference, device=device,
              lengths=L, shapes=s, advise=False, rewards=rewards, flatten=flatten)

    def tryit(desc, cfg=None, **over):
        p = plan_memory(cfg or config, **{**kw, **over})
        saved = plan.peak - p.peak
        if saved > 0.01 * GiB:
            out.append(f"{desc}: peak {p.peak / GiB:.1f} GiB ({'fits' if p.fits else 'still too big'})")

    o, r = config.optim, config.rollout
    if plan.peak_phase == "update" or not plan.fits:
        if o.micro_batch_prompts > 1:
            tryit(f"optim.micro_batch_prompts={o.micro_batch_prompts // 2}",
                  config.replace(optim=o.replace(micro_batch_prompts=max(1, o.micro_batch_prompts // 2))))
        if not config.model.gradient_checkpointing:
            tryit("model.gradient_checkpointing=true", config.replace(model=config.model.replace(
                gradient_checkpointing=True)))
    if "reference" in plan.items and plan.bytes("reference") > 0:
        out.append(f"the replicated reference holds {s.ref_unused * 2 / GiB:.2f} GiB of modules its forward never "
                   "reads (vision encoder, aligner, VQ model): copy only the language model and the generation "
                   "modules" if reference == "replicated" else "")
        alts = {"sharded": "shard the reference with fully_shard (a layer gathered at a time)",
                "cpu": "keep the reference in host memory, streamed a layer at a time"}
        for alt, desc in alts.items():
            if alt != reference:
                tryit(desc, reference=alt)
    if plan.bytes("rewards") > 0:
        tryit(f"move the reward models ({plan.bytes('rewards') / GiB:.1f} GiB on every GPU) to another device "
              "(rewards.functions[i].device) or a remote judge", rewards=[])
    P = plan.assumptions["prompts/gpu"]
    now = min(P, r.prompts_per_pass or P)
    if plan.peaks["rollout"][0] >= plan.peak * 0.9 and now > 1:
        # the most groups per pass that fits (fewer rows per decode step cost GPU throughput), else 1;
        # for each number of passes the balanced split (ceil(P / passes) groups each) holds the fewest
        ks = sorted({math.ceil(P / c) for c in range(2, P + 1)} - {now}, reverse=True)
        ks = [k for k in ks if k < now]
        k = next((k for k in ks if plan_memory(config.replace(rollout=r.replace(prompts_per_pass=k)), **kw).fits),
                 1)
        tryit(f"rollout.prompts_per_pass={k} (each GPU rolls out {k} prompt group{'s' if k > 1 else ''} at a "
              "time, the same samples)", config.replace(rollout=r.replace(prompts_per_pass=k)))
    if (plan.peaks["rollout"][0] >= plan.peak * 0.9 or not plan.fits) and r.cot.max_new_tokens > 256:
        L2 = Lengths(L.cot_context, min(L.cot, 256), L.image_context - max(0, L.cot - 256), L.image_context_min,
                     image_shared=L.image_shared)
        tryit("rollout.cot.max_new_tokens=256 (the CoT cache and the longest rows)",
              config.replace(rollout=r.replace(cot=r.cot.replace(max_new_tokens=256))), lengths=L2)
    if not plan.fits and device == "cuda":  # the smallest combination of the above that fits
        combo = [("reference", "sharded", "a sharded reference"), ("rewards", [], "reward models off this GPU")]
        over, names = {}, []
        for k, v, name in combo:
            if k == "reference" and (reference != "replicated" or s.lora):  # LoRA: no reference copy
                continue
            over[k] = v
            names.append(name)
            p = plan_memory(config, **{**kw, **over})
            if p.fits:
                if len(names) > 1:
                    out.append(f"together: {' + '.join(names)}: peak {p.peak / GiB:.1f} GiB (fits)")
                break
    if gpus < 8 and not plan.fits:
        for n in (2, 4, 8):
            if n > gpus and config.data.prompts_per_step >= n:
                tryit(f"{n} GPUs", gpus=n)
                break
    return [a for a in out if a]


# ------------------------------------------------------------------------------ the seed's recipe


def plan_seed_memory(config: TrainerConfig, *, gpus: int = 8, gpu_memory_gib: float = 80.0, margin: float = 0.10,
                     lengths: Lengths | None = None, cot_tokens: int | None = None, prompt_tokens: int = 20,
                     rewards: list | None = None, policy=None, shapes: ModelShapes | None = None) -> MemoryPlan:
    """Estimated per-GPU memory of the seed (CaraJ7/T2I-R1) running ``config``'s shapes: DeepSpeed
    ZeRO-3 over ``gpus`` (every parameter sharded, bf16 params + fp32 masters + fp32 Adam states +
    the persistent bf16 gradient partition, its fp32 copy at the step), one prompt x G per GPU per
    micro-step, an unsharded bf16
    reference copy per GPU, eager HF generation gathering the whole model, a DynamicCache (one layer
    re-concatenated per step), CFG by row doubling on rows right-padded to the longest, bf16
    logits + bf16 log_softmax of the completion positions in the update, gradient checkpointing."""
    s = shapes or model_shapes(config, policy)
    L = lengths or default_lengths(config, prompt_tokens=prompt_tokens, cot_tokens=cot_tokens)
    b, N, G = 2, gpus, config.rollout.num_generations
    H, Nimg = s.hidden, s.image_tokens
    kv_tok = 2 * s.layers * s.kv_heads * s.head_dim * b
    items = {}

    def add(key, label, nbytes, note=""):
        items[key] = Item(key, label, int(max(0, nbytes)), note)

    add("params", "bf16 weights (ZeRO-3 shard, whole model)", s.total * b / N)
    add("master", "fp32 master weights (shard)", s.trainable * 4 / N)
    add("adam", "Adam exp_avg + exp_avg_sq (shard)", s.trainable * 8 / N)
    # ZeRO-3 allocates its flat gradient partition at init (gradient_accumulation_dtype: the model's
    # bf16 under ZeRO) and its IPG bucket (reduce_bucket_size "auto" = hidden^2); fp32 at the step
    add("grads", "bf16 gradient partition + IPG bucket (persistent)", s.trainable * 2 / N + H * H * b)
    add("reference", "reference model (unsharded bf16 copy)", s.total * b)
    rw = sum(REWARD_PARAMS.get(n, 0) * 2 for n in _reward_names(config, rewards))
    add("rewards", "reward models (bf16)", rw)
    add("gathered", "ZeRO-3 gathered weights for generate (whole model)", s.total * b)
    Lcot = L.cot_context + config.rollout.cot.max_new_tokens
    add("kv.cot", f"DynamicCache CoT ({G} rows x {Lcot}) + one layer re-cat", kv_tok * G * Lcot * (1 + 1 / s.layers))
    Li = L.image_context
    rows = 2 * G if config.rollout.guidance_scale > 1 else G
    add("kv.image", f"DynamicCache image ({rows} rows x {Li + Nimg}) + one layer re-cat",
        kv_tok * rows * (Li + Nimg) * (1 + 1 / s.layers))
    add("prefill", "eager prefill (one layer of activations)", rows * Li * layer_forward_bytes(s, b))
    full = max(ch * res * res for ch, res in s.vq_levels)
    add("vq", f"HF VQ decode of {G} images", G * 6 * full * b)
    add("live", "ZeRO-3 live / prefetched params in the update", min(1e9, s.root_trainable + 2 * s.layer_trainable_max)
        * b)
    rows_t = [(G, L.cot_context + L.cot), (G, Li + Nimg)]
    tokens = sum(n * x for n, x in rows_t)
    tmax = max(n * x for n, x in rows_t)
    add("act.saved", "checkpointed activations", tokens * (s.layers * b * H + 4 * H + 2 * b * H))
    add("act.recompute", "one recomputed layer + working set", tmax * (layer_saved_bytes(s, b) + layer_work_bytes(s, b)))
    txt = G * L.cot * s.text_vocab * b
    img = G * Nimg * s.image_vocab * b
    add("logits", "bf16 logits + log_softmax (+ grad) of the longer head", 3 * max(txt, img),
        f"text {G}x{L.cot}x{s.text_vocab}")
    add("opt.temps", "optimizer step: fp32 copy of the gradient partition", s.trainable * 4 / N)
    res = ["params", "master", "adam", "grads", "reference", "rewards"]
    moments = {
        "rollout": {"CoT generate": res + ["gathered", "kv.cot"],
                    "image prefill": res + ["gathered", "kv.image", "prefill"],
                    "VQ decode": res + ["gathered", "vq"]},
        "reward": {"rewards": res},
        "update": {"forward+backward": res + ["live", "act.saved", "act.recompute", "logits"],
                   "optimizer step": res + ["opt.temps"]},
    }
    return MemoryPlan(
        title=f"the seed (DeepSpeed ZeRO-3, HF eager generate) on {s.name}: 1 prompt x G={G} per GPU",
        gpus=N, gpu_memory_gib=float(gpu_memory_gib), margin=margin, items=items, moments=moments,
        assumptions={"cot_context": L.cot_context, "cot": L.cot, "image_context": Li},
    )


# ---------------------------------------------------------------------------------- measurement


class MemoryTracker(TorchDispatchMode):
    """Live bytes of the tensor storages created while active, and their peak -- on any device, CPU
    included, where torch keeps no allocator statistics.

    Every aten op's outputs pass through ``__torch_dispatch__``; a storage seen for the first time
    is counted with its ``nbytes()`` and watched through a C++ weak reference
    (``StorageWeakRef``), so it leaves the count when its last tensor (Python, autograd's saved
    tensors, a cache) lets it go. Storages an op receives that the tracker has not seen (created
    before entering, or outside the dispatcher) are remembered with 0 bytes, so views of them (a
    weight's ``.t()``) are never counted. Before counting a new allocation the dead storages are
    swept, so ``peak`` is the high-water mark of live bytes at op granularity. Not seen: scratch
    memory an op allocates and frees inside itself (e.g. a C++ kernel's workspace), tensors made
    outside the dispatcher (a pybind extension's outputs), and the allocator's own slack.
    """

    def __init__(self):
        super().__init__()
        from torch.multiprocessing.reductions import StorageWeakRef

        self._ref = StorageWeakRef
        self.live: dict = {}
        self.current = 0
        self.peak = 0

    def _sweep(self):
        dead = [k for k, (w, _) in self.live.items() if w.expired()]
        for k in dead:
            self.current -= self.live.pop(k)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in torch.utils._pytree.tree_leaves((args, kwargs)):  # storages from before: never counted
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                w = self._ref(t.untyped_storage())
                old = self.live.get(w.cdata)
                if old is None or old[0].expired():
                    self.live[w.cdata] = (w, 0)
        out = func(*args, **(kwargs or {}))
        new = []
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                w = self._ref(st)
                old = self.live.get(w.cdata)
                if old is None or old[0].expired():
                    new.append((w, st.nbytes()))
        if new:
            self._sweep()
            for w, n in new:
                self.live[w.cdata] = (w, n)
                self.current += n
            self.peak = max(self.peak, self.current)
        return out

    def reset_peak(self):
        self._sweep()
        self.peak = self.current

    @contextlib.contextmanager
    def window(self):
        """The high-water mark of one stretch of code, above the live bytes when it starts:
        ``with m.window() as w: ...; w.peak``. The tracker's own ``peak`` keeps counting the whole block."""
        self._sweep()
        w = types.SimpleNamespace(base=self.current, peak=0)
        outer, self.peak = self.peak, self.current
        try:
            yield w
        finally:
            w.peak = self.peak - w.base
            self.peak = max(outer, self.peak)


# ------------------------------------------------------------------------------------------- CLI


def cli(argv=None) -> int:
    """``fastbicot plan --config X.yaml --gpus N [--gpu-memory 80] [--reference replicated|sharded|cpu]
    [--cot-tokens K] [--prompt-tokens K] [--margin 0.1] [--seed-recipe]
    [--json] [--section.key=value ...]``: print the plan; exit 0 when it fits, 1 when it does not, 2
    on a bad config or argument."""
    p = argparse.ArgumentParser(prog="fastbicot plan", description="per-GPU memory plan of a training recipe")
    p.add_argument("--config", required=True)
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default 80)")
    p.add_argument("--margin", type=float, default=0.10, help="fraction kept free (default 0.10)")
    p.add_argument("--reference", default=None, choices=["replicated", "sharded", "cpu"],
                   help="default: what the trainer does (1 GPU: replicated; torchrun: distributed.reference)")
    p.add_argument("--cot-tokens", type=int, default=None, help="assumed CoT length (default: max_new_tokens)")
    p.add_argument("--prompt-tokens", type=int, default=20)
    p.add_argument("--seed-recipe", action="store_true", help="also print the seed's (ZeRO-3 + HF) estimate")
    p.add_argument("--json", action="store_true")
    args, rest = p.parse_known_args(argv)
    from ..settings import ConfigError

    overrides = []
    i = 0
    while i < len(rest):
        a = rest[i]
        if not a.startswith("--"):
            print(f"fastbicot plan: unexpected argument {a!r}", file=sys.stderr)
            return 2
        if "=" in a:
            overrides.append(a[2:])
            i += 1
        elif i + 1 < len(rest):
            overrides.append(f"{a[2:]}={rest[i + 1]}")
            i += 2
        else:
            print(f"fastbicot plan: override {a} needs a value", file=sys.stderr)
            return 2
    try:
        config = TrainerConfig.from_yaml(args.config, overrides)
        plan = plan_memory(config, gpus=args.gpus, gpu_memory_gib=args.gpu_memory, margin=args.margin,
                           reference=args.reference, cot_tokens=args.cot_tokens, prompt_tokens=args.prompt_tokens)
    except (ConfigError, ValueError) as e:
        print(f"fastbicot plan: {e}", file=sys.stderr)
        return 2
    if args.json:
        import json

        out = {"plan": plan.summary()}
        if args.seed_recipe:
            out["seed"] = plan_seed_memory(config, gpus=args.gpus, gpu_memory_gib=args.gpu_memory,
                                           margin=args.margin, cot_tokens=args.cot_tokens,
                                           prompt_tokens=args.prompt_tokens).summary()
        print(json.dumps(out, indent=1))
    else:
        print(plan.format())
        if args.seed_recipe:
            print()
            print(plan_seed_memory(config, gpus=args.gpus, gpu_memory_gib=args.gpu_memory, margin=args.margin,
                                   cot_tokens=args.cot_tokens, prompt_tokens=args.prompt_tokens).format())
    return 0 if plan.fits else 1


__all__ = ["Item", "Lengths", "MemoryPlan", "MemoryTracker", "ModelShapes", "cli", "default_lengths",
           "layer_saved_bytes", "model_shapes", "plan_memory", "plan_seed_memory", "uncond_blocks"]
