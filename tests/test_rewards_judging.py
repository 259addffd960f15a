"""fastbicot.rewards.judging: the one \\boxed{} rule and the one yes/no probability, against
hand-written answers, including every case the two former parsers (rewards/remote.py's
``boxed_score`` and the VLM judge's ``parse_boxed``) were tested with."""

import math

import pytest
import torch

from fastbicot.rewards.judging import (
    UnscorableAnswer,
    boxed_verdict,
    top_logprobs_yes_probability,
    yes_probability,
    yes_share,
)

# (answer, verdict): None = unscorable. Marked R (remote judge) / V (VLM judge): a former call site's case.
BOXED = [
    ("reasoning... \\boxed{1}", 1.0),  # R
    ("\\boxed{ 1 }", 1.0),  # R
    ("so the answer is \\boxed{1}.", 1.0),  # V
    ("\\boxed{ 0 } and again \\boxed{0}", 0.0),  # V
    ("\\boxed{0}", 0.0),
    ("\\boxed{1}\n\\boxed{1}\\boxed{ 1}", 1.0),
    ("\\boxed{1} no wait \\boxed{0}", None),  # R: the last box won (0.0) before the rules were merged
    ("\\boxed{1} but \\boxed{0}", None),  # V
    ("\\boxed{yes}", None),  # R, V
    ("The answer is 1", None),  # R
    ("\\boxed{0.5}", None),  # R, V
    ("\\boxed{10}", None),  # R
    ("\\boxed{}", None),  # V
    ("boxed{1}", None),  # V
    ("yes", None),  # V
    ("", None),  # V
    (None, None),  # R: a reply with no content
    ("\\boxed{1} and \\boxed{yes}", None),  # every box must hold 0 or 1, not just the last
    ("\\boxed{yes} then \\boxed{1}", None),  # R took the last box: 1.0
    ("\\boxed{{1}}", None),  # nested braces are not a box of 0/1
]


@pytest.mark.parametrize(("answer", "want"), BOXED, ids=repr)
def test_boxed_verdict(answer, want):
    if want is None:
        with pytest.raises(UnscorableAnswer):
            boxed_verdict(answer)
    else:
        assert boxed_verdict(answer) == want


def test_boxed_errors_say_why():
    with pytest.raises(UnscorableAnswer, match=r"no \\boxed"):
        boxed_verdict("The answer is 1")
    with pytest.raises(UnscorableAnswer, match=r"\\boxed\{yes\} is not \\boxed\{0\} or \\boxed\{1\}"):
        boxed_verdict("\\boxed{1} \\boxed{yes}")
    with pytest.raises(UnscorableAnswer, match="disagree"):
        boxed_verdict("\\boxed{1} \\boxed{0}")
    with pytest.raises(TypeError, match="must be a string"):
        boxed_verdict(["\\boxed{1}"])


def test_yes_share():
    assert yes_share(math.log(0.3), math.log(0.1)).item() == pytest.approx(0.75)
    assert yes_share(-1000.0, -1001.0).item() == pytest.approx(1 / (1 + math.exp(-1.0)))
    assert yes_share(-math.inf, -2.0).item() == 0.0 and yes_share(-2.0, -math.inf).item() == 1.0
    assert math.isnan(yes_share(-math.inf, -math.inf).item())
    got = yes_share(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(got, torch.tensor([1 / (1 + math.exp(-1.0)), 0.5]))


def test_yes_probability_from_logits():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 5.0]], dtype=torch.float64)
    yes_no = yes_probability(logits, 0, 1, "yes_no")
    assert yes_no.dtype == torch.float32
    torch.testing.assert_close(yes_no, torch.tensor([1 / (1 + math.exp(-1.0)), 0.5]))
    vocab = yes_probability(logits, 0, 1, "vocab")
    z = [math.exp(2) + math.exp(1) + 1, 2 + math.exp(5)]
    torch.testing.assert_close(vocab, torch.tensor([math.exp(2) / z[0], 1 / z[1]]))
    with pytest.raises(ValueError, match="normalize"):
        yes_probability(logits, 0, 1, "softmax")


def test_top_logprobs_yes_probability():
    top = [{"token": " Yes", "logprob": math.log(0.3)}, {"token": "yes", "logprob": math.log(0.1)},
           {"token": "NO", "logprob": math.log(0.2)}, {"token": "maybe", "logprob": math.log(0.4)}]
    assert top_logprobs_yes_probability(top) == pytest.approx(0.4 / 0.6)
    assert top_logprobs_yes_probability([{"token": "no", "logprob": -1000.0}]) == 0.0
    assert top_logprobs_yes_probability([{"token": "yes", "logprob": -1000.0}]) == 1.0
    with pytest.raises(UnscorableAnswer, match="neither 'yes' nor 'no'"):
        top_logprobs_yes_probability([{"token": "maybe", "logprob": 0.0}])
    with pytest.raises(UnscorableAnswer, match="NaN"):
        top_logprobs_yes_probability([{"token": "yes", "logprob": float("nan")}, {"token": "no", "logprob": -1.0}])
    for bad in ("yes", {"token": "yes"}, [["yes", 0.0]], [{"token": "yes", "logprob": True}]):
        with pytest.raises(TypeError):
            top_logprobs_yes_probability(bad)
