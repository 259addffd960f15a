"""Model-backed rewards end to end on tiny random configs of the real architectures.

Each model is built in the test, saved with save_pretrained (plus a word-level tokenizer / processor
built in code) and loaded back through the reward's from_pretrained. Scores are checked against the
tiny transformers model run directly on unpadded single-sample inputs (independent of the reward's
batching, padding and preprocessing), and for batch-size invariance and ranges.
"""

import math

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from fastbicot.rewards import RewardError, rule_score
from fastbicot.rewards.learned import (
    CLIPScoreReward,
    GitVQAReward,
    GroundingDinoReward,
    HPSReward,
    ORMJudgeReward,
    ORMReward,
    PickScoreReward,
    VLMJudgeReward,
    convert_hps_checkpoint,
    open_clip_to_clip_state_dict,
)
from fastbicot.rewards.learned._common import preprocess

WORDS = ["a", "an", "the", "is", "this", "there", "of", "and", "image", "prompt", "does", "show", "accurately", "following", "answer", "with", "yes", "no", "green", "red", "blue", "bench", "car", "cat", "dog", "cup", "plate", "left", "right", "above", "below", "two", "three", "on", "top"]
PUNCT = list(".,?!:\"'{}\\")


def word_tokenizer(extra=(), fixed=None, **special):
    """PreTrainedTokenizerFast over a WordLevel vocabulary (split on whitespace and punctuation).
    ``fixed`` pins tokens to ids (GroundingDINO hard-codes BERT's [CLS]=101, [SEP]=102, '.'=1012)."""
    fixed = dict(fixed or {})
    tokens = ["[PAD]", "[UNK]"] + [t for t in special.values() if t not in ("[PAD]", "[UNK]")]
    tokens += [t for t in list(extra) + WORDS + PUNCT if t not in tokens]
    vocab, next_id = dict(fixed), 0
    for t in tokens:
        if t in vocab:
            continue
        while next_id in vocab.values():
            next_id += 1
        vocab[t] = next_id
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", **special)
    fast.add_special_tokens({"additional_special_tokens": [t for t in extra if t.startswith("<")]})
    return fast


def rand_images(n, h, w):
    return torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8)


# ----------------------------------------------------------------------------- preprocessing


def test_preprocess_matches_transformers_image_processor(seed):
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor(size={"shortest_edge": 24}, crop_size={"height": 20, "width": 22}, resample=3,
                              image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.25])
    images = rand_images(3, 37, 45)
    ref = proc(images=list(images.numpy()), return_tensors="pt")["pixel_values"]
    ours = preprocess(images, proc.to_dict(), torch.float32)
    assert ours.shape == ref.shape == (3, 3, 20, 22)
    # PIL and torch antialiased bicubic agree to a few uint8 levels; crop offsets and normalisation exactly
    diff_levels = (ours - ref).abs() * torch.tensor([0.2, 0.3, 0.25]).view(1, 3, 1, 1) * 255
    assert diff_levels.max() <= 12 and diff_levels.mean() <= 1.5, (diff_levels.max(), diff_levels.mean())
    same = rand_images(2, 24, 29)  # shortest edge already 24: no resize, crop and normalise exact
    ref = proc(images=list(same.numpy()), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(preprocess(same, proc.to_dict(), torch.float32), ref, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- CLIP / PickScore


def save_tiny_clip(tmp_path, image_size=32, act="quick_gelu"):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tok = word_tokenizer(bos_token="<s>", eos_token="</s>", extra=["<s>", "</s>"])
    tok._tokenizer.post_processor = None
    config = CLIPConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 40, "num_hidden_layers": 2,
                         "num_attention_heads": 2, "max_position_embeddings": 24, "eos_token_id": tok.eos_token_id,
                         "bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id, "hidden_act": act},
        vision_config={"hidden_size": 32, "intermediate_size": 40, "num_hidden_layers": 2, "num_attention_heads": 2,
                           "image_size": image_size, "patch_size": 8, "hidden_act": act},
        projection_dim=16, logit_scale_init_value=math.log(20.0))
    model = CLIPModel(config).eval()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                       ).save_pretrained(tmp_path)
    return model, tok


def clip_reference(model, tok, images, texts, scale):
    """CLIPModel.forward on each (image, text) pair alone; EOS appended by hand (WordLevel adds none)."""
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor(size={"shortest_edge": images.shape[1]},
                              crop_size={"height": images.shape[1], "width": images.shape[2]})
    out = []
    for img, text in zip(images, texts):
        ids = torch.tensor([tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]])
        pix = proc(images=[img.numpy()], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            o = model(input_ids=ids, pixel_values=pix)
        cos = (o.logits_per_image[0, 0] / model.logit_scale.exp()).detach()
        out.append(float(cos * scale(model).detach()))
    return torch.tensor(out)


class EosTokenizer:
    """Wraps the WordLevel tokenizer to append EOS, as CLIP's tokenizer does (the pooled token)."""

    def __init__(self, tok):
        self.tok = tok

    def __call__(self, texts, **kw):
        enc = [self.tok.encode(t, add_special_tokens=False)[: kw["max_length"] - 1] + [self.tok.eos_token_id]
               for t in texts]
        n = max(map(len, enc))
        ids = torch.tensor([e + [self.tok.pad_token_id] * (n - len(e)) for e in enc])
        return {"input_ids": ids, "attention_mask": (torch.arange(n) < torch.tensor([len(e) for e in enc])[:, None]).long()}


def test_clip_and_pickscore_match_clipmodel(tmp_path, seed):
    model, tok = save_tiny_clip(tmp_path)
    images = rand_images(5, 32, 32)
    prompts = ["a green bench", "a red car and a cat", "dog", "two blue cup on the plate", "this is a cat"]
    ref = clip_reference(model, tok, images, prompts, lambda m: m.logit_scale.exp())
    for cls, batch_size in ((CLIPScoreReward, 2), (PickScoreReward, 5)):
        reward = cls.from_pretrained(tmp_path, batch_size=batch_size, dtype="fp32")
        reward.tokenizer = EosTokenizer(tok)
        got = reward(images, prompts)
        assert got.dtype == torch.float32 and got.shape == (5,)
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert PickScoreReward.from_pretrained(tmp_path).name == "pickscore"
    # a fixed scale and CLIPScore's clipping at zero
    r = CLIPScoreReward.from_pretrained(tmp_path, scale=2.5, clip_at_zero=True)
    r.tokenizer = EosTokenizer(tok)
    torch.testing.assert_close(r(images, prompts), 2.5 * (ref / 20.0).clamp(min=0), atol=1e-4, rtol=1e-4)


def test_clip_bf16_and_resized_inputs(tmp_path, seed):
    _model, tok = save_tiny_clip(tmp_path)
    images = rand_images(3, 40, 56)  # resized (shortest edge) and centre-cropped to 32x32
    prompts = ["a cat", "a red car", "the dog"]
    r32 = CLIPScoreReward.from_pretrained(tmp_path, dtype="fp32")
    r16 = CLIPScoreReward.from_pretrained(tmp_path, dtype="bf16")
    assert next(r16.model.parameters()).dtype == torch.bfloat16
    r32.tokenizer = r16.tokenizer = EosTokenizer(tok)
    a, b = r32(images, prompts), r16(images, prompts)
    assert b.dtype == torch.float32 and torch.isfinite(b).all()
    assert (a.abs() <= 20.0 + 1e-3).all()
    torch.testing.assert_close(b, a, atol=0.05 * 20, rtol=0.05)


def test_nan_model_is_error_or_fallback(tmp_path, seed):
    save_tiny_clip(tmp_path)
    r = CLIPScoreReward.from_pretrained(tmp_path)
    with torch.no_grad():
        r.model.visual_projection.weight.fill_(float("nan"))
    with pytest.raises(RewardError, match=r"clip_score.*a red car"):
        r(rand_images(2, 32, 32), ["a red car", "a cat"])
    r2 = CLIPScoreReward.from_pretrained(tmp_path, fallback=-1.0, name="clip2")
    r2.model = r.model
    assert r2(rand_images(2, 32, 32), ["a red car", "a cat"]).tolist() == [-1.0, -1.0]
    assert r2.num_fallbacks == 2


def test_loading_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CLIPScoreReward.from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="config.json"):
        GitVQAReward.from_pretrained(tmp_path)
    save_tiny_clip(tmp_path)
    with pytest.raises(ValueError, match="'clip' checkpoint, expected model_type git"):
        GitVQAReward.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="batch_size"):
        CLIPScoreReward.from_pretrained(tmp_path, batch_size=0)


