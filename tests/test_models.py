"""JanusPolicy must compute exactly what transformers' Janus computes."""

import json
import random
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import JanusConfig, JanusForConditionalGeneration

from fastbicot.models import JanusPolicy, preset_config
from fastbicot.models.tokenizer import build_byte_tokenizer

IDS = {"bos": 1, "eos": 2, "pad": 3, "boi": 4, "eoi": 5, "image": 6}


def random_janus(hidden, layers, heads, vocab, seed, image_vocab=37, grid=3):
    """A tiny random Janus of odd shapes, built straight from transformers' config classes."""
    torch.manual_seed(seed)
    config = JanusConfig(
        text_config={"model_type": "llama", "hidden_size": hidden, "num_hidden_layers": layers,
                         "num_attention_heads": heads, "num_key_value_heads": heads, "intermediate_size": 2 * hidden + 6,
                         "vocab_size": vocab, "max_position_embeddings": 256, "tie_word_embeddings": False},
        vision_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 16 * grid,
                           "patch_size": 16, "num_image_tokens": grid * grid, "projection_dim": hidden},
        vq_config={"embed_dim": 8, "num_embeddings": image_vocab, "latent_channels": 32, "base_channels": 32,
                       "channel_multiplier": [1, 2], "num_patches": grid, "projection_dim": hidden + 10,
                       "image_token_embed_dim": hidden},
        image_token_id=IDS["image"], tie_word_embeddings=False,
    )
    model = JanusForConditionalGeneration(config).eval()
    g = model.generation_config
    g.bos_token_id, g.eos_token_id, g.pad_token_id = IDS["bos"], IDS["eos"], IDS["pad"]
    g.generation_kwargs = {"boi_token_id": IDS["boi"]}
    return model


@pytest.mark.parametrize("hidden,layers,heads,vocab", [(48, 2, 3, 97), (64, 1, 4, 130), (40, 3, 5, 61)])
def test_text_and_image_heads_match_hf(seed, hidden, layers, heads, vocab):
    hf = random_janus(hidden, layers, heads, vocab, seed)
    policy = JanusPolicy(hf)
    B, L = 3, 11
    ids = torch.randint(7, vocab, (B, L))
    with torch.no_grad():
        ref = hf(input_ids=ids, output_hidden_states=True)
        hidden_states, _ = policy.trunk(policy.embed_text(ids))
        torch.testing.assert_close(policy.text_logits(hidden_states), ref.logits, rtol=1e-5, atol=1e-5)
        # Image head: HF's own generation head on the same trunk output.
        torch.testing.assert_close(policy.image_logits(hidden_states), hf.model.generation_head(ref.hidden_states[-1]),
                                   rtol=1e-5, atol=1e-5)
        # Split head: final Linear applied to image_head_hidden is the whole head.
        x = policy.image_head_hidden(hidden_states)
        assert x.shape[-1] == policy.image_head_linear.in_features
        manual = x.double() @ policy.image_head_linear.weight.double().T + policy.image_head_linear.bias.double()
        torch.testing.assert_close(policy.image_logits(hidden_states).double(), manual, rtol=1e-5, atol=1e-5)
        # Image-token embedding: gen embedding + aligner, as HF's generate uses it.
        img = torch.randint(0, 37, (B, 5))
        torch.testing.assert_close(policy.embed_image(img), hf.prepare_embeddings_for_image_generation(img))


def test_trunk_with_cache_matches_full_forward(seed):
    policy = JanusPolicy(random_janus(32, 2, 2, 50, seed))
    ids = torch.randint(7, 50, (2, 9))
    with torch.no_grad():
        full, _ = policy.trunk(policy.embed_text(ids))
        h1, cache = policy.trunk(policy.embed_text(ids[:, :6]), use_cache=True)
        h2, _ = policy.trunk(policy.embed_text(ids[:, 6:]), past_key_values=cache, use_cache=True,
                             position_ids=torch.arange(6, 9).expand(2, 3))
    torch.testing.assert_close(torch.cat([h1, h2], 1), full, rtol=1e-5, atol=1e-5)


def test_special_ids_and_shapes():
    policy = JanusPolicy(random_janus(32, 1, 2, 50, 0))
    assert (policy.bos_token_id, policy.eos_token_id, policy.pad_token_id, policy.boi_token_id) == (1, 2, 3, 4)
    assert policy.num_image_tokens == 9 and policy.image_grid == 3 and policy.image_vocab_size == 37
    ids = torch.tensor([[1, 9, 10, 11, 4]])
    assert policy.unconditional_ids(ids).tolist() == [[1, 3, 3, 3, 4]]


