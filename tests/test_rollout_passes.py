"""rollout.prompts_per_pass: a rollout generated a few prompt groups at a time is the rollout of one
pass -- every sample is drawn from its own keyed stream, so splitting the prompts changes no token."""

import pytest
import torch

from fastbicot.data import PromptRecord
from fastbicot.models import JanusPolicy
from fastbicot.rollout import RolloutEngine
from fastbicot.settings import ConfigError
from fastbicot.trainer import TrainerConfig

PROMPTS = [PromptRecord("a red cube", {"id": 0}), "two green dogs left of a cat", "x", PromptRecord("a blue sky")]
SHORT = dict(template="{system} {instruction}", system="Plan.", instruction="Draw {prompt}:")


def _same(a, b):
    assert len(a) == len(b) and a.group_index == b.group_index
    assert torch.equal(a.group_ids, b.group_ids) and torch.equal(a.sample_keys, b.sample_keys)
    assert torch.equal(a.image_tokens, b.image_tokens)
    # the same tokens decode to the same pixels up to the last uint8 level: oneDNN's convolutions round
    # differently at another batch size (~1e-6), which can move a value across a rounding boundary
    # (seed 76126018: one pixel of 36864)
    assert a.images.shape == b.images.shape and int((a.images.int() - b.images.int()).abs().max()) <= 1
    for x, y in zip(a.samples, b.samples):
        assert (x.prompt_index, x.prompt, x.metadata, x.cot_ids, x.cot_text) == (
            y.prompt_index, y.prompt, y.metadata, y.cot_ids, y.cot_text)
        assert (x.cot_context_ids, x.image_context_ids, x.uncond_context_ids) == (
            y.cot_context_ids, y.image_context_ids, y.uncond_context_ids)
        torch.testing.assert_close(x.cot_logprobs, y.cot_logprobs, rtol=0, atol=1e-5)
        torch.testing.assert_close(x.image_logprobs, y.image_logprobs, rtol=0, atol=1e-5)


# k=3: passes of unequal size (3 + 1 prompts)
@pytest.mark.parametrize("k,mode,guidance", [(1, "reprompt", 5.0), (3, "reprompt", 1.0), (3, "continue", 3.0)])
def test_passes_draw_the_samples_of_one_pass(seed, k, mode, guidance, monkeypatch):
    policy = JanusPolicy.from_preset("tiny", seed=seed, dtype=torch.float32)
    engine = RolloutEngine(policy, **SHORT, num_generations=3, max_new_tokens=6, guidance_scale=guidance,
                           image_mode=mode)
    gi = [7, 2, 11, 0]  # global group indices, not in order
    one = engine.generate(PROMPTS, seed=seed, group_index=gi)
    starts = []
    real = engine._start
    monkeypatch.setattr(engine, "_start", lambda records, *a: starts.append(len(records)) or real(records, *a))
    passes = engine.generate(PROMPTS, seed=seed, group_index=gi, prompts_per_pass=k)
    assert starts == ([1, 1, 1, 1] if k == 1 else [3, 1])
    _same(passes, one)
    assert set(passes.timing) == set(one.timing) and passes.timing["total"] > 0
    assert engine.config.prompts_per_pass == 0  # a per-call override


def test_passes_from_the_config_and_default_group_index(seed):
    policy = JanusPolicy.from_preset("tiny", seed=seed, dtype=torch.float32)
    kw = dict(**SHORT, num_generations=2, max_new_tokens=4)
    one = RolloutEngine(policy, **kw).generate(PROMPTS, seed=seed)
    passes = RolloutEngine(policy, **kw, prompts_per_pass=2).generate(PROMPTS, seed=seed)
    _same(passes, one)
    assert passes.group_index == [0, 1, 2, 3]
    # more per pass than prompts: one pass
    _same(RolloutEngine(policy, **kw, prompts_per_pass=9).generate(PROMPTS, seed=seed), one)


@pytest.mark.parametrize("value,match", [("-1", "must be >= 0"), ("1.5", "must be an integer"),
                                         ("two", "must be an integer")])
def test_bad_prompts_per_pass_names_the_key(tmp_path, value, match):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  preset: tiny\n")
    with pytest.raises(ConfigError, match=f"rollout.prompts_per_pass: {match}"):
        TrainerConfig.from_yaml(path, [f"rollout.prompts_per_pass={value}"])
