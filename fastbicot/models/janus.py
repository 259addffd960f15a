"""JanusPolicy: the adapter over transformers' ``JanusForConditionalGeneration``.

The rollout engine and the trainer talk to the model through this adapter (the members they use are
listed in ``fastbicot.models.protocol.Policy``): embeddings for text and image tokens, the decoder
trunk and its parts by role (``decoder_layers``, ``final_norm``, ``rope_tables``, ...), the text
head, and the image head split into its hidden part and its final Linear (the fused log-prob kernel
takes that Linear's input and weight, and CFG can be applied to that input because the layer is
linear).

Other code that knows a transformers class, on purpose: ``fastbicot/vq.py`` re-implements
``JanusVQVAE``'s decoder (it reads its blocks; ``policy.vqmodel`` is handed to it);
``fastbicot/rollout/baselines.py`` is the transformers-generate baseline; the trainer's LoRA and
FSDP code wraps modules of ``policy.hf_model``; checkpoints are ``hf_model.save_pretrained``.
"""

from __future__ import annotations

import fnmatch
import json
import numbers
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..checks import ArgumentError, check_bool, check_int, check_str
from .tokenizer import build_byte_tokenizer

# Janus-Pro's special tokens (deepseek-community/Janus-Pro-{1B,7B} tokenizer and generation config).
JANUS_PRO_SPECIAL_IDS = {"bos": 100000, "eos": 100001, "pad": 100015, "boi": 100016, "eoi": 100593, "image": 100581}


@dataclass(frozen=True)
class Preset:
    """Shapes of a Janus-architecture model; random weights of these shapes via from_preset."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_size: int
    special_ids: dict
    image_size: int  # pixels of the generated image
    vq_base_channels: int
    vq_channel_multiplier: tuple
    vq_latent_channels: int
    vq_num_embeddings: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    max_position_embeddings: int = 16384


PRESETS = {
    # A few MB: the same architecture at toy scale. 8x8 image tokens, 32 px images.
    "tiny": Preset(
        hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, vocab_size=264,
        special_ids={"bos": 256, "eos": 257, "pad": 258, "boi": 259, "eoi": 260, "image": 261},
        image_size=32, vq_base_channels=32, vq_channel_multiplier=(1, 1, 2), vq_latent_channels=32,
        vq_num_embeddings=64, vision_hidden=32, vision_layers=1, vision_heads=2, max_position_embeddings=2048,
    ),
    "janus-pro-1b": Preset(
        hidden_size=2048, num_layers=24, num_heads=16, intermediate_size=5632, vocab_size=102400,
        special_ids=JANUS_PRO_SPECIAL_IDS, image_size=384, vq_base_channels=128,
        vq_channel_multiplier=(1, 1, 2, 2, 4), vq_latent_channels=256, vq_num_embeddings=16384,
        vision_hidden=1024, vision_layers=24, vision_heads=16,
    ),
    "janus-pro-7b": Preset(
        hidden_size=4096, num_layers=30, num_heads=32, intermediate_size=11008, vocab_size=102400,
        special_ids=JANUS_PRO_SPECIAL_IDS, image_size=384, vq_base_channels=128,
        vq_channel_multiplier=(1, 1, 2, 2, 4), vq_latent_channels=256, vq_num_embeddings=16384,
        vision_hidden=1024, vision_layers=24, vision_heads=16,
    ),
}


def preset_config(name: str, attn_implementation: str = "sdpa"):
    """A transformers JanusConfig with the preset's shapes."""
    from transformers import JanusConfig

    if not isinstance(name, str) or name not in PRESETS:
        raise ArgumentError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    attn_implementation = check_str("attn_implementation", attn_implementation)
    p = PRESETS[name]
    upsample = 2 ** (len(p.vq_channel_multiplier) - 1)
    patches = p.image_size // upsample  # latent grid side = image tokens per row
    ids = p.special_ids
    text = {
        "model_type": "llama", "hidden_size": p.hidden_size, "num_hidden_layers": p.num_layers,
        "num_attention_heads": p.num_heads, "num_key_value_heads": p.num_heads, "intermediate_size": p.intermediate_size,
        "vocab_size": p.vocab_size, "max_position_embeddings": p.max_position_embeddings, "rms_norm_eps": 1e-6,
        "bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"], "tie_word_embeddings": False,
    }
    # The vision encoder's patch grid fixes num_image_tokens (and, via JanusConfig, the VQ latent grid).
    vision = {
        "hidden_size": p.vision_hidden, "num_hidden_layers": p.vision_layers, "num_attention_heads": p.vision_heads,
        "image_size": patches * 16, "patch_size": 16, "num_image_tokens": patches * patches, "projection_dim": p.hidden_size,
    }
    vq = {
        "embed_dim": 8, "num_embeddings": p.vq_num_embeddings, "latent_channels": p.vq_latent_channels,
        "base_channels": p.vq_base_channels, "channel_multiplier": list(p.vq_channel_multiplier), "num_patches": patches,
        "projection_dim": p.hidden_size, "image_token_embed_dim": p.hidden_size,
    }
    config = JanusConfig(text_config=text, vision_config=vision, vq_config=vq, image_token_id=ids["image"],
                         tie_word_embeddings=False)
    config._attn_implementation = attn_implementation
    config.text_config._attn_implementation = attn_implementation
    return config