# ----------------------------------------------------------------------------- HPS (open_clip converter)


def random_open_clip_state_dict(width=32, text_width=24, layers=2, text_layers=1, patch=8, grid=3, vocab=60,
                                ctx=16, embed=12):
    """An open_clip-format CLIP state dict with random weights (shapes as open_clip stores them)."""
    g = lambda *s: torch.randn(*s) * 0.2
    sd = {"visual.class_embedding": g(width), "visual.positional_embedding": g(grid * grid + 1, width),
          "visual.conv1.weight": g(width, 3, patch, patch), "visual.proj": g(width, embed),
          "token_embedding.weight": g(vocab, text_width), "positional_embedding": g(ctx, text_width),
          "text_projection": g(text_width, embed), "logit_scale": torch.tensor(math.log(100.0))}
    for pre, d in (("visual.ln_pre", width), ("visual.ln_post", width), ("ln_final", text_width)):
        sd[pre + ".weight"], sd[pre + ".bias"] = 1 + g(d), g(d)
    for prefix, d, n in (("visual.transformer", width, layers), ("transformer", text_width, text_layers)):
        for i in range(n):
            p = f"{prefix}.resblocks.{i}."
            sd.update({p + "ln_1.weight": 1 + g(d), p + "ln_1.bias": g(d), p + "ln_2.weight": 1 + g(d),
                       p + "ln_2.bias": g(d), p + "attn.in_proj_weight": g(3 * d, d), p + "attn.in_proj_bias": g(3 * d),
                       p + "attn.out_proj.weight": g(d, d), p + "attn.out_proj.bias": g(d),
                       p + "mlp.c_fc.weight": g(3 * d, d), p + "mlp.c_fc.bias": g(3 * d),
                       p + "mlp.c_proj.weight": g(d, 3 * d), p + "mlp.c_proj.bias": g(d)})
    return sd


