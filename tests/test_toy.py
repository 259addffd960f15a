"""The embedded toy world (fastbicot.toy): tokenizer, policy, codebook, prompts, rewards, SFT data."""

import json
import random
from collections import deque

import numpy as np
import pytest
import torch

from fastbicot.data import load_prompts
from fastbicot.rewards import RELATIONS, RewardError
from fastbicot.rollout.templates import IMAGE_TEMPLATE_HEAD, IMAGE_TEMPLATE_TAIL, cot_prompt
from fastbicot.toy import (
    BACKGROUND,
    CODE_CLASS,
    COLOR_CODES,
    COLORS,
    NUM_CODES,
    PALETTE,
    TOY_INSTRUCTION,
    TOY_ROLLOUT,
    TOY_SYSTEM,
    TOY_TEMPLATE,
    WORDS,
    ToyObject,
    background_code,
    build_policy,
    build_tokenizer,
    find_objects,
    make_prompts,
    parse_plan,
    plan_text,
    render_tokens,
    sft_examples,
    toy_reward_ensemble,
    toy_rewards,
    write_prompts,
    write_sft_jsonl,
)
from fastbicot.toy.rewards import label_components
from fastbicot.vq import vq_decode


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def policy():
    return build_policy(seed=0)


def meta_of(record):
    return {k: v for k, v in record.items() if k != "prompt"}


# ---- tokenizer ---------------------------------------------------------------------------------


def test_vocabulary_covers_prompts_plans_and_templates(tok, seed):
    unk = tok.unk_token_id
    texts = [TOY_SYSTEM, IMAGE_TEMPLATE_TAIL]
    for ex in sft_examples(200, seed, error_rate=0.5):
        texts.append(cot_prompt(ex["prompt"], TOY_TEMPLATE, TOY_SYSTEM, TOY_INSTRUCTION))
        texts.append(IMAGE_TEMPLATE_HEAD.format(prompt=ex["prompt"]) + ex["cot"] + IMAGE_TEMPLATE_TAIL)
    for t in texts:
        ids = tok.encode(t, add_special_tokens=False)
        assert unk not in ids, (t, tok.convert_ids_to_tokens(ids))
    assert tok.encode("a zebra", add_special_tokens=False)[-1] == unk


def test_round_trip_of_ids_for_any_vocabulary_text(tok, seed):
    rng = random.Random(seed)
    seps = [" ", "  ", "\n", "\n\n", "\t", ""]
    words = list(WORDS) + ["<eos>", "<unk>", "<begin_of_image>", "<pad>"]
    for _ in range(200):
        parts = []
        for _ in range(rng.randint(0, 30)):
            w = rng.choice(words)
            parts.append(w.upper() if rng.random() < 0.1 and w in WORDS else w)
            # punctuation may glue to words; words need a separator between them
            parts.append(rng.choice(seps if w in ".,:" else seps[:-1]))
        text = "".join(parts)
        ids = tok.encode(text, add_special_tokens=False)
        assert len(ids) == sum(1 for p in parts[::2])
        assert tok.encode(tok.decode(ids), add_special_tokens=False) == ids


def test_special_tokens(tok, policy):
    ids = tok.encode("a red square", add_special_tokens=False)
    specials = [policy.bos_token_id, policy.boi_token_id, policy.eos_token_id, policy.pad_token_id, tok.unk_token_id]
    assert len(set(specials)) == 5
    assert tok.decode(specials[:2] + ids + specials[2:], skip_special_tokens=True) == "a red square"
    assert tok.convert_tokens_to_ids("<begin_of_image>") == policy.boi_token_id
    assert tok.convert_tokens_to_ids("<end_of_image>") not in specials
    assert tok.convert_tokens_to_ids("<image_placeholder>") == policy.config.image_token_id