def test_tiny_preset_runs_and_tokenizer_roundtrips():
    policy = JanusPolicy.from_preset("tiny", seed=3)
    tok = policy.tokenizer
    text = "a red cube left of ✓ 三つの球, émoji 🎨"
    ids = tok(text, add_special_tokens=False).input_ids
    assert max(ids) < 256 and tok.decode(ids) == text
    assert tok.convert_tokens_to_ids("<begin_of_image>") == policy.boi_token_id
    assert tok.eos_token_id == policy.eos_token_id
    # Same seed -> same weights; different seed -> different weights.
    again = JanusPolicy.from_preset("tiny", seed=3)
    other = JanusPolicy.from_preset("tiny", seed=4)
    w = policy.lm_head.weight
    assert torch.equal(w, again.lm_head.weight) and not torch.equal(w, other.lm_head.weight)
    img = policy.hf_model.decode_image_tokens(torch.randint(0, policy.image_vocab_size, (2, policy.num_image_tokens)))
    assert img.shape == (2, 32, 32, 3)


@pytest.mark.parametrize("name,params_b,layers,heads", [("janus-pro-1b", 2.09, 24, 16), ("janus-pro-7b", 7.42, 30, 32)])
def test_real_presets_on_meta(name, params_b, layers, heads):
    policy = JanusPolicy.from_preset(name, device="meta", dtype=torch.bfloat16)
    n = sum(p.numel() for p in policy.hf_model.parameters()) / 1e9
    assert abs(n - params_b) < 0.05, n  # published sizes of Janus-Pro-1B / 7B
    assert (policy.num_layers, policy.num_heads, policy.head_dim) == (layers, heads, 128)
    assert policy.num_image_tokens == 576 and policy.image_vocab_size == 16384
    assert policy.image_head_linear.weight.shape == (16384, policy.hidden_size)
    assert policy.lm_head.weight.shape == (102400, policy.hidden_size)
    assert policy.hf_model.lm_head.weight.device.type == "meta"
    # KV per token per row, DESIGN.md §3: 7B 480 KiB, 1B 192 KiB (bf16).
    kv = 2 * policy.num_layers * policy.num_kv_heads * policy.head_dim * 2
    assert kv == {"janus-pro-1b": 192, "janus-pro-7b": 480}[name] * 1024


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'janus-9b'.*janus-pro-7b"):
        JanusPolicy.from_preset("janus-9b")


def test_from_pretrained_roundtrip(tmp_path, seed):
    hf = random_janus(32, 2, 2, 300, seed)
    hf.save_pretrained(tmp_path)
    tok_dir = tmp_path / "tok"  # a tokenizer kept elsewhere (tokenizer_dir=)
    build_byte_tokenizer({"bos": 256, "eos": 257, "pad": 258, "boi": 259, "eoi": 260, "image": 261}).save_pretrained(tok_dir)
    policy = JanusPolicy.from_pretrained(tmp_path, dtype=torch.float32, tokenizer_dir=tok_dir)
    # Special ids come from the checkpoint's generation config, not from the tokenizer.
    assert policy.dtype == torch.float32 and policy.boi_token_id == IDS["boi"] and policy.pad_token_id == IDS["pad"]
    assert policy.hf_model.generation_config.generation_kwargs["boi_token_id"] == IDS["boi"]
    ids = torch.randint(7, 256, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(policy.hf_model(input_ids=ids).logits, hf(input_ids=ids).logits)
    assert policy.tokenizer.decode(policy.tokenizer("hi").input_ids, skip_special_tokens=True) == "hi"


def test_from_pretrained_bad_dirs(tmp_path):
    with pytest.raises(FileNotFoundError, match="directory not found"):
        JanusPolicy.from_pretrained(tmp_path / "nope")
    with pytest.raises(ValueError, match="no config.json"):
        JanusPolicy.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type='llama', expected 'janus'"):
        JanusPolicy.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "janus"}))
    with pytest.raises(ValueError, match="no weight files"):
        JanusPolicy.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        JanusPolicy.from_pretrained(tmp_path)


def test_wraps_only_janus():
    with pytest.raises(TypeError, match="JanusForConditionalGeneration"):
        JanusPolicy(torch.nn.Linear(2, 2))


def test_preset_config_shapes():
    cfg = preset_config("tiny")
    assert cfg.vq_config.num_patches == 8 and cfg.vision_config.num_image_tokens == 64


# ---- issue 15: nothing silent ------------------------------------------------------------------

BYTE_IDS = {"bos": 256, "eos": 257, "pad": 258, "boi": 259, "eoi": 260, "image": 261}


@pytest.fixture(scope="module")
def saved_janus(tmp_path_factory):
    d = tmp_path_factory.mktemp("janus")
    random_janus(32, 2, 2, 300, 0).save_pretrained(d)
    build_byte_tokenizer(BYTE_IDS).save_pretrained(d)
    return d


