"""Multi-process training (trainer/distributed.py) and durable checkpoints (trainer/checkpoint.py).

* 2 gloo ranks under torchrun and 1 process, same global batch: equal rollouts (every token), equal
  rewards, equal losses and equal updated weights (float tolerance: gradients are summed in another
  order) for 2 steps; a checkpoint written by 2 ranks resumes in 1 process (DCP resharding) and
  continues as the uninterrupted run.
* DAPO's dynamic sampling (``advantage.refill``) under 2 ranks refills to the batch one process trains on.
* LoRA under FSDP2: 2 ranks train the adapters as 1 process does; their checkpoint resumes in 1 process.
* SIGKILL between checkpoints and SIGKILL while a checkpoint is being written: ``--resume`` gives a
  metrics.jsonl equal line for line (timings aside) to an uninterrupted run and bit-identical final
  weights; the last good checkpoint is never damaged.
* bad input: a world size that does not divide the prompt groups, a corrupt checkpoint, a config
  change that breaks the resume.

The runs use the toy world (configs/toy.yaml) made small; each is a fresh process.
"""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "dist_worker.py")
SMALL = ["--sft.steps=0", "--data.prompts_per_step=4", "--rollout.num_generations=4", "--rollout.cot.max_new_tokens=8",
         "--log.progress=false", "--log.tensorboard=false", "--log.grid_every=0", "--distributed.timeout_s=300"]
TIMING = ("time/", "images_per_s")


def _env():
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
                PYTHONWARNINGS="ignore")


def _run(cmd, timeout=900):
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout, check=False)
    return proc


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _torchrun(n, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *args]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    out = {}
    _ok(_run(_torchrun(2, WORKER, str(d / "w2.json"), *SMALL, "--steps=2", f"--output_dir={d / 'r2'}",
                       "--checkpoint.every=1")))
    _ok(_run([sys.executable, WORKER, str(d / "w1.json"), *SMALL, "--steps=2", f"--output_dir={d / 'r1'}"]))
    # resume the 2-rank run's step-1 checkpoint in one process (its output_dir: a copy)
    shutil.copytree(d / "r2", d / "rr")
    _ok(_run([sys.executable, WORKER, str(d / "wr.json"), "--resume", str(d / "rr" / "checkpoint-000001"), *SMALL,
              "--steps=2", f"--output_dir={d / 'rr'}"]))
    for k in ("w1", "w2", "wr"):
        out[k] = json.loads((d / f"{k}.json").read_text())
    out["dir"] = d
    return out


def _close_metrics(a, b, rtol):
    for k, v in a.items():
        if k.startswith(TIMING):
            continue
        assert k in b, k
        assert v == pytest.approx(b[k], rel=rtol, abs=1e-7), (k, v, b[k])


def test_two_ranks_generate_the_same_rollouts_as_one(runs):
    w1, w2 = runs["w1"], runs["w2"]
    assert w2["world_size"] == 2 and w1["world_size"] == 1
    for s1, s2 in zip(w1["steps"], w2["steps"], strict=True):
        assert len(s1["samples"]) == 16
        # (global prompt, generation, CoT ids, image tokens, reward): every token of every sample
        assert s1["samples"] == s2["samples"]


def test_two_ranks_give_the_same_losses_and_weights_as_one(runs):
    w1, w2 = runs["w1"], runs["w2"]
    for s1, s2 in zip(w1["steps"], w2["steps"], strict=True):
        _close_metrics(s1["metrics"], s2["metrics"], rtol=1e-5)
    assert w1["steps"][1]["metrics"]["loss"] != 0.0
    for name, v1 in w1["params"].items():
        assert v1 == pytest.approx(w2["params"][name], abs=2e-6), name
        assert w1["norms"][name] == pytest.approx(w2["norms"][name], rel=1e-6), name


def test_a_two_rank_checkpoint_resumes_in_one_process(runs):
    w1, wr = runs["w1"], runs["wr"]
    assert wr["world_size"] == 1 and len(wr["steps"]) == 1  # step 2 only
    assert wr["steps"][0]["samples"] == w1["steps"][1]["samples"]
    _close_metrics(wr["steps"][0]["metrics"], w1["steps"][1]["metrics"], rtol=1e-5)
    for name, v in w1["params"].items():
        assert wr["params"][name] == pytest.approx(v, abs=2e-6), name
    ckpt = runs["dir"] / "r2" / "checkpoint-000002"
    assert sorted(os.listdir(ckpt / "rng")) == ["rank-00000.pt", "rank-00001.pt"]
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "optim" / ".metadata").is_file()


