"""A short training run end to end: what it writes, resume, and bad input (one clear message, no work
lost, never an optimizer step on NaN)."""

import json
import math
import os

import pytest
import torch
from helpers import PROMPTS, make_trainer

from fastbicot.models import JanusPolicy
from fastbicot.rewards import FunctionReward
from fastbicot.trainer import ConfigError, Trainer, TrainerConfig, TrainingError
from fastbicot.trainer.trainer import find_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

REQUIRED = ["step", "reward/mean", "reward/std", "reward/red", "loss", "kl", "clip_fraction", "grad_norm", "lr",
            "cot_len", "entropy/text", "entropy/image", "images_per_s", "time/rollout", "time/reward",
            "time/update"]
TIMES = ("images_per_s", "time/")


def without_times(rows):
    return [{k: v for k, v in r.items() if not k.startswith(TIMES)} for r in rows]


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_train_writes_metrics_grids_curve_and_a_loadable_policy(seed, tmp_path):
    tr = make_trainer(seed, tmp_path, dtype="float32", steps=3, checkpoint={"every": 1, "keep": 2},
                      log={"grid_every": 2}, optim={"lr": 1e-3})
    out = tr.train()
    rows = read(os.path.join(out, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        missing = [k for k in REQUIRED if k not in r]
        assert not missing, missing
        assert all(v is None or math.isfinite(v) for v in r.values() if isinstance(v, float))
    assert rows[0]["lr"] == pytest.approx(1e-3) and rows[1]["lr"] == pytest.approx(1e-3 * 2 / 3)  # linear decay
    assert sorted(os.listdir(os.path.join(out, "grids"))) == ["step_000001.png", "step_000002.png",
                                                              "step_000003.png"]
    assert os.path.getsize(os.path.join(out, "reward_curve.png")) > 5000
    assert TrainerConfig.from_yaml(os.path.join(out, "config.yaml")) == tr.config  # the resolved config
    ckpts = sorted(d for d in os.listdir(out) if d.startswith("checkpoint-"))
    assert ckpts == ["checkpoint-000001", "checkpoint-000002"]  # keep=2; the end is "final"
    loaded = JanusPolicy.from_pretrained(os.path.join(out, "final"), dtype=torch.float32)
    for (n, a), (_, b) in zip(tr.policy.hf_model.named_parameters(), loaded.hf_model.named_parameters()):
        assert torch.equal(a.detach(), b.detach()), n
    from transformers import JanusForConditionalGeneration  # plain transformers loads it too

    JanusForConditionalGeneration.from_pretrained(os.path.join(out, "final"))
    # the same output dir again: refused, nothing touched
    metrics = os.path.join(out, "metrics.jsonl")
    with open(metrics) as f:
        before = f.read()
    with pytest.raises(ConfigError, match="already holds a run"):
        make_trainer(seed, tmp_path, dtype="float32", steps=3).train()
    with open(metrics) as f:
        assert f.read() == before


def test_resume_continues_exactly(seed, tmp_path):
    common = dict(dtype="float32", steps=4, optim={"lr": 1e-3})
    a = make_trainer(seed, tmp_path / "a", checkpoint={"every": 0}, **common)
    a.train()
    b = make_trainer(seed, tmp_path / "b", checkpoint={"every": 2, "keep": 3}, **common)
    b.config = b.config.replace(steps=3)  # a run that stops after step 3 (its last checkpoint: step 2)
    b.train()
    c = make_trainer(seed, tmp_path / "b", checkpoint={"every": 2, "keep": 3}, **common)
    c.load_checkpoint(find_checkpoint(c.config.output_dir))
    assert c.step_idx == 2
    c.train()
    ra, rb = read(os.path.join(a.config.output_dir, "metrics.jsonl")), read(os.path.join(c.config.output_dir,
                                                                                         "metrics.jsonl"))
    assert without_times(ra) == without_times(rb)  # bit-identical on CPU, line for line
    for x, y in zip(a.policy.parameters(), c.policy.parameters()):
        assert torch.equal(x, y)


def nan_reward():
    return FunctionReward("broken", lambda im, p, m, c: [float("nan")] * len(p))


def test_bad_rewards_name_the_reward_and_change_nothing(seed, tmp_path):
    tr = make_trainer(seed, tmp_path, dtype="float32")
    tr.rewards = Trainer._as_ensemble([nan_reward()])
    before = [p.detach().clone() for p in tr.policy.parameters()]
    with pytest.raises(TrainingError, match=r"step 1: .*broken.*non-finite"):
        tr.step()

    def boom(im, p, m, c):
        raise RuntimeError("judge server down")

    tr.rewards = Trainer._as_ensemble([FunctionReward("judge", boom)])
    with pytest.raises(Exception, match="judge") as info:
        tr.step()
    assert "judge server down" in str(info.value) or "judge server down" in str(info.value.__cause__)
    assert all(torch.equal(a, b) for a, b in zip(before, tr.policy.parameters()))
    assert tr.step_idx == 0


def test_nan_loss_or_gradient_stops_before_the_optimizer_step(seed, tmp_path):
    tr = make_trainer(seed, tmp_path, dtype="float32", loss={"beta": 0.0})
    batch = tr.rollout()
    scores = tr.score(batch)
    adv, _, _ = tr.advantages(batch, scores)
    w = tr.policy.lm_head.weight
    with torch.no_grad():
        w[batch.samples[0].cot_ids[0], 0] = float("nan")
    snapshot = [p.detach().clone() for p in tr.policy.parameters()]
    with pytest.raises(TrainingError, match=r"step 1: \d+ log-probs are not finite"):
        tr.update(batch, adv)
    same = [torch.equal(a, b) or (a.isnan() == b.isnan()).all() for a, b in zip(snapshot, tr.policy.parameters())]
    assert all(same) and not tr.optim.optimizer.state
    with torch.no_grad():
        w.copy_(torch.nan_to_num(w, nan=0.0))
    handle = tr.policy.hf_model.model.language_model.layers[0].mlp.up_proj.weight.register_hook(
        lambda g: g * float("inf"))
    with pytest.raises(TrainingError, match=r"gradient is not finite \(first in .*layers\.0\.mlp\.up_proj"):
        tr.update(batch, adv)
    handle.remove()
    assert not tr.optim.optimizer.state and tr.optim.scheduler.last_epoch == 0


@pytest.mark.parametrize("bad,match", [
    ([123], r"prompts\[0\] must be a string or a PromptRecord"),
    (["ok", None], r"prompts\[1\]"),
    ("x" * 3000, "exceeds the model's"),
])
def test_bad_prompts_are_clear_errors(seed, tmp_path, bad, match):
    tr = make_trainer(seed, tmp_path, dtype="float32", rollout={"max_prompt_length": None})
    with pytest.raises((TypeError, ValueError), match=match):
        tr.rollout(bad if isinstance(bad, list) else [bad])


@pytest.mark.parametrize("override,match", [
    ("loss.beta=.nan", "loss.beta: must be a finite number"),
    ("rollout.cot.top_k=2.5", "rollout.cot.top_k: must be an integer"),
    ("rollout.num_generations=0", "rollout.num_generations: must be >= 1"),
    ("optim.lr=fast", "optim.lr: must be a number"),
    ("loss.aggregation=mean", "loss.aggregation: must be one of"),
    ("rollout.instruction=hello", r"rollout.instruction: needs the placeholder"),
    ("rollout.cot.topk=3", "rollout.cot.topk: unknown setting"),
    ("bogus.key=1", "bogus: unknown setting"),
    ("optim.micro_batch_prompts=0", "optim.micro_batch_prompts: must be >= 1"),
    ("model.trainable=[]", "model.trainable: is empty"),
])
def test_bad_settings_name_the_key(tmp_path, override, match):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  preset: tiny\ndata:\n  prompts_per_step: 4\n")
    with pytest.raises(ConfigError, match=match):
        TrainerConfig.from_yaml(path, [override])


def test_config_yaml_round_trip_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 7\nloss:\n  beta: 0.02\nrollout:\n  cot:\n    top_k: 20\n")
    c = TrainerConfig.from_yaml(path, ["--loss.beta=0", "rollout.image.temperature=0.5", "optim.betas=[0.9, 0.95]"])
    assert (c.steps, c.loss.beta, c.rollout.cot.top_k, c.rollout.image.temperature) == (7, 0.0, 20, 0.5)
    assert c.optim.betas == [0.9, 0.95] and c.rollout.cot.max_new_tokens == 1024  # untouched defaults
    (tmp_path / "d.yaml").write_text(c.to_yaml())
    assert TrainerConfig.from_yaml(tmp_path / "d.yaml") == c
    (tmp_path / "bad.yaml").write_text("loss: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        TrainerConfig.from_yaml(tmp_path / "bad.yaml")


@pytest.mark.parametrize("how", ["yaml", "override", "dict"])
def test_a_partial_cot_section_keeps_the_seeds_top_k(tmp_path, how):
    """rollout.cot defaults to the seed's CoT sampling (top-k 50), not to SamplingParams' own (top-k 0):
    setting only max_new_tokens -- in YAML, as a dotted override, in a dict -- must not drop the top-k."""
    path = tmp_path / "c.yaml"
    path.write_text("rollout:\n  cot:\n    max_new_tokens: 24\n" if how == "yaml" else "steps: 2\n")
    if how == "dict":
        c = TrainerConfig.from_dict({"rollout": {"cot": {"max_new_tokens": 24}}})
    else:
        c = TrainerConfig.from_yaml(path, ["rollout.cot.max_new_tokens=24"] if how == "override" else [])
    assert (c.rollout.cot.max_new_tokens, c.rollout.cot.top_k) == (24, 50)
    assert c.rollout.image.top_k == 0 and c.rollout.cot.temperature == 1.0  # the image section: its class's
    explicit = TrainerConfig.from_dict({"rollout": {"cot": {"max_new_tokens": 24, "top_k": 0}}})
    assert explicit.rollout.cot.top_k == 0
    (tmp_path / "d.yaml").write_text(c.to_yaml())
    assert TrainerConfig.from_yaml(tmp_path / "d.yaml") == c


def test_prompts_are_drawn_in_shuffled_epochs(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("\n".join(f"prompt {i}" for i in range(5)))
    cfg = TrainerConfig.from_dict({"model": {"preset": "tiny"}, "data": {"prompts": str(p), "prompts_per_step": 2},
                                   "loss": {"beta": 0.0}})
    tr = Trainer(cfg, policy=JanusPolicy.from_preset("tiny"), rewards=[nan_reward()])
    seen = [r.prompt for k in range(5) for r in tr.records(k)]
    assert sorted(seen[:5]) == sorted(PROMPTS_5 := [f"prompt {i}" for i in range(5)])  # epoch 1: a permutation
    assert sorted(seen[5:10]) == PROMPTS_5 and seen[:5] != seen[5:10]
    assert [r.prompt for r in tr.records(3)] == seen[6:8]  # a function of the step (exact resume)
    assert PROMPTS  # the shared prompt list is importable (used by the equivalence tests)
