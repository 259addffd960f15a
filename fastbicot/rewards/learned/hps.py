"""HPS v2.1 (Human Preference Score, a CLIP ViT-H-14 fine-tuned on human preferences) run through
transformers' CLIPModel, and the converter from the official open_clip checkpoint.

The score is HPSv2's: the cosine similarity of the L2-normalised image and prompt embeddings (no
temperature), typically 0.2-0.35 for real images.

The official checkpoint (``HPS_v2.1_compressed.pt``) is an open_clip state dict (``{"state_dict": {...}}``
with keys ``visual.conv1.weight``, ``visual.transformer.resblocks.N.attn.in_proj_weight``,
``positional_embedding``, ``text_projection``, ``logit_scale``, ...). ``convert_hps_checkpoint`` writes
it as a CLIPModel directory once; ``HPSReward.from_pretrained`` loads that directory:

    python -m fastbicot.rewards.learned.hps --checkpoint HPS_v2.1_compressed.pt \
        --tokenizer /path/to/CLIP-ViT-H-14-laion2B-s32B-b79K --out /path/to/hps_v2.1_hf
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from .clip_score import CLIPScoreReward

# open_clip's OPENAI_DATASET_MEAN / STD and its eval transform (Resize(224, bicubic) + CenterCrop)
_OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
_OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]

# per residual block: open_clip suffix -> CLIPEncoderLayer suffix (attn.in_proj_* is split into q/k/v)
_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
          "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
# outside the blocks (".T": stored as x @ W in open_clip, nn.Linear weight is W.T)
_TOP = {"positional_embedding": "text_model.embeddings.position_embedding.weight",
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "ln_final.weight": "text_model.final_layer_norm.weight", "ln_final.bias": "text_model.final_layer_norm.bias",
        "text_projection": "text_projection.weight.T", "logit_scale": "logit_scale",
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight", "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
        "visual.ln_post.weight": "vision_model.post_layernorm.weight",
        "visual.ln_post.bias": "vision_model.post_layernorm.bias", "visual.proj": "visual_projection.weight.T"}
_BLOCK_KEY = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+?)[._](weight|bias)$")  # in_proj_weight


def open_clip_to_clip_state_dict(state_dict: dict) -> dict:
    """Rename / split / transpose an open_clip CLIP state dict into CLIPModel's keys."""
    out, unknown = {}, []
    for key, value in state_dict.items():
        key = key.removeprefix("module.")  # checkpoints saved from DistributedDataParallel
        if key in _TOP:
            target = _TOP[key]
            if target.endswith(".T"):
                out[target[:-2]] = value.t().contiguous()
            else:
                out[target] = value
            continue
        m = _BLOCK_KEY.match(key)
        if m is None:
            unknown.append(key)
            continue
        tower = "vision_model" if m.group(1) else "text_model"
        prefix = f"{tower}.encoder.layers.{m.group(2)}."
        module, kind = m.group(3), m.group(4)
        if module == "attn.in_proj":  # packed [3D, D] / [3D] -> q, k, v projections
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{prefix}self_attn.{name}.{kind}"] = part.contiguous()
        elif module in _BLOCK:
            out[f"{prefix}{_BLOCK[module]}.{kind}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"not an open_clip CLIP state dict: unexpected keys {unknown[:8]}"
                         f"{' ...' if len(unknown) > 8 else ''}")
    return out


