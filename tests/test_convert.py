"""Checkpoint converters: a tiny random checkpoint in the SOURCE format is built here (the seed's / DeepSeek's
parameter names and layouts), converted, loaded back, and a forward pass is compared with a computation
written in plain torch from the source weights."""

import json
import math

import pytest
import torch

from fastbicot.convert import ConversionError, atomic_output_dir, convert_janus
from fastbicot.models.tokenizer import build_byte_tokenizer

IDS = {"bos": 256, "eos": 257, "pad": 258, "boi": 259, "eoi": 260, "image": 261}
TEXT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 48, "vocab_size": 264, "max_position_embeddings": 128, "rms_norm_eps": 1e-6,
        "model_type": "llama", "torch_dtype": "float32"}
V_HID, V_PATCH, V_GRID, V_LAYERS, V_HEADS, V_MLP = 16, 4, 3, 2, 2, 32
ALIGN, GEN_EMBED, N_IMG, HEAD_EMBED = 32, 4, 20, 32  # head width = aligner width in transformers
VQ = {"base_channels": 32, "channel_multiplier": [1, 2], "num_res_blocks": 1, "latent_channels": 32,
      "embed_dim": GEN_EMBED, "num_embeddings": N_IMG, "num_patches": V_GRID}


def deepseek_vq_names(seed):
    """The VQ-16 model's parameters under gen_vision_model.* with the seed's names (vq_model.py: encoder /
    decoder ``conv_blocks[i].res[j]``, ``.attn[j]``, ``.downsample`` / ``.upsample``, ``mid`` = ModuleList
    [ResnetBlock, AttnBlock, ResnetBlock]); shapes from a tiny JanusVQVAE of the same architecture."""
    import re

    from transformers import JanusVQVAE, JanusVQVAEConfig

    torch.manual_seed(seed)
    vq = JanusVQVAE(JanusVQVAEConfig(**VQ))
    out = {}
    for k, v in vq.state_dict().items():
        k = re.sub(r"^encoder\.down\.", "encoder.conv_blocks.", k)
        k = re.sub(r"^decoder\.up\.", "decoder.conv_blocks.", k)
        k = re.sub(r"\.block\.(\d+)\.", r".res.\1.", k)
        k = k.replace("mid.block_1.", "mid.0.").replace("mid.attn_1.", "mid.1.").replace("mid.block_2.", "mid.2.")
        out["gen_vision_model." + k] = torch.randn_like(v) * 0.1
    out["gen_vision_model.quantize.codebook_used"] = torch.zeros(N_IMG)  # a buffer transformers does not use
    return out