def test_dynamic_sampling_refills_the_same_batch_on_two_ranks_as_on_one(tmp_path):
    """Most groups score no reward spread (tests/dist_worker.py ``gated_reward``): the refill generates
    batches of uneven size (odd ones split unevenly over the ranks, one group leaves a rank without work)
    until 4 groups are kept. 2 ranks must train on the very batch 1 process does: every sample, the
    refill counts, the losses and the updated weights."""
    args = [*SMALL, "--steps=2", "--advantage.filter_zero_std=true", "--advantage.refill=new_prompts",
            "--advantage.max_gen_batches=0"]
    _ok(_run(_torchrun(2, WORKER, str(tmp_path / "w2.json"), "--gated-reward", *args,
                       f"--output_dir={tmp_path / 'r2'}")))
    _ok(_run([sys.executable, WORKER, str(tmp_path / "w1.json"), "--gated-reward", *args,
              f"--output_dir={tmp_path / 'r1'}"]))
    w1, w2 = (json.loads((tmp_path / f"w{n}.json").read_text()) for n in (1, 2))
    rounds = [s["metrics"]["groups/gen_batches"] for s in w1["steps"]]
    assert max(rounds) >= 2, rounds  # the refill ran
    for s1, s2 in zip(w1["steps"], w2["steps"], strict=True):
        assert len(s1["samples"]) == 16 and s1["samples"] == s2["samples"]
        assert all(any(x[4] != 0 for x in s1["samples"] if x[0] == g) for g in range(4))  # all kept have a spread
        for k in ("groups/gen_batches", "groups/refilled", "groups/first_batch_kept"):
            assert s1["metrics"][k] == s2["metrics"][k], k
        _close_metrics(s1["metrics"], s2["metrics"], rtol=1e-5)
    for name, v1 in w1["params"].items():
        assert v1 == pytest.approx(w2["params"][name], abs=2e-6), name


def test_lora_on_two_ranks_equals_one_process_and_resumes_in_one(tmp_path):
    """LoRA adapters inside FSDP2 units (frozen base weights and trainable adapters sharded together; the
    KL reference is the policy with its adapters disabled, through the FSDP root): 2 ranks give the
    rollouts, losses and adapter weights of 1 process, and the 2-rank checkpoint (adapter gathered into
    peft's format, masters by DCP) continues in 1 process as the uninterrupted run."""
    pytest.importorskip("peft")
    args = [*SMALL, "--steps=2", "--lora.enabled=true", "--lora.r=4", "--lora.alpha=8"]
    _ok(_run(_torchrun(2, WORKER, str(tmp_path / "w2.json"), *args, f"--output_dir={tmp_path / 'r2'}",
                       "--checkpoint.every=1")))
    _ok(_run([sys.executable, WORKER, str(tmp_path / "w1.json"), *args, f"--output_dir={tmp_path / 'r1'}"]))
    ckpt = tmp_path / "r2" / "checkpoint-000001"
    _ok(_run([sys.executable, WORKER, str(tmp_path / "wr.json"), "--resume", str(ckpt), *args,
              f"--output_dir={tmp_path / 'r2'}"]))
    w1, w2, wr = (json.loads((tmp_path / f"w{n}.json").read_text()) for n in ("1", "2", "r"))
    assert w1["params"] and all(".lora_" in n for n in w1["params"])  # only the adapters train
    for s1, s2 in zip(w1["steps"], w2["steps"], strict=True):
        assert s1["samples"] == s2["samples"]
        _close_metrics(s1["metrics"], s2["metrics"], rtol=1e-5)
    assert w1["steps"][1]["metrics"]["kl"] > 0  # the adapters moved the policy away from the reference
    assert wr["steps"][0]["samples"] == w1["steps"][1]["samples"]
    _close_metrics(wr["steps"][0]["metrics"], w1["steps"][1]["metrics"], rtol=1e-5)
    for name, v1 in w1["params"].items():
        assert w2["norms"][name] > 0, name
        assert v1 == pytest.approx(w2["params"][name], abs=2e-6), name
        assert v1 == pytest.approx(wr["params"][name], abs=2e-6), name
    from safetensors.torch import load_file

    saved = load_file(str(ckpt / "adapter_model.safetensors"))  # gathered, not one rank's shard
    assert len(saved) == len(w1["params"]) and all(".lora_" in k for k in saved)
    for k, v in saved.items():
        assert (v.shape[0] if "lora_A" in k else v.shape[1]) == 4, (k, v.shape)
        assert (v.shape[1] if "lora_A" in k else v.shape[0]) >= 64, (k, v.shape)  # full width, not a half


