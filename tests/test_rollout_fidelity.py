"""The rollout's defaults pinned against the seed's code (CaraJ7/T2I-R1 @ 2d9d4d1,
src/t2i-r1/src/open_r1/trainer/grpo_trainer.py = TR)."""

import pytest
import torch

from fastbicot.models import JanusPolicy
from fastbicot.rollout import RolloutConfig, RolloutEngine, image_prompt
from fastbicot.rollout.engine import decode_images
from fastbicot.settings import ConfigError

SHORT = {"template": "{system} {instruction}", "system": "Plan.", "instruction": "Draw {prompt}:"}


@pytest.fixture(scope="module")
def policy():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield JanusPolicy.from_preset("tiny", seed=3)
    torch.set_num_threads(n)


def test_image_context_is_the_seed_string_tokenized_at_once(policy, seed):
    # TR:541-569: answer = decode(completion_ids, skip_special_tokens=True); text = f"{raw_prompt}. {answer}"
    # rendered as the User turn (empty system prompt), tokenized with BOS, then <begin_of_image> appended
    eng = RolloutEngine(policy, max_new_tokens=7, guidance_scale=2.0, **SHORT)
    batch = eng.generate(["a red cube", "two dogs"], num_generations=2, seed=seed)
    tok = policy.tokenizer
    for s in batch.samples:
        answer = tok.decode(s.cot_ids, skip_special_tokens=True)
        want = [policy.bos_token_id] + tok.encode(image_prompt(s.prompt, answer), add_special_tokens=False)
        assert s.image_context_ids == want + [policy.boi_token_id]
        # the unconditional row: every token but BOS and the final BOI -> pad (TR:589-601)
        assert s.uncond_context_ids == [policy.bos_token_id] + [policy.pad_token_id] * (len(want) - 1) + [
            policy.boi_token_id]
        assert s.cot_text == answer


def test_splice_option_keeps_raw_cot_ids(policy, seed):
    eng = RolloutEngine(policy, max_new_tokens=5, guidance_scale=1.0, image_context="splice", **SHORT)
    s = eng.generate(["a cat"], num_generations=1, seed=seed).samples[0]
    body = s.cot_ids[:-1] if s.cot_ids[-1] == policy.eos_token_id else s.cot_ids
    head = policy.tokenizer.encode("User: a cat. ", add_special_tokens=False)
    tail = policy.tokenizer.encode("\n\nAssistant:", add_special_tokens=False)
    assert s.image_context_ids == [policy.bos_token_id] + head + body + tail + [policy.boi_token_id]


def test_prompt_left_truncation_and_textcot_length(policy, seed):
    # TR:445-447: prompt_ids = prompt_ids[:, -max_prompt_length:] (BOS included in what is cut)
    eng = RolloutEngine(policy, max_new_tokens=6, guidance_scale=1.0, max_prompt_length=40, **SHORT)
    long_prompt = "a very long prompt about many red cubes and blue spheres"
    full = [policy.bos_token_id] + policy.tokenizer.encode(f"Plan. Draw {long_prompt}:", add_special_tokens=False)
    assert eng.cot_context(long_prompt) == full[-40:]
    s = eng.generate([long_prompt], num_generations=1, seed=seed).samples[0]
    assert s.cot_context_ids == full[-40:]
    # TR:492-493: prompt_completion_ids[:, -max_textcot_length:]
    eng = RolloutEngine(policy, max_new_tokens=6, guidance_scale=1.0, max_textcot_length=3, **SHORT)
    s = eng.generate(["a cube"], num_generations=1, seed=seed).samples[0]
    assert len(s.cot_ids) <= 3 and len(s.cot_logprobs) == len(s.cot_ids)
    with pytest.raises(ConfigError, match="max_textcot_length"):
        RolloutConfig(image_mode="continue", max_textcot_length=3)


def test_pixel_rounding_truncates_as_the_seed(policy, seed):
    # TR:702-706: np.clip((dec + 1) / 2 * 255, 0, 255) assigned into a uint8 array (truncation)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, policy.image_vocab_size, (3, policy.num_image_tokens), generator=gen)
    with torch.no_grad():
        x = policy.vqmodel.decode(tokens).float()
    want = ((x + 1) / 2 * 255).clamp(0, 255).numpy().astype("uint8").transpose(0, 2, 3, 1)
    got = decode_images(policy, tokens, "truncate").numpy()
    assert (abs(got.astype(int) - want.astype(int)) <= 1).all()  # fp32 decoders differ in the last bit
    assert (got == want).mean() > 0.99
    rounded = decode_images(policy, tokens, "round").numpy()
    assert (rounded.astype(int) - got.astype(int)).mean() > 0.3  # rounding lifts half the levels by one
    assert RolloutConfig().pixel_rounding == "truncate"


def test_non_finite_logits_and_bad_ids_are_named(seed):
    p = JanusPolicy.from_preset("tiny", seed=seed % 997)
    with torch.no_grad():
        p.lm_head.weight[int(torch.randint(0, 256, ()))] = float("nan")  # every CoT row sees it
    with pytest.raises(FloatingPointError, match="non-finite logits in the CoT phase at CoT step 0"):
        RolloutEngine(p, max_new_tokens=4, **SHORT).generate(["a cat"], num_generations=2, seed=seed)
    p = JanusPolicy.from_preset("tiny", seed=seed % 997)
    with torch.no_grad():
        p.image_head_linear.bias[0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"image phase: first at image step 0, rows \[0, 1\]"):
        RolloutEngine(p, max_new_tokens=3, guidance_scale=3.0, **SHORT).generate(["a cat"], 2, seed=seed)
    p = JanusPolicy.from_preset("tiny", seed=1)
    with pytest.raises(ValueError, match="input_ids"):
        from fastbicot.rollout import generate_images

        generate_images(p, [[p.bos_token_id, 10**6, p.boi_token_id]])
