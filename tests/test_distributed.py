"""Multi-process training (trainer/distributed.py) and durable checkpoints (trainer/checkpoint.py).

* 2 gloo ranks under torchrun and 1 process, same global batch: equal rollouts (every token), equal
  rewards, equal losses and equal updated weights (float tolerance: gradients are summed in another
  order) for 2 steps; a checkpoint written by 2 ranks resumes in 1 process (DCP resharding) and
  continues as the uninterrupted run.
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
import sys

import pytest
import torch
from helpers import ROOT, SMALL, TIMING, WORKER, close_metrics, ok, run, torchrun


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    out = {}
    ok(run(torchrun(2, WORKER, str(d / "w2.json"), *SMALL, "--steps=2", f"--output_dir={d / 'r2'}",
                       "--checkpoint.every=1")))
    ok(run([sys.executable, WORKER, str(d / "w1.json"), *SMALL, "--steps=2", f"--output_dir={d / 'r1'}"]))
    # resume the 2-rank run's step-1 checkpoint in one process (its output_dir: a copy)
    shutil.copytree(d / "r2", d / "rr")
    ok(run([sys.executable, WORKER, str(d / "wr.json"), "--resume", str(d / "rr" / "checkpoint-000001"), *SMALL,
              "--steps=2", f"--output_dir={d / 'rr'}"]))
    for k in ("w1", "w2", "wr"):
        out[k] = json.loads((d / f"{k}.json").read_text())
    out["dir"] = d
    return out


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
        close_metrics(s1["metrics"], s2["metrics"], rtol=1e-5)
    assert w1["steps"][1]["metrics"]["loss"] != 0.0
    for name, v1 in w1["params"].items():
        assert v1 == pytest.approx(w2["params"][name], abs=2e-6), name
        assert w1["norms"][name] == pytest.approx(w2["norms"][name], rel=1e-6), name


def test_a_two_rank_checkpoint_resumes_in_one_process(runs):
    w1, wr = runs["w1"], runs["wr"]
    assert wr["world_size"] == 1 and len(wr["steps"]) == 1  # step 2 only
    assert wr["steps"][0]["samples"] == w1["steps"][1]["samples"]
    close_metrics(wr["steps"][0]["metrics"], w1["steps"][1]["metrics"], rtol=1e-5)
    for name, v in w1["params"].items():
        assert wr["params"][name] == pytest.approx(v, abs=2e-6), name
    ckpt = runs["dir"] / "r2" / "checkpoint-000002"
    assert sorted(os.listdir(ckpt / "rng")) == ["rank-00000.pt", "rank-00001.pt"]
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "optim" / ".metadata").is_file()


def test_the_world_size_must_divide_the_prompt_groups():
    from fastbicot.trainer.distributed import Parallel

    assert list(Parallel(1, 2).local_slice(6)) == [3, 4, 5]
    with pytest.raises(ValueError, match=r"data.prompts_per_step=3 is not divisible by the world size 2"):
        Parallel(0, 2).local_slice(3)


def test_a_stuck_rank_stops_the_others_with_an_error(tmp_path):
    """Rank 1 stops answering: rank 0's next collective times out (distributed.timeout_s) and the run
    ends with an error naming the timeout instead of hanging."""
    proc = run(torchrun(2, WORKER, str(tmp_path / "w.json"), "--hang-rank", "1", *SMALL[:-1], "--steps=1",
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
    ok(run([sys.executable, "-m", "fastbicot", *TRAIN, f"--output_dir={d}"]))
    return d


@pytest.mark.parametrize("when", ["after-step-3", "publishing-checkpoint-000004"])
def test_sigkill_then_resume_equals_an_uninterrupted_run(uninterrupted, tmp_path, when):
    d = tmp_path / "run"
    proc = run([sys.executable, "-c", CRASH, when, *TRAIN, f"--output_dir={d}"])
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    if when == "after-step-3":
        assert len(_metrics(d)) == 3 and not (d / "final").exists()
    else:  # killed mid-write: the temporary directory is there, the good checkpoint of step 2 intact
        assert (d / ".tmp-checkpoint-000004").is_dir() and not (d / "checkpoint-000004").exists()
        assert (d / "checkpoint-000002" / "trainer_state.pt").is_file()
    assert sorted(p.name for p in d.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-000002"]
    proc = ok(run([sys.executable, "-m", "fastbicot", *TRAIN, f"--output_dir={d}", "--resume"]))
    assert "resumed from" in proc.stderr and "at step 2" in proc.stderr
    assert _metrics(d) == _metrics(uninterrupted)  # line for line, bit for bit (CPU)
    a, b = _final_weights(d), _final_weights(uninterrupted)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (d / ".tmp-checkpoint-000004").exists()


def test_resume_refuses_a_corrupt_checkpoint_and_a_changed_config(uninterrupted, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(uninterrupted, d)
    shutil.rmtree(d / "final")
    proc = run([sys.executable, "-m", "fastbicot", *TRAIN, f"--output_dir={d}", "--resume",
                 "--rollout.num_generations=2"])
    assert proc.returncode == 2 and "rollout.num_generations" in proc.stderr, proc.stderr[-2000:]
    state = d / "checkpoint-000004" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])  # truncated
    proc = run([sys.executable, "-m", "fastbicot", *TRAIN, f"--output_dir={d}", "--resume"])
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
