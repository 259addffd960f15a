"""RolloutEngine: the sampler's log-probs equal a teacher-forced recomputation through the HF model
(so the engine's KV cache and positions are right) in every image-context / unconditional mode."""

import pytest
import torch
from helpers import IDS, random_policy

from fastbicot.rollout import RolloutEngine, decoders, image_prompt
from fastbicot.rollout.sampling import Sampler, filtered_logits

PROMPTS = ["a red cube", "two small dogs to the left of a very large green cat"]
SHORT = dict(system="Plan the image.", instruction="Draw: {prompt}")  # the default template is ~730 bytes

pytestmark = pytest.mark.usefixtures("one_thread")


def eos_prone_policy(seed, dtype=torch.float64):
    """grid 2 (4 image tokens); the EOS logit is scaled up so rows stop at different steps."""
    policy = random_policy(32, 2, 4, grid=2, image_vocab=23, seed=seed, dtype=dtype, scale=1.0)
    with torch.no_grad():
        policy.lm_head.weight[IDS["eos"]] *= 8.0
    return policy


def hf_hidden(policy, ids, image_tokens=None):
    """Teacher-forced trunk output over [ids | image_tokens] with explicit positions 0..L-1."""
    dev = policy.device
    emb = policy.embed_text(torch.tensor(ids, device=dev))[None]
    if image_tokens is not None:
        emb = torch.cat([emb, policy.embed_image(image_tokens[None, :-1].to(dev))], dim=1)
    pos = torch.arange(emb.shape[1], device=dev)[None]
    with torch.no_grad():
        return policy.trunk(emb, position_ids=pos)[0][0]


def recompute(policy, s, o):
    c = len(s.cot_context_ids)
    h = hf_hidden(policy, s.cot_context_ids + s.cot_ids)[c - 1 : c - 1 + len(s.cot_ids)]
    z = filtered_logits(policy.text_logits(h), temperature=1.0, top_k=o["cot_top_k"], top_p=1.0)
    cot = torch.log_softmax(z, -1).gather(-1, torch.tensor(s.cot_ids)[:, None])[:, 0]
    n, c = len(s.image_tokens), len(s.image_context_ids)
    logits = policy.image_logits(hf_hidden(policy, s.image_context_ids, s.image_tokens)[c - 1 : c - 1 + n])
    if o["guidance_scale"] > 1:
        u = policy.image_logits(hf_hidden(policy, s.uncond_context_ids, s.image_tokens)[c - 1 : c - 1 + n])
        logits = u + o["guidance_scale"] * (logits - u)
    z = filtered_logits(logits, temperature=o["temperature"], top_k=o["top_k"], top_p=o["top_p"])
    img = torch.log_softmax(z, -1).gather(-1, s.image_tokens[:, None])[:, 0]
    return cot.float(), img.float()


CASES = [  # image_mode, uncond, guidance, flatten, image top_k, image top_p
    ("reprompt", "all", 5.0, True, 0, 1.0),
    ("reprompt", "all", 5.0, False, 7, 0.9),
    ("reprompt", "cot", 3.0, False, 0, 1.0),
    ("reprompt", "keep_cot", 2.0, True, 0, 0.8),
    ("reprompt", "all", 1.0, False, 0, 1.0),
    ("continue", "all", 5.0, True, 0, 1.0),
    ("continue", "all", 4.0, False, 5, 1.0),
    ("continue", "cot", 3.0, False, 0, 1.0),
    ("continue", "keep_cot", 2.0, True, 0, 1.0),
    ("continue", "all", 1.0, True, 0, 1.0),
]


@pytest.mark.parametrize("mode,uncond,w,flatten,top_k,top_p", CASES)
def test_sampler_logprobs_match_teacher_forced(seed, mode, uncond, w, flatten, top_k, top_p):
    policy = eos_prone_policy(seed)
    o = dict(cot_top_k=50, guidance_scale=w, temperature=1.0, top_k=top_k, top_p=top_p)
    eng = RolloutEngine(
        policy,
        **SHORT,
        max_new_tokens=9,
        image_mode=mode,
        uncond=uncond,
        flatten=flatten,
        guidance_scale=w,
        top_k=top_k,
        top_p=top_p,
    )
    batch = eng.generate(PROMPTS, num_generations=3, seed=seed)
    assert len(batch.samples) == 6
    for s in batch.samples:
        cot, img = recompute(policy, s, o)
        torch.testing.assert_close(s.cot_logprobs, cot, rtol=0, atol=1e-6)
        torch.testing.assert_close(s.image_logprobs, img, rtol=0, atol=1e-6)


