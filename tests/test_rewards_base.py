"""Reward protocol: input/output validation, fallback, FunctionReward, RewardEnsemble."""

import random

import numpy as np
import pytest
import torch

from fastbicot.data import PromptRecord
from fastbicot.rewards import FunctionReward, Reward, RewardEnsemble, RewardError, require_field
from fastbicot.rewards.base import group_ids_from


def _images(n, h=5, w=7):
    return torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8)


class Const(Reward):
    """Scores with a fixed tensor, so tests control exactly what score() returns."""

    def __init__(self, name, values, **kw):
        super().__init__(name, **kw)
        self.values = values

    def score(self, images, prompts, metadata, cots):
        return self.values


def _mean_brightness(images, prompts, metadata, cots):
    return images.double().mean(dim=(1, 2, 3)) / 255.0


def test_function_reward_batched_and_per_sample(seed):
    n = 5
    images = _images(n, 3, 11)
    ref = [float(np.asarray(images[i], dtype=np.float64).mean() / 255.0) for i in range(n)]
    batched = FunctionReward("bright", _mean_brightness)(images, ["p"] * n)
    per_sample = FunctionReward(
        "bright", lambda im, p, m, c: im.double().mean().item() / 255.0, batched=False
    )(images.numpy(), ["p"] * n)
    for out in (batched, per_sample):
        assert out.dtype == torch.float32 and out.shape == (n,)
        torch.testing.assert_close(out.double(), torch.tensor(ref, dtype=torch.float64), atol=1e-6, rtol=0)


def test_metadata_and_cots_are_passed_through():
    seen = {}

    def fn(images, prompts, metadata, cots):
        seen.update(prompts=prompts, metadata=metadata, cots=cots)
        return [len(c) for c in cots]

    r = FunctionReward("f", fn)
    out = r(_images(2), ["a", "b"], [{"nouns": ["x"]}, {}], ["plan one", ""])
    assert out.tolist() == [8.0, 0.0]
    assert seen["metadata"] == [{"nouns": ["x"]}, {}]
    r(_images(2), ["a", "b"])  # defaults: {} metadata and "" CoTs
    assert seen["metadata"] == [{}, {}] and seen["cots"] == ["", ""]


@pytest.mark.parametrize(
    "images, match",
    [
        (torch.zeros(2, 4, 4, 3), "uint8"),
        (torch.zeros(2, 3, 4, 4, dtype=torch.uint8), "channels-first"),
        (torch.zeros(4, 4, 3, dtype=torch.uint8), r"\[N, H, W, 3\]"),
        (torch.zeros(2, 4, 4, 4, dtype=torch.uint8), r"\[N, H, W, 3\]"),
        ([[0]], "uint8 tensor"),
    ],
)
def test_bad_images_name_the_reward(images, match):
    r = Const("my_reward", [0.0, 0.0])
    with pytest.raises(RewardError, match="my_reward") as e:
        r(images, ["a", "b"])
    assert e.match(match)


def test_length_mismatch_and_bad_metadata():
    r = Const("lens", [0.0, 0.0])
    with pytest.raises(RewardError, match="lens.*2 images but 3 prompts"):
        r(_images(2), ["a", "b", "c"])
    with pytest.raises(RewardError, match="2 images but 1 CoTs"):
        r(_images(2), ["a", "b"], None, ["x"])
    with pytest.raises(RewardError, match="prompts must be a list"):
        r(_images(2), "ab")
    with pytest.raises(RewardError, match="metadata for prompt 'b' must be a dict"):
        r(_images(2), ["a", "b"], [{}, "oops"])


def test_nonfinite_score_errors_naming_reward_and_prompt():
    r = Const("judge", torch.tensor([0.5, float("nan"), 1.0]))
    with pytest.raises(RewardError, match=r"'judge'.*non-finite.*'two'"):
        r(_images(3), ["one", "two", "three"])
    r = Const("judge", torch.tensor([float("inf"), 0.25, float("-inf")]), fallback=-1.0)
    out = r(_images(3), ["one", "two", "three"])
    assert out.tolist() == [-1.0, 0.25, -1.0] and r.num_fallbacks == 2
    with pytest.raises(ValueError, match="fallback must be a finite"):
        Const("x", [0.0], fallback=float("nan"))