def open_clip_forward(sd, pixels, tokens, heads=2):
    """open_clip's CLIP.encode_image / encode_text written out in plain torch (float64)."""
    sd = {k: v.double() for k, v in sd.items()}

    def ln(x, p):
        return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], 1e-5)

    def block(x, p, causal):
        b, t, d = x.shape
        q, k, v = F.linear(ln(x, p + "ln_1"), sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"]).chunk(3, -1)
        q, k, v = (z.view(b, t, heads, d // heads).transpose(1, 2) for z in (q, k, v))
        att = q @ k.transpose(-1, -2) / math.sqrt(d // heads)
        if causal:
            att = att.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        o = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
        x = x + F.linear(o, sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"])
        h = F.gelu(F.linear(ln(x, p + "ln_2"), sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"]))
        return x + F.linear(h, sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])

    def layers(prefix):
        return sorted({int(k.split(".")[len(prefix.split("."))]) for k in sd if k.startswith(prefix + ".")})

    x = F.conv2d(pixels.double(), sd["visual.conv1.weight"], stride=sd["visual.conv1.weight"].shape[-1])
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(x.shape[0], 1, -1), x], 1) + sd["visual.positional_embedding"]
    x = ln(x, "visual.ln_pre")
    for i in layers("visual.transformer.resblocks"):
        x = block(x, f"visual.transformer.resblocks.{i}.", causal=False)
    img = ln(x, "visual.ln_post")[:, 0] @ sd["visual.proj"]
    t = sd["token_embedding.weight"][tokens] + sd["positional_embedding"][: tokens.shape[1]]
    for i in layers("transformer.resblocks"):
        t = block(t, f"transformer.resblocks.{i}.", causal=True)
    txt = ln(t, "ln_final")[torch.arange(tokens.shape[0]), tokens.argmax(-1)] @ sd["text_projection"]
    return F.normalize(img, dim=-1), F.normalize(txt, dim=-1)


def test_hps_converter_matches_open_clip_forward(tmp_path, seed):
    sd = random_open_clip_state_dict()
    vocab = sd["token_embedding.weight"].shape[0]
    # a CLIP-style tokenizer: EOT is the largest id (open_clip pools at argmax of the ids)
    words = [f"w{i}" for i in range(vocab - 4 - len(WORDS) - len(PUNCT))]
    tok = word_tokenizer(extra=words, fixed={"<start>": vocab - 2, "<end>": vocab - 1},
                         bos_token="<start>", eos_token="<end>")
    assert max(tok.get_vocab().values()) == vocab - 1
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<start> $A <end>", special_tokens=[("<start>", vocab - 2), ("<end>", vocab - 1)])
    tok_dir = tmp_path / "tok"
    tok.save_pretrained(tok_dir)
    ckpt = tmp_path / "hps.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, ckpt)
    out = convert_hps_checkpoint(ckpt, tok_dir, tmp_path / "hf", vision_heads=2, text_heads=2)
    reward = HPSReward.from_pretrained(out, batch_size=2, dtype="fp32")  # with the saved tokenizer
    images = rand_images(3, 24, 24)
    prompts = ["a red car", "w3 w7 the cat and a dog", "blue"]
    got = reward(images, prompts)
    # reference: open_clip forward on open_clip's own preprocessing (OpenAI mean/std) and zero padding
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    pixels = (images.permute(0, 3, 1, 2).double() / 255 - mean) / std
    tokens = torch.zeros(3, 16, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids = [vocab - 2] + tok.encode(p, add_special_tokens=False) + [vocab - 1]
        tokens[i, : len(ids)] = torch.tensor(ids)
    img, txt = open_clip_forward(sd, pixels, tokens)
    torch.testing.assert_close(got.double(), (img * txt).sum(-1), atol=1e-4, rtol=1e-4)
    assert (got.abs() <= 1 + 1e-5).all()
    assert reward.model.logit_scale.item() == pytest.approx(math.log(100.0))
    with pytest.raises(ValueError, match="unexpected keys.*visual.extra"):
        open_clip_to_clip_state_dict({**sd, "visual.extra.weight": torch.zeros(1)})
    # atomic: a conversion that fails while writing leaves the previous directory as it was, no temp dirs
    before = sorted(p.name for p in out.iterdir())
    import transformers as tf

    real = tf.CLIPModel.save_pretrained

    def broken(self, path, **kw):
        real(self, path, **kw)
        raise OSError("disk full")

    tf.CLIPModel.save_pretrained = broken
    try:
        with pytest.raises(OSError, match="disk full"):
            convert_hps_checkpoint(ckpt, tok_dir, out, vision_heads=2, text_heads=2)
        with pytest.raises(OSError, match="disk full"):
            convert_hps_checkpoint(ckpt, tok_dir, tmp_path / "fresh", vision_heads=2, text_heads=2)
    finally:
        tf.CLIPModel.save_pretrained = real
    assert sorted(p.name for p in out.iterdir()) == before
    assert not (tmp_path / "fresh").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    torch.testing.assert_close(HPSReward.from_pretrained(out, batch_size=2, dtype="fp32")(images, prompts), got)


# ----------------------------------------------------------------------------- GIT VQA


def save_tiny_git(tmp_path):
    from transformers import CLIPImageProcessor, GitConfig, GitForCausalLM

    tok = word_tokenizer(cls_token="[CLS]", sep_token="[SEP]")
    config = GitConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=40, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                       vision_config={"hidden_size": 32, "intermediate_size": 40, "num_hidden_layers": 1,
                                          "num_attention_heads": 2, "image_size": 32, "patch_size": 8})
    model = GitForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc.save_pretrained(tmp_path)
    return model, tok, proc


def git_reference(model, tok, proc, images, phrase_lists, template):
    """GitForCausalLM on each (image, question) alone: softmax ratio P(yes)/(P(yes)+P(no)), mean."""
    yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
    ref = []
    for img, phrases in zip(images, phrase_lists):
        pix = proc(images=[img.numpy()], return_tensors="pt")["pixel_values"]
        probs = []
        for phrase in phrases:
            ids = [tok.cls_token_id] + tok.encode(template.format(phrase), add_special_tokens=False)
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids]), pixel_values=pix).logits[0, -1].double()
            p = logits.softmax(-1)
            probs.append(p[yes] / (p[yes] + p[no]))
        ref.append(sum(probs) / len(probs))
    return torch.tensor(ref, dtype=torch.float32)


def test_git_vqa_matches_gitforcausallm(tmp_path, seed):
    """The pre-fidelity behaviour, now behind options: "is this a {}?" over attr_nouns only."""
    model, tok, proc = save_tiny_git(tmp_path)
    images = rand_images(3, 32, 32)
    prompts = ["a green bench and a red car", "a blue cat", "x"]
    meta = [{"attr_nouns": ["green bench", "red car"]}, {"attr_nouns": ["blue cat"]},
            {"attr_nouns": ["red dog", "the green cup on the blue plate", "cat"]}]
    ref = git_reference(model, tok, proc, images, [m["attr_nouns"] for m in meta], "is this a {}?")
    old = {"question_template": "is this a {}?", "fallback_field": None, "zero_tasks": (), "empty_score": None}
    for batch_size in (1, 2, 16):
        got = GitVQAReward.from_pretrained(tmp_path, batch_size=batch_size, dtype="fp32", **old)(images, prompts, meta)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        assert ((got >= 0) & (got <= 1)).all()
    r = GitVQAReward.from_pretrained(tmp_path, **old)
    with pytest.raises(RewardError, match=r"git_vqa.*attr_nouns.*a blue cat"):
        r(images[:2], prompts[:2], [meta[0], {"nouns": ["cat"]}])
    with pytest.raises(ValueError, match="single-token"):
        GitVQAReward.from_pretrained(tmp_path, yes="yes yes")


def seed_git_scores(model, tok, proc, images, metadata):
    """reward_git.py:41-76 of the seed, restated (task gating, attr_nouns else nouns, "{phrase}?")."""
    yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
    score = []
    for m, image in zip(metadata, images):
        if m.get("task_type") in ["spatial", "numeracy"]:
            score.append(0)
            continue
        if m.get("attr_nouns") is not None:
            key = "attr_nouns"
        else:
            key = "nouns"
            if m.get("nouns") is None or len(m["nouns"]) == 0:
                score.append(1)
                continue
        pixel_values = proc(images=[image.numpy()], return_tensors="pt").pixel_values
        temp = []
        for attr_noun in m[key]:
            input_ids = [tok.cls_token_id] + tok.encode(f"{attr_noun}?", add_special_tokens=False)
            with torch.no_grad():
                logits = model(pixel_values=pixel_values, input_ids=torch.tensor([input_ids])).logits[:, -1].double()
            probs = torch.softmax(logits, dim=1)
            temp.append(float(probs[:, yes] / (probs[:, yes] + probs[:, no])))
        score.append(sum(temp) / len(temp))
    return torch.tensor(score, dtype=torch.float32)


def test_git_vqa_seed_defaults(tmp_path, seed):
    model, tok, proc = save_tiny_git(tmp_path)
    rng = torch.Generator().manual_seed(seed)
    pool = ["green bench", "red car", "cat", "blue cup", "dog", "the green plate"]
    tasks = ["color", "shape", "texture", "spatial", "numeracy", "complex", "non", "object", None]
    meta = []
    for _ in range(7):
        m = {"task_type": tasks[int(torch.randint(len(tasks), (1,), generator=rng))]}
        kind = int(torch.randint(4, (1,), generator=rng))
        pick = [pool[int(i)] for i in torch.randperm(len(pool), generator=rng)[:1 + int(torch.randint(3, (1,), generator=rng))]]
        if kind == 0:
            m["attr_nouns"], m["nouns"] = pick, ["cat"]
        elif kind == 1:
            m["nouns"] = pick  # no attr_nouns: the seed asks about the nouns
        elif kind == 2:
            m["nouns"] = []  # no phrases at all: 1
        meta.append(m)
    meta += [{"task_type": "color", "attr_nouns": ["red car"]}, {"task_type": "spatial", "nouns": ["cat"]},
             {"task_type": "object", "nouns": ["dog"]}, {"task_type": "non"}]
    images = rand_images(len(meta), 32, 32)
    prompts = [f"p{i}" for i in range(len(meta))]
    ref = seed_git_scores(model, tok, proc, images, meta)
    for batch_size in (1, 3):
        got = GitVQAReward.from_pretrained(tmp_path, batch_size=batch_size, dtype="fp32")(images, prompts, meta)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert ref[-4] != 0 and ref[-3] == 0 and ref[-1] == 1  # asked, gated, no phrases
    r = GitVQAReward.from_pretrained(tmp_path)
    assert r.questions("p", {"attr_nouns": ["red car"], "nouns": ["car"]}) == ["red car?"]  # reward_git.py:64
    for bad, msg in (({"nouns": "red car"}, r"'git_vqa'.*'p'.*'nouns' must be a list of str"),
                     ({"attr_nouns": ["red car", None]}, r"'attr_nouns' must be a list of str"),
                     ({"task_type": "numeracyy", "nouns": ["cat"]}, r"'task_type' must be one of.*'numeracyy'"),
                     ({"attr_nouns": []}, r"empty list")):
        with pytest.raises(RewardError, match=msg):
            r(images[:1], ["p"], [bad])
    with pytest.raises(RewardError, match=r"git_vqa.*must be (a )?str"):
        r(images[:1], [3], [{"nouns": ["cat"]}])
    r.fallback = 0.5
    with pytest.raises(RewardError, match="'nouns' must be a list of str"):  # bad metadata is never a fallback
        r(images[:1], ["p"], [{"nouns": "cat"}])


# ----------------------------------------------------------------------------- GroundingDINO


def save_tiny_grounding_dino(tmp_path):
    from transformers import GroundingDinoConfig, GroundingDinoForObjectDetection

    # GroundingDINO hard-codes BERT's ids of [CLS], [SEP], '.', '?' for its text self-attention blocks
    tok = word_tokenizer(fixed={"[CLS]": 101, "[SEP]": 102, ".": 1012, "?": 1029}, cls_token="[CLS]",
                         sep_token="[SEP]")
    config = GroundingDinoConfig(
        backbone_config={"model_type": "swin", "window_size": 4, "embed_dim": 8, "depths": [1, 1, 1, 1],
                             "num_heads": [1, 1, 1, 1], "image_size": 48, "out_features": ["stage2", "stage3", "stage4"],
                             "out_indices": [2, 3, 4]},
        text_config={"model_type": "bert", "vocab_size": 1040, "hidden_size": 16, "num_hidden_layers": 1,
                         "num_attention_heads": 2, "intermediate_size": 24, "max_position_embeddings": 64},
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=24, decoder_ffn_dim=24,
        encoder_attention_heads=2, decoder_attention_heads=2, num_queries=12, num_feature_levels=3,
        encoder_n_points=2, decoder_n_points=2, max_text_len=32, disable_custom_kernels=True)
    model = GroundingDinoForObjectDetection(config).eval()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(
        '{"do_resize": true, "size": {"shortest_edge": 48, "longest_edge": 64}, "resample": 2, '
        '"do_rescale": true, "rescale_factor": 0.00392156862745098, "do_normalize": true, '
        '"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}')
    return model, tok


def test_grounding_dino_detections_feed_rules(tmp_path, seed):
    model, tok = save_tiny_grounding_dino(tmp_path)
    images = rand_images(3, 40, 40)
    meta = [{"task_type": "color", "nouns": ["bench", "car"], "attr_nouns": ["green bench", "red car"]},
            {"task_type": "numeracy", "numeracy_info": [{"obj_name": "cat", "num": 2}]},
            {"task_type": "spatial", "spatial_info": {"obj1": "dog", "obj2": "cup", "locality": "left of"}}]
    prompts = ["a green bench and a red car", "two cat", "a dog left of a cup"]
    thr = 0.3
    reward = GroundingDinoReward.from_pretrained(tmp_path, box_threshold=thr, batch_size=2, threshold=0.4,
                                                 dtype="fp32", rules="fastbicot")  # the continuous rules
    # reference: one unpadded forward per image, GroundingDINO's own text format, phrases scored by hand
    pixels = preprocess(images, reward.detector.image_config, torch.float32)
    assert pixels.shape[-2:] == (48, 48)
    queries = [["bench", "car"], ["cat"], ["dog", "cup"]]
    ref_dets, ref_scores = [], []
    for i, q in enumerate(queries):
        words = " . ".join(q).split() + ["."]
        ids = [101] + [tok.convert_tokens_to_ids(w) for w in words] + [102]
        with torch.no_grad():
            out = model(pixel_values=pixels[i:i + 1], input_ids=torch.tensor([ids]))
        probs = out.logits[0].sigmoid()
        dets = []
        for qi in range(probs.shape[0]):
            scores = [probs[qi, 1 + 2 * j].item() for j in range(len(q))]  # token of phrase j (one word each)
            j = max(range(len(q)), key=scores.__getitem__)
            if scores[j] >= thr:
                cx, cy, w, h = out.pred_boxes[0, qi].tolist()
                box = tuple(min(1.0, max(0.0, v)) for v in (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
                dets.append((q[j], scores[j], box))
        ref_dets.append(dets)
        ref_scores.append(rule_score(dets, meta[i], threshold=0.4))
    assert sum(map(len, ref_dets)) > 0  # the random tiny model does fire above the threshold
    got_dets = reward.detector(images, queries)
    for got, ref in zip(got_dets, ref_dets):
        assert [d.label for d in got] == [d[0] for d in ref]
        for d, r in zip(got, ref):
            assert d.score == pytest.approx(r[1], abs=1e-5)
            assert d.box == pytest.approx(r[2], abs=1e-5)
            assert 0 <= d.box[0] <= d.box[2] <= 1 and 0 <= d.box[1] <= d.box[3] <= 1
    got = reward(images, prompts, meta)
    torch.testing.assert_close(got, torch.tensor(ref_scores, dtype=torch.float32), atol=1e-6, rtol=0)
    torch.testing.assert_close(GroundingDinoReward.from_pretrained(tmp_path, box_threshold=thr, batch_size=1,
                                                                   threshold=0.4, rules="fastbicot")(images, prompts, meta), got)
    assert ((got >= 0) & (got <= 1)).all()
    # a NaN from the model: error naming reward and prompt, or the configured fallback
    with torch.no_grad():
        reward.detector.model.model.input_proj_vision[0][0].weight.fill_(float("nan"))
    with pytest.raises(RewardError, match=r"grounding_dino.*a green bench"):
        reward(images, prompts, meta)
    reward.fallback = 0.0
    assert reward(images, prompts, meta).tolist() == [0.0, 0.0, 0.0]


def seed_positive_map(tokenized, token_span, max_text_len):
    """create_positive_map_from_span (GroundingDINO util/vl_utils.py:8-47 in the seed), restated."""
    positive_map = torch.zeros((len(token_span), max_text_len), dtype=torch.float)
    for j, tok_list in enumerate(token_span):
        for (beg, end) in tok_list:
            beg_pos = tokenized.char_to_token(beg)
            end_pos = tokenized.char_to_token(end - 1)
            if beg_pos is None:
                try:
                    beg_pos = tokenized.char_to_token(beg + 1)
                    if beg_pos is None:
                        beg_pos = tokenized.char_to_token(beg + 2)
                except Exception:  # noqa: BLE001 -- as the seed
                    beg_pos = None
            if end_pos is None:
                try:
                    end_pos = tokenized.char_to_token(end - 2)
                    if end_pos is None:
                        end_pos = tokenized.char_to_token(end - 3)
                except Exception:  # noqa: BLE001 -- as the seed
                    end_pos = None
            if beg_pos is None or end_pos is None:
                continue
            positive_map[j, beg_pos: end_pos + 1].fill_(1)
    return positive_map / (positive_map.sum(-1)[:, None] + 1e-6)


def seed_make_detection_prompt(nouns):
    """grpo.py:63-82 of the seed, restated."""
    token_spans, pointer = [], 0
    for noun in nouns:
        n_split = noun.strip().split(" ")
        if len(n_split) == 1:
            length = len(n_split[0])
            token_spans.append([[pointer, pointer + length]])
            pointer += length + 3
        else:
            beg_len, total_length, end_len = len(n_split[0]), len(noun), len(n_split[-1])
            token_spans.append([[pointer, pointer + beg_len],
                                [pointer + total_length - end_len, pointer + total_length]])
            pointer += total_length + 3
    return " . ".join(nouns) + ".", token_spans


def test_grounding_dino_t2i_r1_mode_matches_the_seed(tmp_path, seed):
    from test_rewards_rules import seed_gdino_score

    model, tok = save_tiny_grounding_dino(tmp_path)
    # a BERT-like tokenizer that adds [CLS] / [SEP] itself, as the seed's model.tokenizer(caption) does
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 101), ("[SEP]", 102)])
    tok.save_pretrained(tmp_path)
    images = rand_images(4, 40, 44)
    meta = [{"task_type": "color", "nouns": ["bench", "green car"], "attr_nouns": ["green bench", "red car"]},
            {"task_type": "numeracy", "nouns": ["cat", "dog"],
             "numeracy_info": [{"obj_name": "cat", "num": 2}, {"obj_name": "dog", "num": 1}]},
            {"task_type": "spatial", "nouns": ["dog", "the blue cup"],
             "spatial_info": {"obj1": "dog", "obj2": "the blue cup", "locality": "left of"}},
            {"task_type": "complex", "nouns": ["red dog", "cup", "the green plate"]}]
    prompts = ["a green bench and a green car", "two cat and a dog", "a dog left of the blue cup", "x"]
    reward = GroundingDinoReward.from_pretrained(tmp_path, batch_size=3, dtype="fp32", fix_above=False,
                                                 fix_proximity=False, fix_nms=False)
    assert reward.rules == "t2i_r1" and reward.detector.box_threshold == 0.3
    pixels = preprocess(images, reward.detector.image_config, torch.float32)
    ref, fired = [], 0
    for i, m in enumerate(meta):
        caption, spans = seed_make_detection_prompt(m["nouns"])
        tokenized = tok(caption)
        with torch.no_grad():
            out = model(pixel_values=pixels[i:i + 1], input_ids=torch.tensor([tokenized.input_ids]))
        logits = out.logits.sigmoid()[0]  # (nq, max_text_len)
        pmap = seed_positive_map(tokenized, spans, logits.shape[1])
        phrase_logits = pmap @ logits.T  # gdino:151
        fired += int((phrase_logits > 0.3).sum())
        labels = [" ".join(caption[a:b] for a, b in span) for span in spans]  # gdino:157
        ref.append(seed_gdino_score(phrase_logits.double(), out.pred_boxes[0].double(), labels, m))
    assert fired > 0  # the random tiny model does score phrases above the threshold
    got = reward(images, prompts, meta)
    torch.testing.assert_close(got, torch.tensor(ref, dtype=torch.float32), atol=1e-5, rtol=0)
    again = GroundingDinoReward.from_pretrained(tmp_path, batch_size=1, fix_above=False, fix_proximity=False,
                                                fix_nms=False)(images, prompts, meta)
    torch.testing.assert_close(again, got)
    # a 3-word noun is labelled by its first and last word ("the cup"), as in the seed
    dets = reward.detector(images[2:3], [meta[2]["nouns"]])[0]
    assert all(dict(d.phrase_scores).keys() == {"dog", "the cup"} for d in dets)
    # no nouns: 1 without running the detector on anything
    assert reward(images[:1], ["x"], [{"task_type": "object", "nouns": []}]).tolist() == [1.0]
    with pytest.raises(ValueError, match="needs a detector in mode"):
        GroundingDinoReward(reward.detector, rules="fastbicot")
    with pytest.raises(ValueError, match="box_threshold"):
        GroundingDinoReward.from_pretrained(tmp_path, box_threshold=float("nan"))


