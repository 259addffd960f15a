"""fastbicot eval on the toy world: files, the table against samples.jsonl, fixed seeds, --no-cot, errors."""

import hashlib
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from fastbicot.evaluate import (
    DEFAULT_TASK_TYPES,
    EvalError,
    batch_seed,
    check_task_types,
    cli,
    default_out_dir,
    evaluate,
)
from fastbicot.trainer.config import TrainerConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY_YAML = os.path.join(ROOT, "configs", "toy.yaml")
TINY = ["rollout.cot.max_new_tokens=6", "threads=1"]
N = 2


@pytest.fixture(scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, one_thread):
    """A random toy policy saved as a transformers-format checkpoint (what the trainer writes as final/)."""
    from fastbicot.toy import build_policy
    from fastbicot.trainer.trainer import save_policy

    path = str(tmp_path_factory.mktemp("ckpt") / "final")
    save_policy(build_policy(seed=0), path)
    return path


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    """Three toy task types, a blank line, and one prompt without task_type (the "all" bucket)."""
    with open(os.path.join(ROOT, "configs", "toy", "prompts.jsonl"), encoding="utf-8") as f:
        lines = [json.loads(x) for x in f if x.strip()]
    picked = [next(r for r in lines if r["task_type"] == t) for t in ("color", "numeracy", "spatial")]
    untyped = dict([r for r in lines if r["task_type"] == "color"][1])
    del untyped["task_type"]  # the toy rewards still need nouns / attr_nouns / numeracy_info
    picked.append(untyped)
    path = str(tmp_path_factory.mktemp("prompts") / "p.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(picked[0]) + "\n\n" + "".join(json.dumps(r) + "\n" for r in picked[1:]))
    return path


@pytest.fixture(scope="module")
def config():
    return TrainerConfig.from_yaml(TOY_YAML, TINY)


@pytest.fixture(scope="module")
def run1(tmp_path_factory, ckpt, prompts, config, one_thread):
    out = str(tmp_path_factory.mktemp("eval") / "out")
    results = evaluate(config, prompts=prompts, out_dir=out, checkpoint=ckpt, num_per_prompt=N, seed=0, batch=3,
                       progress=False)
    return out, results


def read_samples(out):
    with open(os.path.join(out, "samples.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_text(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def pixels(out, rows):
    return [np.asarray(Image.open(os.path.join(out, r["image"])).convert("RGB")) for r in rows]


def test_files_exist_and_parse(run1, ckpt, prompts):
    out, results = run1
    for name in ("results.md", "results.json", "samples.jsonl", "manifest.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
        assert json.load(f) == results
    assert list(results["buckets"]) == ["color", "spatial", "numeracy", "all", "overall"]
    rows = read_samples(out)
    assert len(rows) == 4 * N
    assert [r["task_type"] for r in rows[::N]] == ["color", "numeracy", "spatial", "all"]
    for img in pixels(out, rows):
        assert img.shape == (16, 16, 3)
    for name in ("color", "spatial", "numeracy", "all"):
        assert Image.open(os.path.join(out, "grids", f"{name}.png")).size[0] > 100
    with open(os.path.join(out, "manifest.json"), encoding="utf-8") as f:
        m = json.load(f)
    with open(prompts, "rb") as f:
        assert m["prompts"]["sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert m["complete"] and m["checkpoint"] == os.path.abspath(ckpt) and m["config"]["model"]["path"] == ckpt
    assert m["config"]["model"]["builder"] is None and m["config"]["rollout"]["semantic_cot"] is True
    assert m["num_per_prompt"] == N and m["seed"] == 0 and m["batch"] == 3 and m["images"] == 4 * N
    assert [b["seed"] for b in m["batch_seeds"]] == [batch_seed(0, 0), batch_seed(0, 3)]
    assert m["versions"]["torch"] == torch.__version__ and m["versions"]["transformers"]
    assert {r["seed"] for r in rows[: 3 * N]} == {batch_seed(0, 0)}
    assert TrainerConfig.from_dict(m["config"]).rollout.cot.max_new_tokens == 6  # the resolved config reloads
    md = read_text(os.path.join(out, "results.md"))
    assert "| task type | prompts | images | total | toy_color | toy_count | toy_spatial |" in md
    assert "| **overall** | 4 | 8 |" in md and "| all | 1 | 2 |" in md


def test_table_equals_recomputation_from_samples(run1, config):
    out, results = run1
    rows = read_samples(out)
    keys = results["keys"]
    assert keys == ["total", "toy_color", "toy_count", "toy_spatial"]
    weights = config.rewards.functions[0].options["weights"]
    for r in rows:  # the total is the ensemble's weighted sum of its components
        s = r["scores"]
        assert s["total"] == pytest.approx(sum(w * s[k] for w, k in zip(weights, keys[1:])), abs=1e-6)
    md = read_text(os.path.join(out, "results.md"))
    for bucket, entry in results["buckets"].items():
        sel = rows if bucket == "overall" else [r for r in rows if r["task_type"] == bucket]
        assert entry["images"] == len(sel) and entry["prompts"] == len(sel) // N
        for k in keys:
            x = np.array([r["scores"][k] for r in sel], dtype=np.float64)
            assert entry[k]["count"] == len(x) and entry[k]["nonfinite"] == 0
            assert math.isclose(entry[k]["mean"], x.mean(), rel_tol=1e-12, abs_tol=1e-12)
            assert math.isclose(entry[k]["std"], x.std(ddof=0), rel_tol=1e-9, abs_tol=1e-12)
            assert f"{x.mean():.3f} ± {x.std():.3f}" in md


def test_fixed_seeds_reproduce_images(run1, tmp_path, ckpt, prompts, config, one_thread):
    out1, _ = run1
    out2 = str(tmp_path / "again")
    evaluate(config, prompts=prompts, out_dir=out2, checkpoint=ckpt, num_per_prompt=N, seed=0, batch=3,
             progress=False)
    a, b = read_samples(out1), read_samples(out2)
    assert a == b  # plans, image names and scores
    for x, y in zip(pixels(out1, a), pixels(out2, b)):
        assert np.array_equal(x, y)
    with open(os.path.join(out1, "results.json"), "rb") as f1, open(os.path.join(out2, "results.json"), "rb") as f2:
        assert f1.read() == f2.read()
    out3 = str(tmp_path / "seed1")  # another seed: other images
    evaluate(config, prompts=prompts, out_dir=out3, checkpoint=ckpt, num_per_prompt=N, seed=1, batch=3,
             progress=False)
    c = read_samples(out3)
    assert any(not np.array_equal(x, y) for x, y in zip(pixels(out1, a), pixels(out3, c)))


def test_no_cot_gives_empty_plans(tmp_path, ckpt, prompts, config, one_thread):
    out = str(tmp_path / "nocot")
    results = evaluate(config, prompts=prompts, out_dir=out, checkpoint=ckpt, num_per_prompt=N, use_cot=False,
                       progress=False)
    rows = read_samples(out)
    assert len(rows) == 4 * N and all(r["plan"] == "" for r in rows)
    assert results["settings"]["semantic_cot"] is False
    with open(os.path.join(out, "manifest.json"), encoding="utf-8") as f:
        m = json.load(f)
    assert m["no_cot"] is True and m["config"]["rollout"]["semantic_cot"] is False


def test_unknown_task_type_names_file_and_line(tmp_path, ckpt, config):
    path = str(tmp_path / "bad.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        f.write('{"prompt": "a red square", "task_type": "color"}\n\n{"prompt": "a blue square", '
                '"task_type": "colour"}\n')
    out = str(tmp_path / "never")
    with pytest.raises(EvalError, match=rf"{path}:3: unknown task_type 'colour'"):
        evaluate(config, prompts=path, out_dir=out, checkpoint=ckpt, num_per_prompt=1, progress=False)
    assert not os.path.exists(out)  # checked before anything is written
    from fastbicot.data import load_prompts

    assert check_task_types(load_prompts(path), path, ["color", "colour"]) == ["color", "colour"]
    assert "spatial" in DEFAULT_TASK_TYPES and "non-spatial" in DEFAULT_TASK_TYPES


def test_reused_out_dir_is_refused_unless_overwrite(tmp_path, ckpt, prompts, config, one_thread):
    out = str(tmp_path / "out")
    kw = dict(prompts=prompts, out_dir=out, checkpoint=ckpt, num_per_prompt=1, batch=4, progress=False)
    evaluate(config, **kw)
    with pytest.raises(EvalError, match="already holds an eval.*--overwrite"):
        evaluate(config, **kw)
    stale = os.path.join(out, "images", "99999_00.png")
    open(stale, "wb").close()
    mine = os.path.join(out, "notes.txt")  # not the eval's: kept
    open(mine, "w").close()
    evaluate(config, overwrite=True, **kw)
    assert not os.path.exists(stale) and os.path.exists(mine)
    assert len(read_samples(out)) == 4


def test_checkpoint_must_exist(tmp_path, prompts, config):
    with pytest.raises(FileNotFoundError, match="--checkpoint"):
        evaluate(config, prompts=prompts, out_dir=str(tmp_path / "o"), checkpoint=str(tmp_path / "missing"))
    with pytest.raises(EvalError, match="num_per_prompt"):
        evaluate(config, prompts=prompts, out_dir=str(tmp_path / "o"), num_per_prompt=0)


def test_cli(tmp_path, ckpt, prompts, capsys, one_thread):
    out = str(tmp_path / "cli")
    args = ["--config", TOY_YAML, "--checkpoint", ckpt, "--prompts", prompts, "--out", out, "--num", "1",
            "--no-cot", "--seed", "3", "--batch", "4", "--no-progress", "--rollout.cot.max_new_tokens=4",
            "--threads", "1"]
    assert cli(args) == 0
    assert "| **overall** | 4 | 4 |" in capsys.readouterr().out
    with open(os.path.join(out, "manifest.json"), encoding="utf-8") as f:
        m = json.load(f)
    assert m["seed"] == 3 and m["no_cot"] and m["config"]["rollout"]["cot"]["max_new_tokens"] == 4
    assert m["command"][-2:] == ["--threads", "1"]
    assert cli(args) == 2  # the same out dir again
    assert "already holds an eval" in capsys.readouterr().err
    assert cli(args[:-4] + ["--overwrite", "--task-types", "color,spatial"]) == 2  # numeracy is now unknown
    err = capsys.readouterr().err
    assert f"{prompts}:3: unknown task_type 'numeracy'" in err
    assert cli(["--config", TOY_YAML, "--prompts", prompts, "--out", out, "--bogus.key=1"]) == 2
    assert "bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["--config", TOY_YAML, "--prompts", prompts, "--num", "0"])
    from fastbicot.cli import main  # `fastbicot eval` delegates here

    assert main(["eval"] + args[:-4] + ["--overwrite", "--task-types", "color"]) == 2
    assert "fastbicot eval: error" in capsys.readouterr().err


def test_default_out_dir(config):
    assert default_out_dir(config, "runs/toy/final/", "data/p.jsonl", 10, True, 0) == \
        os.path.join("runs/toy", "eval", "final-p-n10-cot-seed0")
    assert default_out_dir(config, None, "p.txt", 2, False, 1) == \
        os.path.join(config.output_dir, "eval", "model-p-n2-nocot-seed1")