def test_bad_score_shapes():
    with pytest.raises(RewardError, match=r"'s': score\(\) must return \[2\] scores, got shape \(2, 1\)"):
        Const("s", torch.zeros(2, 1))(_images(2), ["a", "b"])
    with pytest.raises(RewardError, match="not numbers"):
        Const("s", ["x", "y"])(_images(2), ["a", "b"])


def test_empty_batch_and_output_dtype():
    assert Const("c", [])(_images(0), []).shape == (0,)
    out = Const("c", np.array([1, 2], dtype=np.int64))(_images(2), ["a", "b"])
    assert out.dtype == torch.float32 and out.device.type == "cpu"


def test_to_moves_modules_and_device():
    class WithModel(Reward):
        def __init__(self):
            super().__init__("m")
            self.net = torch.nn.Linear(3, 1)
            self.scale = torch.ones(1)

        def score(self, images, prompts, metadata, cots):
            assert images.device == self.device
            return self.net(images.float().mean(dim=(1, 2))).squeeze(-1)

    r = WithModel().to("meta")
    assert r.device.type == "meta" and r.net.weight.device.type == "meta" and r.scale.device.type == "meta"
    assert WithModel().to("cpu")(_images(2), ["a", "b"]).shape == (2,)


def test_require_field():
    assert require_field({"nouns": ["cat"]}, "nouns", "r", "p") == ["cat"]
    with pytest.raises(
        RewardError, match=r"reward 'det' needs metadata field 'spatial_info' for prompt 'a cat'"
    ):
        require_field({"nouns": ["cat"]}, "spatial_info", "det", "a cat")


def _group_ref(x, ids, eps=1e-4):
    out = torch.empty_like(x, dtype=torch.float64)
    for g in set(ids.tolist()):
        m = ids == g
        v = x[m].double()
        std = v.std(unbiased=True) if v.numel() > 1 else torch.tensor(0.0, dtype=torch.float64)
        out[m] = (v - v.mean()) / (std + eps)
    return out


def test_ensemble_sum_weights_and_components(seed):
    n = 7
    a, b = torch.randn(n), torch.rand(n) * 100
    ens = RewardEnsemble([Const("a", a), Const("b", b)], weights={"b": 0.25})
    out = ens(_images(n), ["p"] * n)
    torch.testing.assert_close(out.total.double(), a.double() + 0.25 * b.double(), rtol=1e-6, atol=1e-5)
    assert set(out["components"]) == {"a", "b"} and torch.equal(out["components"]["b"], b)
    out2 = RewardEnsemble([Const("a", a), Const("b", b)], weights=[1.0, 0.25])(_images(n), ["p"] * n)
    torch.testing.assert_close(out2.total, out.total)


def test_ensemble_product(seed):
    n = 6
    a, b = torch.rand(n), torch.rand(n) + 0.5
    out = RewardEnsemble([Const("a", a), Const("b", b)], weights=[1.0, 2.0], mode="product")(
        _images(n), ["p"] * n
    )
    torch.testing.assert_close(out.total.double(), a.double() * b.double() ** 2, rtol=1e-6, atol=1e-7)
    with pytest.raises(RewardError, match="non-negative.*'a'"):
        RewardEnsemble([Const("a", -a - 1)], mode="product")(_images(n), ["p"] * n)


