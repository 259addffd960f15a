"""grpo_loss vs a float64 autograd reference of each formula, on the CPU path and the Triton kernels.

Triton runs on CPU under its interpreter, which triton selects at import; see
tests/test_token_logprobs.py for how conftest.py arranges that and how the Triton cases fall back
to a fresh subprocess.
"""

import importlib

import numpy as np
import pytest
import torch
from helpers import run_triton_cases_in_fresh_interpreter

from fastbicot.kernels.grpo_loss import grpo_loss, grpo_loss_reference

mod = importlib.import_module("fastbicot.kernels.grpo_loss")  # the module (the package re-exports the function)
INTERPRETED = mod._interpreted()
TRITON_READY = INTERPRETED  # the kernel_path fixture (conftest.py) runs the 'triton' cases in this process


def _batch(device="cpu", num_seq=6):
    """Packed batch: random lengths (one of length 1), sequence 1 fully masked, advantages of both
    signs, and old log-probs placing ratios inside and far outside the clip range."""
    lens = torch.randint(1, 12, (num_seq,)).tolist()
    lens[0] = 1
    seq_ids = torch.cat([torch.full((n,), s) for s, n in enumerate(lens)])[torch.randperm(sum(lens))]
    n = seq_ids.numel()
    logp = -torch.rand(n, dtype=torch.float64) * 4
    shift = torch.tensor([-0.6, -0.3, -0.02, 0.0, 0.02, 0.3, 0.6], dtype=torch.float64)
    shifts = shift[torch.randint(0, len(shift), (n,))]
    first2, first3 = (int((seq_ids == s).nonzero()[0, 0]) for s in (2, 3))
    shifts[first2], shifts[first3] = 0.6, -0.6  # surely clipped: A > 0 with r > 1+eps, A < 0 with r < 1-eps
    old = logp - shifts  # r = exp(shift) in [0.55, 1.82]
    ref = logp + torch.randn(n, dtype=torch.float64) * 0.5
    adv = torch.randn(num_seq, dtype=torch.float64)
    adv[:2] = adv[:2].abs() * torch.tensor([1.0, -1.0], dtype=torch.float64)
    adv[2:] = torch.where(torch.arange(num_seq - 2) % 2 == 0, adv[2:].abs(), -adv[2:].abs())
    weights = (torch.rand(n) > 0.25).double()
    weights[seq_ids == 1] = 0.0
    weights[[first2, first3]] = 1.0
    to = {"device": device}
    return {"logp": logp.to(**to), "old": old.to(**to), "ref": ref.to(**to), "adv": adv.to(**to),
                "seq_ids": seq_ids.to(**to), "weights": weights.to(**to)}


@pytest.mark.parametrize("loss_type", ["token_mean", "seq_mean", "dr_grpo"])
@pytest.mark.parametrize("per_token_adv", [False, True])
@pytest.mark.parametrize("with_old", [False, True])
def test_matches_reference(kernel_path, loss_type, per_token_adv, with_old, seed):
    b = _batch()
    adv = b["adv"][b["seq_ids"]] if per_token_adv else b["adv"]
    kw = {"old_logprobs": b["old"] if with_old else None, "ref_logprobs": b["ref"], "beta": 0.04, "eps_low": 0.2,
              "eps_high": 0.28, "loss_type": loss_type, "token_weights": b["weights"],
              "max_tokens": None if seed % 2 else 16}
    got_in = b["logp"].float().requires_grad_()
    ref_in = b["logp"].float().double().requires_grad_()
    loss, stats = grpo_loss(got_in, adv, b["seq_ids"], **kw)
    want, want_stats = grpo_loss_reference(ref_in, adv, b["seq_ids"], **kw)
    loss.backward()
    want.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_in.grad.double(), ref_in.grad, rtol=1e-5, atol=1e-7)
    for key in ("kl", "clip_fraction", "ratio_mean"):
        torch.testing.assert_close(stats[key].double(), want_stats[key], rtol=1e-5, atol=1e-6)
    if with_old:  # the batch really exercises clipping on both sides
        adv_tok = b["adv"][b["seq_ids"]]
        r = torch.exp(b["logp"] - b["old"])
        assert ((adv_tok > 0) & (r > 1.28)).any() and ((adv_tok < 0) & (r < 0.8)).any()
        assert stats["clip_fraction"] > 0
    else:
        assert stats["clip_fraction"] == 0 and abs(stats["ratio_mean"].item() - 1) < 1e-6