@pytest.mark.parametrize("w", [1.0, 4.0])
@pytest.mark.parametrize("plain_max", [23, 22], ids=["draw_plain", "sampler"])
def test_image_temperature_on_both_cpu_paths(seed, monkeypatch, w, plain_max):
    """Plain image sampling at temperature 0.7 on CPU: Sampler.draw_plain (the head folded with 1/T)
    for a codebook of at most PLAIN_MAX_VOCAB tokens, the sampler's torch path (T in the sampler)
    above it; either way the log-probs are the teacher-forced ones of the tempered distribution."""
    monkeypatch.setattr(decoders, "PLAIN_MAX_VOCAB", plain_max)  # the codebook has 23 tokens
    drew_plain = []
    draw_plain = Sampler.draw_plain
    monkeypatch.setattr(Sampler, "draw_plain", lambda self, *a, **kw: drew_plain.append(1) or draw_plain(self, *a, **kw))
    policy = eos_prone_policy(seed)
    o = dict(cot_top_k=50, guidance_scale=w, temperature=0.7, top_k=0, top_p=1.0)
    eng = RolloutEngine(policy, **SHORT, max_new_tokens=5, guidance_scale=w, temperature=0.7)
    batch = eng.generate(PROMPTS, num_generations=2, seed=seed)
    assert bool(drew_plain) == (plain_max >= policy.image_vocab_size)
    for s in batch.samples:
        cot, img = recompute(policy, s, o)
        torch.testing.assert_close(s.cot_logprobs, cot, rtol=0, atol=1e-6)
        torch.testing.assert_close(s.image_logprobs, img, rtol=0, atol=1e-6)


def test_per_row_stop_and_sample_layout(seed):
    # The scaled EOS row has a random sign, so for some weights EOS is never likely; a lock-step
    # engine gives equal lengths for *every* policy, so trying a few random policies keeps the check.
    for attempt in range(4):
        policy = eos_prone_policy(seed + attempt)
        eng = RolloutEngine(policy, **SHORT, max_new_tokens=12)
        batch = eng.generate(PROMPTS, num_generations=4, seed=seed)
        lengths = [len(s.cot_ids) for s in batch.samples]
        if len(set(lengths)) > 1:
            break
    assert len(set(lengths)) > 1, "rows should stop independently (EOS is likely at every step)"
    eos, pad, boi, bos = IDS["eos"], IDS["pad"], IDS["boi"], IDS["bos"]
    for i, s in enumerate(batch.samples):
        assert s.prompt_index == i // 4 and s.prompt == PROMPTS[i // 4]
        assert 1 <= len(s.cot_ids) <= 12 and eos not in s.cot_ids[:-1]
        assert s.cot_ids[-1] == eos or len(s.cot_ids) == 12
        body = s.cot_ids[:-1] if s.cot_ids[-1] == eos else s.cot_ids
        assert s.cot_text == policy.tokenizer.decode(body, skip_special_tokens=True)  # as the seed (TR:544)
        # the seed strips the User turn: with an empty (or all-special) CoT "p." is followed by "\n\n"
        head = policy.tokenizer.encode(f"User: {s.prompt}.", add_special_tokens=False)
        assert s.image_context_ids[: 1 + len(head)] == [bos] + head and s.image_context_ids[-1] == boi
        text = policy.tokenizer.encode(image_prompt(s.prompt, s.cot_text), add_special_tokens=False)
        assert s.image_context_ids == [bos] + text + [boi]
        assert s.uncond_context_ids == [bos] + [pad] * (len(s.image_context_ids) - 2) + [boi]
        assert s.image_tokens.shape == (policy.num_image_tokens,) and s.image.dtype == torch.uint8
        assert s.cot_logprobs.shape == (len(s.cot_ids),) and bool((s.cot_logprobs <= 0).all())
    assert batch.images.shape[0] == 8 and batch.images.shape[-1] == 3
    assert set(batch.timing) == {"cot", "image", "decode", "total"}