# ----------------------------------------------------------------------------- VLM judges (ORM, Qwen2.5-VL)

CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}IMAGE{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|> "
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")
VLM_WORDS = ["<|im_start|>", "<|im_end|>", "user", "assistant", "generated", "by", "represent", "please", "or",
             "boxed", "0", "1", "maybe"]


def without_video(processor_cls):
    """The processor class minus its video processor: transformers' video processors need torchvision,
    which the CPU test machine lacks (so AutoProcessor cannot load these processors there either)."""

    class Processor(processor_cls):
        @classmethod
        def get_attributes(cls):
            return [a for a in super().get_attributes() if a != "video_processor"]

    return Processor


def save_tiny_qwen_vl(tmp_path):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    from transformers import Qwen2VLImageProcessor as image_cls  # the PIL backend without torchvision

    special = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok = word_tokenizer(extra=VLM_WORDS + special, eos_token="<|im_end|>")
    image_processor = image_cls(size={"shortest_edge": 16 * 16, "longest_edge": 32 * 32}, patch_size=4,
                                merge_size=2, temporal_patch_size=2)
    processor = without_video(Qwen2_5_VLProcessor)(image_processor=image_processor, tokenizer=tok, chat_template=CHAT.replace(
        "IMAGE", "<|vision_start|><|image_pad|><|vision_end|>"))
    ids = {t: tok.convert_tokens_to_ids(t) for t in special}
    config = Qwen2_5_VLConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
                         "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 512,
                         "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                         "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id, "tie_word_embeddings": False},
        vision_config={"depth": 1, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2, "out_hidden_size": 32,
                           "patch_size": 4, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 16,
                           "fullatt_block_indexes": [0]},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.save_pretrained(tmp_path)
    return model, processor