@pytest.fixture
def ckpt(saved_janus, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(saved_janus, d)
    return d


@pytest.fixture
def no_weight_loading(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("weights were loaded before the argument check")

    monkeypatch.setattr(JanusForConditionalGeneration, "from_pretrained", fail)


_BAD_DEVICES = ["gpu", "cuda:x", "meta", 3.5, True, ["cpu"]]
if not torch.cuda.is_available():
    _BAD_DEVICES += ["cuda", "cuda:0", torch.device("cuda", 1)]
if not (hasattr(torch, "mps") and torch.mps.is_available()):
    _BAD_DEVICES += ["mps"]


@pytest.mark.parametrize("device", _BAD_DEVICES, ids=repr)
def test_from_pretrained_checks_device_before_loading(ckpt, no_weight_loading, device):
    with pytest.raises(ValueError, match="device"):
        JanusPolicy.from_pretrained(ckpt, dtype=torch.float32, device=device)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, "floaty", "int8", "__class__", 3, True], ids=repr)
def test_from_pretrained_checks_dtype_before_loading(ckpt, no_weight_loading, dtype):
    with pytest.raises(ValueError, match="dtype"):
        JanusPolicy.from_pretrained(ckpt, dtype=dtype)


@pytest.mark.parametrize("device", ["cuda", "cpu", "gpu:0"])
def test_from_preset_checks_device(device):
    if device == "cpu" or (device == "cuda" and torch.cuda.is_available()):
        pytest.skip("a valid device here")
    with pytest.raises(ValueError, match="device"):
        JanusPolicy.from_preset("tiny", device=device)


@pytest.mark.parametrize("seed_value", [-1, 2.7, 1.0, True, "0", None], ids=repr)
def test_from_preset_checks_seed(seed_value):
    with pytest.raises(ValueError, match="seed"):
        JanusPolicy.from_preset("tiny", seed=seed_value)


def _truncation_points(size, header_len):
    return sorted({0, 3, 7, 8, 8 + header_len // 2, 8 + header_len, 8 + header_len + 1,
                   (size + 8 + header_len) // 2, size - 1})


def test_truncated_safetensors_are_named(ckpt, seed):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    points = _truncation_points(len(data), header_len) + [random.Random(seed).randrange(len(data))]
    for cut in points:
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="model.safetensors") as err:
            JanusPolicy.from_pretrained(ckpt, dtype=torch.float32)
        assert str(path) in str(err.value), cut
    path.write_bytes(data + b"\0")  # trailing garbage is not the file the header describes either
    with pytest.raises(ValueError, match="model.safetensors"):
        JanusPolicy.from_pretrained(ckpt, dtype=torch.float32)
    path.write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(ValueError, match="model.safetensors"):
        JanusPolicy.from_pretrained(ckpt, dtype=torch.float32)


@pytest.mark.parametrize("fname", ["config.json", "generation_config.json", "tokenizer_config.json",
                                   "tokenizer.json", "model.safetensors.index.json"])
@pytest.mark.parametrize("content", ["{", "", "{\"a\": }", "\xff\xfe", "null"], ids=repr)
def test_bad_json_files_are_named(ckpt, fname, content):
    path = ckpt / fname
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(ValueError, match=fname.replace(".", r"\.")):
        JanusPolicy.from_pretrained(ckpt, dtype=torch.float32)


def test_index_naming_absent_shard_is_named(ckpt):
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "shard-2.safetensors"}}))
    with pytest.raises(ValueError, match="shard-2.safetensors"):
        JanusPolicy.from_pretrained(ckpt, dtype=torch.float32)


def _rewrite(ckpt, drop=(), add=None):
    path = ckpt / "model.safetensors"
    sd = load_file(path)
    sd = {k: v for k, v in sd.items() if not any(k.startswith(p) for p in drop)}
    sd.update(add or {})
    save_file(sd, path, metadata={"format": "pt"})
    return sd


@pytest.mark.parametrize("drop,pattern", [
    (("model.vqmodel.",), "model.vqmodel.*"),
    (("lm_head.",), "lm_head.*"),
    (("model.generation_head.vision_head.",), "model.generation_head.*"),
    (("model.language_model.layers.1.self_attn.q_proj.weight",), "model.language_model.layers.1.*"),
])
def test_missing_weights_are_an_error_unless_allowed(ckpt, drop, pattern):
    full = load_file(ckpt / "model.safetensors")
    _rewrite(ckpt, drop=drop)
    dropped = sorted(k for k in full if any(k.startswith(p) for p in drop))
    assert dropped
    with pytest.raises(ValueError, match="missing from the checkpoint") as err:
        JanusPolicy.from_pretrained(ckpt, dtype=torch.float32)
    assert f"{len(dropped)} key(s)" in str(err.value) and dropped[0] in str(err.value)
    policy = JanusPolicy.from_pretrained(ckpt, dtype=torch.float32, allow_missing=(pattern,))
    kept = next(k for k in full if not any(k.startswith(p) for p in drop))
    torch.testing.assert_close(policy.hf_model.state_dict()[kept], full[kept])
    with pytest.raises(ValueError, match="allow_missing"):
        JanusPolicy.from_pretrained(ckpt, dtype=torch.float32, allow_missing=[3])