def _num_blocks(state_dict: dict, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
    ids = {int(m.group(1)) for k in state_dict if (m := pat.match(k))}
    return max(ids) + 1 if ids else 0


def open_clip_config(state_dict: dict, *, vision_heads: int = 16, text_heads: int = 16, hidden_act: str = "gelu"):
    """CLIPConfig for an open_clip state dict. Widths, depths and sizes come from the tensor shapes; head
    counts and the activation are not stored, so they are arguments (defaults: ViT-H-14, as HPS v2.1).
    Text pooling: open_clip pools at ``argmax(token ids)``, i.e. at the end-of-text token, which is the
    largest id of the CLIP vocabulary; CLIPModel pools at the first ``eos_token_id``, set to vocab_size - 1."""
    from transformers import CLIPConfig

    sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
    conv = sd["visual.conv1.weight"]
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    vocab, text_width = sd["token_embedding.weight"].shape
    vision = {"hidden_size": conv.shape[0], "patch_size": conv.shape[-1], "image_size": conv.shape[-1] * grid,
                  "num_hidden_layers": _num_blocks(sd, "visual."), "num_attention_heads": vision_heads,
                  "intermediate_size": sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                  "hidden_act": hidden_act, "layer_norm_eps": 1e-5}
    text = {"vocab_size": vocab, "hidden_size": text_width, "max_position_embeddings": sd["positional_embedding"].shape[0],
                "num_hidden_layers": _num_blocks(sd, ""), "num_attention_heads": text_heads,
                "intermediate_size": sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0], "hidden_act": hidden_act,
                "layer_norm_eps": 1e-5, "eos_token_id": vocab - 1, "bos_token_id": vocab - 2, "pad_token_id": 0}
    if sd["text_projection"].shape[1] != sd["visual.proj"].shape[1]:
        raise ValueError(f"text_projection {tuple(sd['text_projection'].shape)} and visual.proj "
                         f"{tuple(sd['visual.proj'].shape)} disagree on the embedding size")
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=sd["visual.proj"].shape[1])


def open_clip_to_clip_model(state_dict: dict, **config_kwargs):
    """A CLIPModel (fp32) holding the weights of an open_clip state dict; every weight must be used and set."""
    from transformers import CLIPModel

    model = CLIPModel(open_clip_config(state_dict, **config_kwargs))
    missing, unexpected = model.load_state_dict(open_clip_to_clip_state_dict(state_dict), strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]  # buffers CLIPModel builds itself
    if missing or unexpected:
        raise ValueError(f"open_clip -> CLIPModel conversion left missing={missing[:8]} unexpected={unexpected[:8]}")
    return model.eval()


def convert_hps_checkpoint(checkpoint, tokenizer_dir, out_dir, **config_kwargs) -> Path:
    """Write the open_clip HPS checkpoint (path or state dict) as a CLIPModel directory loadable by
    ``HPSReward.from_pretrained(out_dir)``: weights, the CLIP tokenizer from ``tokenizer_dir`` (any
    transformers CLIP tokenizer directory, e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K) and open_clip's
    eval preprocessing as preprocessor_config.json. The directory is written atomically (a temporary
    directory renamed into place; an existing ``out_dir`` is replaced only once everything is written)."""
    from transformers import AutoTokenizer

    sd = checkpoint if isinstance(checkpoint, dict) else torch.load(checkpoint, map_location="cpu", weights_only=True)
    sd = sd.get("state_dict", sd)
    from ...convert import atomic_output_dir

    model = open_clip_to_clip_model(sd, **config_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    # written to a temporary directory and renamed into place: no half-written checkpoint on failure
    with atomic_output_dir(out_dir, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        size = model.config.vision_config.image_size
        (tmp / "preprocessor_config.json").write_text(json.dumps({
            "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
            "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size}, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": _OPENAI_MEAN, "image_std": _OPENAI_STD,
        }, indent=2))
    return Path(out_dir)


class HPSReward(CLIPScoreReward):
    """HPS v2.1: cos(image, prompt) of the preference-tuned CLIP (load a converted directory)."""

    name = "hps"

    def __init__(self, model, tokenizer, image_config, *, scale=1.0, **kwargs):
        super().__init__(model, tokenizer, image_config, scale=scale, **kwargs)


def main(argv=None):
    p = argparse.ArgumentParser(description="Convert the open_clip HPS v2.1 checkpoint to a CLIPModel directory")
    p.add_argument("--checkpoint", required=True, help="HPS_v2.1_compressed.pt")
    p.add_argument("--tokenizer", required=True, help="local directory with a transformers CLIP tokenizer")
    p.add_argument("--out", required=True)
    p.add_argument("--vision-heads", type=int, default=16)
    p.add_argument("--text-heads", type=int, default=16)
    args = p.parse_args(argv)
    out = convert_hps_checkpoint(args.checkpoint, args.tokenizer, args.out, vision_heads=args.vision_heads,
                                 text_heads=args.text_heads)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