@dataclass(frozen=True)
class DecoderLayer:
    """One decoder layer's parts by role (transformers' LlamaDecoderLayer: ``input_layernorm``,
    ``self_attn.{q,k,v,o}_proj``, ``post_attention_layernorm``, ``mlp.{gate,up,down}_proj``).

    The projections are ``nn.Linear`` modules, or peft LoRA wrappers of them (read the weight the
    layer applies with ``fastbicot.rollout.trunk.effective_weight``); the norms are RMSNorm modules
    (``weight``; their epsilon is ``JanusPolicy.rms_norm_eps``); ``mlp(x) = down(act(gate(x)) * up(x))``.
    """

    input_norm: nn.Module
    q_proj: nn.Module
    k_proj: nn.Module
    v_proj: nn.Module
    o_proj: nn.Module
    post_attention_norm: nn.Module
    mlp: nn.Module
    gate_proj: nn.Module
    up_proj: nn.Module
    down_proj: nn.Module
    act: Callable[[torch.Tensor], torch.Tensor]


def _set_generation_ids(hf_model, ids: dict) -> None:
    gen = hf_model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = ids["bos"], ids["eos"], ids["pad"]
    gen.generation_kwargs = {**(getattr(gen, "generation_kwargs", None) or {}), "boi_token_id": ids["boi"]}


