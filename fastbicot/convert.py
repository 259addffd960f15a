"""Checkpoint converters into transformers' formats, each writing its output directory atomically.

* ``convert_janus(src_dir, dst_dir)``: a DeepSeek-format Janus-Pro / T2I-R1 checkpoint (the format of
  ``deepseek-ai/Janus-Pro-7B`` and of the seed's released T2I-R1 model: ``config.json`` with
  ``language_config`` / ``vision_config`` / ``gen_vision_config`` ..., weights named ``language_model.*``,
  ``vision_model.*``, ``gen_vision_model.*``, ``aligner.*``, ``gen_aligner.*``, ``gen_head.*``,
  ``gen_embed.*``) into transformers' ``JanusForConditionalGeneration`` format, loadable with
  ``fastbicot.JanusPolicy.from_pretrained(dst_dir)``.
* ``convert_orm(src_dir, dst_dir)``: the seed's ORM (LLaVA-NeXT ``llava_qwen`` format: ``model.*`` Qwen2
  weights, ``model.vision_tower.vision_tower.vision_model.*`` SigLIP, ``model.mm_projector.{0,2}``,
  ``model.image_newline``, ``lm_head``) into transformers' ``LlavaOnevisionForConditionalGeneration``.

Both write into a temporary directory next to ``dst_dir`` and rename it into place when everything is
written, so a failure never leaves a half-written checkpoint; an existing non-empty ``dst_dir`` is an
error unless ``overwrite=True``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch


class ConversionError(ValueError):
    """The source checkpoint is not in the expected format (the message names the file or key)."""


@contextlib.contextmanager
def atomic_output_dir(dst_dir, *, overwrite: bool = False):
    """Yield a fresh temporary directory; on success it replaces ``dst_dir`` (renamed into place),
    on an exception it is removed and ``dst_dir`` is untouched."""
    dst = Path(dst_dir)
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"{str(dst)!r} exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise FileExistsError(f"{str(dst)!r} exists and is not empty (pass overwrite=True to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dst, old)
    try:
        os.rename(tmp, dst)
    except BaseException:
        if old is not None:
            os.rename(old, dst)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- reading checkpoints


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ConversionError(f"{what}: {str(path)!r} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{what}: {str(path)!r} is not valid JSON ({e})") from None


def load_state_dict_dir(src_dir) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: model.safetensors / pytorch_model.bin, or their sharded
    ``*.index.json`` forms."""
    src = Path(src_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(src)!r} does not exist")
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = src / index_name
        if index.is_file():
            files = sorted(set(_read_json(index, "checkpoint index").get("weight_map", {}).values()))
            break
    else:
        files = [f for f in ("model.safetensors", "pytorch_model.bin") if (src / f).is_file()][:1]
    if not files:
        raise ConversionError(f"{str(src)!r} holds no weights (model.safetensors, pytorch_model.bin or an index)")
    out: dict[str, torch.Tensor] = {}
    for name in files:
        path = src / name
        if not path.is_file():
            raise ConversionError(f"weight file {str(path)!r} named in the index is missing")
        if name.endswith(".safetensors"):
            from safetensors.torch import load_file

            out.update(load_file(str(path)))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
            out.update(sd.get("state_dict", sd) if isinstance(sd, dict) else sd)
    return out