def test_ensemble_group_normalize(seed):
    ids = torch.tensor([3, 0, 3, 3, 9, 0, 5])  # non-contiguous ids, a singleton group (5)
    n = ids.numel()
    a, b = torch.randn(n) * 10, torch.randn(n)
    b[ids == 0] = 0.7  # a zero-variance group
    ens = RewardEnsemble([Const("a", a), Const("b", b)], weights=[0.5, 2.0], normalize="group")
    out = ens(_images(n), ["p"] * n, group_ids=ids)
    ref = 0.5 * _group_ref(a, ids) + 2.0 * _group_ref(b, ids)
    torch.testing.assert_close(out.total.double(), ref, rtol=1e-5, atol=1e-5)
    assert out.total[ids == 5].item() == 0.0
    torch.testing.assert_close(out.components["a"], a)  # components stay raw

    g = 3
    c = torch.randn(2 * g)
    out = RewardEnsemble([Const("c", c)], normalize="group")(_images(2 * g), ["p"] * 2 * g, group_size=g)
    torch.testing.assert_close(
        out.total.double(), _group_ref(c, torch.arange(2 * g) // g), rtol=1e-5, atol=1e-5
    )


def test_ensemble_config_errors():
    c = Const("c", [0.0, 1.0])
    with pytest.raises(ValueError, match="unique.*'c'"):
        RewardEnsemble([c, Const("c", [1.0, 1.0])])
    with pytest.raises(ValueError, match="unknown rewards"):
        RewardEnsemble([c], weights={"d": 1.0})
    with pytest.raises(ValueError, match="2 weights for 1 rewards"):
        RewardEnsemble([c], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="mode must be"):
        RewardEnsemble([c], mode="max")
    with pytest.raises(ValueError, match="mode='sum' only"):
        RewardEnsemble([c], mode="product", normalize="group")
    ens = RewardEnsemble([c], normalize="group")
    with pytest.raises(ValueError, match="group_ids=.*group_size"):
        ens(_images(2), ["a", "b"])
    with pytest.raises(ValueError, match="not both"):
        ens(_images(2), ["a", "b"], group_ids=[0, 0], group_size=2)
    with pytest.raises(ValueError, match="dividing the batch size 2"):
        ens(_images(2), ["a", "b"], group_size=3)
    with pytest.raises(ValueError, match="3 entries for 2 samples"):
        ens(_images(2), ["a", "b"], group_ids=[0, 0, 1])


# ---- issue 15: nothing silent ------------------------------------------------------------------


def _id_forms(labels):
    """The same grouping written in every accepted form (labels: small non-negative ints)."""
    names = ["g" + str(x) for x in labels]
    return [
        list(labels), tuple(labels), torch.tensor(labels), torch.tensor(labels, dtype=torch.int32),
        torch.tensor(labels, dtype=torch.float32), np.asarray(labels, dtype=np.float64),
        [float(x) for x in labels], names, np.asarray(names), [np.int64(x) for x in labels],
    ]


def test_group_ids_every_form_groups_like_the_reference(seed):
    rng = random.Random(seed)
    for _ in range(20):
        n = rng.randint(1, 12)
        labels = [rng.randint(0, 3) for _ in range(n)]
        c = torch.randn(n)
        ref = _group_ref(c, torch.tensor(labels))  # independent of group_ids_from
        for form in _id_forms(labels):
            out = RewardEnsemble([Const("c", c)], normalize="group")(_images(n), ["p"] * n, group_ids=form)
            torch.testing.assert_close(out.total.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ids", [
    [0.5, 1.0], [0, 1.5], [float("nan"), 0], [float("inf"), 1], torch.tensor([0.0, 0.25]),
    [True, False], [np.bool_(True), 0], [None, 1], [0, "a"], [b"a", b"b"], [(0,), (1,)], [[0], [1]],
    [{}, {}], "ab", 3, np.asarray([0.5, 1.0]),
], ids=repr)
def test_bad_group_ids_are_named(ids):
    with pytest.raises(ValueError, match="group_ids"):
        group_ids_from(2, ids)
    ens = RewardEnsemble([Const("c", [0.0, 1.0])], normalize="group")
    with pytest.raises(ValueError, match="group_ids"):
        ens(_images(2), ["a", "b"], group_ids=ids)


@pytest.mark.parametrize("size", [0, -2, 2.0, 1.5, True, "2", float("nan")], ids=repr)
def test_bad_group_size_is_named(size):
    with pytest.raises(ValueError, match="group_size"):
        group_ids_from(4, group_size=size)


_NOT_STRINGS = [PromptRecord("a cat", {"task_type": "object"}), None, 3, 2.5, b"a cat", ["a cat"], {"prompt": "x"}]


@pytest.mark.parametrize("bad", _NOT_STRINGS, ids=repr)
@pytest.mark.parametrize("index", [0, 2])
def test_non_string_prompt_or_cot_names_reward_and_index(bad, index):
    seen = []
    r = FunctionReward("scorer", lambda im, p, m, c: seen.append(p) or 1.0, batched=False)
    prompts = ["x", "y", "z"]
    prompts[index] = bad
    with pytest.raises(RewardError, match=rf"'scorer'.*prompts\[{index}\]"):
        r(_images(3), prompts)
    cots = ["x", "y", "z"]
    cots[index] = bad
    with pytest.raises(RewardError, match=rf"'scorer'.*cots\[{index}\]"):
        r(_images(3), ["x", "y", "z"], None, cots)
    assert seen == []  # nothing was scored as a repr
    ens = RewardEnsemble([Const("k", [0.0] * 3), r])
    with pytest.raises(RewardError, match=rf"prompts\[{index}\]"):
        ens(_images(3), prompts)