def deepseek_state_dict(seed):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    h, inter, vocab = TEXT["hidden_size"], TEXT["intermediate_size"], TEXT["vocab_size"]
    hd = h // TEXT["num_attention_heads"]
    kv = TEXT["num_key_value_heads"] * hd
    sd = {"language_model.model.embed_tokens.weight": r(vocab, h, scale=1.0),
          "language_model.model.norm.weight": 1 + r(h), "language_model.lm_head.weight": r(vocab, h)}
    for i in range(TEXT["num_hidden_layers"]):
        p = f"language_model.model.layers.{i}."
        sd.update({p + "self_attn.q_proj.weight": r(h, h), p + "self_attn.k_proj.weight": r(kv, h),
                   p + "self_attn.v_proj.weight": r(kv, h), p + "self_attn.o_proj.weight": r(h, h),
                   p + "mlp.gate_proj.weight": r(inter, h), p + "mlp.up_proj.weight": r(inter, h),
                   p + "mlp.down_proj.weight": r(h, inter), p + "input_layernorm.weight": 1 + r(h),
                   p + "post_attention_layernorm.weight": 1 + r(h)})
    vt = "vision_model.vision_tower."
    sd.update({vt + "pos_embed": r(1, V_GRID * V_GRID, V_HID), vt + "patch_embed.proj.weight": r(V_HID, 3, V_PATCH, V_PATCH),
               vt + "patch_embed.proj.bias": r(V_HID), vt + "norm.weight": 1 + r(V_HID), vt + "norm.bias": r(V_HID),
               vt + "attn_pool.latent": r(1, 1, V_HID), vt + "attn_pool.q.weight": r(V_HID, V_HID)})
    for i in range(V_LAYERS):
        p = f"{vt}blocks.{i}."
        sd.update({p + "norm1.weight": 1 + r(V_HID), p + "norm1.bias": r(V_HID), p + "attn.qkv.weight": r(3 * V_HID, V_HID),
                   p + "attn.qkv.bias": r(3 * V_HID), p + "attn.proj.weight": r(V_HID, V_HID), p + "attn.proj.bias": r(V_HID),
                   p + "norm2.weight": 1 + r(V_HID), p + "norm2.bias": r(V_HID), p + "mlp.fc1.weight": r(V_MLP, V_HID),
                   p + "mlp.fc1.bias": r(V_MLP), p + "mlp.fc2.weight": r(V_HID, V_MLP), p + "mlp.fc2.bias": r(V_HID)})
    sd.update({"aligner.layers.0.weight": r(h, V_HID), "aligner.layers.0.bias": r(h),
               "aligner.layers.2.weight": r(h, h), "aligner.layers.2.bias": r(h),
               "gen_aligner.layers.0.weight": r(h, GEN_EMBED), "gen_aligner.layers.0.bias": r(h),
               "gen_aligner.layers.2.weight": r(h, h), "gen_aligner.layers.2.bias": r(h),
               "gen_embed.weight": r(N_IMG, GEN_EMBED, scale=1.0),
               "gen_head.output_mlp_projector.weight": r(HEAD_EMBED, h), "gen_head.output_mlp_projector.bias": r(HEAD_EMBED),
               "gen_head.vision_head.weight": r(N_IMG, HEAD_EMBED), "gen_head.vision_head.bias": r(N_IMG)})
    sd.update(deepseek_vq_names(seed))
    return sd


def deepseek_config():
    # the layout of deepseek-ai/Janus-Pro-7B's config.json, with tiny sizes
    return {"model_type": "multi_modality", "language_config": TEXT,
            "vision_config": {"cls": "CLIPVisionTower", "model_type": "vision",
                              "params": {"image_size": V_GRID * V_PATCH, "model_name": "tiny_siglip",
                                         "select_feature": "same", "select_layer": -1}},
            "aligner_config": {"cls": "MlpProjector", "model_type": "aligner",
                               "params": {"depth": 2, "input_dim": V_HID, "n_embed": TEXT["hidden_size"],
                                          "projector_type": "mlp_gelu"}},
            "gen_vision_config": {"cls": "VQ-16", "model_type": "gen_vision",
                                  "params": {"image_token_size": N_IMG, "n_embed": GEN_EMBED}},
            "gen_aligner_config": {"cls": "MlpProjector", "model_type": "gen_aligner",
                                   "params": {"depth": 2, "input_dim": GEN_EMBED, "n_embed": TEXT["hidden_size"],
                                              "projector_type": "mlp_gelu"}},
            "gen_head_config": {"cls": "vision_head", "model_type": "gen_head",
                                "params": {"image_token_embed": HEAD_EMBED, "image_token_size": N_IMG,
                                           "n_embed": TEXT["hidden_size"]}}}


def write_source(path, sd, fmt="bin"):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(deepseek_config()))
    build_byte_tokenizer(IDS).save_pretrained(path)
    if fmt == "bin":
        torch.save(sd, path / "pytorch_model.bin")
    else:  # sharded safetensors with an index
        from safetensors.torch import save_file

        keys = sorted(sd)
        half = len(keys) // 2
        shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
        for name, ks in shards.items():
            save_file({k: sd[k].contiguous() for k in ks}, str(path / name))
        (path / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {k: n for n, ks in shards.items() for k in ks}}))


