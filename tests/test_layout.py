"""GoT-R1 layout plans: the strict parser, box rendering on a blank canvas, IoU matching, the layout rewards
and the product ensemble, the added tokens -- each against hand-computed answers."""

import logging

import numpy as np
import pytest
import torch

from fastbicot.layout import (
    BOX_END,
    BOX_START,
    LAYOUT_TOKENS,
    OBJ_END,
    OBJ_START,
    LayoutError,
    LayoutObject,
    box_pixels,
    format_layout,
    iou,
    match_ious,
    parse_layout,
    render_layout,
    try_parse_layout,
)
from fastbicot.rewards import Detection, FunctionReward, RewardEnsemble
from fastbicot.rewards.layout import LayoutIoUReward, LayoutJudgeReward, SumReward

# gogoduan/GoT-R1 examples/GoT-R1-7B/.../reasoning_chain.txt, first sentence (the model's own output)
GOT_EXAMPLE = ("A <|obj_start|>vibrant still life painting<|obj_end|> <|box_start|>(0,60),(997,983)<|box_end|> "
               "showcases a <|obj_start|>bouquet of red tulips<|obj_end|> <|box_start|>(0,60),(698,780)<|box_end|> "
               "in a <|obj_start|>yellow vase<|obj_end|> <|box_start|>(65,488),(582,982)<|box_end|>, alongside.")


def test_parse_got_example():
    assert parse_layout(GOT_EXAMPLE) == [
        LayoutObject("vibrant still life painting", (0, 60, 997, 983)),
        LayoutObject("bouquet of red tulips", (0, 60, 698, 780)),
        LayoutObject("yellow vase", (65, 488, 582, 982)),
    ]


def test_parse_allows_whitespace_and_round_trips():
    objs = [LayoutObject("red square", (0, 375, 250, 625)), LayoutObject("a b", (1, 2, 3, 4))]
    spaced = f"{OBJ_START} red square {OBJ_END} {BOX_START} ( 0 , 375 ) , ( 250 , 625 ) {BOX_END}"
    assert parse_layout(spaced) == objs[:1]
    for space in (False, True):
        assert parse_layout(format_layout(objs, space=space)) == objs
    assert objs[0].norm_box() == (0.0, 0.375, 0.25, 0.625)


@pytest.mark.parametrize("text, reason", [
    ("a cat on a mat", "0 object span"),
    (f"{BOX_START}(1,2),(3,4){BOX_END}", "not inside an object span"),
    (f"{OBJ_START}cat{OBJ_END} and more", "not complete"),
    (f"{OBJ_START}cat{OBJ_END} {OBJ_START}dog{OBJ_END} {BOX_START}(1,2),(3,4){BOX_END}", "expected"),
    (f"{OBJ_START} {OBJ_END} {BOX_START}(1,2),(3,4){BOX_END}", "empty name"),
    (f"{OBJ_START}cat{OBJ_END} at {BOX_START}(1,2),(3,4){BOX_END}", "text between"),
    (f"{OBJ_START}cat{OBJ_END} {BOX_START}(1,2),(3){BOX_END}", "integer coordinates"),
    (f"{OBJ_START}cat{OBJ_END} {BOX_START}(1.5,2),(3,4){BOX_END}", "integer coordinates"),
    (f"{OBJ_START}cat{OBJ_END} {BOX_START}(-1,2),(3,4){BOX_END}", "integer coordinates"),
    (f"{OBJ_START}cat{OBJ_END} {BOX_START}(1,2),(3,1001){BOX_END}", "above 1000"),
    (f"{OBJ_START}cat{OBJ_END} {BOX_START}(5,2),(3,4){BOX_END}", "empty or inverted"),
    (f"{OBJ_START}cat{OBJ_END} {BOX_START}(1,2),(3,2){BOX_END}", "empty or inverted"),
    (f"{OBJ_START}cat{OBJ_END} {BOX_START}(1,2),(3,4){BOX_END} {BOX_END}", "not inside an object span"),
    (f"{OBJ_START}cat{OBJ_END} {BOX_START}(1,2),(3,4){BOX_END}{OBJ_END}", "not inside an object span"),
    (None, "not text"),
])
def test_parse_is_strict(text, reason):
    with pytest.raises(LayoutError, match=reason):
        parse_layout(text)
    objs, why = try_parse_layout(text)
    assert objs is None and reason in why