def test_policy_saves_and_loads_in_transformers_format(tmp_path):
    from fastbicot.models import JanusPolicy

    policy = build_policy(seed=3)
    policy.hf_model.save_pretrained(tmp_path)
    policy.tokenizer.save_pretrained(tmp_path)
    loaded = JanusPolicy.from_pretrained(tmp_path, dtype=torch.float32)
    ids = ("bos", "eos", "pad", "boi")
    assert [getattr(loaded, f"{k}_token_id") for k in ids] == [getattr(policy, f"{k}_token_id") for k in ids]
    text = "User: a red square. red square at top left\n\nAssistant:"
    assert loaded.tokenizer.encode(text, add_special_tokens=False) == policy.tokenizer.encode(
        text, add_special_tokens=False
    )
    for (name, a), b in zip(policy.named_parameters(), loaded.parameters()):
        assert torch.equal(a, b), name


# ---- policy and codebook -----------------------------------------------------------------------


def test_policy_shapes_and_determinism(policy):
    assert policy.num_image_tokens == 64 and policy.image_grid == 8
    assert policy.image_vocab_size == NUM_CODES == len(COLORS) + 64
    assert [CODE_CLASS[COLOR_CODES[c]] for c in COLORS] == list(range(1, len(PALETTE)))
    assert {CODE_CLASS[background_code(p)] for p in range(64)} == {0}
    # the image-token input embedding tells every code apart (colour, and position of background codes)
    table = policy.hf_model.model.generation_embeddings.weight
    assert torch.cdist(table, table).add(torch.eye(NUM_CODES) * 9).min() > 0.3
    assert policy.text_vocab_size == len(policy.tokenizer)
    state = torch.get_rng_state()
    again = build_policy(seed=0)
    assert torch.equal(torch.get_rng_state(), state)  # building does not consume the caller's randomness
    other = build_policy(seed=1)
    for (name, a), b, c in zip(policy.named_parameters(), again.parameters(), other.parameters()):
        assert torch.equal(a, b), name
    w = policy.language_model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(w, other.language_model.layers[0].self_attn.q_proj.weight)


def expected_pixels(tokens, ppt):
    """Independent reference: each token's palette colour repeated over a ppt x ppt patch."""
    pal = np.array(PALETTE, dtype=np.int32)[list(CODE_CLASS)]  # code -> RGB
    grid = pal[tokens.numpy().reshape(-1, 8, 8)]
    return grid.repeat(ppt, axis=1).repeat(ppt, axis=2)


@pytest.mark.parametrize("ppt", [1, 2, 4])
def test_codes_decode_to_flat_palette_patches(seed, ppt):
    policy = build_policy(seed=seed % 1000, pixels_per_token=ppt)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, NUM_CODES, (6, 64), generator=gen)
    tokens[0] = background_code(5)  # all background
    tokens[1] = COLOR_CODES["orange"]  # one colour everywhere
    tokens[2, ::2] = torch.randint(0, len(COLORS), (32,), generator=gen)  # colours at every other token
    img = vq_decode(policy.vqmodel, tokens, output="uint8")
    assert img.dtype == torch.uint8 and img.shape == (6, 8 * ppt, 8 * ppt, 3)
    ref = expected_pixels(tokens, ppt)
    assert np.abs(img.numpy().astype(np.int32) - ref).max() <= 2
    # transformers' own decoder gives the same colours (the weights, not fastbicot's fused ops, do it)
    with torch.no_grad():
        hf = ((policy.vqmodel.decode(tokens).clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1)
    assert np.abs(hf.numpy().astype(np.int32) - ref).max() <= 2


def test_token_colour_does_not_depend_on_neighbours(policy, seed):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, NUM_CODES, (1, 64), generator=gen).repeat(8, 1)
    keep = torch.randint(0, 64, (1,), generator=gen).item()
    noise = torch.randint(0, NUM_CODES, (8, 64), generator=gen)
    noise[:, keep] = tokens[0, keep]
    img = vq_decode(policy.vqmodel, noise, output="uint8").int()
    r, c = divmod(keep, 8)
    patch = img[:, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2]
    assert (patch - patch[0]).abs().max() <= 1