def _copy_tokenizer(src: Path, dst: Path) -> None:
    names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
             "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
    found = [n for n in names if (src / n).is_file()]
    if not any(n in found for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ConversionError(f"{str(src)!r} has no tokenizer (tokenizer.json, tokenizer.model or vocab.json)")
    for n in found:
        shutil.copy2(src / n, dst / n)


# ----------------------------------------------------------------------------- Janus (DeepSeek format)

_LAYER = re.compile(r"^(\d+)\.(.*)$")
# heads of the SigLIP towers DeepSeek's config names (vision_config.params.model_name)
_SIGLIP_HEADS = {"siglip_large_patch16_384": 16, "siglip_so400m_patch14_384": 16}


def _mlp_projector_key(rest: str, prefix: str) -> str:
    """MlpProjector ``layers.{0, 2, 4, ...}`` (Linear, GELU, Linear, ...) -> fc1, hidden_layers.{0, 1, ...}."""
    m = re.match(r"^layers\.(\d+)\.(weight|bias)$", rest)
    if not m or int(m.group(1)) % 2:
        raise ConversionError(f"unexpected aligner key {prefix}{rest!r}")
    i = int(m.group(1)) // 2
    return f"{prefix}fc1.{m.group(2)}" if i == 0 else f"{prefix}hidden_layers.{i - 1}.{m.group(2)}"


def _vq_key(rest: str) -> str:
    for part, (old, new) in (("encoder.", ("conv_blocks", "down")), ("decoder.", ("conv_blocks", "up"))):
        if rest.startswith(part + old + "."):
            rest = part + new + "." + rest[len(part + old + "."):]
    rest = re.sub(r"\.res\.(\d+)\.", r".block.\1.", rest)
    rest = re.sub(r"\bmid\.0\.", "mid.block_1.", rest)
    rest = re.sub(r"\bmid\.1\.", "mid.attn_1.", rest)
    rest = re.sub(r"\bmid\.2\.", "mid.block_2.", rest)
    return "model.vqmodel." + rest


def _vision_key(rest: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    v = "model.vision_model."
    if rest == "pos_embed":
        return {v + "embeddings.position_embedding.weight": value.reshape(value.shape[-2], value.shape[-1])}
    if rest.startswith("patch_embed.proj."):
        return {v + "embeddings.patch_embedding." + rest.split(".")[-1]: value}
    if rest.startswith("norm."):
        return {v + "post_layernorm." + rest.split(".")[-1]: value}
    m = re.match(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$", rest)
    if not m:
        raise ConversionError(f"unexpected vision tower key 'vision_model.vision_tower.{rest}'")
    layer, module, kind = m.groups()
    base = f"{v}encoder.layers.{layer}."
    if module == "attn.qkv":
        q, k, w = value.chunk(3, dim=0)
        return {base + f"self_attn.{n}_proj.{kind}": t for n, t in zip("qkv", (q, k, w))}
    names = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.projection_layer",
             "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    if module not in names:
        raise ConversionError(f"unexpected vision tower key 'vision_model.vision_tower.{rest}'")
    return {base + f"{names[module]}.{kind}": value}


def janus_state_dict_to_hf(state_dict: dict) -> dict[str, torch.Tensor]:
    """DeepSeek Janus parameter names -> transformers' JanusForConditionalGeneration names (qkv split,
    position embedding squeezed; the SigLIP attention-pool head and the VQ codebook-usage buffer, unused
    by transformers, are dropped). An unknown key is a ConversionError naming it."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("language_model.model."):
            new = {"model.language_model." + key[len("language_model.model."):]: value}
        elif key == "language_model.lm_head.weight":
            new = {"lm_head.weight": value}
        elif key.startswith("gen_embed."):
            new = {"model.generation_embeddings." + key[len("gen_embed."):]: value}
        elif key.startswith("gen_head.output_mlp_projector."):
            new = {"model.generation_head.proj_out." + key.split(".")[-1]: value}
        elif key.startswith("gen_head.vision_head."):
            new = {"model.generation_head.vision_head." + key.split(".")[-1]: value}
        elif key.startswith("gen_aligner."):
            new = {_mlp_projector_key(key[len("gen_aligner."):], "model.generation_aligner."): value}
        elif key.startswith("aligner."):
            new = {_mlp_projector_key(key[len("aligner."):], "model.aligner."): value}
        elif key.startswith("gen_vision_model."):
            rest = key[len("gen_vision_model."):]
            new = {} if rest == "quantize.codebook_used" else {_vq_key(rest): value}
        elif key.startswith("vision_model.vision_tower."):
            rest = key[len("vision_model.vision_tower."):]
            new = {} if rest.startswith("attn_pool.") else _vision_key(rest, value)
        else:
            raise ConversionError(f"unexpected key {key!r} in the DeepSeek Janus checkpoint")
        for k in new:
            if k in out:
                raise ConversionError(f"two source keys map to {k!r}")
        out.update(new)
    return out


def _count(sd: dict, pattern: str) -> int:
    r = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := r.match(k))})


def janus_config_from_deepseek(config: dict, state_dict: dict, *, vision_heads: int | None = None,
                               image_token_id: int | None = None):
    """transformers' JanusConfig for a DeepSeek Janus config.json; the vision tower's and the VQ model's
    sizes are read from the weights' shapes (DeepSeek's config names them only by class)."""
    from transformers import JanusConfig

    for part in ("language_config", "vision_config", "aligner_config", "gen_vision_config", "gen_aligner_config",
                 "gen_head_config"):
        if part not in config:
            raise ConversionError(f"config.json has no {part!r}: not a DeepSeek Janus (multi_modality) checkpoint")

    def shape(key):
        if key not in state_dict:
            raise ConversionError(f"the checkpoint has no {key!r}")
        return tuple(state_dict[key].shape)

    text = {k: v for k, v in config["language_config"].items() if k not in ("torch_dtype", "dtype")}
    text.setdefault("model_type", "llama")
    text["tie_word_embeddings"] = False
    vt = "vision_model.vision_tower."
    hidden, _, patch, _ = shape(vt + "patch_embed.proj.weight")
    n_pos = shape(vt + "pos_embed")[-2]
    grid = round(n_pos ** 0.5)
    if grid * grid != n_pos:
        raise ConversionError(f"vision pos_embed has {n_pos} positions, not a square grid")
    name = config["vision_config"].get("params", {}).get("model_name")
    heads = vision_heads or _SIGLIP_HEADS.get(name)
    if heads is None:
        raise ConversionError(f"vision tower {name!r}: its head count is unknown; pass vision_heads=")
    aligner_depth = _count(state_dict, r"^aligner\.layers\.(\d+)\.weight$")
    vision = {"hidden_size": hidden, "num_hidden_layers": _count(state_dict, r"^vision_model\.vision_tower\.blocks\.(\d+)\."),
              "num_attention_heads": heads, "patch_size": patch, "image_size": grid * patch,
              "mlp_ratio": shape(vt + "blocks.0.mlp.fc1.weight")[0] / hidden, "layer_norm_eps": 1e-6,
              "attention_bias": vt + "blocks.0.attn.qkv.bias" in state_dict, "num_image_tokens": n_pos,
              "projection_dim": shape("aligner.layers.0.weight")[0], "depth": aligner_depth}
    g = "gen_vision_model."
    num_embeddings, embed_dim = shape(g + "quantize.embedding.weight")
    base = shape(g + "encoder.conv_in.weight")[0]
    n_levels = _count(state_dict, r"^gen_vision_model\.encoder\.conv_blocks\.(\d+)\.")
    mult = [shape(g + f"encoder.conv_blocks.{i}.res.0.conv1.weight")[0] // base for i in range(n_levels)]
    vq = {"embed_dim": embed_dim, "num_embeddings": num_embeddings, "base_channels": base, "channel_multiplier": mult,
          "latent_channels": shape(g + "encoder.conv_out.weight")[0],
          "num_res_blocks": _count(state_dict, r"^gen_vision_model\.encoder\.conv_blocks\.0\.res\.(\d+)\."),
          "num_patches": grid, "projection_dim": shape("gen_aligner.layers.0.weight")[0],
          "num_hidden_layers": _count(state_dict, r"^gen_aligner\.layers\.(\d+)\.weight$"),
          "image_token_embed_dim": shape("gen_head.output_mlp_projector.weight")[1]}
    # transformers' JanusVQVAEHead is Linear(image_token_embed_dim -> projection_dim) -> GELU -> Linear(->
    # num_embeddings) with projection_dim shared with the generation aligner's width
    if shape("gen_head.output_mlp_projector.weight")[0] != vq["projection_dim"]:
        raise ConversionError("gen_head's hidden width differs from gen_aligner's output width; transformers' Janus "
                              "cannot represent that checkpoint")
    return JanusConfig(text_config=text, vision_config=vision, vq_config=vq, image_token_id=image_token_id,
                       tie_word_embeddings=False)


def convert_janus(src_dir, dst_dir, *, vision_heads: int | None = None, tokenizer_dir=None,
                  overwrite: bool = False) -> Path:
    """Convert a DeepSeek-format Janus-Pro / T2I-R1 checkpoint directory into transformers' Janus format.

    ``src_dir``: config.json (``model_type: multi_modality``), the weights (``pytorch_model.bin``,
    ``model.safetensors`` or sharded with an index) and the tokenizer (or ``tokenizer_dir``).
    ``dst_dir`` receives config.json, generation_config.json (pad ``<｜▁pad▁｜>``, BOI ``<begin_of_image>``,
    BOS / EOS from the tokenizer), the weights in their source dtype and the tokenizer, written atomically;
    it loads with ``fastbicot.JanusPolicy.from_pretrained(dst_dir)``. ``vision_heads``: the SigLIP tower's
    head count when its ``model_name`` is not a known one. Returns ``Path(dst_dir)``.
    """
    from transformers import AutoTokenizer, JanusForConditionalGeneration

    src = Path(src_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"convert_janus: source directory {str(src)!r} does not exist")
    config = _read_json(src / "config.json", "convert_janus")
    if config.get("model_type") != "multi_modality":
        raise ConversionError(f"convert_janus: {str(src)!r} holds model_type {config.get('model_type')!r}, "
                              "expected DeepSeek's 'multi_modality'")
    tok_src = Path(tokenizer_dir) if tokenizer_dir is not None else src
    tokenizer = AutoTokenizer.from_pretrained(str(tok_src), local_files_only=True)
    vocab = tokenizer.get_vocab()
    specials = {"pad": "<｜▁pad▁｜>", "boi": "<begin_of_image>", "image": "<image_placeholder>"}
    missing = [t for t in specials.values() if t not in vocab]
    if missing:
        raise ConversionError(f"convert_janus: the tokenizer lacks Janus' special tokens {missing}")
    source = load_state_dict_dir(src)
    hf_config = janus_config_from_deepseek(config, source, vision_heads=vision_heads,
                                           image_token_id=vocab[specials["image"]])
    weights = janus_state_dict_to_hf(source)
    with torch.device("meta"):
        model = JanusForConditionalGeneration(hf_config)
    expected = set(model.state_dict())
    missing_keys, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing_keys or extra:
        raise ConversionError(f"convert_janus: converted weights do not match transformers' Janus: missing "
                              f"{missing_keys[:8]}{' ...' if len(missing_keys) > 8 else ''}, unexpected "
                              f"{extra[:8]}{' ...' if len(extra) > 8 else ''}")
    model.load_state_dict(weights, strict=True, assign=True)
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    gen.pad_token_id = vocab[specials["pad"]]
    gen.generation_kwargs = {**(getattr(gen, "generation_kwargs", None) or {}), "boi_token_id": vocab[specials["boi"]]}
    with atomic_output_dir(dst_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        _copy_tokenizer(tok_src, tmp)
        if (src / "preprocessor_config.json").is_file():
            shutil.copy2(src / "preprocessor_config.json", tmp / "preprocessor_config.json")
    return Path(dst_dir)


# ----------------------------------------------------------------------------- ORM (LLaVA-NeXT llava_qwen format)

_VT = "model.vision_tower.vision_tower.vision_model."
_SIGLIP_TOWER_HEADS = {"google/siglip-so400m-patch14-384": 16, "siglip-so400m-patch14-384": 16}


def orm_state_dict_to_hf(state_dict: dict) -> dict[str, torch.Tensor]:
    """LLaVA-NeXT ``llava_qwen`` parameter names -> transformers' LlavaOnevisionForConditionalGeneration names.
    The SigLIP tower keeps its inner names; its position-id buffer is dropped. Unknown keys are errors."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith(_VT):
            rest = key[len(_VT):]
            if rest.endswith("position_ids"):
                continue
            if rest.startswith("head."):
                raise ConversionError(f"{key!r}: the ORM's SigLIP tower should have no pooling head "
                                      "(LLaVA-NeXT replaces it with Identity)")
            out["model.vision_tower." + rest] = value
        elif key.startswith("model.mm_projector."):
            m = re.match(r"^model\.mm_projector\.(\d+)\.(weight|bias)$", key)
            if not m or m.group(1) not in ("0", "2"):
                raise ConversionError(f"unexpected projector key {key!r} (expected mlp2x_gelu: mm_projector.0 / .2)")
            out[f"model.multi_modal_projector.linear_{1 if m.group(1) == '0' else 2}.{m.group(2)}"] = value
        elif key == "model.image_newline":
            out["model.image_newline"] = value
        elif key.startswith("model."):
            out["model.language_model." + key[len("model."):]] = value
        elif key == "lm_head.weight":
            out["lm_head.weight"] = value
        else:
            raise ConversionError(f"unexpected key {key!r} in the LLaVA-NeXT checkpoint")
    return out


def orm_config_from_llava(config: dict, state_dict: dict, *, vision_heads: int | None = None,
                          image_token_id: int):
    """transformers' LlavaOnevisionConfig for a LLaVA-NeXT llava_qwen config.json; the SigLIP tower's sizes
    are read from the weights (LLaVA-NeXT names the tower only by ``mm_vision_tower``)."""
    from transformers import LlavaOnevisionConfig

    def shape(key):
        if key not in state_dict:
            raise ConversionError(f"the checkpoint has no {key!r}")
        return tuple(state_dict[key].shape)

    projector = config.get("mm_projector_type", "mlp2x_gelu")
    if projector != "mlp2x_gelu":
        raise ConversionError(f"mm_projector_type {projector!r}: only mlp2x_gelu maps onto transformers' projector")
    text_keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
                 "rope_scaling", "max_window_layers", "use_sliding_window", "sliding_window", "attention_dropout",
                 "bos_token_id", "eos_token_id", "tie_word_embeddings")
    text = {k: config[k] for k in text_keys if k in config and config[k] is not None}
    text["model_type"] = "qwen2"
    text["vocab_size"] = shape("model.embed_tokens.weight")[0]
    hidden, _, patch, _ = shape(_VT + "embeddings.patch_embedding.weight")
    n_pos = shape(_VT + "embeddings.position_embedding.weight")[0]
    grid = round(n_pos ** 0.5)
    if grid * grid != n_pos:
        raise ConversionError(f"SigLIP position embedding has {n_pos} positions, not a square grid")
    tower = config.get("mm_vision_tower", "")
    heads = vision_heads or _SIGLIP_TOWER_HEADS.get(tower) or _SIGLIP_TOWER_HEADS.get(str(tower).split("/")[-1])
    if heads is None:
        raise ConversionError(f"vision tower {tower!r}: its head count is unknown; pass vision_heads=")
    vision = {"model_type": "siglip_vision_model", "hidden_size": hidden, "image_size": grid * patch,
              "patch_size": patch, "num_attention_heads": heads,
              "num_hidden_layers": _count(state_dict, r"^model\.vision_tower\.vision_tower\.vision_model\.encoder\.layers\.(\d+)\."),
              "intermediate_size": shape(_VT + "encoder.layers.0.mlp.fc1.weight")[0], "layer_norm_eps": 1e-6,
              "hidden_act": "gelu_pytorch_tanh", "vision_use_head": False}
    kwargs = {}
    if config.get("image_grid_pinpoints"):
        kwargs["image_grid_pinpoints"] = config["image_grid_pinpoints"]
    if str(config.get("image_aspect_ratio", "")).startswith("anyres_max"):
        kwargs["vision_aspect_ratio"] = config["image_aspect_ratio"]
    # LLaVA-NeXT deletes the tower's last layer and reads hidden_states[-1] (every patch, no CLS): the
    # converted tower has the remaining layers and transformers reads its last hidden state in full
    return LlavaOnevisionConfig(text_config=text, vision_config=vision, image_token_id=image_token_id,
                                vision_feature_layer=-1, vision_feature_select_strategy="full",
                                projector_hidden_act="gelu", tie_word_embeddings=text.get("tie_word_embeddings", False),
                                **kwargs)


def convert_orm(src_dir, dst_dir, *, vision_heads: int | None = None, overwrite: bool = False) -> Path:
    """Convert the seed's ORM (ORM-T2I-R1: a LLaVA-NeXT ``llava_qwen`` checkpoint directory with config.json,
    the weights and the Qwen2 tokenizer) into transformers' LLaVA-OneVision format, loadable with
    ``fastbicot.rewards.learned.ORMReward.from_pretrained(dst_dir)``.

    Adds an ``<image>`` token to the tokenizer when absent (its embedding row is the mean of the existing
    rows when the embedding matrix has no spare row), writes the SigLIP preprocessing the seed uses
    (384 x 384 bicubic, mean = std = 0.5) as preprocessor_config.json, and writes atomically.
    ``vision_heads``: the tower's head count when ``mm_vision_tower`` is not a known SigLIP.
    """
    from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration

    src = Path(src_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"convert_orm: source directory {str(src)!r} does not exist")
    config = _read_json(src / "config.json", "convert_orm")
    if config.get("model_type") not in ("llava", "llava_qwen", "qwen2"):
        raise ConversionError(f"convert_orm: {str(src)!r} holds model_type {config.get('model_type')!r}, expected "
                              "a LLaVA-NeXT llava_qwen checkpoint ('llava' / 'llava_qwen')")
    tokenizer = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    source = load_state_dict_dir(src)
    weights = orm_state_dict_to_hf(source)
    if "<image>" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    emb = weights["model.language_model.embed_tokens.weight"]
    if image_id >= emb.shape[0]:
        grow = image_id + 1 - emb.shape[0]
        for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
            if key in weights:
                w = weights[key]
                weights[key] = torch.cat([w, w.float().mean(0, keepdim=True).to(w.dtype).expand(grow, -1)])
        source["model.embed_tokens.weight"] = weights["model.language_model.embed_tokens.weight"]
    hf_config = orm_config_from_llava(config, source, vision_heads=vision_heads, image_token_id=image_id)
    if hf_config.text_config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = LlavaOnevisionForConditionalGeneration(hf_config)
    expected = {k for k in model.state_dict() if not (hf_config.text_config.tie_word_embeddings and k == "lm_head.weight")}
    missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or extra:
        raise ConversionError(f"convert_orm: converted weights do not match transformers' LLaVA-OneVision: missing "
                              f"{missing[:8]}, unexpected {extra[:8]}")
    model.load_state_dict(weights, strict=False, assign=True)
    if hf_config.text_config.tie_word_embeddings:
        model.tie_weights()
    size = hf_config.vision_config.image_size
    with atomic_output_dir(dst_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "preprocessor_config.json").write_text(json.dumps({
            "image_processor_type": "LlavaOnevisionImageProcessor", "do_resize": True,
            "size": {"height": size, "width": size}, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
            "image_grid_pinpoints": hf_config.image_grid_pinpoints,
        }, indent=2))
    return Path(dst_dir)