def test_mini_batches_and_token_budget_on_two_ranks_equal_one_process(tmp_path):
    """optim.mini_batches=2 (two optimizer steps per rollout, the second off-policy) with a token budget
    that cuts each rank's groups into a different number of micro-batches (the ranks with fewer repeat
    their last one with weight 0, so every rank runs the same forwards; with this seeded toy run, rank 1
    cuts one mini-batch into 4 pieces where rank 0 has 5): 2 ranks = 1 process."""
    args = [*SMALL, "--steps=2", "--optim.mini_batches=2", "--optim.micro_batch_tokens=130"]
    _ok(_run(_torchrun(2, WORKER, str(tmp_path / "w2.json"), *args, f"--output_dir={tmp_path / 'r2'}")))
    _ok(_run([sys.executable, WORKER, str(tmp_path / "w1.json"), *args, f"--output_dir={tmp_path / 'r1'}"]))
    w1, w2 = (json.loads((tmp_path / f"w{n}.json").read_text()) for n in (1, 2))
    for s1, s2 in zip(w1["steps"], w2["steps"], strict=True):
        assert s1["samples"] == s2["samples"]
        _close_metrics(s1["metrics"], s2["metrics"], rtol=1e-5)
    for name, v1 in w1["params"].items():
        assert v1 == pytest.approx(w2["params"][name], abs=2e-6), name


def test_the_world_size_must_divide_the_prompt_groups():
    from fastbicot.trainer.distributed import Parallel

    assert list(Parallel(1, 2).local_slice(6)) == [3, 4, 5]
    with pytest.raises(ValueError, match=r"data.prompts_per_step=3 is not divisible by the world size 2"):
        Parallel(0, 2).local_slice(3)


def test_a_stuck_rank_stops_the_others_with_an_error(tmp_path):
    """Rank 1 stops answering: rank 0's next collective times out (distributed.timeout_s) and the run
    ends with an error naming the timeout instead of hanging."""
    proc = _run(_torchrun(2, WORKER, str(tmp_path / "w.json"), "--hang-rank", "1", *SMALL[:-1], "--steps=1",
                          f"--output_dir={tmp_path / 'r'}", "--distributed.timeout_s=15"), timeout=600)
    assert proc.returncode != 0
    assert "timed out" in (proc.stdout + proc.stderr).lower() or "timeout" in (proc.stdout + proc.stderr).lower()
    assert not (tmp_path / "w.json").exists()


def test_filtered_groups_keep_their_place_with_zero_weight(seed):
    """Under FSDP every rank runs the same forwards: DAPO-filtered samples stay in the batch with weight
    0, and the others get exactly the weights of the batch that drops them."""
    from fastbicot.trainer.batch import aggregation_weights

    class OneRank:  # an enabled world of one rank: the collectives are the identity
        enabled, world_size = True, 1

        def sum(self, x):
            return x

        def max(self, x):
            return x

    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 9, (10,), generator=g)
    seq = torch.repeat_interleave(torch.arange(10), lens)
    seg = torch.randint(0, 2, seq.shape, generator=g)
    groups = seq // 3
    keep_groups = torch.tensor([True, False, True, False])
    live = keep_groups[groups]
    for agg in ("group_token_mean", "token_mean", "seq_mean", "dr_grpo"):
        full = aggregation_weights(seq, seg, groups, aggregation=agg, text_weight=2.0, live=live, world=OneRank())
        kept = aggregation_weights(seq[live], seg[live], groups[live], aggregation=agg, text_weight=2.0)
        assert torch.equal(full[~live], torch.zeros_like(full[~live])), agg
        torch.testing.assert_close(full[live], kept, rtol=1e-12, atol=0, msg=agg)


# ---- SIGKILL and resume (one process, the CLI) ----------------------------------------------------