def test_bfloat16_policy_decodes_close_to_palette(seed):
    policy = build_policy(seed=0, dtype=torch.bfloat16)
    tokens = torch.randint(0, NUM_CODES, (3, 64), generator=torch.Generator().manual_seed(seed))
    img = vq_decode(policy.vqmodel, tokens, output="uint8")
    assert np.abs(img.numpy().astype(np.int32) - expected_pixels(tokens, 2)).max() <= 6


# ---- prompts -----------------------------------------------------------------------------------


def test_prompts_are_t2i_compbench_records(tmp_path, seed):
    records = make_prompts(60, seed)
    assert records == make_prompts(60, seed)
    assert [r["task_type"] for r in records[:3]] == ["color", "numeracy", "spatial"]
    path = write_prompts(tmp_path / "sub" / "toy.jsonl", 60, seed)
    loaded = load_prompts(path)
    assert [(r.prompt, r.metadata) for r in loaded] == [(r["prompt"], meta_of(r)) for r in records]
    for r in records:
        assert r["numeracy_info"] and r["attr_nouns"]
        for item in r["numeracy_info"]:
            assert 1 <= item["num"] <= 4 and item["obj_name"] in r["attr_nouns"]
        if r["task_type"] == "spatial":
            assert r["spatial_info"]["locality"] in RELATIONS
            assert r["spatial_info"]["obj1"] != r["spatial_info"]["obj2"]
    assert make_prompts(0, seed) == []
    with pytest.raises(ValueError, match="task_type"):
        make_prompts(3, seed, task_types=("shape",))


# ---- rewards on hand-drawn images ----------------------------------------------------------------