def test_prompt_record_error_says_what_to_pass():
    with pytest.raises(RewardError, match=r"record\.prompt"):
        Const("c", [0.0])(_images(1), [PromptRecord("a cat")])


_RAISES = [KeyError("nouns"), ZeroDivisionError("division by zero"), RuntimeError("CUDA out of memory"),
           AttributeError("'NoneType' object has no attribute 'boxes'"), ValueError("bad box"),
           IndexError("list index out of range"), TypeError("unsupported operand")]


@pytest.mark.parametrize("exc", _RAISES, ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("n", [1, 5])
def test_ensemble_names_the_reward_that_raised(exc, n):
    def boom(images, prompts, metadata, cots):
        raise exc

    prompts = [f"prompt number {i}" for i in range(n)]
    ens = RewardEnsemble([Const("fine", [1.0] * n), FunctionReward("detector", boom)])
    with pytest.raises(RewardError, match="'detector'.*'prompt number 0'") as err:
        ens(_images(n), prompts)
    assert err.value.__cause__ is exc
    assert type(exc).__name__ in str(err.value)


@pytest.mark.parametrize("exc", _RAISES, ids=lambda e: type(e).__name__)
def test_per_sample_function_reward_names_the_prompt(exc):
    def boom(image, prompt, metadata, cot):
        if prompt == "bad one":
            raise exc
        return 0.0

    r = FunctionReward("per", boom, batched=False)
    with pytest.raises(RewardError, match=r"'per' failed on prompts\[2\] 'bad one'") as err:
        RewardEnsemble([r])(_images(3), ["a", "b", "bad one"])
    assert err.value.__cause__ is exc


def test_reward_error_passes_through_the_ensemble_unchanged():
    original = RewardError("reward 'own': something precise")

    def boom(images, prompts, metadata, cots):
        raise original

    with pytest.raises(RewardError) as err:
        RewardEnsemble([FunctionReward("own", boom)])(_images(2), ["a", "b"])
    assert err.value is original


@pytest.mark.parametrize("weights,match", [
    ([float("nan")], r"weights\[0\]"), ([float("inf")], r"weights\[0\]"), ([True], r"weights\[0\]"),
    (["1.0"], r"weights\[0\]"), ({"c": float("nan")}, r"weights\['c'\]"), ({"c": None}, r"weights\['c'\]"),
    ("1", "weights must be a list"), (2.0, "weights must be a list"),
], ids=repr)
def test_bad_weights_are_named(weights, match):
    with pytest.raises(ValueError, match=match):
        RewardEnsemble([Const("c", [0.0])], weights=weights)


@pytest.mark.parametrize("kwargs,match", [
    ({"mode": "SUM"}, "mode"), ({"mode": None}, "mode"), ({"normalize": "groups"}, "normalize"),
    ({"normalize": 1}, "normalize"),
], ids=repr)
def test_bad_ensemble_options_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RewardEnsemble([Const("c", [0.0])], **kwargs)


@pytest.mark.parametrize("rewards", [Const("c", [0.0]), [lambda *a: 0], [None], "c"],
                         ids=["reward-not-list", "lambda", "none", "string"])  # stable ids: xdist compares them
def test_ensemble_needs_reward_objects(rewards):
    with pytest.raises(ValueError, match="rewards"):
        RewardEnsemble(rewards)


@pytest.mark.parametrize("fallback", [float("nan"), float("inf"), -float("inf"), True, "0", [0.0]], ids=repr)
def test_bad_fallback_is_named(fallback):
    with pytest.raises(ValueError, match="fallback"):
        Const("x", [0.0], fallback=fallback)


def test_group_normalize_checks_eps_and_values():
    from fastbicot.rewards import group_normalize

    for eps in (0.0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="eps"):
            group_normalize(torch.zeros(3), torch.zeros(3, dtype=torch.long), eps)
    with pytest.raises(ValueError, match="non-finite"):
        group_normalize(torch.tensor([0.0, float("nan")]), torch.zeros(2, dtype=torch.long))