CRASH = """
import os, signal, sys
import fastbicot.trainer.checkpoint as ck
import fastbicot.trainer.metrics as mt
when = sys.argv[1]
if when.startswith("after-step-"):
    n = int(when.rsplit("-", 1)[1])
    log = mt.MetricsLogger.log
    def killing_log(self, m):
        log(self, m)
        if m["step"] == n:
            os.kill(os.getpid(), signal.SIGKILL)
    mt.MetricsLogger.log = killing_log
else:  # "publishing-<name>": the checkpoint is written under its temporary name, not yet renamed
    name = when.split("-", 1)[1]
    publish = ck._publish
    def killing_publish(tmp, dst):
        if os.path.basename(dst) == name:
            os.kill(os.getpid(), signal.SIGKILL)
        publish(tmp, dst)
    ck._publish = killing_publish
from fastbicot.cli import main
sys.exit(main(sys.argv[2:]))
"""
TRAIN = ["train", "--config", os.path.join(ROOT, "configs", "toy.yaml"), *SMALL[:-1], "--data.prompts_per_step=2",
         "--steps=5", "--checkpoint.every=2", "--checkpoint.keep=1"]


def _metrics(out_dir):
    lines = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [{k: v for k, v in m.items() if not k.startswith(TIMING)} for m in lines]


def _final_weights(out_dir):
    from safetensors.torch import load_file

    return load_file(str(out_dir / "final" / "model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    d = tmp_path_factory.mktemp("uninterrupted") / "run"
    _ok(_run([sys.executable, "-m", "fastbicot", *TRAIN, f"--output_dir={d}"]))
    return d


@pytest.mark.parametrize("when", ["after-step-3", "publishing-checkpoint-000004"])
def test_sigkill_then_resume_equals_an_uninterrupted_run(uninterrupted, tmp_path, when):
    d = tmp_path / "run"
    proc = _run([sys.executable, "-c", CRASH, when, *TRAIN, f"--output_dir={d}"])
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    if when == "after-step-3":
        assert len(_metrics(d)) == 3 and not (d / "final").exists()
    else:  # killed mid-write: the temporary directory is there, the good checkpoint of step 2 intact
        assert (d / ".tmp-checkpoint-000004").is_dir() and not (d / "checkpoint-000004").exists()
        assert (d / "checkpoint-000002" / "trainer_state.pt").is_file()
    assert sorted(p.name for p in d.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-000002"]
    proc = _ok(_run([sys.executable, "-m", "fastbicot", *TRAIN, f"--output_dir={d}", "--resume"]))
    assert "resumed from" in proc.stderr and "at step 2" in proc.stderr
    assert _metrics(d) == _metrics(uninterrupted)  # line for line, bit for bit (CPU)
    a, b = _final_weights(d), _final_weights(uninterrupted)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (d / ".tmp-checkpoint-000004").exists()


def test_resume_refuses_a_corrupt_checkpoint_and_a_changed_config(uninterrupted, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(uninterrupted, d)
    shutil.rmtree(d / "final")
    proc = _run([sys.executable, "-m", "fastbicot", *TRAIN, f"--output_dir={d}", "--resume",
                 "--rollout.num_generations=2"])
    assert proc.returncode == 2 and "rollout.num_generations" in proc.stderr, proc.stderr[-2000:]
    state = d / "checkpoint-000004" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])  # truncated
    proc = _run([sys.executable, "-m", "fastbicot", *TRAIN, f"--output_dir={d}", "--resume"])
    assert proc.returncode != 0 and "trainer_state.pt" in proc.stderr and "corrupt" in proc.stderr, proc.stderr[-2000:]
    assert (d / "metrics.jsonl").read_text() == (uninterrupted / "metrics.jsonl").read_text()  # nothing lost


def test_a_failed_checkpoint_write_replaces_nothing(seed, tmp_path, monkeypatch):
    import errno

    from helpers import make_trainer

    from fastbicot.trainer import TrainingError, checkpoint

    trainer = make_trainer(seed, tmp_path, dtype="float32")
    trainer.step()
    good = trainer.save_checkpoint()
    before = {p.name: p.read_bytes() for p in sorted((tmp_path / "run" / "checkpoint-000001").rglob("*")) if p.is_file()}
    trainer.step()

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "optimizer_state", full_disk)
    with pytest.raises(TrainingError, match=r"step 2: writing the checkpoint .*checkpoint-000002.* failed .*No space "
                                            r"left on device.*previous checkpoints are intact"):
        trainer.save_checkpoint()
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-000001"]
    after = {p.name: p.read_bytes() for p in sorted((run / "checkpoint-000001").rglob("*")) if p.is_file()}
    assert after == before and os.path.basename(good) == "checkpoint-000001"
