"""JanusPolicy: the one place that knows transformers' Janus internals.

The rollout engine and the trainer talk to the model only through this adapter: embeddings for
text and image tokens, the decoder trunk, the text head, and the image head split into its hidden
part and its final Linear (the fused log-prob kernel takes that Linear's input and weight, and CFG
can be applied to that input because the layer is linear).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from torch import nn

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

    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    p = PRESETS[name]
    upsample = 2 ** (len(p.vq_channel_multiplier) - 1)
    patches = p.image_size // upsample  # latent grid side = image tokens per row
    ids = p.special_ids
    text = dict(
        model_type="llama", hidden_size=p.hidden_size, num_hidden_layers=p.num_layers,
        num_attention_heads=p.num_heads, num_key_value_heads=p.num_heads, intermediate_size=p.intermediate_size,
        vocab_size=p.vocab_size, max_position_embeddings=p.max_position_embeddings, rms_norm_eps=1e-6,
        bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"], tie_word_embeddings=False,
    )
    # The vision encoder's patch grid fixes num_image_tokens (and, via JanusConfig, the VQ latent grid).
    vision = dict(
        hidden_size=p.vision_hidden, num_hidden_layers=p.vision_layers, num_attention_heads=p.vision_heads,
        image_size=patches * 16, patch_size=16, num_image_tokens=patches * patches, projection_dim=p.hidden_size,
    )
    vq = dict(
        embed_dim=8, num_embeddings=p.vq_num_embeddings, latent_channels=p.vq_latent_channels,
        base_channels=p.vq_base_channels, channel_multiplier=list(p.vq_channel_multiplier), num_patches=patches,
        projection_dim=p.hidden_size, image_token_embed_dim=p.hidden_size,
    )
    config = JanusConfig(text_config=text, vision_config=vision, vq_config=vq, image_token_id=ids["image"],
                         tie_word_embeddings=False)
    config._attn_implementation = attn_implementation
    config.text_config._attn_implementation = attn_implementation
    return config


def _set_generation_ids(hf_model, ids: dict) -> None:
    gen = hf_model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = ids["bos"], ids["eos"], ids["pad"]
    gen.generation_kwargs = {**(getattr(gen, "generation_kwargs", None) or {}), "boi_token_id": ids["boi"]}


class JanusPolicy(nn.Module):
    """Adapter over ``transformers.JanusForConditionalGeneration``.

    Attributes used by the rest of fastbicot:
      bos_token_id, eos_token_id, pad_token_id, boi_token_id, num_image_tokens, image_grid,
      text_vocab_size, image_vocab_size, hidden_size, num_layers, num_heads, head_dim,
      language_model (the LlamaModel trunk), lm_head, image_head_linear, vqmodel, tokenizer.
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

        config = preset_config(name, attn_implementation)
        device = torch.device(device) if device is not None else torch.device("cpu")
        dtype = dtype or torch.float32
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
                        attn_implementation: str = "sdpa"):
        """Load a transformers-format Janus checkpoint (e.g. a local copy of Janus-Pro-7B).

        Nothing is downloaded: ``local_dir`` must hold config.json, the weights and the tokenizer
        (or pass ``tokenizer_dir``).
        """
        from transformers import AutoTokenizer, JanusForConditionalGeneration

        local_dir = os.fspath(local_dir)
        _check_janus_dir(local_dir)
        tok_dir = os.fspath(tokenizer_dir) if tokenizer_dir is not None else local_dir
        if not any(os.path.exists(os.path.join(tok_dir, f)) for f in ("tokenizer.json", "tokenizer.model")):
            raise FileNotFoundError(
                f"no tokenizer in {tok_dir!r}: expected tokenizer.json (or tokenizer.model) beside the "
                f"checkpoint, or pass tokenizer_dir="
            )
        tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        model = JanusForConditionalGeneration.from_pretrained(
            local_dir, dtype=dtype or torch.bfloat16, local_files_only=True, attn_implementation=attn_implementation
        )
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

    def unconditional_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """§3: every token except BOS and BOI replaced by the pad token."""
        keep = (ids == self.bos_token_id) | (ids == self.boi_token_id)
        return torch.where(keep, ids, torch.full_like(ids, self.pad_token_id))

    def weight_bytes(self, trunk_only: bool = False) -> int:
        """Bytes read per decode step: trunk + image head (+ generation embedding/aligner)."""
        modules = [self.language_model.layers, self.language_model.norm]
        if not trunk_only:
            m = self.hf_model.model
            modules += [m.generation_head, m.generation_aligner]
        return sum(p.numel() * p.element_size() for mod in modules for p in mod.parameters())


def _first_id(x):
    if isinstance(x, (list, tuple)):
        return x[0] if x else None
    return x


def _saved_boi_id(local_dir: str):
    """boi_token_id from generation_config.json (read raw: not every version keeps generation_kwargs)."""
    path = os.path.join(local_dir, "generation_config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return (json.load(f).get("generation_kwargs") or {}).get("boi_token_id")


def _check_janus_dir(local_dir: str) -> None:
    if not os.path.isdir(local_dir):
        raise FileNotFoundError(f"Janus checkpoint directory not found: {local_dir!r}")
    cfg_path = os.path.join(local_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{local_dir!r} is not a Janus checkpoint: no config.json (expected transformers' Janus format)")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError) as e:
        raise ValueError(f"{cfg_path}: unreadable config.json ({e})") from e
    if model_type != "janus":
        raise ValueError(
            f"{local_dir!r} is not a Janus checkpoint: config.json has model_type={model_type!r}, expected 'janus' "
            f"(convert original DeepSeek checkpoints with transformers' convert_janus_weights_to_hf.py)"
        )
    weights = [f for f in os.listdir(local_dir) if f.endswith((".safetensors", ".bin"))]
    if not weights:
        raise ValueError(f"{local_dir!r} has a Janus config.json but no weight files (*.safetensors / *.bin)")
