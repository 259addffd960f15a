"""The CoT and image-step prompts against the T2I-R1 seed's exact strings (CaraJ7/T2I-R1 @ 2d9d4d1).

The seed strings below are written out by hand from the seed files (file:line in the comments); the
seed's conversation code is re-stated in ``seed_sft_format`` to check random prompts and CoTs.
"""

import random

import pytest

from fastbicot.rollout.templates import (
    COT_TEMPLATE,
    IMAGE_TEMPLATE_HEAD,
    IMAGE_TEMPLATE_TAIL,
    INSTRUCTION,
    SYSTEM_PROMPT,
    cot_prompt,
    image_prompt,
    render_conversation,
)

# data/prompt/reasoning_prompt.txt (626 bytes, no trailing newline, the last line ends with one space)
SEED_REASONING_PROMPT = (
    'You are asked to generate an image based on this prompt: "{}"\n'
    "Provide a brief, precise visualization of all elements in the prompt. Your description should:\n"
    "1. Include every object mentioned in the prompt\n"
    "2. Specify visual attributes (color, number, shape, texture) if specified in the prompt\n"
    "3. Clarify relationships (e.g., spatial) between objects if specified in the prompt\n"
    "4. Be concise (50 words or less)\n"
    "5. Focus only on what's explicitly stated in the prompt\n"
    "6. Do not elaborate beyond the attributes or relationships specified in the prompt\n"
    "Do not miss objects. Output your visualization directly without explanation: "
)
# src/t2i-r1/src/open_r1/trainer/grpo_trainer.py:432
SEED_SYSTEM = "You are a helpful assistant that receives an image prompt and generate a visualization of the prompt."


def seed_sft_format(conversations, system_prompt):
    """processing_vlm.py:171-175 over conversation.py:78-91 (SeparatorStyle.DeepSeek, sep "\\n\\n",
    sep2 "<｜end▁of▁sentence｜>"), restated line by line."""
    messages = [[m["role"], m["content"].strip()] for m in conversations]  # processing_vlm.py:173-174
    seps = ["\n\n", "<｜end▁of▁sentence｜>"]
    if system_prompt == "" or system_prompt is None:
        ret = ""
    else:
        ret = system_prompt + seps[0]
    for i, (role, message) in enumerate(messages):
        if message:
            ret += role + ": " + message + seps[i % 2]
        else:
            ret += role + ":"
    return ret.strip()  # processing_vlm.py:175


def seed_cot_text(prompt):
    # grpo.py:136-140 and grpo_trainer.py:428-433
    conv = [{"role": "User", "content": SEED_REASONING_PROMPT.format(prompt)}, {"role": "Assistant", "content": ""}]
    return seed_sft_format(conv, SEED_SYSTEM)


def seed_image_text(raw_prompt, answer):
    # grpo_trainer.py:543-558 (answer = tokenizer.decode(completion_ids, skip_special_tokens=True))
    image_gen_prompt = f"{raw_prompt}. {answer}"
    conv = [{"role": "User", "content": image_gen_prompt}, {"role": "Assistant", "content": ""}]
    return seed_sft_format(conv, "")


def test_instruction_is_the_seed_file_byte_for_byte():
    assert INSTRUCTION.replace("{prompt}", "{}") == SEED_REASONING_PROMPT
    assert len(SEED_REASONING_PROMPT.encode()) == 626
    assert INSTRUCTION.count("{prompt}") == 1 and INSTRUCTION.endswith("explanation: ")
    assert SYSTEM_PROMPT == SEED_SYSTEM


def test_cot_prompt_pinned_string():
    # the full CoT text for one prompt, written out (774 characters in the seed; BOS comes from the tokenizer)
    expected = (
        "You are a helpful assistant that receives an image prompt and generate a visualization of the prompt."
        "\n\nUser: "
        'You are asked to generate an image based on this prompt: "a photo of a car below a zebra"\n'
        "Provide a brief, precise visualization of all elements in the prompt. Your description should:\n"
        "1. Include every object mentioned in the prompt\n"
        "2. Specify visual attributes (color, number, shape, texture) if specified in the prompt\n"
        "3. Clarify relationships (e.g., spatial) between objects if specified in the prompt\n"
        "4. Be concise (50 words or less)\n"
        "5. Focus only on what's explicitly stated in the prompt\n"
        "6. Do not elaborate beyond the attributes or relationships specified in the prompt\n"
        "Do not miss objects. Output your visualization directly without explanation:"
        "\n\nAssistant:"
    )
    got = cot_prompt("a photo of a car below a zebra")
    assert got == expected == seed_cot_text("a photo of a car below a zebra")
    assert len(got) == 774


