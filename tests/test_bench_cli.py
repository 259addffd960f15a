"""bench/*.py command lines: every flag checked at parse time, --json checked before any work and
written incrementally, a failing implementation gives exit status 1, peak memory per implementation."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
_MODULES = {}


def bench(name):
    """Import bench/<name>.py as a module (once)."""
    if name not in _MODULES:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        _MODULES[name] = module
    return _MODULES[name]


NO_CUDA = not torch.cuda.is_available()
SIZES = ["0", "-1", "2.5", "x", "nan", ""]

BAD_FLAGS = {
    "grpo_loss": [
        *[("--samples", v) for v in SIZES], *[("--hidden", v) for v in SIZES], *[("--reps", v) for v in SIZES],
        *[("--cot", v) for v in ["-1", "1.5", "x"]], *[("--image", v) for v in ["-3", "inf"]],
        ("--methods", "fastbicot,nope"), ("--methods", ""), ("--methods", "fastbicot,fastbicot"),
        ("--device", "gpu"), ("--device", "cuda:0"),
    ],
    "cfg_sampling": [
        *[("--vocab", v) for v in SIZES], *[("--reps", v) for v in SIZES], *[("--batch", v) for v in SIZES],
        ("--dtype", "float64"), ("--configs", "greedy"), ("--methods", "torch_eager,sorting"),
        ("--device", "tpu"),
    ],
    "vq_decode": [
        *[("--iters", v) for v in SIZES], *[("--threads", v) for v in SIZES],
        *[("--warmup", v) for v in ["-1", "0.5", "x"]],
        ("--batches", "1,0"), ("--batches", "1,,2"), ("--batches", "-4"), ("--batches", "a"),
        ("--methods", "hf_fp32,hf_fp64"), ("--methods", ","), ("--config", "huge"), ("--device", "cuda:x"),
        ("--device", "mps"),
    ],
    "rollout_throughput": [
        *[("--batch", v) for v in SIZES], *[("--repeats", v) for v in SIZES], *[("--threads", v) for v in SIZES],
        *[("--prompt-len", v) for v in ["1", "0", "-5", "3.5", "100000"]],
        *[("--guidance", v) for v in ["nan", "inf", "-1", "x"]],
        *[("--bandwidth-gbs", v) for v in ["0", "-3", "nan", "inf"]],
        ("--impls", "fastbicot,vllm"), ("--impls", ""), ("--preset", "janus-9b"), ("--dtype", "float8"),
        ("--clock", "gpu"), ("--device", "cuda:7"),
    ],
    "rewards": [
        *[("--batch", v) for v in SIZES], *[("--iters", v) for v in SIZES], *[("--size", v) for v in ["4", "0", "x"]],
        ("--checkpoint", "HPSReward"), ("--checkpoint", "NoSuchReward=/tmp"), ("--checkpoint", "HPSReward=/no/dir"),
        ("--device", "gpu"),
    ],
    "train_step": [
        *[("--prompts", v) for v in SIZES], *[("--rounds", v) for v in SIZES], *[("--repeats", v) for v in SIZES],
        *[("--generations", v) for v in ["1", "0", "x"]], ("--malloc", "jemalloc"), ("--heads", "huge"),
        ("--micro-batch-tokens", "-1"), ("--micro-batch-tokens", "64,64"), ("--micro-batch-tokens", "a"),
        ("--preset", "janus-9b"), ("--device", "gpu"), ("--layers", "-1"), ("--layers", "x"), ("--layers", "3"),
    ],
}
if NO_CUDA:
    for flags in BAD_FLAGS.values():
        flags.append(("--device", "cuda"))
CASES = [(name, flag, value) for name, flags in BAD_FLAGS.items() for flag, value in flags]


@pytest.mark.parametrize("name,flag,value", CASES, ids=[f"{n}:{f}={v}" for n, f, v in CASES])
def test_bad_flags_fail_at_parse_time_naming_the_flag(name, flag, value, capsys, tmp_path):
    out = tmp_path / "out.json"
    with pytest.raises(SystemExit) as err:
        bench(name).main([f"{flag}={value}", "--json", str(out)])
    assert err.value.code == 2
    stderr = capsys.readouterr().err
    assert f"argument {flag}" in stderr, stderr
    assert not out.exists()  # nothing ran


@pytest.mark.parametrize("name", sorted(BAD_FLAGS))
def test_unwritable_json_fails_before_running(name, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for target in (tmp_path, blocker / "out.json"):
        with pytest.raises(SystemExit) as err:
            bench(name).main(["--json", str(target)])
        assert err.value.code == 2
        assert "argument --json" in capsys.readouterr().err


def _load(path):
    with open(path) as f:
        return json.load(f)


def test_grpo_loss_failure_is_exit_1_and_keeps_rows(tmp_path, monkeypatch):
    mod = bench("grpo_loss")
    out = tmp_path / "g" / "out.json"
    small = ["--device", "cpu", "--samples", "1", "--cot", "1", "--image", "2", "--hidden", "8", "--reps", "1",
             "--methods", "fastbicot,torch_eager", "--json", str(out)]

    def broken(*a, **k):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(mod, "eager_step", broken)
    assert mod.main(small) == 1
    doc = _load(out)
    assert doc["complete"] is True
    ok = [r for r in doc["rows"] if "error" not in r]
    bad = [r for r in doc["rows"] if "error" in r]
    assert {r["method"] for r in ok} == {"fastbicot"} and len(ok) == 2 and all(r["ms"] > 0 for r in ok)
    assert {r["method"] for r in bad} == {"torch_eager"} and "injected failure" in bad[0]["error"]
    # a crash mid-run (not an Exception) leaves every row measured before it in the file
    calls = {"n": 0}
    real = mod.measure

    def crash_on_third(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(mod, "measure", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        mod.main(small)
    doc = _load(out)
    assert doc["complete"] is False and len(doc["rows"]) == 2


def test_cfg_sampling_failure_is_exit_1(tmp_path, monkeypatch):
    mod = bench("cfg_sampling")
    out = tmp_path / "out.json"
    monkeypatch.setattr(mod, "torch_eager", lambda *a: (_ for _ in ()).throw(ValueError("injected")))
    rc = mod.main(["--device", "cpu", "--no-compile", "--batch", "2", "--vocab", "4096", "--reps", "1",
                   "--configs", "plain", "--methods", "fastbicot,torch_eager", "--json", str(out)])
    assert rc == 1
    doc = _load(out)
    assert doc["complete"] and [r["method"] for r in doc["results"]] == ["fastbicot"]
    assert doc["failures"][0]["method"] == "torch_eager" and "injected" in doc["failures"][0]["error"]


def test_vq_decode_failure_is_exit_1(tmp_path, monkeypatch):
    mod = bench("vq_decode")
    out = tmp_path / "out.json"
    real = mod._make

    def make(method, model, dtype):
        if method == "fastbicot_torch_fp32":
            raise RuntimeError("injected")
        return real(method, model, dtype)

    monkeypatch.setattr(mod, "_make", make)
    monkeypatch.setitem(mod.CONFIGS, "tiny", {**mod.CONFIGS["tiny"], "num_patches": 4})
    rc = mod.main(["--device", "cpu", "--config", "tiny", "--methods", "hf_fp32,fastbicot_torch_fp32",
                   "--warmup", "0", "--iters", "1", "--json", str(out)])
    assert rc == 1
    doc = _load(out)
    assert doc["complete"] and doc["results"][0]["method"] == "hf_fp32" and doc["results"][0]["ms"] > 0
    assert "injected" in doc["results"][1]["error"]


def test_rollout_failure_is_exit_1_and_others_are_timed(tmp_path, monkeypatch):
    mod = bench("rollout_throughput")
    out = tmp_path / "out.json"

    def broken(*a, **k):
        raise RuntimeError("injected hf failure")

    monkeypatch.setattr(mod, "hf_generate_images", broken)
    monkeypatch.setattr(mod, "measure_cpu_bandwidth_gbs", lambda: 10.0)
    rc = mod.main(["--preset", "tiny", "--device", "cpu", "--batch", "1", "--repeats", "1",
                   "--impls", "hf_generate,fastbicot", "--json", str(out)])
    assert rc == 1
    doc = _load(out)
    assert doc["complete"] and [r["impl"] for r in doc["results"]] == ["fastbicot"]
    assert "injected hf failure" in doc["errors"]["hf_generate"]
    assert doc["results"][0]["images_per_s"] > 0


def test_rollout_peak_memory_is_per_implementation():
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs a writable /proc/self/clear_refs")
    mod = bench("rollout_throughput")
    keep = []

    def big():
        t = torch.ones(300 * 2**20 // 4)  # 300 MB, touched
        keep.append(t)
        keep.pop()

    secs, peaks, errors = mod.run_all({"big": big, "small": lambda: None}, torch.device("cpu"), 1)
    assert not errors and set(secs) == {"big", "small"}
    if None in peaks.values():
        pytest.skip("this kernel does not reset VmHWM through /proc/self/clear_refs")
    # with a process-wide peak (ru_maxrss) "small" would report big's 300 MB too
    assert peaks["big"] - peaks["small"] > 0.2, peaks


def test_rewards_failure_is_exit_1(tmp_path, monkeypatch):
    mod = bench("rewards")
    out = tmp_path / "out.json"

    def broken(images, queries, per_phrase=4):
        raise RuntimeError("injected detector failure")

    monkeypatch.setattr(mod, "random_detector", broken)
    monkeypatch.setattr(mod, "RANDOM_BUILDERS", {})
    monkeypatch.setattr(mod, "OTHER_MODEL_REWARDS", [])
    rc = mod.main(["--device", "cpu", "--batch", "2", "--size", "16", "--iters", "1", "--json", str(out)])
    assert rc == 1
    doc = _load(out)
    results = doc["results"]
    assert doc["complete"]
    assert "injected detector failure" in results["detector_rules (synthetic detections)"]["error"]
    judge = results["remote_judge (loopback, instant answer)"]
    assert judge["images_per_s"] > 0 and "peak_mem_gb" in judge


def test_train_step_ratios_are_medians_of_per_round_ratios(tmp_path, monkeypatch):
    """The rounds alternate the implementations; each ratio is taken within its round, then the median."""
    mod = bench("train_step")
    out = tmp_path / "out.json"
    calls = []
    step_s = {"seed_style": [1.0, 3.0, 1.2], "fastbicot": [0.5, 0.5, 0.3]}  # a drifting machine
    update_s = {"seed_style": [0.4, 0.9, 0.5], "fastbicot": [0.2, 0.3, 0.1]}

    def child(flag, impl, args, mbt, malloc):
        calls.append((flag, impl, dict(malloc)))
        if flag == "update-peak":
            return {"update_peak_mib": {"seed_style": 8.0, "fastbicot": 2.0}[impl]}
        k = sum(1 for c in calls if c[:2] == (flag, impl)) - 1
        return {"rollout": 0.0, "decode": 0.0, "reward": 0.0, "update": update_s[impl][k], "step": step_s[impl][k],
                "images_per_s": 4 / step_s[impl][k]}

    monkeypatch.setattr(mod, "child", child)
    assert mod.main(["--prompts", "2", "--generations", "2", "--rounds", "3", "--json", str(out)]) == 0
    assert [c[:2] for c in calls[:6]] == [("time", "seed_style"), ("time", "fastbicot")] * 3  # alternating
    assert all(c[2] == mod.PINNED_MALLOC for c in calls if c[0] == "time")
    assert all(c[2] == mod.TRACKING_MALLOC for c in calls if c[0] == "update-peak")
    doc = _load(out)
    q = doc["results"]["ratios"]
    per_round = sorted(a / b for a, b in zip(step_s["seed_style"], step_s["fastbicot"]))  # 2, 6, 4
    assert q["fastbicot"]["images_per_s"] == pytest.approx(per_round[1])  # 4.0, not a ratio of medians (1.2/0.5)
    assert q["fastbicot"]["update_time"] == pytest.approx(sorted(
        a / b for a, b in zip(update_s["seed_style"], update_s["fastbicot"]))[1])
    assert q["fastbicot"]["update_peak_memory"] == pytest.approx(0.25)
    assert doc["results"]["seed_style"]["step"] == pytest.approx(1.2)  # medians over the rounds
    assert doc["complete"] and len(doc["results"]["fastbicot"]["rounds"]) == 3


def test_train_step_runs_end_to_end(tmp_path, capsys):
    """The real child processes on the smallest work (one decoder layer of the tiny preset): both
    implementations timed and peak-measured."""
    out = tmp_path / "out.json"
    rc = bench("train_step").main(["--prompts", "1", "--generations", "2", "--cot-tokens", "2", "--repeats", "1",
                                   "--rounds", "1", "--layers", "1", "--json", str(out)])
    assert rc == 0
    assert "tiny+1-layers on cpu" in capsys.readouterr().out
    doc = _load(out)
    assert doc["complete"] and doc["config"]["malloc"] == "pinned"
    for impl in ("seed_style", "fastbicot"):
        r = doc["results"][impl]
        assert r["images_per_s"] == pytest.approx(2 / r["step"]) and r["update"] > 0 and r["update_peak_mib"] > 0
    q = doc["results"]["ratios"]["fastbicot"]
    assert q["images_per_s"] == pytest.approx(doc["results"]["fastbicot"]["images_per_s"] /
                                              doc["results"]["seed_style"]["images_per_s"])


def _seed_style():
    import argparse

    from fastbicot.models import JanusPolicy

    mod = bench("train_step")
    args = argparse.Namespace(generations=3, cot_tokens=4, seed=int(torch.randint(0, 2**31, ()).item()))
    policy = JanusPolicy.from_preset("tiny", seed=args.seed, dtype=torch.float64)
    return mod.SeedStyleStep(policy, args), policy


def test_seed_style_logps_follow_the_seeds_formula():
    """``_get_per_token_logps`` as the seed writes it (the text head over every position, then the
    completion's slice; the image head over BOI + image tokens) gives each target's log-prob under the
    position before it: checked against a float64 log_softmax of the logits at exactly those positions."""
    step, p = _seed_style()
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    for head, vocab in (("text", p.hf_model.config.text_config.vocab_size), ("image", 64)):
        B, L, n = 3, int(torch.randint(6, 20, (), generator=g)), int(torch.randint(1, 5, (), generator=g))
        ids = torch.randint(0, min(vocab, 256), (B, L), generator=g)
        if head == "text":
            emb = p.embed_text(ids)
        else:
            emb = torch.cat([p.embed_text(ids[:, : L - n]), p.embed_image(ids[:, L - n:])], 1)
        mask = torch.ones(B, L, dtype=torch.long)
        mask[0, : L - n - 1] = 0  # a padded row (left padding, as the seed's CoT batch)
        got = step.logps(p, emb, mask, ids, n, head)
        h = p.language_model(inputs_embeds=emb, attention_mask=mask).last_hidden_state[:, L - n - 1: L - 1]
        logits = p.text_logits(h) if head == "text" else p.image_logits(h)
        want = torch.log_softmax(logits.double(), -1).gather(-1, ids[:, L - n:, None])[..., 0]
        assert got.shape == (B, n)
        torch.testing.assert_close(got.double(), want, rtol=1e-10, atol=1e-10)


def test_seed_style_rolls_out_one_prompt_per_micro_batch(monkeypatch):
    """run_grpo.sh: per_device_train_batch_size 1 with gradient accumulation -- each prompt rolls out its
    own samples and runs its own backward; the optimizer steps once, after the last prompt."""
    step, _ = _seed_style()
    seen, steps = [], []
    cot = step.cot

    def spy_cot(texts):
        seen.append(list(texts))
        return cot(texts)

    monkeypatch.setattr(step, "cot", spy_cot)
    monkeypatch.setattr(step.opt, "step", lambda *a, **k: steps.append(len(seen)))
    timing = step.step(["a red cat", "two blue dogs above a tree"])
    assert seen == [["a red cat"], ["two blue dogs above a tree"]] and steps == [2]
    assert all(timing[k] > 0 for k in ("rollout", "decode", "update"))


def test_update_window_reports_the_largest_growth_over_windows():
    """The seed-style update's peak: the largest growth above the first window's start, over windows
    separated by work that is not the update (here the RSS high-water mark of real allocations)."""
    mod = bench("train_step")
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc")
    w = mod.UpdateWindow(torch.device("cpu"))
    mod.UpdateWindow.track_rss = True
    try:
        with w:
            a = torch.ones(48 * 2**18)  # 48 MiB, touched
            del a
        b = torch.ones(16 * 2**18)  # outside any window: not counted
        del b
        with w:
            c = torch.ones(24 * 2**18)
            del c
    finally:
        mod.UpdateWindow.track_rss = False
    assert 40 < w.peak_mib < 60