def test_without_old_or_ref_gradient_is_minus_weighted_advantage(kernel_path, seed):
    # r = exp(logp - logp.detach()) == 1, so d(token_mean)/d logp_i = -A_i * w_i / sum(w) exactly.
    b = _batch()
    logp = b["logp"].float().requires_grad_()
    loss, stats = grpo_loss(logp, b["adv"].float(), b["seq_ids"], token_weights=b["weights"].float())
    loss.backward()
    w = b["weights"]
    adv_tok = b["adv"][b["seq_ids"]]
    torch.testing.assert_close(loss.double(), -(w * adv_tok).sum() / w.sum(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logp.grad.double(), -adv_tok * w / w.sum(), rtol=1e-5, atol=1e-7)
    assert stats["kl"] == 0


@pytest.mark.parametrize("loss_type", ["token_mean", "seq_mean", "dr_grpo"])
def test_fully_masked_batch_is_zero_not_nan(kernel_path, loss_type, seed):
    b = _batch()
    logp = b["logp"].float().requires_grad_()
    loss, stats = grpo_loss(logp, b["adv"], b["seq_ids"], old_logprobs=b["old"], ref_logprobs=b["ref"],
                            beta=0.1, loss_type=loss_type, token_weights=torch.zeros_like(logp))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(logp.grad == 0)
    assert all(torch.isfinite(v) for v in stats.values())


def test_seq_mean_excludes_masked_sequences(seed):
    # closed form: two live sequences of per-token losses -A (no old/ref), one masked sequence
    logp = torch.zeros(5, requires_grad=True)
    seq_ids = torch.tensor([0, 0, 1, 2, 2])
    adv = torch.tensor([1.0, 7.0, -3.0])
    w = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0])
    loss, _ = grpo_loss(logp, adv, seq_ids, loss_type="seq_mean", token_weights=w)
    assert loss.item() == pytest.approx((-1.0 + 3.0) / 2)


def test_bad_inputs_raise_clear_errors():
    logp, seq_ids, adv = torch.zeros(4), torch.tensor([0, 0, 1, 1]), torch.ones(2)
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(logp, adv, seq_ids, loss_type="mean")
    with pytest.raises(ValueError, match="seq_ids"):
        grpo_loss(logp, adv, seq_ids[:3])
    with pytest.raises(ValueError, match=r"seq_ids must lie in \[0, 2\)"):
        grpo_loss(logp, adv, torch.tensor([0, 0, 1, 2]))
    with pytest.raises(ValueError, match="old_logprobs"):
        grpo_loss(logp, adv, seq_ids, old_logprobs=torch.zeros(3))
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(logp, adv, seq_ids, beta=0.1)
    with pytest.raises(ValueError, match="eps_low"):
        grpo_loss(logp, adv, seq_ids, eps_low=1.5)


def test_triton_cases_in_fresh_interpreter():
    if INTERPRETED:
        pytest.skip("the Triton cases ran in this process")
    run_triton_cases_in_fresh_interpreter(__file__)


@pytest.mark.gpu
@pytest.mark.parametrize("loss_type", ["token_mean", "seq_mean", "dr_grpo"])
def test_cuda_matches_reference(loss_type, seed):
    b = _batch(device="cuda", num_seq=40)
    kw = {"old_logprobs": b["old"], "ref_logprobs": b["ref"], "beta": 0.04, "loss_type": loss_type,
              "token_weights": b["weights"]}
    got_in = b["logp"].float().requires_grad_()
    ref_in = b["logp"].float().double().requires_grad_()
    loss, _ = grpo_loss(got_in, b["adv"], b["seq_ids"], **kw)
    want, _ = grpo_loss_reference(ref_in, b["adv"], b["seq_ids"], **kw)
    loss.backward()
    want.backward()
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_in.grad.double(), ref_in.grad, rtol=1e-5, atol=1e-7)


