"""Reward protocol: input/output validation, fallback, FunctionReward, RewardEnsemble."""

import numpy as np
import pytest
import torch

from fastbicot.rewards import FunctionReward, Reward, RewardEnsemble, RewardError, require_field


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