def test_box_pixels_and_render_by_hand():
    # edges at floor(v * size / 1000 + 0.5): x 100 -> 1, 450 -> 5; y 200 -> 2, 600 -> 6
    assert box_pixels((100, 200, 450, 600), 10, 10) == (2, 6, 1, 5)
    assert box_pixels((0, 0, 1, 1), 10, 10) == (0, 1, 0, 1)  # at least one pixel
    obj = LayoutObject("a", (100, 200, 450, 600))
    filled = render_layout([obj], 10, fill=True, color=lambda o, i: (9, 8, 7), background=(0, 0, 0))
    want = np.zeros((10, 10, 3), np.uint8)
    want[2:6, 1:5] = (9, 8, 7)
    np.testing.assert_array_equal(filled, want)
    outline = render_layout([obj], 10, line_width=1, color=lambda o, i: (9, 8, 7), background=(255, 255, 255))
    mask = np.zeros((10, 10), bool)
    mask[2, 1:5] = mask[5, 1:5] = mask[2:6, 1] = mask[2:6, 4] = True
    want = np.full((10, 10, 3), 255, np.uint8)
    want[mask] = (9, 8, 7)
    np.testing.assert_array_equal(outline, want)
    # later objects are drawn on top; a non-square canvas scales x and y separately
    # rows: y 400 -> 2, 1000 -> 4 (obj c); y 0 -> 0, 500 -> floor(2.5) = 2 (obj b, drawn over c's row 1.6 -> 2)
    two = render_layout([LayoutObject("c", (100, 400, 450, 1000)), LayoutObject("b", (0, 0, 1000, 500))], 4, 8,
                        fill=True, color=lambda o, i: (i + 1, 0, 0), background=(0, 0, 0))
    want = np.zeros((4, 8), np.uint8)
    want[2:4, 1:4] = 1  # x 100 -> floor(1.3) = 1, 450 -> floor(4.1) = 4
    want[0:2, :] = 2
    assert two.shape == (4, 8, 3)
    np.testing.assert_array_equal(two[..., 0], want)
    labelled = render_layout([obj], 64, labels=True)
    assert labelled.shape == (64, 64, 3) and labelled.dtype == np.uint8


def test_iou_and_matching_by_hand():
    assert iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    assert iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    assert iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0
    planned = [("cat", (0, 0, 2, 2)), ("cat", (10, 10, 12, 12)), ("dog", (0, 0, 1, 1))]
    grounded = [(" Cat", (1, 1, 3, 3)), ("cat", (10, 10, 12, 13))]
    assert match_ious(planned, grounded) == pytest.approx([1 / 7, 4 / 6, 0.0])
    # one-to-one, greedy by IoU: the exact match wins the grounded box, the other planned box gets nothing
    assert match_ious([("a", (0, 0, 4, 4)), ("a", (0, 0, 2, 2))], [("a", (0, 0, 2, 2))]) == [0.0, 1.0]


class StubDetector:
    def __init__(self, results):
        self.results, self.queries = results, None

    def __call__(self, images, queries):
        self.queries = queries
        return self.results[: len(queries)]


def _images(n, size=8):
    return torch.zeros(n, size, size, 3, dtype=torch.uint8)


def test_iou_reward_by_hand_and_malformed_plans(caplog):
    plan = format_layout([LayoutObject("cat", (0, 0, 500, 500)), LayoutObject("dog", (500, 500, 1000, 1000))])
    dets = [[Detection("cat", 0.9, (0.0, 0.0, 0.5, 0.25)), Detection("dog", 0.1, (0.5, 0.5, 1.0, 1.0))]]
    reward = LayoutIoUReward(StubDetector(dets), threshold=0.0)
    # cat: IoU 0.125 / 0.25 = 0.5; dog: 1.0 -> mean 0.75
    assert reward(_images(1), ["p"], cots=[plan]).tolist() == pytest.approx([0.75])
    assert reward.detector.queries == [["cat", "dog"]]
    strict = LayoutIoUReward(StubDetector(dets), threshold=0.5)  # the dog's detection is below 0.5
    assert strict(_images(1), ["p"], cots=[plan]).tolist() == pytest.approx([0.25])
    with caplog.at_level(logging.WARNING, logger="fastbicot.rewards.layout"):
        out = reward(_images(3), ["p0", "p1", "p2"], cots=["no plan", plan, f"{OBJ_START}x{OBJ_END}"])
    assert out.tolist() == pytest.approx([0.0, 0.75, 0.0])
    assert reward.parts["malformed"].tolist() == [1.0, 0.0, 1.0]
    assert [i for i, _ in reward.last_malformed] == [0, 2]
    assert "2 of 3 plans are malformed" in caplog.text and "'p0'" in caplog.text