class JanusPolicy(nn.Module):
    """Adapter over ``transformers.JanusForConditionalGeneration``.

    What the rest of fastbicot uses is the ``fastbicot.models.protocol.Policy`` Protocol
    (tests/test_models.py checks that this class satisfies it, signatures included).
    """

    def __init__(self, hf_model, tokenizer=None):
        super().__init__()
        if not hasattr(hf_model, "model") or not hasattr(hf_model.model, "generation_head"):
            raise TypeError(f"JanusPolicy wraps a JanusForConditionalGeneration, got {type(hf_model).__name__}")
        self.hf_model = hf_model
        self.tokenizer = tokenizer
        cfg = hf_model.config
        text = cfg.text_config
        gen = hf_model.generation_config
        self.bos_token_id = _first_id(gen.bos_token_id if gen.bos_token_id is not None else text.bos_token_id)
        self.eos_token_id = _first_id(gen.eos_token_id if gen.eos_token_id is not None else text.eos_token_id)
        self.pad_token_id = _first_id(gen.pad_token_id if gen.pad_token_id is not None else text.pad_token_id)
        boi = (getattr(gen, "generation_kwargs", None) or {}).get("boi_token_id")
        if boi is None and tokenizer is not None:
            boi = tokenizer.convert_tokens_to_ids("<begin_of_image>")
        self.boi_token_id = boi
        # other tokens whose sampling also ends the CoT, recorded as eos_token_id (model.cot_stop_tokens)
        self.cot_stop_ids: tuple = ()
        missing = [n for n in ("bos", "eos", "pad", "boi") if getattr(self, f"{n}_token_id") is None]
        if missing:
            raise ValueError(f"Janus model lacks special token ids {missing} (generation_config or tokenizer)")
        self.num_image_tokens = int(cfg.vision_config.num_image_tokens)
        self.image_grid = int(hf_model.model.vqmodel.quantize.quant_state_dims[0])
        self.text_vocab_size = int(text.vocab_size)
        self.image_vocab_size = int(cfg.vq_config.num_embeddings)
        self.hidden_size = int(text.hidden_size)
        self.num_layers = int(text.num_hidden_layers)
        self.num_heads = int(text.num_attention_heads)
        self.num_kv_heads = int(getattr(text, "num_key_value_heads", None) or self.num_heads)
        self.head_dim = int(getattr(text, "head_dim", None) or self.hidden_size // self.num_heads)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, seed: int = 0, device=None, dtype=None, attn_implementation: str = "sdpa"):
        """Random weights of a real shape: "tiny", "janus-pro-1b" or "janus-pro-7b".

        ``device="meta"`` builds the module without memory (shape checks of 7B). Weights are
        created directly on ``device`` in ``dtype`` so 7B never exists in fp32 on the host.
        """
        from transformers import JanusForConditionalGeneration

        if not isinstance(name, str):
            raise ArgumentError(f"name must be a preset name (one of {sorted(PRESETS)}), got {name!r}")
        seed = check_int("seed", seed, low=0)
        device = _check_device(device, allow_meta=True) or torch.device("cpu")
        dtype = _check_dtype(dtype) or torch.float32
        config = preset_config(name, attn_implementation)
        torch.manual_seed(seed)
        old_dtype = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with device:
                model = JanusForConditionalGeneration(config)
        finally:
            torch.set_default_dtype(old_dtype)
        model.eval()
        ids = PRESETS[name].special_ids
        _set_generation_ids(model, ids)
        return cls(model, build_byte_tokenizer(ids))

    @classmethod
    def from_pretrained(cls, local_dir, dtype=None, device=None, tokenizer_dir=None,
                        attn_implementation: str = "sdpa", allow_missing=(), allow_unexpected=()):
        """Load a transformers-format Janus checkpoint (e.g. a local copy of Janus-Pro-7B).

        Nothing is downloaded: ``local_dir`` must hold config.json, the weights and the tokenizer
        (or pass ``tokenizer_dir``). Checked before any weight is read (docs/errors.md): ``device``
        (a CUDA device needs CUDA), ``dtype``, every JSON file (named when unparsable), every
        safetensors file's header and size (a truncated file is named), the tokenizer's presence.
        After loading, a model weight absent from the checkpoint, or a checkpoint tensor the model
        does not use, is an error naming the keys unless it matches one of the fnmatch patterns in
        ``allow_missing`` / ``allow_unexpected`` (e.g. ``allow_missing=("model.vqmodel.*",)``).
        """
        from transformers import AutoTokenizer, JanusForConditionalGeneration

        device = _check_device(device, allow_meta=False)
        dtype = _check_dtype(dtype)
        allow_missing = _check_patterns("allow_missing", allow_missing)
        allow_unexpected = _check_patterns("allow_unexpected", allow_unexpected)
        attn_implementation = check_str("attn_implementation", attn_implementation)
        if not isinstance(local_dir, (str, os.PathLike)):
            raise ArgumentError(f"local_dir must be a path, got {type(local_dir).__name__}")
        local_dir = os.fspath(local_dir)
        _check_janus_dir(local_dir)
        if tokenizer_dir is not None and not isinstance(tokenizer_dir, (str, os.PathLike)):
            raise ArgumentError(f"tokenizer_dir must be a path or None, got {type(tokenizer_dir).__name__}")
        tok_dir = os.fspath(tokenizer_dir) if tokenizer_dir is not None else local_dir
        if not os.path.isdir(tok_dir):
            raise FileNotFoundError(f"tokenizer_dir not found: {tok_dir!r}")
        if not any(os.path.exists(os.path.join(tok_dir, f)) for f in ("tokenizer.json", "tokenizer.model")):
            raise FileNotFoundError(
                f"no tokenizer in {tok_dir!r}: expected tokenizer.json (or tokenizer.model) beside the "
                f"checkpoint, or pass tokenizer_dir="
            )
        _check_json_files(tok_dir)
        _check_weight_files(local_dir)
        try:
            tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        except Exception as e:
            raise ValueError(f"{tok_dir}: cannot load the tokenizer ({type(e).__name__}: {e})") from e
        try:
            model, info = JanusForConditionalGeneration.from_pretrained(
                local_dir, dtype=dtype or torch.bfloat16, local_files_only=True,
                attn_implementation=attn_implementation, output_loading_info=True,
            )
        except Exception as e:
            raise ValueError(f"{local_dir}: cannot load the Janus weights ({type(e).__name__}: {e})") from e
        _check_loading_info(local_dir, info, allow_missing, allow_unexpected)
        if device is not None:
            model.to(device)
        model.eval()
        gen = model.generation_config
        ids = {"bos": _first_id(gen.bos_token_id), "eos": _first_id(gen.eos_token_id), "pad": _first_id(gen.pad_token_id),
               "boi": _saved_boi_id(local_dir)}
        if ids["pad"] is None:
            ids["pad"] = tokenizer.pad_token_id
        if ids["boi"] is None:
            ids["boi"] = tokenizer.convert_tokens_to_ids("<begin_of_image>")
            if ids["boi"] == tokenizer.unk_token_id:
                ids["boi"] = None
        if None not in ids.values():
            # Some transformers versions drop generation_kwargs on load; HF generate needs it.
            _set_generation_ids(model, ids)
        return cls(model, tokenizer)

    # ---- pieces the engine and the trainer use -------------------------------------------------
    @property
    def config(self):
        return self.hf_model.config

    @property
    def device(self) -> torch.device:
        return self.hf_model.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.hf_model.lm_head.weight.dtype

    @property
    def language_model(self):
        """The decoder trunk (a transformers LlamaModel: embed_tokens, layers, norm, rotary_emb)."""
        return self.hf_model.model.language_model

    @property
    def lm_head(self) -> nn.Linear:
        return self.hf_model.lm_head

    @property
    def image_head_linear(self) -> nn.Linear:
        """The image head's final Linear (hidden -> image vocabulary)."""
        return self.hf_model.model.generation_head.vision_head

    @property
    def vqmodel(self):
        return self.hf_model.model.vqmodel

    # ---- the decoder trunk by role (fastbicot's own trunk: rollout/trunk.py) ----------------------
    @property
    def max_positions(self) -> int:
        """Positions the trunk supports (``text_config.max_position_embeddings``)."""
        return int(self.config.text_config.max_position_embeddings)

    @property
    def mlp_activation(self) -> str:
        """The MLP activation's name (``text_config.hidden_act``; "silu" for Janus-Pro)."""
        return str(getattr(self.config.text_config, "hidden_act", ""))

    @property
    def attention_scale(self) -> float:
        """The factor on q·k before the softmax (head_dim ** -0.5 for Janus-Pro)."""
        return float(self.language_model.layers[0].self_attn.scaling)

    @property
    def rms_norm_eps(self) -> float:
        """The epsilon of every RMSNorm of the trunk."""
        return float(self.language_model.layers[0].input_layernorm.variance_epsilon)

    @property
    def final_norm(self) -> nn.Module:
        """The RMSNorm after the last decoder layer."""
        return self.language_model.norm

    def decoder_layers(self) -> list[DecoderLayer]:
        """The trunk's layers by role, read now (so a LoRA wrapper added later is seen by the next call)."""
        out = []
        for layer in self.language_model.layers:
            a, m = layer.self_attn, layer.mlp
            out.append(DecoderLayer(
                input_norm=layer.input_layernorm, q_proj=a.q_proj, k_proj=a.k_proj, v_proj=a.v_proj,
                o_proj=a.o_proj, post_attention_norm=layer.post_attention_layernorm, mlp=m,
                gate_proj=m.gate_proj, up_proj=m.up_proj, down_proj=m.down_proj, act=m.act_fn,
            ))
        return out

    @torch.no_grad()
    def rope_tables(self, num_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each [num_positions, head_dim] in the policy's dtype and on its device, from the
        model's own rotary embedding (so RoPE scaling settings of the config apply)."""
        num_positions = check_int("num_positions", num_positions, low=1)
        pos = torch.arange(num_positions, device=self.device)[None]
        cos, sin = self.language_model.rotary_emb(torch.empty(1, dtype=self.dtype, device=self.device), pos)
        return cos[0], sin[0]

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.embed_tokens(ids)

    def embed_image(self, ids: torch.Tensor) -> torch.Tensor:
        """Image-token ids -> trunk input (generation embedding + generation aligner)."""
        return self.hf_model.prepare_embeddings_for_image_generation(ids)

    def image_head_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """Trunk output -> input of the image head's final Linear (proj_out + activation)."""
        head = self.hf_model.model.generation_head
        return head.activation_fn(head.proj_out(hidden))

    def image_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.image_head_linear(self.image_head_hidden(hidden))

    def text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def trunk(self, inputs_embeds, *, position_ids=None, attention_mask=None, past_key_values=None,
              use_cache=False):
        """Run the decoder trunk; returns (last hidden states [B, L, H], cache or None)."""
        out = self.language_model(
            inputs_embeds=inputs_embeds, position_ids=position_ids, attention_mask=attention_mask,
            past_key_values=past_key_values, use_cache=use_cache,
        )
        return out.last_hidden_state, out.past_key_values

    def forward(self, inputs_embeds, **kwargs):
        return self.trunk(inputs_embeds, **kwargs)[0]

    def check_token_ids(self, ids, name: str = "ids", *, vocab: str = "text"):
        """Raise a ValueError naming ``name`` unless every id lies in [0, text_vocab_size)
        (``vocab="image"``: [0, image_vocab_size)); returns ``ids`` unchanged.

        ``ids``: an integer tensor of any shape, or a (nested) list/tuple of ints. Call it before
        embedding: an out-of-vocabulary id is otherwise an IndexError in ``F.embedding`` on CPU and
        a device-side assert on CUDA. On CUDA this costs one host sync.
        """
        vocab = check_str("vocab", vocab, choices=("text", "image"))
        size = self.text_vocab_size if vocab == "text" else self.image_vocab_size
        return check_token_ids(ids, name, size, vocab=vocab)

    def unconditional_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """§3: every token except BOS and BOI replaced by the pad token."""
        keep = (ids == self.bos_token_id) | (ids == self.boi_token_id)
        return torch.where(keep, ids, torch.full_like(ids, self.pad_token_id))

    def weight_bytes(self, trunk_only: bool = False) -> int:
        """Bytes read per decode step: trunk + image head (+ generation embedding/aligner)."""
        trunk_only = check_bool("trunk_only", trunk_only)
        modules = [self.language_model.layers, self.language_model.norm]
        if not trunk_only:
            m = self.hf_model.model
            modules += [m.generation_head, m.generation_aligner]
        return sum(p.numel() * p.element_size() for mod in modules for p in mod.parameters())


def _first_id(x):
    if isinstance(x, (list, tuple)):
        return x[0] if x else None
    return x


def check_token_ids(ids, name: str, vocab_size: int, *, vocab: str = "text"):
    """Module-level form of ``JanusPolicy.check_token_ids``: every id must be an integer in [0, vocab_size)."""
    if type(ids).__module__ == "numpy" and hasattr(ids, "dtype"):  # numpy array or scalar
        if ids.dtype.kind not in "iu":
            raise ArgumentError(f"{name}: token ids must be integers, got a numpy array of {ids.dtype}")
        check_token_ids(torch.as_tensor(ids), name, vocab_size, vocab=vocab)
        return ids
    if isinstance(ids, torch.Tensor):
        if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
            raise ArgumentError(f"{name}: token ids must be an integer tensor, got {ids.dtype}")
        if ids.numel() == 0:
            return ids
        flat = ids.reshape(-1)
        bad = (flat < 0) | (flat >= vocab_size)
        if bool(bad.any()):
            pos = int(bad.nonzero()[0, 0])
            raise ValueError(f"{name}: {int(bad.sum())} token id(s) outside the {vocab} vocabulary [0, {vocab_size}), "
                             f"first {int(flat[pos])} at flat index {pos}")
        return ids
    if not isinstance(ids, (list, tuple)):
        raise ArgumentError(f"{name}: token ids must be a tensor or a list of ints, got {type(ids).__name__}")
    flat, stack = [], [ids]
    while stack:
        item = stack.pop()
        if isinstance(item, (list, tuple)):
            stack.extend(reversed(item))
        elif isinstance(item, torch.Tensor):
            check_token_ids(item, name, vocab_size, vocab=vocab)
        else:
            flat.append(item)
    for pos, x in enumerate(flat):
        if isinstance(x, bool) or not isinstance(x, numbers.Integral):
            raise ArgumentError(f"{name}: token ids must be ints, got {x!r} ({type(x).__name__}) at flat index {pos}")
        if not 0 <= int(x) < vocab_size:
            raise ValueError(f"{name}: token id {int(x)} at flat index {pos} is outside the {vocab} vocabulary "
                             f"[0, {vocab_size})")
    return ids


def _check_device(device, *, allow_meta: bool):
    """torch.device(device) after checking that the backend exists here (before any weight is loaded)."""
    if device is None:
        return None
    if not isinstance(device, (str, torch.device, int)) or isinstance(device, bool):
        raise ArgumentError(f"device must be a str, torch.device or int, got {type(device).__name__}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as e:
        raise ArgumentError(f"device: {device!r} is not a torch device ({e})") from e
    if dev.type == "meta" and not allow_meta:
        raise ArgumentError("device='meta' cannot hold loaded weights; use from_preset(..., device='meta')")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ArgumentError(f"device={device!r} but CUDA is not available on this machine "
                                f"(torch {torch.__version__}, cuda build: {torch.version.cuda})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ArgumentError(f"device={device!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type not in ("cpu", "meta"):
        backend = getattr(torch, dev.type, None)
        available = getattr(backend, "is_available", None)
        if available is None or not available():
            raise ArgumentError(f"device={device!r}: the {dev.type!r} backend is not available on this machine")
    return dev


def _check_dtype(dtype):
    if dtype is None:
        return None
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ArgumentError(f"dtype must be a floating torch.dtype (e.g. torch.bfloat16), got {dtype!r}")
    return dtype


def _check_patterns(name, patterns):
    if isinstance(patterns, str):
        patterns = (patterns,)
    if not isinstance(patterns, (list, tuple, set, frozenset)) or not all(isinstance(p, str) and p for p in patterns):
        raise ArgumentError(f"{name} must be a tuple of fnmatch patterns (non-empty strings), got {patterns!r}")
    return tuple(patterns)


def _describe_keys(keys, limit=8):
    keys = sorted(keys)
    groups = {}
    for k in keys:
        prefix = ".".join(k.split(".")[:2]) + ".*"
        groups[prefix] = groups.get(prefix, 0) + 1
    shown = ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
    by_group = ", ".join(f"{g}: {n}" for g, n in sorted(groups.items()))
    return f"{len(keys)} key(s) [{by_group}]: {shown}"


def _check_loading_info(local_dir, info, allow_missing, allow_unexpected):
    def not_allowed(keys, patterns):
        return [k for k in keys if not any(fnmatch.fnmatchcase(k, p) for p in patterns)]

    missing = not_allowed(info.get("missing_keys") or (), allow_missing)
    unexpected = not_allowed(info.get("unexpected_keys") or (), allow_unexpected)
    mismatched = list(info.get("mismatched_keys") or ())
    problems = []
    if missing:
        problems.append(f"the model's weights missing from the checkpoint (they would be random): "
                        f"{_describe_keys(missing)}; pass allow_missing=(patterns,) to accept")
    if unexpected:
        problems.append(f"checkpoint tensors the model does not use: {_describe_keys(unexpected)}; pass "
                        f"allow_unexpected=(patterns,) to accept")
    if mismatched:
        problems.append(f"tensors of the wrong shape: {mismatched[:8]}")
    if problems:
        raise ValueError(f"{local_dir}: checkpoint does not match the Janus model: " + "; ".join(problems))


def _load_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e
    except OSError as e:
        raise ValueError(f"{path}: unreadable ({e})") from e


def _check_json_files(directory: str) -> None:
    """Parse every JSON file of a checkpoint/tokenizer directory, naming the file that is broken."""
    for fname in sorted(os.listdir(directory)):
        path = os.path.join(directory, fname)
        if fname.endswith(".json") and os.path.isfile(path):
            data = _load_json(path)
            if not isinstance(data, dict):  # every HF checkpoint/tokenizer JSON file holds an object
                raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")


def _check_safetensors(path: str) -> None:
    """Header and size of a safetensors file, without reading its tensors: names a truncated/corrupt file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file ({size} bytes, truncated or empty)")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise ValueError(f"{path}: truncated safetensors file (header of {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header (not a JSON object)")  # noqa: TRY004
    end = 0
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            end = max(end, int(meta["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError) as e:
            raise ValueError(f"{path}: corrupt safetensors header entry {key!r}") from e
    if 8 + n + end != size:
        raise ValueError(f"{path}: truncated or corrupt safetensors file: the header describes {8 + n + end} "
                         f"bytes, the file has {size}")


def _saved_boi_id(local_dir: str):
    """boi_token_id from generation_config.json (read raw: not every version keeps generation_kwargs)."""
    path = os.path.join(local_dir, "generation_config.json")
    if not os.path.isfile(path):
        return None
    data = _load_json(path)
    kwargs = data.get("generation_kwargs") if isinstance(data, dict) else None
    return (kwargs or {}).get("boi_token_id") if isinstance(kwargs, dict) or kwargs is None else None


def _check_janus_dir(local_dir: str) -> None:
    if not os.path.isdir(local_dir):
        raise FileNotFoundError(f"Janus checkpoint directory not found: {local_dir!r}")
    cfg_path = os.path.join(local_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{local_dir!r} is not a Janus checkpoint: no config.json (expected transformers' Janus format)")
    config = _load_json(cfg_path)
    if not isinstance(config, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object, got {type(config).__name__}")  # noqa: TRY004
    model_type = config.get("model_type")
    if model_type != "janus":
        raise ValueError(
            f"{local_dir!r} is not a Janus checkpoint: config.json has model_type={model_type!r}, expected 'janus' "
            f"(convert original DeepSeek checkpoints with transformers' convert_janus_weights_to_hf.py)"
        )
    weights = [f for f in os.listdir(local_dir) if f.endswith((".safetensors", ".bin"))]
    if not weights:
        raise ValueError(f"{local_dir!r} has a Janus config.json but no weight files (*.safetensors / *.bin)")


def _check_weight_files(local_dir: str) -> None:
    """Every JSON file parses, index files name existing shards, weight files are complete (named if not)."""
    weights = [f for f in os.listdir(local_dir) if f.endswith((".safetensors", ".bin"))]
    _check_json_files(local_dir)
    for index in (f for f in os.listdir(local_dir) if f.endswith(".index.json")):
        data = _load_json(os.path.join(local_dir, index))
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{os.path.join(local_dir, index)}: no weight_map object")  # noqa: TRY004
        absent = sorted({v for v in weight_map.values() if not os.path.isfile(os.path.join(local_dir, str(v)))})
        if absent:
            raise ValueError(f"{os.path.join(local_dir, index)}: names shard file(s) that do not exist: {absent}")
    for fname in sorted(weights):
        path = os.path.join(local_dir, fname)
        if not os.path.isfile(path):
            raise ValueError(f"{path}: not a regular file")
        if fname.endswith(".safetensors"):
            _check_safetensors(path)
        else:
            with open(path, "rb") as f:
                is_zip = f.read(2) == b"PK"
            if is_zip:
                try:
                    with zipfile.ZipFile(path) as z:
                        z.namelist()
                except (zipfile.BadZipFile, OSError) as e:
                    raise ValueError(f"{path}: truncated or corrupt PyTorch weight file ({e})") from e