@pytest.mark.parametrize("image_mode", ["reprompt", "continue"])
def test_extra_stop_tokens_end_the_cot_as_the_end_token(seed, image_mode):
    """policy.cot_stop_ids (model.cot_stop_tokens; ReasonGen-R1 stops on EOS or BOI): a stop token ends
    the CoT and is recorded as the end token. The sampler is keyed by (seed, step, sample), so each CoT
    must be the run without stop tokens cut at its first stop token, which becomes EOS; the image context
    is built from the cut CoT."""
    policy = random_policy(32, 2, 4, grid=2, image_vocab=23, seed=seed, scale=1.0)
    kw = dict(**SHORT, max_new_tokens=16, cot_top_k=0, image_mode=image_mode)
    plain = RolloutEngine(policy, **kw).generate(PROMPTS, num_generations=4, seed=seed)
    counts = {}
    for smp in plain.samples:  # a token sampled mid-CoT by some samples but not all
        for t in set(smp.cot_ids[:-1]) - {IDS["eos"]}:
            counts[t] = counts.get(t, 0) + 1
    stop = max(counts, key=lambda t: (0 < counts[t] < len(plain.samples), counts[t]))
    policy.cot_stop_ids = (stop,)
    cut = RolloutEngine(policy, **kw).generate(PROMPTS, num_generations=4, seed=seed)
    n_cut = 0
    for a, b in zip(plain.samples, cut.samples):
        if stop in a.cot_ids:
            k = a.cot_ids.index(stop)
            assert b.cot_ids == a.cot_ids[:k] + [IDS["eos"]]
            torch.testing.assert_close(b.cot_logprobs[:k], a.cot_logprobs[:k], rtol=0, atol=0)
            n_cut += 1
        else:
            assert b.cot_ids == a.cot_ids
        body = b.cot_ids[:-1] if b.cot_ids[-1] == IDS["eos"] else b.cot_ids
        assert b.cot_text == policy.tokenizer.decode(body, skip_special_tokens=True)
    assert n_cut > 0


def test_flatten_and_grouped_layouts_agree(seed):
    policy = eos_prone_policy(seed)
    a = RolloutEngine(policy, **SHORT, max_new_tokens=7, flatten=True).generate(PROMPTS, 2, seed=seed)
    b = RolloutEngine(policy, **SHORT, max_new_tokens=7, flatten=False).generate(PROMPTS, 2, seed=seed)
    for x, y in zip(a.samples, b.samples):
        assert x.cot_ids == y.cot_ids and torch.equal(x.image_tokens, y.image_tokens)
        torch.testing.assert_close(x.image_logprobs, y.image_logprobs)


def test_float32_with_fused_sampler(seed):
    policy = eos_prone_policy(seed, dtype=torch.float32)
    o = dict(cot_top_k=50, guidance_scale=5.0, temperature=1.0, top_k=0, top_p=1.0)
    batch = RolloutEngine(policy, **SHORT, max_new_tokens=6, image_mode="continue").generate(
        PROMPTS[:1], 3, seed=seed
    )
    for s in batch.samples:
        cot, img = recompute(policy, s, o)
        torch.testing.assert_close(s.cot_logprobs, cot, rtol=0, atol=2e-4)
        torch.testing.assert_close(s.image_logprobs, img, rtol=0, atol=2e-4)


def test_bad_input_errors():
    policy = eos_prone_policy(0)
    eng = RolloutEngine(policy, **SHORT, max_new_tokens=4)
    with pytest.raises(ValueError, match="empty"):
        eng.generate([], 2)
    with pytest.raises(ValueError, match="num_generations"):
        eng.generate(PROMPTS, 0)
    with pytest.raises(ValueError, match="exceeds"):
        eng.generate(["x" * 600], 1)
    with pytest.raises(ValueError, match="guidance_scale"):
        eng.generate(PROMPTS, 1, guidance_scale=0.9)
    with pytest.raises(ValueError, match="top_p"):
        eng.generate(PROMPTS, 1, top_p=1.2)
    with pytest.raises(ValueError, match="top_p"):
        RolloutEngine(policy, cot_top_p=0.0)
    with pytest.raises(ValueError, match="image_mode"):
        eng.generate(PROMPTS, 1, image_mode="bogus")
    with pytest.raises(ValueError, match="uncond"):
        eng.generate(PROMPTS, 1, uncond="bogus")