def test_iou_reward_unjudged_image_is_an_error_or_the_fallback():
    plan = format_layout([LayoutObject("cat", (0, 0, 500, 500))])
    with pytest.raises(Exception, match="could not judge"):
        LayoutIoUReward(StubDetector([None]))(_images(1), ["p"], cots=[plan])
    fb = LayoutIoUReward(StubDetector([None]), fallback=0.25)
    assert fb(_images(1), ["p"], cots=[plan]).tolist() == [0.25] and fb.num_fallbacks == 1


def test_judge_sees_the_canvas_and_product_ensemble_by_hand():
    seen = {}

    def judge_fn(images, prompts, metadata, cots):
        seen["images"] = images.clone()
        return images[..., 0].float().mean((1, 2)) / 255  # fraction of red on the canvas

    obj = LayoutObject("a", (0, 0, 500, 1000))
    plan = format_layout([obj])
    spa = LayoutJudgeReward(FunctionReward("red", judge_fn), "spa", fill=True, labels=False,
                            color=lambda o, i: (255, 0, 0), background=(0, 0, 0))
    sem = FunctionReward("sem", lambda im, p, m, c: torch.tensor([0.25, 0.5]))
    pi = FunctionReward("pi", lambda im, p, m, c: torch.tensor([0.5, 0.8]))
    ri = LayoutIoUReward(StubDetector([[Detection("a", 1.0, (0.0, 0.0, 0.5, 0.5))]] * 2))
    ens = RewardEnsemble([pi, SumReward("plan", [sem, spa]), ri], mode="product")
    out = ens(_images(2, 4), ["p", "q"], cots=[plan, "not a plan"])
    np.testing.assert_array_equal(seen["images"][0].numpy(), render_layout([obj], 4, fill=True,
                                  color=lambda o, i: (255, 0, 0), background=(0, 0, 0)))
    # sample 0: spa = 0.5 (left half red), ri = IoU((0,0,.5,1), (0,0,.5,.5)) = 0.5; total 0.5 * (0.25 + 0.5) * 0.5
    # sample 1: malformed -> spa = ri = 0 -> total 0 (no exception)
    assert out.total.tolist() == pytest.approx([0.5 * 0.75 * 0.5, 0.0])
    assert out.components["plan"].tolist() == pytest.approx([0.75, 0.5])
    assert out.components["plan/spa"].tolist() == pytest.approx([0.5, 0.0])
    assert out.components["plan/spa/malformed"].tolist() == [0.0, 1.0]
    assert out.components["ri/malformed"].tolist() == [0.0, 1.0]


def test_add_text_tokens_resizes_with_mean_rows(tmp_path):
    from fastbicot.models import JanusPolicy
    from fastbicot.models.added_tokens import add_text_tokens
    from fastbicot.toy import build_policy
    from fastbicot.trainer.trainer import save_policy

    policy = build_policy(seed=0, dtype=torch.float64)
    n = policy.text_vocab_size
    emb = policy.embed_text(torch.arange(n)).clone()
    head = policy.lm_head.weight.detach().clone()
    ids = add_text_tokens(policy, LAYOUT_TOKENS)
    assert ids == list(range(n, n + 4)) and policy.text_vocab_size == n + 4
    assert policy.hf_model.config.text_config.vocab_size == n + 4
    new_emb = policy.embed_text(torch.arange(n + 4)).detach()
    torch.testing.assert_close(new_emb[:n], emb, rtol=0, atol=0)
    for i in range(4):
        torch.testing.assert_close(new_emb[n + i], emb.mean(0))
        torch.testing.assert_close(policy.lm_head.weight[n + i].detach(), head.mean(0))
    # the markers decode as themselves with special tokens skipped (the rewards read them)
    text = f"{OBJ_START} red square {OBJ_END}"
    assert policy.tokenizer.decode(policy.tokenizer.encode(text, add_special_tokens=False),
                                   skip_special_tokens=True) == text
    assert add_text_tokens(policy, LAYOUT_TOKENS) == ids  # idempotent
    save_policy(policy, str(tmp_path))
    loaded = JanusPolicy.from_pretrained(str(tmp_path), dtype=torch.float64)
    assert loaded.text_vocab_size == n + 4 and loaded.tokenizer.convert_tokens_to_ids(list(LAYOUT_TOKENS)) == ids