def llama_reference(sd, embeds):
    """Janus' language model (LlamaForCausalLM, DeepSeek names) in float64: RMSNorm, RoPE (theta 1e4,
    rotate-half), causal GQA attention, SwiGLU MLP. embeds [L, H] -> final hidden [L, H]."""
    d = {k: v.double() for k, v in sd.items()}
    h, heads, kvh = TEXT["hidden_size"], TEXT["num_attention_heads"], TEXT["num_key_value_heads"]
    hd, eps = h // heads, TEXT["rms_norm_eps"]
    x = embeds.double()
    L = x.shape[0]
    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    ang = torch.arange(L, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    def rms(t, w):
        return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + eps) * w

    def rope(t):  # [heads, L, hd]
        rot = torch.cat([-t[..., hd // 2:], t[..., : hd // 2]], -1)
        return t * cos + rot * sin

    mask = torch.full((L, L), -math.inf, dtype=torch.float64).triu(1)
    for i in range(TEXT["num_hidden_layers"]):
        p = f"language_model.model.layers.{i}."
        a = rms(x, d[p + "input_layernorm.weight"])
        q = rope((a @ d[p + "self_attn.q_proj.weight"].T).view(L, heads, hd).transpose(0, 1))
        k = rope((a @ d[p + "self_attn.k_proj.weight"].T).view(L, kvh, hd).transpose(0, 1))
        v = (a @ d[p + "self_attn.v_proj.weight"].T).view(L, kvh, hd).transpose(0, 1)
        k, v = k.repeat_interleave(heads // kvh, 0), v.repeat_interleave(heads // kvh, 0)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + mask, -1) @ v
        x = x + att.transpose(0, 1).reshape(L, h) @ d[p + "self_attn.o_proj.weight"].T
        m = rms(x, d[p + "post_attention_layernorm.weight"])
        gate, up = m @ d[p + "mlp.gate_proj.weight"].T, m @ d[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ d[p + "mlp.down_proj.weight"].T
    return rms(x, d["language_model.model.norm.weight"])


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_convert_janus_matches_the_source_weights(tmp_path, seed, fmt):
    from fastbicot import JanusPolicy

    sd = deepseek_state_dict(seed)
    write_source(tmp_path / "src", sd, fmt)
    out = convert_janus(tmp_path / "src", tmp_path / "dst", vision_heads=V_HEADS)
    assert out == tmp_path / "dst" and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    policy = JanusPolicy.from_pretrained(out, dtype=torch.float64)
    assert (policy.bos_token_id, policy.eos_token_id, policy.pad_token_id, policy.boi_token_id) == (
        IDS["bos"], IDS["eos"], IDS["pad"], IDS["boi"])
    assert policy.num_image_tokens == V_GRID * V_GRID and policy.image_vocab_size == N_IMG
    d = {k: v.double() for k, v in sd.items()}
    g = torch.Generator().manual_seed(seed)
    # text step: token ids -> lm_head logits
    ids = torch.randint(0, 256, (7,), generator=g)
    ref = llama_reference(sd, d["language_model.model.embed_tokens.weight"][ids]) @ d["language_model.lm_head.weight"].T
    with torch.no_grad():
        hidden, _ = policy.trunk(policy.embed_text(ids[None]))
        got = policy.text_logits(hidden[0])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)  # transformers computes RoPE in fp32
    # image step: text prefix + image tokens (gen_embed -> gen_aligner) -> gen_head logits
    img = torch.randint(0, N_IMG, (4,), generator=g)
    gelu = torch.nn.functional.gelu
    al = gelu(d["gen_embed.weight"][img] @ d["gen_aligner.layers.0.weight"].T + d["gen_aligner.layers.0.bias"])
    al = al @ d["gen_aligner.layers.2.weight"].T + d["gen_aligner.layers.2.bias"]
    seq = torch.cat([d["language_model.model.embed_tokens.weight"][ids], al])
    hid = llama_reference(sd, seq)
    head = gelu(hid @ d["gen_head.output_mlp_projector.weight"].T + d["gen_head.output_mlp_projector.bias"])
    ref_img = head @ d["gen_head.vision_head.weight"].T + d["gen_head.vision_head.bias"]
    with torch.no_grad():
        emb = torch.cat([policy.embed_text(ids), policy.embed_image(img)])
        hidden, _ = policy.trunk(emb[None])
        got_img = policy.image_logits(hidden[0])
    torch.testing.assert_close(got_img, ref_img, atol=1e-5, rtol=1e-5)
    # understanding tower: q/k/v split, projection, norms, the squeezed position embedding, the aligner
    hf = policy.hf_model.model
    vt = "vision_model.vision_tower."
    layer = hf.vision_model.encoder.layers[1].self_attn
    q, k, v = sd[vt + "blocks.1.attn.qkv.weight"].double().chunk(3)
    for got_w, want in ((layer.q_proj.weight, q), (layer.k_proj.weight, k), (layer.v_proj.weight, v),
                        (layer.projection_layer.weight, sd[vt + "blocks.1.attn.proj.weight"]),
                        (hf.vision_model.embeddings.position_embedding.weight, sd[vt + "pos_embed"][0]),
                        (hf.vision_model.post_layernorm.bias, sd[vt + "norm.bias"]),
                        (hf.aligner.hidden_layers[0].weight, sd["aligner.layers.2.weight"]),
                        (hf.vqmodel.decoder.up[1].block[0].conv1.weight,
                         sd["gen_vision_model.decoder.conv_blocks.1.res.0.conv1.weight"]),
                        (hf.vqmodel.encoder.mid.attn_1.q.weight, sd["gen_vision_model.encoder.mid.1.q.weight"])):
        torch.testing.assert_close(got_w.detach(), want.double(), atol=0, rtol=0)


def test_convert_janus_errors_and_atomicity(tmp_path, seed):
    sd = deepseek_state_dict(seed)
    write_source(tmp_path / "src", {**sd, "language_model.model.extra.weight": torch.zeros(1)})
    with pytest.raises(ConversionError, match="language_model.model.extra.weight|unexpected"):
        convert_janus(tmp_path / "src", tmp_path / "dst", vision_heads=V_HEADS)
    assert not (tmp_path / "dst").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConversionError, match="multi_modality"):
        convert_janus(bad, tmp_path / "dst")
    with pytest.raises(FileNotFoundError):
        convert_janus(tmp_path / "missing", tmp_path / "dst")
    ok = tmp_path / "ok"
    write_source(ok, sd)
    with pytest.raises(ConversionError, match="head count"):
        convert_janus(ok, tmp_path / "dst")  # "tiny_siglip" is not a known tower
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        convert_janus(ok, tmp_path / "full", vision_heads=V_HEADS)
    assert (tmp_path / "full" / "keep.txt").read_text() == "x"
    convert_janus(ok, tmp_path / "full", vision_heads=V_HEADS, overwrite=True)
    assert not (tmp_path / "full" / "keep.txt").exists() and (tmp_path / "full" / "config.json").is_file()


def test_atomic_output_dir(tmp_path):
    with pytest.raises(RuntimeError), atomic_output_dir(tmp_path / "a") as tmp:
        (tmp / "f").write_text("half")
        raise RuntimeError("boom")
    assert not (tmp_path / "a").exists() and list(tmp_path.iterdir()) == []
    with atomic_output_dir(tmp_path / "a") as tmp:
        (tmp / "f").write_text("whole")
    assert (tmp_path / "a" / "f").read_text() == "whole" and len(list(tmp_path.iterdir())) == 1


# ----------------------------------------------------------------------------- ORM (LLaVA-NeXT llava_qwen)

QWEN = {"hidden_size": 32, "intermediate_size": 40, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 256,
        "tie_word_embeddings": False}
S_HID, S_PATCH, S_GRID, S_LAYERS, S_HEADS, S_MLP = 16, 4, 4, 2, 2, 24


def llava_state_dict(seed, vocab):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    h, inter = QWEN["hidden_size"], QWEN["intermediate_size"]
    hd = h // QWEN["num_attention_heads"]
    kv = QWEN["num_key_value_heads"] * hd
    sd = {"model.embed_tokens.weight": r(vocab, h, scale=1.0), "model.norm.weight": 1 + r(h),
          "lm_head.weight": r(vocab, h), "model.image_newline": r(h, scale=1.0),
          "model.mm_projector.0.weight": r(h, S_HID), "model.mm_projector.0.bias": r(h),
          "model.mm_projector.2.weight": r(h, h), "model.mm_projector.2.bias": r(h)}
    for i in range(QWEN["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd.update({p + "self_attn.q_proj.weight": r(h, h), p + "self_attn.q_proj.bias": r(h),
                   p + "self_attn.k_proj.weight": r(kv, h), p + "self_attn.k_proj.bias": r(kv),
                   p + "self_attn.v_proj.weight": r(kv, h), p + "self_attn.v_proj.bias": r(kv),
                   p + "self_attn.o_proj.weight": r(h, h), p + "mlp.gate_proj.weight": r(inter, h),
                   p + "mlp.up_proj.weight": r(inter, h), p + "mlp.down_proj.weight": r(h, inter),
                   p + "input_layernorm.weight": 1 + r(h), p + "post_attention_layernorm.weight": 1 + r(h)})
    vt = "model.vision_tower.vision_tower.vision_model."
    sd.update({vt + "embeddings.patch_embedding.weight": r(S_HID, 3, S_PATCH, S_PATCH),
               vt + "embeddings.patch_embedding.bias": r(S_HID),
               vt + "embeddings.position_embedding.weight": r(S_GRID * S_GRID, S_HID),
               vt + "embeddings.position_ids": torch.arange(S_GRID * S_GRID)[None],
               vt + "post_layernorm.weight": 1 + r(S_HID), vt + "post_layernorm.bias": r(S_HID)})
    for i in range(S_LAYERS):  # LLaVA-NeXT saved the tower after deleting its last layer
        p = f"{vt}encoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd.update({p + f"self_attn.{n}.weight": r(S_HID, S_HID), p + f"self_attn.{n}.bias": r(S_HID)})
        sd.update({p + "layer_norm1.weight": 1 + r(S_HID), p + "layer_norm1.bias": r(S_HID),
                   p + "layer_norm2.weight": 1 + r(S_HID), p + "layer_norm2.bias": r(S_HID),
                   p + "mlp.fc1.weight": r(S_MLP, S_HID), p + "mlp.fc1.bias": r(S_MLP),
                   p + "mlp.fc2.weight": r(S_HID, S_MLP), p + "mlp.fc2.bias": r(S_HID)})
    return sd


def siglip_reference(d, pixels):
    """LLaVA-NeXT's SigLIP tower with its last layer deleted, hidden_states[-1] (no post-layernorm)."""
    vt = "model.vision_tower.vision_tower.vision_model."
    x = torch.nn.functional.conv2d(pixels, d[vt + "embeddings.patch_embedding.weight"],
                                   d[vt + "embeddings.patch_embedding.bias"], stride=S_PATCH)
    x = x.flatten(2).transpose(1, 2)[0] + d[vt + "embeddings.position_embedding.weight"]
    hd = S_HID // S_HEADS
    ln = torch.nn.functional.layer_norm
    for i in range(S_LAYERS):
        p = f"{vt}encoder.layers.{i}."
        a = ln(x, (S_HID,), d[p + "layer_norm1.weight"], d[p + "layer_norm1.bias"], 1e-6)
        q, k, v = (a @ d[p + f"self_attn.{n}_proj.weight"].T + d[p + f"self_attn.{n}_proj.bias"] for n in "qkv")
        q, k, v = (t.view(-1, S_HEADS, hd).transpose(0, 1) for t in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), -1) @ v
        x = x + att.transpose(0, 1).reshape(-1, S_HID) @ d[p + "self_attn.out_proj.weight"].T + d[p + "self_attn.out_proj.bias"]
        m = ln(x, (S_HID,), d[p + "layer_norm2.weight"], d[p + "layer_norm2.bias"], 1e-6)
        m = torch.nn.functional.gelu(m @ d[p + "mlp.fc1.weight"].T + d[p + "mlp.fc1.bias"], approximate="tanh")
        x = x + m @ d[p + "mlp.fc2.weight"].T + d[p + "mlp.fc2.bias"]
    return x


def qwen_reference(d, x):
    """Qwen2 (q/k/v biases, RoPE theta from QWEN) in float64 on embeddings [L, H] -> final hidden."""
    h, heads, kvh = QWEN["hidden_size"], QWEN["num_attention_heads"], QWEN["num_key_value_heads"]
    hd, eps, L = h // heads, QWEN["rms_norm_eps"], x.shape[0]
    inv = 1.0 / (QWEN["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    ang = torch.arange(L, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    def rms(t, w):
        return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + eps) * w

    def rope(t):
        return t * cos + torch.cat([-t[..., hd // 2:], t[..., : hd // 2]], -1) * sin

    mask = torch.full((L, L), -math.inf, dtype=torch.float64).triu(1)
    for i in range(QWEN["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = rms(x, d[p + "input_layernorm.weight"])

        def proj(n, nh, a=a, p=p):
            return (a @ d[p + f"self_attn.{n}_proj.weight"].T + d[p + f"self_attn.{n}_proj.bias"]).view(L, nh, hd).transpose(0, 1)

        q, k, v = rope(proj("q", heads)), rope(proj("k", kvh)), proj("v", kvh)
        k, v = k.repeat_interleave(heads // kvh, 0), v.repeat_interleave(heads // kvh, 0)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + mask, -1) @ v
        x = x + att.transpose(0, 1).reshape(L, h) @ d[p + "self_attn.o_proj.weight"].T
        m = rms(x, d[p + "post_attention_layernorm.weight"])
        x = x + (torch.nn.functional.silu(m @ d[p + "mlp.gate_proj.weight"].T) * (m @ d[p + "mlp.up_proj.weight"].T)) \
            @ d[p + "mlp.down_proj.weight"].T
    return rms(x, d["model.norm.weight"])


def test_convert_orm_matches_the_source_weights(tmp_path, seed):
    from test_rewards_learned import VLM_WORDS, word_tokenizer

    from fastbicot.convert import convert_orm
    from fastbicot.rewards.learned import ORMReward

    tok = word_tokenizer(extra=VLM_WORDS, eos_token="<|im_end|>")  # no "<image>": the converter adds it
    sd = llava_state_dict(seed, len(tok))
    src = tmp_path / "orm"
    src.mkdir()
    tok.save_pretrained(src)
    torch.save(sd, src / "pytorch_model.bin")
    (src / "config.json").write_text(json.dumps({
        "model_type": "llava", "architectures": ["LlavaQwenForCausalLM"], **QWEN, "vocab_size": len(tok),
        "mm_vision_tower": "tiny-siglip", "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": S_HID,
        "mm_vision_select_layer": -2, "mm_patch_merge_type": "spatial_unpad", "image_aspect_ratio": "anyres_max_9",
        "image_grid_pinpoints": [[16, 16], [16, 32], [32, 16], [32, 32]]}))
    out = convert_orm(src, tmp_path / "hf", vision_heads=S_HEADS)
    reward = ORMReward.from_pretrained(out, dtype="fp32", gate="none")
    assert reward.tokenizer.convert_tokens_to_ids("<image>") == len(tok)  # appended; embeddings grown by one row
    images = torch.randint(0, 256, (2, S_GRID * S_PATCH, S_GRID * S_PATCH, 3), dtype=torch.uint8)
    prompts = ["a red car", "two cat and a dog"]
    got = reward.first_token_logits(images, prompts).double()
    d = {k: v.double() for k, v in sd.items()}
    for i, p in enumerate(prompts):
        pix = (images[i].permute(2, 0, 1)[None].double() / 255 - 0.5) / 0.5  # SigLIP: mean = std = 0.5
        feats = siglip_reference(d, pix)
        feats = torch.nn.functional.gelu(feats @ d["model.mm_projector.0.weight"].T + d["model.mm_projector.0.bias"])
        feats = feats @ d["model.mm_projector.2.weight"].T + d["model.mm_projector.2.bias"]
        feats = torch.cat([feats, d["model.image_newline"][None]])  # one tile + newline (llava_arch.py:408-413)
        a, b = (tok(c).input_ids for c in reward.text(p).split("<image>"))
        emb = d["model.embed_tokens.weight"]
        hid = qwen_reference(d, torch.cat([emb[a], feats, emb[b]]))
        ref = hid[-1] @ d["lm_head.weight"].T
        torch.testing.assert_close(got[i, : len(tok)], ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(ConversionError, match="unexpected key"):
        bad = tmp_path / "bad"
        bad.mkdir()
        tok.save_pretrained(bad)
        (bad / "config.json").write_text((src / "config.json").read_text())
        torch.save({**sd, "vision_resampler.x": torch.zeros(1)}, bad / "pytorch_model.bin")
        convert_orm(bad, tmp_path / "hf2", vision_heads=S_HEADS)
    assert not (tmp_path / "hf2").exists()