def save_tiny_llava_onevision(tmp_path):
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionProcessor,
    )
    from transformers import LlavaOnevisionImageProcessor as image_cls  # the PIL backend without torchvision

    tok = word_tokenizer(extra=VLM_WORDS + ["<image>", "<video>"], eos_token="<|im_end|>")
    pinpoints = [[16, 16], [16, 32], [32, 16], [32, 32]]
    image_processor = image_cls(size={"height": 16, "width": 16}, image_grid_pinpoints=pinpoints)
    processor = without_video(LlavaOnevisionProcessor)(image_processor=image_processor, tokenizer=tok, num_image_tokens=16,
                                        vision_feature_select_strategy="full",
                                        chat_template=CHAT.replace("IMAGE", "<image>"))
    config = LlavaOnevisionConfig(
        text_config={"model_type": "qwen2", "vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 48,
                         "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                         "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id},
        vision_config={"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 48,
                           "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 16, "patch_size": 4},
        image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="full",
        vision_feature_layer=-1, image_grid_pinpoints=pinpoints)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    model.save_pretrained(tmp_path)
    return model, processor


def vlm_reference(model, processor, images, questions, yes, no, normalize):
    """The tiny model on each sample alone (no padding): next-token yes-probability."""
    out = []
    for img, q in zip(images, questions):
        text = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
            add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[text], images=[img.numpy()], return_tensors="pt")
        with torch.no_grad():
            p = model(**inputs).logits[0, -1].double().softmax(-1)
        yid, nid = processor.tokenizer.convert_tokens_to_ids(yes), processor.tokenizer.convert_tokens_to_ids(no)
        out.append(p[yid] if normalize == "vocab" else p[yid] / (p[yid] + p[nid]))
    return torch.tensor(out, dtype=torch.float32)