_NONFINITE = [float("nan"), float("inf"), -float("inf"), torch.tensor(float("nan"))]
_NOT_NUMBERS = [True, False, "0.1", None, [0.1], 1j]


@pytest.mark.parametrize("name,value", [
    *[("beta", v) for v in [*_NONFINITE, *_NOT_NUMBERS, -0.1, -1e-12]],
    *[("eps_low", v) for v in [*_NONFINITE, *_NOT_NUMBERS, -0.01, 1.0, 1.5]],
    *[("eps_high", v) for v in [*_NONFINITE, *_NOT_NUMBERS, -0.01]],
    *[("max_tokens", v) for v in [0, -3, 2.5, 4.0, True, float("nan"), "8"]],
    *[("loss_type", v) for v in ["mean", "TOKEN_MEAN", "", None, 3, ["token_mean"]]],
], ids=repr)
def test_bad_scalars_name_the_argument(name, value):
    logp, seq_ids, adv = torch.zeros(4), torch.tensor([0, 0, 1, 1]), torch.ones(2)
    kwargs = {"ref_logprobs": torch.zeros(4), "loss_type": "dr_grpo", name: value}
    with pytest.raises((ValueError, TypeError), match=name):
        grpo_loss(logp, adv, seq_ids, **kwargs)


@pytest.mark.parametrize("name", ["logprobs", "advantages", "seq_ids", "old_logprobs", "ref_logprobs",
                                  "token_weights"])
@pytest.mark.parametrize("bad", [[0.0, 0.0, 0.0, 0.0], "x", 3.0], ids=repr)
def test_non_tensor_arguments_name_the_argument(name, bad):
    args = {"logprobs": torch.zeros(4), "advantages": torch.ones(2), "seq_ids": torch.tensor([0, 0, 1, 1])}
    args[name] = bad
    with pytest.raises(TypeError, match=name):
        grpo_loss(args.pop("logprobs"), args.pop("advantages"), args.pop("seq_ids"), **args)


def test_valid_scalars_still_match_reference(seed):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(12, generator=g, dtype=torch.float64)
    ref, old = logp - 0.1 * torch.rand(12, generator=g, dtype=torch.float64), logp + 0.05
    seq_ids, adv = torch.arange(12) // 4, torch.randn(3, generator=g, dtype=torch.float64)
    for beta, eps in [(0.0, 0.0), (0.04, 0.2), (torch.tensor(0.5), 0.999), (1, 0)]:
        got, _ = grpo_loss(logp, adv, seq_ids, old_logprobs=old, ref_logprobs=ref, beta=beta, eps_low=eps,
                           eps_high=eps, loss_type="dr_grpo", max_tokens=5)
        want, _ = grpo_loss_reference(logp, adv, seq_ids, old_logprobs=old, ref_logprobs=ref, beta=float(beta),
                                      eps_low=eps, eps_high=eps, loss_type="dr_grpo", max_tokens=5)
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-6)


def test_negative_token_weights_rejected():
    with pytest.raises(ValueError, match="token_weights"):
        grpo_loss(torch.zeros(3), torch.ones(1), torch.zeros(3, dtype=torch.long),
                  token_weights=torch.tensor([1.0, -1.0, 1.0]))


@pytest.mark.parametrize("name,value", [("beta", np.float32("nan")), ("beta", 10**400), ("eps_high", 1e308), ("eps_low", 10**400), ("beta", 1e39), ("max_tokens", 10**400), ("max_tokens", 2**63), ("eps_low", np.float64("inf")),
                                        ("eps_high", np.bool_(True)), ("beta", torch.tensor([0.1, 0.2])),
                                        ("max_tokens", np.float64(4.0))], ids=repr)
def test_bad_numpy_and_tensor_scalars_name_the_argument(name, value):
    logp, seq_ids, adv = torch.zeros(4), torch.tensor([0, 0, 1, 1]), torch.ones(2)
    with pytest.raises((ValueError, TypeError), match=name):
        grpo_loss(logp, adv, seq_ids, ref_logprobs=torch.zeros(4), loss_type="dr_grpo", **{name: value})
