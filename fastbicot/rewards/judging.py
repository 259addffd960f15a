"""Reading a judge's verdict: the one ``\\boxed{}`` rule and the one yes/no probability.

Every judge reward reads its answer here: ``RemoteJudgeReward`` (an OpenAI-compatible server),
``VLMJudgeReward`` / ``ORMReward`` (a local chat VLM) and ``GitVQAReward`` (GIT VQA).

* ``boxed_verdict``: a judge that reasons and then writes ``\\boxed{1}`` (the image matches) or
  ``\\boxed{0}``. At least one box; every box, whitespace stripped, holds the same 0 or 1. A judge
  that changes its mind (``\\boxed{1} ... \\boxed{0}``) or boxes anything else gives no verdict:
  ``UnscorableAnswer`` (the caller turns it into a RewardError or its configured fallback). The seed
  (CaraJ7/T2I-R1) has no boxed judge; this is the stricter of the two rules fastbicot had (the
  other took the last box), see docs/fidelity.md.
* ``yes_share``: P(yes) / (P(yes) + P(no)) = sigmoid(log P(yes) - log P(no)), the seed's ratio
  (reward_git.py:71-73, reward_orm.py:107-108) computed from logs so log-probabilities like -1000 do
  not underflow; the normaliser cancels, so raw logits work too. ``yes_probability`` (next-token
  logits) and ``top_logprobs_yes_probability`` (an OpenAI ``top_logprobs`` list) are built on it.
"""

from __future__ import annotations

import math
import re

import torch

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


class UnscorableAnswer(ValueError):
    """The judge answered, but the answer does not give a score."""


def boxed_verdict(text: str | None) -> float:
    """1.0 / 0.0 when every ``\\boxed{...}`` of ``text`` holds the same ``1`` / ``0``; else UnscorableAnswer."""
    if text is not None and not isinstance(text, str):
        raise TypeError(f"message content must be a string, got {type(text).__name__}")
    found = [v.strip() for v in _BOXED.findall(text or "")]
    if not found:
        raise UnscorableAnswer("no \\boxed{...} in the answer")
    for value in found:
        if value not in ("0", "1"):
            raise UnscorableAnswer(f"\\boxed{{{value}}} is not \\boxed{{0}} or \\boxed{{1}}")
    if len(set(found)) > 1:
        raise UnscorableAnswer("the \\boxed{...} answers disagree (both \\boxed{0} and \\boxed{1})")
    return float(found[0])


def yes_share(log_yes, log_no) -> torch.Tensor:
    """P(yes) / (P(yes) + P(no)) from log P(yes) and log P(no) (or the two logits), as a tensor.

    -inf on one side gives exactly 0 or 1; -inf on both sides gives NaN (no yes/no mass at all)."""
    return torch.sigmoid(torch.as_tensor(log_yes) - torch.as_tensor(log_no))


def yes_probability(logits: torch.Tensor, yes_id: int, no_id: int, normalize: str) -> torch.Tensor:
    """From next-token logits [N, V]: P(yes) over the vocabulary ("vocab") or P(yes)/(P(yes)+P(no))
    ("yes_no"), in float32."""
    logits = logits.float()
    if normalize == "vocab":
        return torch.softmax(logits, dim=-1)[:, yes_id]
    if normalize == "yes_no":
        return yes_share(logits[:, yes_id], logits[:, no_id])
    raise ValueError(f"normalize must be 'vocab' or 'yes_no', got {normalize!r}")


def _logsumexp(values: list[float]) -> float:
    m = max(values, default=-math.inf)
    return m if m == -math.inf else m + math.log(sum(math.exp(v - m) for v in values))


def top_logprobs_yes_probability(top_logprobs) -> float:
    """P(yes) / (P(yes) + P(no)) from an OpenAI ``top_logprobs`` list of {token, logprob}.

    Every top token that reads "yes" or "no" once stripped and lower-cased ("Yes", " yes", "YES" ...)
    counts toward its side. Neither among the top tokens, or a NaN log-probability: UnscorableAnswer.
    """
    logp = {"yes": [], "no": []}
    if isinstance(top_logprobs, (str, bytes, dict)) or not isinstance(top_logprobs, (list, tuple)):
        raise TypeError(f"top_logprobs must be a list of {{token, logprob}} objects, got "
                        f"{type(top_logprobs).__name__}")
    for entry in top_logprobs:
        if not isinstance(entry, dict):
            raise TypeError(f"top_logprobs entry must be an object, got {type(entry).__name__}")
        word = str(entry.get("token", "")).strip().lower()
        if word in logp:
            value = entry["logprob"]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"logprob of {entry.get('token')!r} must be a number, got {value!r}")
            logp[word].append(float(value))
    ly, ln = _logsumexp(logp["yes"]), _logsumexp(logp["no"])
    if ly == ln == -math.inf or math.isnan(ly) or math.isnan(ln):
        tokens = [e.get("token") for e in top_logprobs]
        if any(math.isnan(v) for v in logp["yes"] + logp["no"]):
            raise UnscorableAnswer(f"NaN log-probability among the top tokens {tokens}")
        raise UnscorableAnswer(f"neither 'yes' nor 'no' among the top tokens {tokens}")
    return float(yes_share(torch.tensor(ly, dtype=torch.float64), torch.tensor(ln, dtype=torch.float64)))
