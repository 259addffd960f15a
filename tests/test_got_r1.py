"""GoT-R1's real reward preset (fastbicot.rewards.layout.got_r1_rewards) with tiny random judges: a local
Qwen2.5-VL for R_PI / R_sem / R_spa and a GroundingDINO grounder for R_RI, combined as
R_PI * (R_sem + R_spa) * R_RI; and configs/got_r1.yaml training two steps on the toy GoT policy with it."""

import logging
import os

import pytest
import torch

from fastbicot.rewards.layout import got_r1_rewards
from fastbicot.toy.got import got_sft_examples
from fastbicot.trainer import Trainer, TrainerConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def judges(tmp_path):
    from test_rewards_learned import save_tiny_grounding_dino, save_tiny_qwen_vl

    (tmp_path / "judge").mkdir()
    (tmp_path / "gdino").mkdir()
    _, processor = save_tiny_qwen_vl(tmp_path / "judge")
    save_tiny_grounding_dino(tmp_path / "gdino")
    ens = got_r1_rewards(str(tmp_path / "judge"), str(tmp_path / "gdino"), canvas_size=32, dtype="fp32",
                         judge_processor=processor, box_threshold=0.0)
    return ens


def test_preset_is_the_product_of_its_parts(judges):
    from fastbicot.rollout.engine import decode_images
    from fastbicot.toy.got import build_got_policy

    assert judges.mode == "product" and judges.names == ["pi", "plan", "ri"]
    exs = got_sft_examples(3, seed=2)
    images = decode_images(build_got_policy(layout_tokens=True), torch.tensor([e["image_tokens"] for e in exs]))
    cots = [e["cot"] for e in exs[:2]] + ["a plan without boxes"]
    out = judges(images, [e["prompt"] for e in exs], [e["metadata"] for e in exs], cots)
    c = out.components
    want = c["pi"].double() * (c["plan/sem"].double() + c["plan/spa"].double()) * c["ri"].double()
    torch.testing.assert_close(out.total.double(), want, rtol=1e-6, atol=1e-7)
    for k in ("pi", "plan/sem", "plan/spa", "ri"):
        assert ((c[k] >= 0) & (c[k] <= 1)).all(), k
    assert out.total[2] == 0 and c["ri/malformed"].tolist() == [0.0, 0.0, 1.0]
    assert c["pi"][2] > 0  # the image judge still ran on the malformed sample


def test_got_r1_config_trains_two_steps(tmp_path, judges):
    logging.getLogger("fastbicot.rewards.layout").setLevel(logging.ERROR)
    toy = os.path.join(ROOT, "configs/toy_got.yaml")
    t = TrainerConfig.from_yaml(toy)
    overrides = {"output_dir": str(tmp_path / "run"), "steps": 2, "model.path": None,
                 "model.builder": t.model.builder, "model.dtype": "float32", "model.device": "cpu",
                 "model.gradient_checkpointing": False, "data.prompts": os.path.join(ROOT, t.data.prompts),
                 "data.prompts_per_step": 2, "rollout.num_generations": 2, "rollout.template": t.rollout.template,
                 "rollout.system": t.rollout.system, "rollout.instruction": t.rollout.instruction,
                 "rollout.cot.max_new_tokens": 40, "rollout.guidance_scale": 2.0, "optim.lr": 0.001,
                 "log.progress": False, "log.grid_every": 0, "log.tensorboard": False, "checkpoint.every": 0}
    cfg = TrainerConfig.from_yaml(os.path.join(ROOT, "configs/got_r1.yaml"), overrides)
    try:
        tr = Trainer(cfg, rewards=judges)
        assert tr.policy.eos_token_id == tr.policy.boi_token_id  # the plan ends with <begin_of_image>
        tr.train()
    finally:
        logging.getLogger("fastbicot.rewards.layout").setLevel(logging.NOTSET)
    from fastbicot.trainer.metrics import read_metrics

    rows = read_metrics(os.path.join(cfg.output_dir, "metrics.jsonl"))
    assert len(rows) == 2 and all(r["reward/ri/malformed"] == 1.0 for r in rows)  # a random plan has no boxes
    assert all(r["reward/mean"] == 0.0 for r in rows)
