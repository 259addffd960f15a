"""The command line and the shipped configs, as a user runs them (subprocesses, real files)."""

import json
import os
import subprocess
import sys

import pytest

from fastbicot.trainer import TrainerConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, cwd=ROOT):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "fastbicot", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=900, env=env, check=False)


def test_train_toy_end_to_end_then_generate(tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    common = ["--config", "configs/toy.yaml", f"--output_dir={out}", f"--sft.cache_dir={cache}", "--steps=2",
              "--sft.steps=2", "--data.prompts_per_step=2", "--rollout.num_generations=2", "--log.progress=false",
              "--checkpoint.every=1"]
    r = run("train", *common)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "SFT warm start: 2 steps" in r.stderr and "metrics:" in r.stdout
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == [1, 2] and all("reward/toy_color" in x for x in rows)
    for name in ("reward_curve.png", "config.yaml", "final/config.json", "final/trainer_state.pt",
                 "grids/step_000001.png", "grids/step_000002.png", "checkpoint-000001/trainer_state.pt"):
        assert (out / name).exists(), name
    # the same output dir again: refused with one line, nothing changed
    before = (out / "metrics.jsonl").read_text()
    r = run("train", *common)
    assert r.returncode == 2 and "already holds a run" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert (out / "metrics.jsonl").read_text() == before
    # --overwrite: the SFT warm start comes from the cache this time
    r = run("train", *common, "--overwrite")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "found in the cache" in r.stderr
    # generate from the trained policy
    prompts = tmp_path / "p.jsonl"
    with open(os.path.join(ROOT, "configs/toy/prompts.jsonl")) as f:
        prompts.write_text("".join(f.readlines()[:2]))
    r = run("generate", "--config", "configs/toy.yaml", "--checkpoint", str(out / "final"), "--prompts",
            str(prompts), "--out", str(tmp_path / "gen"), "--num", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "gen" / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and all((tmp_path / "gen" / x["image"]).exists() for x in lines)
    assert (tmp_path / "gen" / "grid.png").exists()


@pytest.mark.parametrize("override,needle", [
    ("--loss.betta=0.1", "loss.betta: unknown setting"),
    ("--loss.beta=.nan", "loss.beta: must be a finite number"),
    ("--loss.beta=nan", "loss.beta: must be a number"),
    ("--rollout.num_generations=2.5", "rollout.num_generations: must be an integer"),
    ("--optim.lr", "needs a value"),
])
def test_bad_settings_exit_2_with_one_line(tmp_path, override, needle):
    r = run("train", "--config", "configs/toy.yaml", f"--output_dir={tmp_path / 'x'}", override)
    assert r.returncode != 0 and needle in r.stderr, r.stderr[-2000:]
    assert len([x for x in r.stderr.splitlines() if x.strip()]) == 1
    assert not (tmp_path / "x").exists()  # nothing written before the config is valid


def test_shipped_configs_load_and_t2i_r1_is_the_default_recipe():
    c = TrainerConfig.from_yaml(os.path.join(ROOT, "configs/t2i_r1.yaml"))
    d = TrainerConfig()
    assert (c.rollout, c.loss, c.optim, c.advantage) == (d.rollout, d.loss, d.optim, d.advantage)
    assert [f.name for f in c.rewards.functions] == ["hps", "git", "gdino", "orm"] and c.rewards.mode == "sum"
    assert (c.rollout.num_generations, c.data.prompts_per_step, c.steps) == (8, 16, 1600)
    t = TrainerConfig.from_yaml(os.path.join(ROOT, "configs/toy.yaml"))
    assert t.model.builder == "fastbicot.toy:build_policy" and t.sft.steps > 0


def test_star_import_exposes_the_public_api():
    ns = {}
    exec("from fastbicot import *", ns)  # noqa: S102 - the statement under test
    for name in ("Trainer", "TrainerConfig", "RolloutEngine", "RolloutConfig", "JanusPolicy", "load_prompts",
                 "generate_images", "vq_decode", "SFTTrainer"):
        assert name in ns, name