def test_image_prompt_pinned_strings():
    # grpo_trainer.py:545 f"{raw_prompt}. {answer}", system prompt "" (:557), strips (processing_vlm.py:174-175)
    assert image_prompt("a red car", "A shiny red car.") == "User: a red car. A shiny red car.\n\nAssistant:"
    assert image_prompt("a red car", "") == "User: a red car.\n\nAssistant:"  # empty CoT: no trailing space
    assert image_prompt("a red car", "  A car.  \n") == "User: a red car.   A car.\n\nAssistant:"
    assert image_prompt("  a red car", "x") == "User: a red car. x\n\nAssistant:"
    assert image_prompt("a red car", " \n\t") == "User: a red car.\n\nAssistant:"
    head, tail = IMAGE_TEMPLATE_HEAD.format(prompt="a red car"), IMAGE_TEMPLATE_TAIL
    assert image_prompt("a red car", "plan") == head + "plan" + tail  # the splice pieces around a clean CoT


def _random_text(rng, n, alphabet):
    return "".join(rng.choice(alphabet) for _ in range(n))


ALPHABET = list("abcXYZ .,:;'\"{}()[]é漢-\n\t  ") + ["<｜end▁of▁sentence｜>", "{prompt}", "{}", "\\n"]


def test_random_prompts_and_cots_match_the_seed(seed):
    rng = random.Random(seed)
    for _ in range(300):
        prompt = _random_text(rng, rng.randint(0, 40), ALPHABET)
        cot = _random_text(rng, rng.choice([0, 0, 1, 3, 60]), ALPHABET)
        assert cot_prompt(prompt) == seed_cot_text(prompt), (prompt,)
        assert image_prompt(prompt, cot) == seed_image_text(prompt, cot), (prompt, cot)


def test_custom_system_and_instruction(seed):
    rng = random.Random(seed)
    for system in ("", "  ", "sys  ", "\n sys"):
        for instruction in ("{prompt}", "  ", "Draw {prompt} now:  ", "   {prompt}"):
            prompt = _random_text(rng, rng.randint(0, 12), ALPHABET)
            conv = [{"role": "User", "content": instruction.format(prompt=prompt)}, {"role": "Assistant", "content": ""}]
            assert cot_prompt(prompt, system=system, instruction=instruction) == seed_sft_format(conv, system)
    assert cot_prompt("p", system="") == render_conversation("", INSTRUCTION.format(prompt="p"))
    assert cot_prompt("p", system="").startswith("User: You are asked")
    assert render_conversation("", "   ") == "User:Assistant:"  # the seed's rendering of an empty User turn
    # a custom template is formatted as given (no seed strips)
    assert cot_prompt("p", template="<{system}|{instruction}>", system="s", instruction="i {prompt} ") == "<s|i p >"
    assert COT_TEMPLATE.format(system="s", instruction="i") == "s\n\nUser: i\n\nAssistant:"


def test_type_errors():
    with pytest.raises(TypeError, match="prompt must be a str"):
        cot_prompt(None)
    with pytest.raises(TypeError, match="must be str"):
        image_prompt("p", [1, 2])


# ----------------------------------------------------------------------------- the seed's image loop baseline


def test_t2i_r1_loop_uncond_row_attends_to_all_its_pads(seed):
    """baselines.t2i_r1_generate_images vs the seed's construction (grpo_trainer.py:563-601), recomputed
    here without a KV cache: conditional rows right-padded (pads masked) with BOI after the padding; the
    unconditional row is BOS + pads + BOI with an all-ones mask (``attention_mask_img[1::2] = 1``, :601)."""
    import torch

    from fastbicot.models import JanusPolicy
    from fastbicot.rollout.baselines import t2i_r1_generate_images

    policy = JanusPolicy.from_preset("tiny", seed=seed % 1000, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    lengths = (3, 9, 5)
    rows = [[policy.bos_token_id] + torch.randint(0, 200, (n - 2,), generator=gen).tolist() + [policy.boi_token_id]
            for n in lengths]
    steps = 3
    out = t2i_r1_generate_images(policy, rows, guidance_scale=5.0, temperature=0)
    assert out.shape == (len(rows), policy.num_image_tokens)
    L, pad, lm = max(lengths), policy.pad_token_id, policy.language_model
    for i, s in enumerate(rows):
        cond = s[:-1] + [pad] * (L - len(s)) + [s[-1]]
        cond_mask = [1] * (len(s) - 1) + [0] * (L - len(s)) + [1]
        uncond = [s[0]] + [pad] * (L - 2) + [s[-1]]
        embeds = lm.embed_tokens(torch.tensor([cond, uncond]))
        mask = torch.tensor([cond_mask, [1] * L])
        for k in range(steps):
            with torch.no_grad():
                h = lm(inputs_embeds=embeds, attention_mask=mask).last_hidden_state[:, -1]
                logits = policy.image_logits(h)
            tok = int((logits[1] + 5.0 * (logits[0] - logits[1])).argmax())
            assert tok == int(out[i, k]), (i, k)
            embeds = torch.cat([embeds, policy.embed_image(torch.tensor([tok, tok]))[:, None]], 1)
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