PROMPTS = ["a red car", "a green bench and a blue cat left of two dog", "cat"]


def test_orm_judge_llava_onevision_p_yes(tmp_path, seed):
    """The pre-fidelity ORM scoring, now ORMJudgeReward: chat template, tiling, P(yes) over the vocabulary."""
    model, processor = save_tiny_llava_onevision(tmp_path)
    images = rand_images(3, 24, 20)
    questions = [f"This image is generated by a prompt: {p}. Does this image accurately represent the prompt? "
                 "Please answer yes or no." for p in PROMPTS]
    ref = vlm_reference(model, processor, images, questions, "yes", "no", "vocab")
    for batch_size in (1, 3):
        got = ORMJudgeReward.from_pretrained(tmp_path, processor=processor, batch_size=batch_size,
                                             dtype="fp32")(images, PROMPTS)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
        assert ((got >= 0) & (got <= 1)).all()


def seed_orm_first_token(model, tok, image_mean, image, prompt, top_k=50):
    """reward_orm.py:54-118 of the seed up to the first answer token's processed distribution, restated:
    qwen_1_5 CHATML text (conversation.py:85-95, 443-452), tokenizer_image_token (mm_utils.py:341-360),
    expand2square with the mean colour + the SigLIP processor (mm_utils.py:300-333), one tile followed by
    image_newline (llava_arch.py:408-413), then temperature 0.3 and top-k as HF generate's warpers."""
    from PIL import Image
    from transformers import SiglipImageProcessorPil

    question = (f"<image> This image is generated by a prompt: {prompt}. Does this image accurately represent "
                "the prompt? Please answer yes or no without explanation.")
    text = ("<|im_start|>system\nYou are a helpful assistant." + "<|im_end|>" + "\n" + "<|im_start|>user" + "\n"
            + question + "<|im_end|>" + "\n" + "<|im_start|>assistant" + "\n")
    chunks = [tok(c).input_ids for c in text.split("<image>")]
    pil = Image.fromarray(image.numpy())
    width, height = pil.size
    color = tuple(int(x * 255) for x in image_mean)
    if width != height:
        side = max(width, height)
        square = Image.new(pil.mode, (side, side), color)
        square.paste(pil, (0, (width - height) // 2) if width > height else ((height - width) // 2, 0))
        pil = square
    size = model.config.vision_config.image_size
    proc = SiglipImageProcessorPil(size={"height": size, "width": size}, image_mean=list(image_mean),
                                   image_std=[0.26862954, 0.26130258, 0.27577711], resample=3)
    pix = proc(images=[pil], return_tensors="pt")["pixel_values"]
    inner = model.model
    with torch.no_grad():
        feats = inner.multi_modal_projector(inner.vision_tower(pix, output_hidden_states=True).hidden_states[-1])[0]
        feats = torch.cat([feats, inner.image_newline[None]])
        embed = model.get_input_embeddings()
        embeds = torch.cat([embed(torch.tensor(chunks[0])), feats, embed(torch.tensor(chunks[1]))])[None]
        logits = model(inputs_embeds=embeds).logits[0, -1].double()
    scores = logits / 0.3
    scores = scores.masked_fill(scores < torch.topk(scores, top_k)[0][..., -1, None], -float("inf"))
    return torch.softmax(scores, -1)


def test_orm_seed_defaults(tmp_path, seed):
    model, processor = save_tiny_llava_onevision(tmp_path)
    tok = processor.tokenizer
    processor.image_processor.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    mean = processor.image_processor.image_mean
    yes, no, maybe = (tok.convert_tokens_to_ids(w) for w in ("yes", "no", "maybe"))
    for shape in ((12, 16), (16, 10), (16, 16)):  # padded to 16 x 16 (no resize): exact pixels
        images = rand_images(3, *shape)
        probs = [seed_orm_first_token(model, tok, mean, img, p) for img, p in zip(images, PROMPTS)]
        ratio = torch.tensor([float(p[yes] / (p[yes] + p[no])) for p in probs])
        passes = torch.tensor([float(p[yes] + p[no]) for p in probs])
        for batch_size in (1, 2):
            r = ORMReward.from_pretrained(tmp_path, batch_size=batch_size, dtype="fp32", gate="none")
            torch.testing.assert_close(r(images, PROMPTS), ratio, atol=1e-5, rtol=1e-4)
        r = ORMReward.from_pretrained(tmp_path, processor=processor, dtype="fp32", gate="expectation")
        torch.testing.assert_close(r(images, PROMPTS), ratio * passes, atol=1e-5, rtol=1e-4)
        sampled = ORMReward.from_pretrained(tmp_path, dtype="fp32", seed=seed)(images, PROMPTS)
        assert all(s == 0 or abs(s - q) < 1e-5 for s, q in zip(sampled.tolist(), ratio.tolist()))
        again = ORMReward.from_pretrained(tmp_path, dtype="fp32", seed=seed)(images, PROMPTS)
        assert torch.equal(sampled, again)  # seeded draws
        # keyed by the sample, not its place: reversed or one at a time (another rank's batch), same scores
        rev = ORMReward.from_pretrained(tmp_path, dtype="fp32", seed=seed)(images.flip(0), PROMPTS[::-1])
        assert torch.equal(rev.flip(0), sampled)
        ones = torch.cat([ORMReward.from_pretrained(tmp_path, dtype="fp32", seed=seed)(images[i:i + 1], PROMPTS[i:i + 1])
                          for i in range(len(PROMPTS))])
        assert torch.equal(ones, sampled)
    # the gate, made certain: a first token that is almost surely "yes" keeps the ratio, "maybe" gives 0
    r = ORMReward.from_pretrained(tmp_path, dtype="fp32", seed=seed)
    logits = torch.zeros(2, len(tok))
    logits[0, yes], logits[0, no] = 10.0, 9.0
    logits[1, maybe], logits[1, yes], logits[1, no] = 10.0, 9.0, 8.0
    got = r.scores_from_logits(logits)
    assert got[0].item() == pytest.approx(1 / (1 + math.exp(-1 / 0.3)))  # sigmoid((l_yes - l_no) / 0.3)
    assert got[1].item() == 0.0
    # uniform first-token distribution: the gate passes with probability 2 / V (yes, no)
    r.top_k = 0
    n, v = 4000, len(tok)
    hits = sum(int(r.scores_from_logits(torch.zeros(200, v)).gt(0).sum()) for _ in range(n // 200))
    p = 2 / v
    assert abs(hits - n * p) < 5 * math.sqrt(n * p * (1 - p)) + 1
    # the keyed draw (inverse CDF of content_keys' uniforms) has the same law
    u = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    hits = int(r.scores_from_logits(torch.zeros(n, v), u).gt(0).sum())
    assert abs(hits - n * p) < 5 * math.sqrt(n * p * (1 - p)) + 1
    first = torch.full((3, v), -30.0)
    first[:, yes] = 0.0  # "yes" almost surely: every uniform passes the gate
    assert bool(r.scores_from_logits(first, torch.tensor([1e-9, 0.5, 1 - 1e-9], dtype=torch.float64)).gt(0).all())
    r.gate = "expectation"
    assert r.scores_from_logits(torch.zeros(1, v)).item() == pytest.approx(0.5 * p)
    # the seed's question, with the system turn
    assert r.text("a red car") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image> This image is "
        "generated by a prompt: a red car. Does this image accurately represent the prompt? Please answer yes or no "
        "without explanation.<|im_end|>\n<|im_start|>assistant\n")
    # the gate reads the raw vocabulary string, lower-cased and stripped (reward_orm.py:99-101): "Yes" passes,
    # the byte-level "ĠYes" does not; the ratio always uses the lower-case "yes" / "no" ids (:39-40, :107-108)
    tok2 = word_tokenizer(extra=VLM_WORDS + ["<image>", "<video>", "Yes", "ĠYes"], eos_token="<|im_end|>")
    r2 = ORMReward(r.model, tok2, r.image_config, seed=seed)
    ids2 = {w: tok2.convert_tokens_to_ids(w) for w in ("yes", "no", "Yes", "ĠYes")}
    assert r2.gate_ids.tolist() == sorted([ids2["yes"], ids2["no"], ids2["Yes"]])
    lg = torch.zeros(2, len(tok2))
    lg[:, ids2["yes"]], lg[:, ids2["no"]] = 2.0, 1.0
    lg[0, ids2["Yes"]], lg[1, ids2["ĠYes"]] = 12.0, 12.0
    got2 = r2.scores_from_logits(lg)
    assert got2[0].item() == pytest.approx(1 / (1 + math.exp(-1 / 0.3))) and got2[1].item() == 0.0
    # without the newline vector (a "flat" checkpoint) the features are one token shorter
    assert ORMReward(r.model, tok, r.image_config, image_newline=False).image_features(
        rand_images(1, 16, 16)).shape[1] == r.image_features(rand_images(1, 16, 16)).shape[1] - 1
    for kw in ({"temperature": float("nan")}, {"temperature": 0}, {"gate": "always"}, {"top_k": -1}):
        with pytest.raises(ValueError):
            ORMReward.from_pretrained(tmp_path, **kw)
    with pytest.raises(RewardError, match=r"orm.*must be (a )?str"):
        r(rand_images(1, 16, 16), [None])


def test_qwen_vl_judge_prob_and_boxed(tmp_path, seed):
    model, processor = save_tiny_qwen_vl(tmp_path)
    images = rand_images(3, 32, 32)
    template = "does this image show {prompt}? answer yes or no."
    ref = vlm_reference(model, processor, images, [template.format(prompt=p) for p in PROMPTS], "yes", "no",
                        "yes_no")
    for batch_size in (1, 2):
        judge = VLMJudgeReward.from_pretrained(tmp_path, processor=processor, batch_size=batch_size,
                                               question_template=template,
                                               dtype="fp32")
        got = judge(images, PROMPTS)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
        assert ((got > 0) & (got < 1)).all()
    # boxed mode: a zeroed LM head makes greedy decoding emit token 0; pin token 0's text per case
    boxed = VLMJudgeReward.from_pretrained(tmp_path, processor=processor, mode="boxed", max_new_tokens=1,
                                           batch_size=2)
    with torch.no_grad():
        boxed.model.lm_head.weight.zero_()
    tok = processor.tokenizer
    for text, expect in (("\\boxed{1}", [1.0] * 3), ("\\boxed{0}", [0.0] * 3)):
        boxed.processor.batch_decode = lambda ids, text=text, **kw: [text if (row == 0).all() else "?" for row in ids]
        assert boxed(images, PROMPTS).tolist() == expect
    boxed.processor.batch_decode = lambda ids, **kw: ["maybe" for _ in ids]
    with pytest.raises(RewardError, match=r"vlm_judge.*unparsable.*a red car.*maybe"):
        boxed(images, PROMPTS)
    boxed.fallback = 0.25
    assert boxed(images, PROMPTS).tolist() == [0.25] * 3 and boxed.num_fallbacks == 3
    assert tok.pad_token_id is not None


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_clip_on_cuda_half_matches_cpu_fp32(tmp_path, seed, dtype):
    _model, tok = save_tiny_clip(tmp_path)
    images = rand_images(4, 48, 40)
    prompts = ["a cat", "a red car", "the dog", "two blue cup"]
    cpu = CLIPScoreReward.from_pretrained(tmp_path, dtype="fp32")
    gpu = CLIPScoreReward.from_pretrained(tmp_path, device="cuda", dtype=dtype, batch_size=3)
    assert next(gpu.model.parameters()).is_cuda
    cpu.tokenizer = gpu.tokenizer = EosTokenizer(tok)
    got = gpu(images, prompts)  # CPU images are moved to the reward's device; scores come back on the CPU
    assert got.device.type == "cpu" and got.dtype == torch.float32
    torch.testing.assert_close(got, cpu(images, prompts), atol=1.0, rtol=0.05)


# ----------------------------------------------------------------------------- the T2I-R1 preset


def test_t2i_r1_rewards_preset(tmp_path, seed):
    from fastbicot.rewards import RewardEnsemble, t2i_r1_rewards

    dirs = {k: tmp_path / k for k in ("hps", "git", "gdino", "orm")}
    save_tiny_clip(dirs["hps"])
    save_tiny_git(dirs["git"])
    save_tiny_grounding_dino(dirs["gdino"])
    _, processor = save_tiny_llava_onevision(dirs["orm"])
    processor.tokenizer.save_pretrained(dirs["orm"])
    processor.image_processor.save_pretrained(dirs["orm"])
    paths = {k: str(v) for k, v in dirs.items()}
    ens = t2i_r1_rewards(**paths, dtype="fp32", orm_kwargs={"gate": "expectation"})
    assert isinstance(ens, RewardEnsemble) and ens.names == ["hps", "git", "gdino", "orm"]
    assert ens.mode == "sum" and ens.weights == [1.0] * 4
    git, gdino, orm = ens.rewards[1], ens.rewards[2], ens.rewards[3]
    assert git.question_template == "{}?" and git.fallback_field == "nouns"
    assert gdino.rules == "t2i_r1" and gdino.detector.box_threshold == 0.3
    assert gdino.rule_kwargs["threshold"] == 0.3 and gdino.rule_kwargs["fix_above"] is True
    assert orm.temperature == 0.3 and orm.gate == "expectation"
    images = rand_images(2, 16, 16)
    prompts = ["a red car", "two cat"]
    meta = [{"task_type": "color", "nouns": ["car"], "attr_nouns": ["red car"]},
            {"task_type": "numeracy", "nouns": ["cat"], "numeracy_info": [{"obj_name": "cat", "num": 2}]}]
    out = ens(images, prompts, meta)
    singles = [HPSReward.from_pretrained(paths["hps"], dtype="fp32"), GitVQAReward.from_pretrained(paths["git"], dtype="fp32"),
               GroundingDinoReward.from_pretrained(paths["gdino"], dtype="fp32"),
               ORMReward.from_pretrained(paths["orm"], dtype="fp32", gate="expectation")]
    parts = [r(images, prompts, meta) for r in singles]
    for name, part in zip(ens.names, parts):
        torch.testing.assert_close(out.components[name], part)
    torch.testing.assert_close(out.total, sum(parts))
    exact = t2i_r1_rewards(**paths, seed_exact=True)
    assert not any(exact.rewards[2].rule_kwargs[k] for k in ("fix_above", "fix_proximity", "fix_nms"))
    with pytest.raises(TypeError, match="unknown options.*'gdino_options'"):
        t2i_r1_rewards(**paths, gdino_options={})
    with pytest.raises(FileNotFoundError):
        t2i_r1_rewards(**{**paths, "git": str(tmp_path / "missing")})