def test_unexpected_weights_are_an_error_unless_allowed(ckpt):
    _rewrite(ckpt, add={"model.extra_head.weight": torch.zeros(3), "junk": torch.ones(1)})
    with pytest.raises(ValueError, match="does not use") as err:
        JanusPolicy.from_pretrained(ckpt, dtype=torch.float32)
    assert "junk" in str(err.value) and "model.extra_head.weight" in str(err.value)
    JanusPolicy.from_pretrained(ckpt, dtype=torch.float32, allow_unexpected=("junk", "model.extra_head.*"))


def test_check_token_ids(seed):
    policy = JanusPolicy(random_janus(32, 1, 2, 50, 0))
    V, K = policy.text_vocab_size, policy.image_vocab_size
    rng = random.Random(seed)
    for _ in range(60):
        shape = [rng.randint(1, 4) for _ in range(rng.randint(1, 3))]
        ids = torch.randint(0, V, shape)
        bad = rng.random() < 0.5
        if bad:
            ids.view(-1)[rng.randrange(ids.numel())] = rng.choice([-1, V, V + rng.randint(0, 10**6), -(10**9)])
        outside = bool(((ids < 0) | (ids >= V)).any())  # independent reference
        for form in (ids, ids.to(torch.int32), ids.tolist(), ids.numpy(), [ids[i] for i in range(len(ids))]):
            if outside:
                with pytest.raises(ValueError, match="prompt_ids"):
                    policy.check_token_ids(form, "prompt_ids")
            else:
                assert policy.check_token_ids(form, "prompt_ids") is form
    for bad in (torch.zeros(3), torch.zeros(3, dtype=torch.bool), [1, 2.7], [1, True], [[1], [None]], "abc", 5,
                np.zeros(3), np.array([True]), [np.float64(1.0)], [1, "2"]):
        with pytest.raises(ValueError, match="cot_ids"):
            policy.check_token_ids(bad, "cot_ids")
    assert policy.check_token_ids(torch.zeros(0, dtype=torch.long), "x").numel() == 0
    policy.check_token_ids([K - 1], "img", vocab="image")
    with pytest.raises(ValueError, match="img"):
        policy.check_token_ids([K], "img", vocab="image")
    with pytest.raises(ValueError, match="vocab"):
        policy.check_token_ids([1], "x", vocab="txt")


@pytest.mark.parametrize("change", [{"bos": 5}, {"eos": 2.0}, {"pad": True}, {"boi": "259"}, {"eoi": 256},
                                    {"image": None}], ids=repr)
def test_byte_tokenizer_checks_special_ids(change):
    ids = {**BYTE_IDS, **change}
    with pytest.raises(ValueError, match="special_ids"):
        build_byte_tokenizer(ids)
    with pytest.raises(ValueError, match="special_ids lacks"):
        build_byte_tokenizer({k: v for k, v in BYTE_IDS.items() if k != next(iter(change))})


@pytest.mark.parametrize("kwargs,match", [({"tokenizer_dir": 3}, "tokenizer_dir"), ({"attn_implementation": 3},
                                          "attn_implementation"), ({"allow_missing": [None]}, "allow_missing"),
                                          ({"allow_unexpected": 5}, "allow_unexpected")], ids=repr)
def test_from_pretrained_other_arguments_are_named(ckpt, no_weight_loading, kwargs, match):
    with pytest.raises(ValueError, match=match):
        JanusPolicy.from_pretrained(ckpt, dtype=torch.float32, **kwargs)
    with pytest.raises(ValueError, match="local_dir"):
        JanusPolicy.from_pretrained(3)


def test_cot_end_and_stop_tokens_resolve_to_ids():
    """model.cot_end_token / cot_stop_tokens on a tokenizer with <begin_of_image>: BOI ends the CoT, the
    model's own EOS ("eos") also stops it; a string that is not one token is an error naming the key."""
    from fastbicot.models.added_tokens import apply_model_tokens
    from fastbicot.toy.got import build_got_policy

    policy = build_got_policy(layout_tokens=True)
    eos = policy.eos_token_id
    apply_model_tokens(policy, (), "<begin_of_image>", ["eos", "<begin_of_image>"])
    assert policy.eos_token_id == policy.boi_token_id != eos
    assert policy.cot_stop_ids == (eos,)  # the end token itself is not an extra stop
    with pytest.raises(ValueError, match="model.cot_stop_tokens"):
        apply_model_tokens(build_got_policy(layout_tokens=True), (), None, ["two words"])