def canvas(h=16, w=16):
    img = np.zeros((h, w, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    return img


def draw(img, color, y, x, size=4):
    img[y : y + size, x : x + size] = COLORS[color]
    return img


def score(images, records):
    ens = toy_reward_ensemble()
    out = ens(torch.from_numpy(np.stack(images)), [r["prompt"] for r in records], [meta_of(r) for r in records])
    return {k: v.tolist() for k, v in out.components.items()}


SPATIAL = {
    "prompt": "a red square on the left of a green square",
    "task_type": "spatial",
    "attr_nouns": ["red square", "green square"],
    "spatial_info": {"obj1": "red square", "obj2": "green square", "locality": "on the left of"},
    "numeracy_info": [{"obj_name": "red square", "num": 1}, {"obj_name": "green square", "num": 1}],
}
TWO_BLUE = {
    "prompt": "two blue squares",
    "task_type": "numeracy",
    "attr_nouns": ["blue square"],
    "numeracy_info": [{"obj_name": "blue square", "num": 2}],
}


def test_rewards_on_hand_drawn_images():
    left_right = draw(draw(canvas(), "red", 6, 1), "green", 6, 11)
    swapped = draw(draw(canvas(), "green", 6, 1), "red", 6, 11)
    only_red = draw(canvas(), "red", 6, 1)
    s = score([left_right, swapped, only_red, canvas()], [SPATIAL] * 4)
    assert s["toy_color"] == [1.0, 1.0, 0.5, 0.0]
    assert s["toy_count"] == [1.0, 1.0, 0.5, 0.0]
    assert s["toy_spatial"] == [1.0, 0.0, 0.0, 0.0]

    two = draw(draw(canvas(), "blue", 0, 0), "blue", 10, 10)
    touching = draw(draw(canvas(), "blue", 0, 0), "blue", 0, 4)  # one 4x8 blob: one object
    diagonal = draw(draw(canvas(), "blue", 0, 0), "blue", 4, 4)  # corners touch: 4-connectivity says two
    three = draw(two.copy(), "blue", 0, 10)
    with_red = draw(two.copy(), "red", 10, 0)
    s = score([two, touching, diagonal, three, with_red], [TWO_BLUE] * 5)
    assert s["toy_count"] == [1.0, 0.5, 1.0, pytest.approx(2 / 3), 1.0]
    assert s["toy_color"] == [1.0, 1.0, 1.0, 1.0, pytest.approx(2 / 3)]
    assert s["toy_spatial"] == [1.0] * 5  # no relation asked


def test_rewards_any_image_size_and_off_palette_pixels(seed):
    rng = np.random.default_rng(seed)
    img = canvas(37, 23)
    draw(img, "yellow", 30, 2, size=5)  # bottom left
    draw(img, "purple", 2, 15, size=6)  # top right
    # grey noise is far from every palette colour: background
    noise = rng.random((37, 23)) < 0.3
    img[noise & (img.sum(-1) == 0)] = (128, 128, 128)
    rec = {
        "prompt": "a yellow square below a purple square",
        "task_type": "spatial",
        "attr_nouns": ["yellow square", "purple square"],
        "spatial_info": {"obj1": "yellow square", "obj2": "purple square", "locality": "below"},
        "numeracy_info": [{"obj_name": "yellow square", "num": 1}, {"obj_name": "purple square", "num": 1}],
    }
    s = score([img], [rec])
    assert s == {"toy_color": [1.0], "toy_count": [1.0], "toy_spatial": [1.0]}
    objs = find_objects(img[None])[0]
    assert sorted((o.color, o.area) for o in objs) == [("purple", 36), ("yellow", 25)]


def bfs_labels(classes):
    """Independent reference: plain BFS over 4-neighbours of equal non-zero class."""
    h, w = classes.shape
    lab = -np.ones((h, w), dtype=np.int64)
    for y in range(h):
        for x in range(w):
            if classes[y, x] == 0 or lab[y, x] >= 0:
                continue
            q = deque([(y, x)])
            lab[y, x] = y * w + x
            while q:
                cy, cx = q.popleft()
                for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                    if 0 <= ny < h and 0 <= nx < w and lab[ny, nx] < 0 and classes[ny, nx] == classes[y, x]:
                        lab[ny, nx] = y * w + x
                        q.append((ny, nx))
    return lab


def test_connected_components_match_bfs(seed):
    rng = np.random.default_rng(seed)
    for h, w, k in [(16, 16, 3), (7, 19, 2), (1, 9, 4), (20, 3, 8)]:
        classes = rng.integers(0, k, size=(3, h, w))
        classes[1] = np.where(rng.random((h, w)) < 0.7, classes[1], 0)
        np.testing.assert_array_equal(label_components(classes), np.stack([bfs_labels(c) for c in classes]))
    snake = np.zeros((1, 9, 9), dtype=np.int64)  # a long serpentine component (many propagation steps)
    snake[0, ::2, :] = 1
    snake[0, 1::4, -1] = 1
    snake[0, 3::4, 0] = 1
    assert len(np.unique(label_components(snake))) == 2


def test_reward_errors_name_reward_prompt_and_field():
    img = torch.from_numpy(canvas()[None])
    color, count, spatial = toy_rewards()
    with pytest.raises(RewardError, match=r"toy_color.*attr_nouns.*a red square"):
        color(img, ["a red square"], [{"task_type": "color"}])
    with pytest.raises(RewardError, match=r"toy_color.*'a red square'.*attr_nouns.*fluffy dog"):
        color(img, ["a red square"], [{"attr_nouns": ["fluffy dog"]}])
    with pytest.raises(RewardError, match=r"toy_count.*numeracy_info"):
        count(img, ["two cats"], [{"numeracy_info": [{"obj_name": "red square", "num": -1}]}])
    with pytest.raises(RewardError, match=r"toy_spatial.*spatial_info.*x"):
        spatial(img, ["x"], [{"task_type": "spatial"}])
    bad = dict(SPATIAL["spatial_info"], locality="inside")
    with pytest.raises(RewardError, match=r"toy_spatial.*unknown spatial relation"):
        spatial(img, ["x"], [{"spatial_info": bad}])
    assert spatial(img, ["x"], [{"task_type": "color"}]).tolist() == [1.0]
    assert color(img[:0], [], []).shape == (0,)


# ---- SFT data ------------------------------------------------------------------------------------


def decode_tokens(policy, token_lists):
    return vq_decode(policy.vqmodel, torch.tensor(token_lists), output="uint8")


def test_correct_sft_examples_score_full_reward(policy, seed):
    exs = sft_examples(90, seed, error_rate=0.0)
    assert all(ex["mistake"] is None for ex in exs)
    for ex in exs:
        assert render_tokens(parse_plan(ex["cot"])) == ex["image_tokens"]
    s = score(decode_tokens(policy, [ex["image_tokens"] for ex in exs]).numpy(), exs_as_records(exs))
    assert all(v == [1.0] * len(exs) for v in s.values()), s


def exs_as_records(exs):
    return [{"prompt": ex["prompt"], **ex["metadata"]} for ex in exs]


def test_mistaken_sft_examples_lose_reward(policy, seed):
    exs = sft_examples(120, seed, error_rate=1.0)
    s = score(decode_tokens(policy, [ex["image_tokens"] for ex in exs]).numpy(), exs_as_records(exs))
    kinds = set()
    for i, ex in enumerate(exs):
        kind, level = ex["mistake"].split(":")
        kinds.add(ex["mistake"])
        got = {k: v[i] for k, v in s.items()}
        assert got["toy_" + {"color": "color", "count": "count", "position": "spatial"}[kind]] < 1.0, (ex, got)
        plan_img = render_tokens(parse_plan(ex["cot"]))
        assert (plan_img == ex["image_tokens"]) == (level == "plan")
    assert len(kinds) == 6
    rate = sum(ex["mistake"] is not None for ex in sft_examples(400, seed, error_rate=0.25)) / 400
    assert 0.15 < rate < 0.35
    with pytest.raises(ValueError, match="numeracy_info"):
        sft_examples(1, seed, prompts=[{"prompt": "a photo of two apples", "task_type": "numeracy"}])
    with pytest.raises(ValueError, match="toy colour"):
        sft_examples(1, seed, prompts=[{"prompt": "two apples", "attr_nouns": ["apple"],
                                        "numeracy_info": [{"obj_name": "apple", "num": 2}]}])


def test_write_sft_jsonl(tmp_path, seed):
    path = write_sft_jsonl(tmp_path / "sft.jsonl", 10, seed, error_rate=0.5)
    with open(path, encoding="utf-8") as f:
        lines = [json.loads(x) for x in f]
    assert lines == sft_examples(10, seed, error_rate=0.5)
    assert all(len(x["image_tokens"]) == 64 and set(x) >= {"prompt", "cot", "image_tokens", "metadata"} for x in lines)


def test_plan_text_round_trip_and_errors():
    objs = [ToyObject("orange", 0, 2), ToyObject("white", 2, 1)]
    tokens = render_tokens(objs)
    orange, white = COLOR_CODES["orange"], COLOR_CODES["white"]
    assert [i for i, t in enumerate(tokens) if t == orange] == [6, 7, 14, 15]
    assert [i for i, t in enumerate(tokens) if t == white] == [51, 52, 59, 60]
    assert all(t == background_code(i) for i, t in enumerate(tokens) if t not in (orange, white))
    assert plan_text(objs) == "orange square at top right . white square at bottom center"
    assert parse_plan(plan_text(objs)) == objs
    assert parse_plan("") == []
    with pytest.raises(ValueError, match="plan clause"):
        parse_plan("red circle at top left")
    with pytest.raises(ValueError, match="two objects"):
        render_tokens([ToyObject("red", 0, 0), ToyObject("blue", 0, 0)])


# ---- the world end to end through the public rollout engine --------------------------------------


def test_rollout_engine_runs_on_the_toy_policy(policy, seed):
    from fastbicot.rollout import RolloutEngine

    records = make_prompts(2, seed)
    eng = RolloutEngine(policy, **{**TOY_ROLLOUT, "max_new_tokens": 6, "guidance_scale": 3.0})  # CFG rows too
    batch = eng.generate([r["prompt"] for r in records], num_generations=2, seed=seed)
    assert batch.images.shape == (4, 16, 16, 3) and batch.images.dtype == torch.uint8
    out = toy_reward_ensemble()(
        batch.images, [s.prompt for s in batch.samples], [meta_of(records[s.prompt_index]) for s in batch.samples]
    )
    assert out.total.shape == (4,) and ((out.total >= 0) & (out.total <= 3)).all()
